"""Constants shared by the nodes: ids, categories, custom types, model folders.

Node ids are public API: saved workflows refer to them. Never rename one after release.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..models.split_files import T5_TOKENIZER_ENV
from ..safe_io import TargetExistsError, name_parts
from ..trainer.launcher import LaunchOptions

# FLUX.1's T5 tokenizer is ComfyUI's own copy (models/split_files.py says why); the training and
# generation processes the nodes start inherit the variable.
os.environ.setdefault(T5_TOKENIZER_ENV, os.path.join(folder_paths.base_path, "comfy", "text_encoders", "t5_tokenizer"))

NODE_ID_PREFIX = "VersaT2I_"
CATEGORY = "VersaT2I"


def node_id(name: str) -> str:
    return NODE_ID_PREFIX + name


def category(*sub: str) -> str:
    return "/".join((CATEGORY, *sub))


def overwrite_refused(error: TargetExistsError, node: str, thing: str, name_input: str) -> TargetExistsError:
    """``error`` in the words of the node's inputs: which input replaces it, which keeps both. The
    same story on every node that writes a result (Save Training Set, Train Aspect LoRA, Train Gate):
    the same inputs again reuse the result; other inputs under the same name are refused unless
    'overwrite' is on (see ``overwrite_tooltip``)."""
    return error.with_fix(f"turn on 'overwrite' in {node} to replace the {thing}, or change '{name_input}' to keep "
                          "both")


def hidden_name_problem(user_name: str, what: str) -> str | None:
    """A part of a typed file name that starts with '.' (a hidden file, and the pack writes its
    temporaries as '.<name>.tmp-<8 hex>'): the training configs refuse it (``output_name_problem``),
    the nodes in the words of their input, when the prompt is queued and when they run."""
    if any(part.startswith(".") for part in name_parts(user_name)):
        return (f"{what} {user_name!r}: a name starting with '.' is hidden (and '.<name>.tmp-...' is how files being "
                "written are named); remove the leading '.'")
    return None


def overwrite_tooltip(thing: str, inputs: str) -> str:
    """The 'overwrite' input's tooltip, the same on every node that writes a result."""
    return (f"Off: queueing again with the same {inputs} reuses the {thing} already made (nothing is redone); "
            f"a {thing} of this name made from other {inputs} is refused and left as it is. On: it is made again "
            "and replaces the old one. The shipped workflows share one 'overwrite' switch between their nodes.")


# Custom socket types passed between our nodes.
Scorers = io.Custom("VERSAT2I_SCORERS")  # loaded reward models, one per aspect
Scores = io.Custom("VERSAT2I_SCORES")  # per-image scores for every aspect + prompts/seeds + scorer ids
Selection = io.Custom("VERSAT2I_SELECTION")  # best-per-prompt picks per aspect (+ the scores they index)
# Per-image generation info (prompt, seed, prompt/candidate index) from the candidate generation node:
# a mapping (or object) with "prompts" and optionally "seeds", "prompt_indices", "candidate_indices",
# "image_ids", one entry per image. Score Images reads it instead of its prompts/seeds text.
Candidates = io.Custom("VERSAT2I_CANDIDATES")
# A DiT's split files (DiT Model Files' output, a trainer's model_files input): a mapping of the node's
# inputs diffusion_model, text_encoder, text_encoder_2 ("none" when unused) and vae to the file names
# as ComfyUI's loaders list them (relative to models/diffusion_models, text_encoders, vae).
ModelFiles = io.Custom("VERSAT2I_MODEL_FILES")

NONE = "none"  # the choice of a model input that is not used (a trainer's ckpt_name when model_files is connected)

# models/versat2i/... holds reward-model weights (and extra_model_paths.yaml may add more roots).
MODEL_FOLDER = "versat2i"
SUPPORTED_WEIGHT_EXTENSIONS = {".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".mat", ".json", ".tflite"}


def register_model_folders() -> None:
    """Register ``models/versat2i`` with ComfyUI. Idempotent; keeps any folders that
    extra_model_paths.yaml already registered under the same name (they are searched too)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))
    folder_paths.folder_names_and_paths[MODEL_FOLDER][1].update(SUPPORTED_WEIGHT_EXTENSIONS)


def model_search_dirs() -> list[str]:
    register_model_folders()
    return list(folder_paths.get_folder_paths(MODEL_FOLDER))


def progress_callback(total: int):
    """A ``(done, total)`` callback driving a ComfyUI progress bar. It also honours Cancel: it raises
    ComfyUI's interruption exception when the user cancelled (the server's progress hook does too,
    but only when one is installed)."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def update(done: int, of: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, of)

    return update



PREVIEW_MAX_SIZE = 512


def preview_image(path: str):
    """A progress-bar preview (ComfyUI's ``(format, PIL image, max size)``) of an image file; None
    when it cannot be read (a preview is never worth failing a training for)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return ("PNG", image.convert("RGB"), PREVIEW_MAX_SIZE)
    except OSError:
        return None


class TrainingHooks:
    """Ties a training child to ComfyUI (``launch_kwargs()`` go to ``train_or_reuse`` /
    ``train_gate_or_reuse``): its step events drive a progress bar, Cancel raises ComfyUI's
    interruption (the launcher then kills the child's process group and keeps its last checkpoint),
    ComfyUI's loaded models are dropped before the child starts so it gets the GPU, and a CPU-only
    ComfyUI trains on the CPU."""

    def __init__(self, total_steps: int):
        import comfy.utils

        self.total_steps = total_steps
        self.bar = comfy.utils.ProgressBar(total_steps)

    def on_event(self, event: dict) -> None:
        if event["event"] in ("start", "step"):
            self.bar.update_absolute(event.get("step", event.get("start_step", 0)), self.total_steps)
        elif event["event"] == "sample" and event["paths"]:
            self.bar.update_absolute(event["step"], self.total_steps, preview=preview_image(event["paths"][0]))

    @staticmethod
    def free_device_memory() -> None:
        import comfy.model_management as mm

        mm.unload_all_models()  # they reload on demand
        mm.soft_empty_cache()

    @staticmethod
    def cancelled() -> bool:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()  # raises; the launcher kills the child first
        return False

    @staticmethod
    def cpu_only() -> bool:
        """ComfyUI runs on the CPU (``--cpu``): the child trains there too."""
        import comfy.model_management as mm

        return mm.cpu_state == mm.CPUState.CPU

    def launch_kwargs(self) -> dict:
        return {"options": LaunchOptions(cpu=self.cpu_only()), "on_event": self.on_event,
                "check_cancel": self.cancelled, "before_launch": self.free_device_memory}

    def finish(self) -> None:
        """Fill the bar (also when a finished result was reused and no step ran)."""
        self.bar.update_absolute(self.total_steps, self.total_steps)

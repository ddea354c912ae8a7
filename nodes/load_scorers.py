"""Load Scorers: choose the reward model of each quality aspect and load it (once: loaded scorers
are cached for the life of the ComfyUI process and shared between runs and graphs).

The weight files the default scorers read are inputs of their own (``clip_weights``,
``aesthetic_weights``): lists of the files in models/versat2i, as a checkpoint loader lists
checkpoints. That is also what lets ComfyUI's frontend see a missing one: a shipped workflow names
the published file and declares where to download it (``properties.models``), and the frontend's
missing-models dialog lists it when the file is not in the folder. With 'download_missing' on, a
missing file is downloaded from the Hugging Face Hub when the node runs (``rewards/download.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import folder_paths
from comfy_api.latest import io

from ..aspects import ASPECTS
from ..rewards.base import Scorer
from ..rewards.cache import stamp_files
from ..rewards.download import downloadable, find_or_download, hub_offline
from ..rewards.registry import DEFAULT_SCORERS, SCORERS, WEIGHT_INPUTS, get_scorer, list_scorers, split_name
from ..rewards.weights import MissingWeightsError, WeightFile
from .common import MODEL_FOLDER, Scorers, category, model_search_dirs, node_id

DISABLED = "disabled"
DEVICES = ("auto", "cpu")
DOWNLOAD_INPUT = "download_missing"

ASPECT_TOOLTIPS = {
    "aesthetics": "How pleasing the image looks. Default: LAION improved aesthetic predictor (reads clip_weights "
                  "and aesthetic_weights).",
    "alignment": "How well the image matches its prompt. Default: CLIP score on CLIP ViT-L/14 (reads clip_weights); "
                 "hps-v2.1 and pickscore-v1 when their weights are installed.",
    "geometry": "Anatomy plausibility, 0..1. Default: MediaPipe hand and body landmarks (optional extra "
                "'geometry'). Images without a person score 0 and are never kept for this aspect.",
    "lowlevel": "Low-level quality (noise, blur, artefacts). Default: CLIP-IQA on the shared CLIP backbone (reads "
                "clip_weights); pyiqa metrics are an optional, non-commercially licensed extra.",
}
WEIGHT_TOOLTIPS = {
    "clip_weights": "CLIP ViT-L/14 (OpenAI) in open_clip format, shared by the CLIP-based scorers: a file in "
                    "models/versat2i/clip/. Published as open_clip_model.safetensors at "
                    "huggingface.co/timm/vit_large_patch14_clip_224.openai.",
    "aesthetic_weights": "The LAION aesthetic MLP: a file in models/versat2i/aesthetic/. Published as "
                         "sac+logos+ava1-l14-linearMSE.pth at huggingface.co/camenduru/improved-aesthetic-predictor.",
}


def scorer_choices() -> list[str]:
    return [DISABLED, *list_scorers()]


def weight_file_choices(spec: WeightFile) -> list[str]:
    """The files in models/versat2i (all its folders) under the spec's sub-folder, as ComfyUI lists them."""
    subfolder = spec.relative_path.split("/", 1)[0] + "/"
    return [name for name in folder_paths.get_filename_list(MODEL_FOLDER) if name.replace("\\",
                                                                                          "/").startswith(subfolder)]


def weight_options(chosen: Mapping[str, str | None]) -> dict[str, str]:
    """Scorer options for the chosen weight files (``{option: relative name}``). A listed file, or the
    published name (looked up, with the names earlier versions used, and downloadable when missing);
    the published name itself needs no option. Anything else is refused: the value comes from a web
    page, and only files of ComfyUI's own listing or the known names may be read."""
    options = {}
    for option, spec in WEIGHT_INPUTS.items():
        value = chosen.get(option) or spec.relative_path
        if value == spec.relative_path:
            continue
        if value not in weight_file_choices(spec):
            subfolder = spec.relative_path.split("/", 1)[0]
            raise ValueError(f"{option} {value!r}: not a file in models/{MODEL_FOLDER}/{subfolder}/; pick one from the "
                             f"list (press R to refresh), or choose {spec.relative_path!r}, the published file")
        options[option] = value
    return options


def resolve_device(device: str) -> str:
    """"auto" is the device ComfyUI runs its models on (honours --cpu, --directml...)."""
    if device not in DEVICES:  # a linked input skips validate_inputs
        raise ValueError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        import comfy.model_management

        return str(comfy.model_management.get_torch_device())
    return device


def load_scorers(choices: Mapping[str, str], *, search_dirs: Sequence[str], device: str,
                 weights: Mapping[str, str] | None = None, download: bool = False) -> dict[str, Scorer]:
    """``{aspect: scorer name}`` -> ``{aspect: Scorer}``, skipping "disabled" aspects. Scorers come
    from the registry's cache, so a second run (or another Load Scorers node) reuses the models.

    Only listed names reach the registry, and as options only the weight files of ``weights``
    (``weight_options``): node inputs come from a web page, and scorer options can name weight files
    anywhere on disk (``clip_weights="/abs/path"``). ``download``: fetch a missing published weight
    file (``rewards/download.py``) into the first models/versat2i folder, then load."""
    known = scorer_choices()
    for aspect, name in choices.items():
        if name not in known:  # ComfyUI 0.3.64 lets V3 combo values through
            raise ValueError(f"{aspect}: unknown scorer {name!r}; choose one of: {', '.join(known)}")
    if all(name == DISABLED for name in choices.values()):
        raise ValueError("Load Scorers: every aspect is 'disabled'; choose a scorer for at least one aspect")
    files = weight_options(weights or {})
    scorers = {}
    for aspect, name in choices.items():
        if name == DISABLED:
            continue
        options = {k: v for k, v in files.items() if k in SCORERS[split_name(name)[0]].weight_inputs}
        try:
            scorers[aspect] = find_or_download(
                lambda name=name, options=options: get_scorer(name, search_dirs=search_dirs, device=device, **options),
                search_dirs[0], download=download and not hub_offline(), progress=download_progress())
        except MissingWeightsError as exc:
            raise missing_weights_in_ui_words(exc, download) from None
    return scorers


def missing_weights_in_ui_words(exc: MissingWeightsError, download: bool) -> MissingWeightsError:
    """The error with what the node offers: its download switch, and the input that names the file."""
    lines = [str(exc)]
    option = next((k for k, spec in WEIGHT_INPUTS.items() if exc.subfolder == spec.relative_path.split("/")[0]), None)
    if option is not None:
        lines.append(f"Or pick another file in Load Scorers' '{option}'.")
    if downloadable(exc.relative_path) is not None:
        if not download:
            lines.append(f"Or turn on '{DOWNLOAD_INPUT}' in Load Scorers to download it from the Hugging Face Hub.")
        elif hub_offline():
            lines.append(f"('{DOWNLOAD_INPUT}' is on, but HF_HUB_OFFLINE is set, which turns downloads off.)")
    exc.args = ("\n".join(lines),)
    return exc


def download_progress():
    """A (bytes done, total) callback driving a ComfyUI progress bar made on the first call (the size is
    known once the download starts); it raises ComfyUI's interruption on Cancel (the partial file stays
    and the next run resumes it)."""
    import comfy.model_management
    import comfy.utils

    bars: dict[int, comfy.utils.ProgressBar] = {}

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar = bars.get(total) or bars.setdefault(total, comfy.utils.ProgressBar(max(total, 1)))
        bar.update_absolute(min(done, max(total, 1)), max(total, 1))

    return update


class LoadScorers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = scorer_choices()
        return io.Schema(
            node_id=node_id("LoadScorers"),
            display_name="Load Scorers (VersaT2I)",
            category=category("score"),
            description=(
                "Loads one reward model per quality aspect for Score Images. Weights are read from "
                "ComfyUI's models/versat2i folder (and extra_model_paths.yaml entries named 'versat2i'), under "
                "their published names. Nothing is downloaded unless 'download_missing' is on: a missing file is "
                "an error naming the file, the folder to put it in and where to get it. Loaded models stay cached "
                "between runs; scorers on the same backbone share it."
            ),
            inputs=[
                *[
                    io.Combo.Input(aspect, options=choices, default=DEFAULT_SCORERS[aspect],
                                   tooltip=f"{ASPECT_TOOLTIPS[aspect]} 'disabled' skips this aspect.")
                    for aspect in ASPECTS
                ],
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="Where the scorers run. 'auto' = the device ComfyUI uses for its models."),
                *[
                    io.Combo.Input(option, options=weight_file_choices(spec), default=spec.relative_path,
                                   optional=True,
                                   tooltip=WEIGHT_TOOLTIPS[option] + " Used by the scorers that read it.")
                    for option, spec in WEIGHT_INPUTS.items()
                ],
                io.Boolean.Input(DOWNLOAD_INPUT, default=False, optional=True,
                                 tooltip="Download missing weight files: when a chosen scorer's published weight "
                                         "file is not in models/versat2i, fetch it from the Hugging Face Hub (with "
                                         "a progress bar; an interrupted download resumes; the sha256 is checked). "
                                         "Off: nothing is downloaded. Always off when HF_HUB_OFFLINE=1."),
            ],
            outputs=[
                Scorers.Output("scorers", display_name="scorers",
                               tooltip="The loaded scorers, one per enabled aspect; connect to Score Images."),
            ],
        )

    @classmethod
    def validate_inputs(cls, clip_weights: str | None = None, aesthetic_weights: str | None = None) -> bool:
        # Taking the weight-file inputs here turns off ComfyUI 0.33's own check of their values
        # (listed files only): a missing published file is a valid choice when 'download_missing' is
        # on. They are checked when the node runs (weight_options: listed files or the published
        # names only); ComfyUI's frontend flags a missing one when the workflow is opened.
        return True

    @classmethod
    def fingerprint_inputs(cls, aesthetics: str | None = None, alignment: str | None = None,
                           geometry: str | None = None, lowlevel: str | None = None,
                           device: str | None = None, **weights) -> tuple | float:
        """ComfyUI reuses this node's cached output while its inputs and this value stay the same,
        so the value is the identity (path, size, mtime, inode, ctime) of every weight file the chosen
        scorers read: a replaced file makes ComfyUI run the node again, and the registry then loads
        the new weights. The scorers come from the registry's cache (loaded here on the first run;
        ``execute`` then reuses them), so this costs a few ``stat`` calls per run. Linked inputs arrive
        as None and are left out. A missing file (nothing is downloaded here) or another failure: the
        node runs, and ``execute`` downloads it or reports the error."""
        if device is None:
            return ("device input linked",)
        names = (aesthetics, alignment, geometry, lowlevel)
        chosen = {aspect: name for aspect, name in zip(ASPECTS, names, strict=True) if name is not None}
        try:
            scorers = load_scorers(chosen, search_dirs=model_search_dirs(), device=resolve_device(device),
                                   weights={k: v for k, v in weights.items() if k in WEIGHT_INPUTS})
        except (MissingWeightsError, ValueError):
            return math.nan
        return tuple((aspect, scorer.scorer_id, stamp_files(scorer.weight_files()))
                     for aspect, scorer in sorted(scorers.items()))

    @classmethod
    def execute(cls, aesthetics: str, alignment: str, geometry: str, lowlevel: str, device: str,
                clip_weights: str | None = None, aesthetic_weights: str | None = None,
                download_missing: bool = False) -> io.NodeOutput:
        choices = {"aesthetics": aesthetics, "alignment": alignment, "geometry": geometry, "lowlevel": lowlevel}
        scorers = load_scorers(choices, search_dirs=model_search_dirs(), device=resolve_device(device),
                               weights={"clip_weights": clip_weights, "aesthetic_weights": aesthetic_weights},
                               download=download_missing)
        return io.NodeOutput(scorers)


NODES = [LoadScorers]

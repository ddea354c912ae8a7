"""Load Scorers: choose the reward model of each quality aspect and load it (once: loaded scorers
are cached for the life of the ComfyUI process and shared between runs and graphs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from comfy_api.latest import io

from ..aspects import ASPECTS
from ..rewards.base import Scorer
from ..rewards.cache import stamp_files
from ..rewards.registry import DEFAULT_SCORERS, get_scorer, list_scorers
from .common import Scorers, category, model_search_dirs, node_id

DISABLED = "disabled"
DEVICES = ("auto", "cpu")

ASPECT_TOOLTIPS = {
    "aesthetics": "How pleasing the image looks. Default: LAION improved aesthetic predictor (needs CLIP ViT-L/14 "
                  "and its MLP weights under models/versat2i).",
    "alignment": "How well the image matches its prompt. Default: CLIP score on CLIP ViT-L/14; hps-v2.1 and "
                 "pickscore-v1 when their weights are installed.",
    "geometry": "Anatomy plausibility, 0..1. Default: MediaPipe hand and body landmarks (optional extra "
                "'geometry'). Images without a person score 0 and are never kept for this aspect.",
    "lowlevel": "Low-level quality (noise, blur, artefacts). Default: CLIP-IQA on the shared CLIP backbone; "
                "pyiqa metrics are an optional, non-commercially licensed extra.",
}


def scorer_choices() -> list[str]:
    return [DISABLED, *list_scorers()]


def resolve_device(device: str) -> str:
    """"auto" is the device ComfyUI runs its models on (honours --cpu, --directml...)."""
    if device not in DEVICES:  # a linked input skips validate_inputs
        raise ValueError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        import comfy.model_management

        return str(comfy.model_management.get_torch_device())
    return device


def load_scorers(choices: Mapping[str, str], *, search_dirs: Sequence[str], device: str) -> dict[str, Scorer]:
    """``{aspect: scorer name}`` -> ``{aspect: Scorer}``, skipping "disabled" aspects. Scorers come
    from the registry's cache, so a second run (or another Load Scorers node) reuses the models.

    Only listed names and no options reach the registry: node inputs come from a web page, and
    scorer options can name weight files anywhere on disk (``clip_weights="/abs/path"``)."""
    known = scorer_choices()
    for aspect, name in choices.items():
        if name not in known:  # a linked input skips validate_inputs
            raise ValueError(f"{aspect}: unknown scorer {name!r}; choose one of: {', '.join(known)}")
    scorers = {aspect: get_scorer(name, search_dirs=search_dirs, device=device)
               for aspect, name in choices.items() if name != DISABLED}
    if not scorers:
        raise ValueError("Load Scorers: every aspect is 'disabled'; choose a scorer for at least one aspect")
    return scorers


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
                "ComfyUI's models/versat2i folder (and extra_model_paths.yaml entries named 'versat2i'); "
                "nothing is downloaded: a missing file is an error naming the file and the folder to put "
                "it in. Loaded models stay cached between runs; scorers on the same backbone share it."
            ),
            inputs=[
                *[
                    io.Combo.Input(aspect, options=choices, default=DEFAULT_SCORERS[aspect],
                                   tooltip=f"{ASPECT_TOOLTIPS[aspect]} 'disabled' skips this aspect.")
                    for aspect in ASPECTS
                ],
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="Where the scorers run. 'auto' = the device ComfyUI uses for its models."),
            ],
            outputs=[
                Scorers.Output("scorers", display_name="scorers",
                               tooltip="The loaded scorers, one per enabled aspect; connect to Score Images."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # ComfyUI 0.3.64 does not check V3 combo values itself; a value from an edited or old
        # workflow must be refused here, before anything runs. None = linked, checked at run time.
        choices = scorer_choices()
        for aspect in ASPECTS:
            value = inputs.get(aspect)
            if value is not None and value not in choices:
                return f"{aspect}: unknown scorer {value!r}; choose one of: {', '.join(choices)}"
        device = inputs.get("device")
        if device is not None and device not in DEVICES:
            return f"device: {device!r} is not one of {', '.join(DEVICES)}"
        if all(inputs.get(aspect) == DISABLED for aspect in ASPECTS):
            return "every aspect is 'disabled'; choose a scorer for at least one aspect"
        return True

    @classmethod
    def fingerprint_inputs(cls, aesthetics: str | None = None, alignment: str | None = None,
                           geometry: str | None = None, lowlevel: str | None = None,
                           device: str | None = None) -> tuple:
        """ComfyUI reuses this node's cached output while its inputs and this value stay the same,
        so the value is the identity (path, size, mtime, inode, ctime) of every weight file the chosen scorers read: a
        replaced file makes ComfyUI run the node again, and the registry then loads the new weights.
        The scorers come from the registry's cache (loaded here on the first run; ``execute`` then
        reuses them), so this costs a few ``stat`` calls per run. Linked inputs arrive as None and
        are left out. A failure propagates: ComfyUI logs it, runs the node, and ``execute`` reports
        the error."""
        if device is None:
            return ("device input linked",)
        names = (aesthetics, alignment, geometry, lowlevel)
        chosen = {aspect: name for aspect, name in zip(ASPECTS, names, strict=True)
                  if name is not None and name != DISABLED}
        if not chosen:
            return ()
        scorers = load_scorers(chosen, search_dirs=model_search_dirs(), device=resolve_device(device))
        return tuple((aspect, scorer.scorer_id, stamp_files(scorer.weight_files()))
                     for aspect, scorer in sorted(scorers.items()))

    @classmethod
    def execute(cls, aesthetics: str, alignment: str, geometry: str, lowlevel: str, device: str) -> io.NodeOutput:
        choices = {"aesthetics": aesthetics, "alignment": alignment, "geometry": geometry, "lowlevel": lowlevel}
        scorers = load_scorers(choices, search_dirs=model_search_dirs(), device=resolve_device(device))
        return io.NodeOutput(scorers)


NODES = [LoadScorers]

"""Gated Multi-LoRA Loader: apply the aspect LoRAs mixed by a learned gate (a MoL file), or a list
of LoRAs with manual / equal weights, to MODEL and CLIP."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..models.lora_files import LORA_FIX
from ..safe_io import file_identity
from ..trainer.mol_file import MOL_SUFFIX, load_mol, read_mol, resolve_loras
from . import model_patching
from .common import category, node_id

logger = logging.getLogger(__name__)

NO_MOL_FILE = "none (use the LoRA list)"
MODES = ("bake", "dynamic", "equal", "manual")
MODE_HELP = (
    "bake: evaluate the learned gate once (prompt gates: on the optional prompt; layer gates: their learned weights; "
    "token gates: the mean gate recorded at training) and merge it into the weights: sampling costs the same as the "
    "base model. A gate that reads the timestep changes at every step and cannot be merged once: bake applies it "
    "dynamically. dynamic: compute the gate at run time (per token, per prompt and per timestep for every sample, "
    "uncond included): a small cost per step. equal: every enabled LoRA at weight 1/N (the naive merge baseline). "
    "manual: the weights typed in the LoRA list."
)


def mol_file_options() -> list[str]:
    return [NO_MOL_FILE] + [name for name in folder_paths.get_filename_list("loras") if name.endswith(MOL_SUFFIX)]


def parse_weight_lines(text: str, *, what: str) -> list[tuple[str, float | None]]:
    """``name = weight`` entries, one per line or comma separated; a bare name has no weight."""
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        weight = None
        if sep:
            try:
                weight = float(value)
            except ValueError:
                raise ValueError(f"{what}: {line!r} has weight {value.strip()!r}, not a number; "
                                 "write e.g. 'name = 0.8'") from None
        entries.append((name, weight))
    return entries


def aspect_of(lora_file: str) -> str:
    name = Path(lora_file).name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else Path(name).stem


def load_aspect_lora(aspect: str, path: str | os.PathLike) -> model_patching.AspectLoRA:
    try:
        state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as exc:  # safetensors and torch.load raise their own types, naming no file
        raise ValueError(f"LoRA file {str(path)!r}: cannot be read ({type(exc).__name__}: {exc}); it is damaged, "
                         f"truncated or not a LoRA file; {LORA_FIX}") from exc
    if not state_dict:
        raise ValueError(f"LoRA file {str(path)!r}: holds no tensors; {LORA_FIX}")
    return model_patching.AspectLoRA(aspect, Path(path).name, state_dict)


class GatedMultiLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("GatedMultiLoRALoader"),
            display_name="Gated Multi-LoRA Loader (Mixture of LoRA)",
            category=category("mix"),
            description=(
                "Applies several aspect LoRAs at once, mixed per layer by the gate learned with Train Gate (or "
                "'versat2i train-gate'; a .mol.safetensors file next to the LoRAs), so the aspects don't fight. "
                "Without a MoL file it merges a list of LoRAs with equal or manual weights. Works before or after "
                "stock LoRA loaders."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (the base the LoRAs were trained on)."),
                io.Combo.Input(
                    "mol_file",
                    options=mol_file_options(),
                    tooltip="The gate file (models/loras/.../*.mol.safetensors). Its LoRAs are found next to it and "
                    "checked by sha256.",
                ),
                io.Combo.Input("mode", options=list(MODES), default="bake", tooltip=MODE_HELP),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="Global strength of the whole mixture (multiplies every LoRA's weight).",
                ),
                io.String.Input(
                    "disabled_aspects", default="", optional=True,
                    tooltip="Aspects to switch off, comma separated (e.g. 'geometry, lowlevel'). The gate renormalises "
                    "over the rest. Without a MoL file an aspect is a LoRA's file name without extension.",
                ),
                io.String.Input(
                    "loras", default="", multiline=True, optional=True,
                    tooltip="Without a MoL file: the LoRAs to mix, one per line as 'folder/file.safetensors = weight' "
                    "(weight used by mode 'manual', default 1). With a MoL file: optional 'aspect = weight' lines "
                    "for mode 'manual' (unlisted aspects weigh 1).",
                ),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP; its text-encoder LoRA layers are mixed too."),
                io.Conditioning.Input(
                    "conditioning", optional=True,
                    tooltip="bake with a prompt gate: a CLIP Text Encode of one prompt to evaluate the gate on, "
                    "taken as "
                    "it is. It can only come from a CLIP upstream of this node, i.e. encoded WITHOUT the mixed "
                    "text-encoder LoRAs: when the LoRAs adapt the text encoder, the baked gate then differs from what "
                    "dynamic mode and training compute. Prefer the prompt input.",
                ),
                io.String.Input(
                    "prompt", default="", multiline=True, optional=True,
                    tooltip="bake with a prompt gate: the prompt to evaluate the gate on (normally your positive "
                    "prompt), encoded with this node's own mixed CLIP, as dynamic mode and gate training see it (so "
                    "bake equals dynamic at cfg 1). Needs the clip input. Empty: the conditioning input if connected, "
                    "else the mean gate recorded at training. Ignored by token gates and other modes.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="MODEL with the mixed LoRAs (a patched clone)."),
                io.Clip.Output(display_name="CLIP",
                               tooltip="CLIP with the mixed text-encoder LoRAs (None if no CLIP came in)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mol_file: str | None = None) -> bool | str:
        # ComfyUI 0.3.64 doesn't check V3 combo values itself, and attaches what this returns to every
        # input it takes: one input, so a missing MoL file is one error, on mol_file. The mode (and
        # whether it needs a MoL file) is checked when the node runs.
        if mol_file is not None and mol_file not in mol_file_options():
            return (f"mol_file {mol_file!r}: no such MoL file in models/loras; train it first (Train Gate), or pick "
                    "one from the list (press R to refresh)")
        return True

    @classmethod
    def fingerprint_inputs(cls, mol_file, loras="", **inputs):
        # ComfyUI reuses the last output while the inputs are unchanged; the files on disk are
        # inputs too: a LoRA or MoL file retrained or swapped under the same name must re-run the
        # node (and so hit the sha256 check). Linked inputs are keyed by ComfyUI itself.
        try:
            return tuple(file_identity(path) for path in mixture_files(mol_file, loras or ""))
        except Exception:  # a bad input is reported by execute: re-run to get there
            return math.nan

    @classmethod
    def execute(cls, model, mol_file, mode, strength, disabled_aspects="", loras="", clip=None, conditioning=None,
                prompt="") -> io.NodeOutput:
        if mode not in MODES:  # ComfyUI 0.3.64 lets V3 combo values through
            raise ValueError(f"mode {mode!r}: unknown; choose one of {', '.join(MODES)}")
        gate, aspect_loras, manual = resolve_mixture(mol_file, mode, loras or "")
        enabled = enabled_aspects([lora.aspect for lora in aspect_loras], disabled_aspects or "")
        prompt = (prompt or "").strip() or None
        context = None
        if mode == "bake" and conditioning is not None and gate is not None:
            context = model_patching.conditioning_prompt_input(conditioning, gate)
        new_model, new_clip = model_patching.apply_mixture(
            model, clip, aspect_loras, mode=mode, gate=gate, enabled=enabled, manual_weights=manual,
            strength=strength, context=context, prompt=prompt if mode == "bake" else None,
        )
        return io.NodeOutput(new_model, new_clip)


def mixture_files(mol_file: str, loras_text: str) -> list[Path]:
    """The files a run of the node reads: the MoL file and its LoRAs (found as ``load_mol`` finds
    them, not hashed), or the LoRAs of the list."""
    if mol_file != NO_MOL_FILE:
        mol_path = folder_paths.get_full_path_or_raise("loras", mol_file)
        mol = resolve_loras(read_mol(mol_path), folder_paths.get_folder_paths("loras"), check_hashes=False)
        return [Path(mol_path), *mol.lora_paths]
    files = []
    for name, _ in parse_weight_lines(loras_text, what="loras"):
        path = folder_paths.get_full_path("loras", name)
        if path is None:
            raise FileNotFoundError(name)
        files.append(Path(path))
    return files


def resolve_mixture(mol_file: str, mode: str, loras_text: str):
    """(gate or None, the aspect LoRAs in gate order, manual weights per aspect)."""
    entries = parse_weight_lines(loras_text, what="loras")
    if mol_file != NO_MOL_FILE:
        mol_path = folder_paths.get_full_path_or_raise("loras", mol_file)
        mol = load_mol(mol_path, search_dirs=folder_paths.get_folder_paths("loras"))
        known = set(mol.aspects)
        unknown = [name for name, _ in entries if name not in known]
        if unknown:
            raise ValueError(f"loras: {unknown} are not aspects of {mol_file!r}; it mixes {', '.join(mol.aspects)}")
        weights = {name: (1.0 if weight is None else weight) for name, weight in entries}
        aspect_loras = [load_aspect_lora(a, p) for a, p in zip(mol.aspects, mol.lora_paths)]
        return mol.gate, aspect_loras, [weights.get(a, 1.0) for a in mol.aspects]
    if mode in ("bake", "dynamic"):
        raise ValueError(f"mode {mode!r} needs a learned gate: pick a MoL file, or use mode 'equal' / 'manual'")
    if not entries:
        raise ValueError("loras: empty; list the LoRA files to mix, one per line ('folder/file.safetensors = 0.8'), "
                         "or pick a MoL file")
    aspect_loras, manual = [], []
    for name, weight in entries:
        path = folder_paths.get_full_path("loras", name)
        if path is None:
            raise FileNotFoundError(f"loras: LoRA {name!r} is not in models/loras; put it there or fix the name")
        aspect_loras.append(load_aspect_lora(aspect_of(name), path))
        manual.append(1.0 if weight is None else weight)
    aspects = [lora.aspect for lora in aspect_loras]
    if len(set(aspects)) != len(aspects):
        raise ValueError(f"loras: two LoRAs share a file name ({aspects}); rename one")
    return None, aspect_loras, manual


def enabled_aspects(aspects: list[str], disabled_text: str) -> list[str] | None:
    disabled = [name for name, _ in parse_weight_lines(disabled_text, what="disabled_aspects")]
    if not disabled:
        return None
    unknown = sorted(set(disabled) - set(aspects))
    if unknown:
        raise ValueError(f"disabled_aspects: {unknown} unknown; this mixture has {', '.join(aspects)}")
    enabled = [a for a in aspects if a not in disabled]
    if not enabled:
        raise ValueError("disabled_aspects: every aspect is switched off; keep at least one (or bypass the node)")
    return enabled


NODES = [GatedMultiLoRALoader]

"""Load a Stable Diffusion base model for LoRA training: a ComfyUI checkpoint file or a diffusers folder.

``load_base_model(path)`` accepts

* a single-file checkpoint in the original layout ComfyUI users have (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``), ``.safetensors``
  (or a legacy ``.ckpt`` read with ``torch.load(weights_only=True)``). It is converted by diffusers'
  own single-file loading (``from_single_file`` for the UNet and VAE, diffusers' CLIP converter for
  the text encoders) against the diffusers configs shipped in ``models/configs/<arch>/``, so
  nothing is fetched from a model hub;
* a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``...).

Configs for a single file, first found wins: ``config_dir=`` when given; else a *sidecar* folder
``<checkpoint stem>.configs/`` next to the checkpoint (``my_model.safetensors`` ->
``my_model.configs/``): a diffusers model folder holding only the configs (``unet/config.json``,
``vae/config.json``, ``text_encoder[_2]/config.json``, ``tokenizer[_2]/``,
``scheduler/scheduler_config.json``), no weights. It describes checkpoints whose shapes are not the
standard ones (the nodes name checkpoints by file, so they cannot pass ``config_dir``). Keep weights
out of it: ComfyUI lists every ``.safetensors`` under models/checkpoints as a checkpoint. Else the
configs shipped for the detected architecture.

Supported architectures: SD1.x (``sd15``), SD2.x (``sd2``, epsilon or v-prediction) and SDXL base
(``sdxl``); and the DiT families FLUX.1 (``flux1``: dev, schnell), FLUX.2-klein (``flux2_klein``: 4B,
9B) and Z-Image (``zimage``) from the split files ComfyUI users have (``text_encoders=`` and ``vae=``
beside the diffusion model, or a full checkpoint, or a diffusers folder; ``models/split_files.py``).
Anything else (SDXL refiner, inpainting, unCLIP, SD3, Chroma...) is a ``ValueError`` naming what was
found.

Prediction type (``prediction_type="auto"``): a diffusers folder says it in
``scheduler/scheduler_config.json``. A single file does not, so it is inferred the way ComfyUI
infers it: a ``v_pred`` key marks a v-prediction checkpoint (SDXL v-pred finetunes; ``ztsnr`` adds
zero-terminal-SNR betas); for SD2 ComfyUI's heuristic (std of
``output_blocks.11.1.transformer_blocks.0.norm1.bias`` > 0.09 means the 768-v model) decides;
everything else is epsilon. When the guess is wrong for a model, pass ``prediction_type`` explicitly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..safe_io import sha256_file
from .architectures import (
    ARCHITECTURE_NAMES,
    ARCHITECTURES,
    SUPPORTED,
    UNET_PREFIX,
    VAE_PREFIX,
    Architecture,
    UnsupportedModel,
    Variant,
    detect_diffusers_folder,
    detect_single_file,
    single_file_prediction_type,
)
from .split_files import (
    ModelFiles,
    folder_architecture,
    inspect_model_files,
    is_dit_diffusion_model,
    load_folder_components,
    load_model_files,
)

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_MATCHING = "flow_matching"  # the prediction type of the DiT families: velocity noise - x0
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass
class BaseModel:
    """A loaded base model, ready for LoRA training (all modules in eval mode, on the CPU).

    ``architecture`` is the family's table entry (``architectures.py``); ``arch`` its name.
    ``denoiser`` is the diffusers denoiser (a UNet for the SD families). ``text_encoders`` /
    ``tokenizers``: in the order of the entry's ``text_encoders``. ``noise_scheduler`` is a
    ``DDPMScheduler`` built from the model's scheduler config (training uses ``add_noise`` /
    ``get_velocity``). ``vae`` is ``None`` when a
    single file carries no VAE (train from cached latents then). ``source_sha256`` is the SHA-256 of
    the checkpoint file (for a folder: of the sorted relative paths and SHA-256s of
    ``model_index.json`` and the files of the loaded component sub-folders), or ``""`` when loading
    was asked to skip hashing.
    """

    architecture: Architecture
    prediction_type: str
    denoiser: Any
    vae: Any | None
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    source_sha256: str
    source_path: str
    source_format: str = "single_file"          # "single_file" | "diffusers"
    vae_scaling_factor: float = 0.18215
    vae_scale_factor: int = 8                   # pixels per latent cell
    resolution: int = 512                       # the model's native training resolution
    config_dir: str = ""                        # diffusers configs the single file was read with
    notes: list[str] = field(default_factory=list)  # how arch / prediction type were decided
    # the DiT families: the released model it is, the VAE's latent shift, every file read
    variant: Variant | None = None
    vae_shift_factor: float | None = None
    source_files: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.architecture.name


# --------------------------------------------------------------------------------------------
# hashing


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, cached per file identity (``safe_io.sha256_file``): a multi-GB
    checkpoint is hashed once per process."""

    return sha256_file(path)


def folder_sha256(folder: str | os.PathLike, components: Sequence[str] | None = None) -> str:
    """Hash of a diffusers folder: relative paths and contents of ``model_index.json`` and every
    file in the ``components`` sub-folders (default: all files), in sorted order. Limiting it to
    the loaded components keeps safety checkers, ONNX exports and ``.git`` out of the identity."""
    folder = Path(folder)
    roots = [folder / name for name in components] if components is not None else [folder]
    files = {p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()}
    if components is not None and (folder / "model_index.json").is_file():
        files.add(folder / "model_index.json")
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# tokenizers


def build_clip_tokenizer(*, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """The real CLIP BPE tokenizer (the one every SD text encoder uses), built offline.

    Built from the BPE merges file open_clip ships inside its wheel (``bpe_simple_vocab_16e6.txt.gz``,
    MIT, from OpenAI CLIP), the same construction as open_clip's ``SimpleTokenizer``: its ids equal
    the Hugging Face ``openai/clip-vit-large-patch14`` ``vocab.json``. Shipping the 1.6 MB
    vocab/merges files per architecture would add nothing. ``pad_token="!"`` is what SD2 and SDXL's
    second tokenizer use (id 0); SD1.x and SDXL's first tokenizer pad with the end token.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Same slice as open_clip.SimpleTokenizer: skip the version header, 48894 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


def load_clip_tokenizer(folder: str | os.PathLike):
    """A CLIPTokenizer from ``folder``: its own vocab files when present, else the offline CLIP BPE
    with the settings in ``tokenizer_config.json`` (pad token, max length) — the form shipped in
    ``model_configs``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no tokenizer in {folder}: expected vocab.json + merges.txt or tokenizer_config.json")
    config = json.loads(config_file.read_text())
    return build_clip_tokenizer(pad_token=config.get("pad_token", "<|endoftext|>"),
                                model_max_length=int(config.get("model_max_length", 77)))


# --------------------------------------------------------------------------------------------
# single-file inspection


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of a single-file checkpoint; clear errors for missing / corrupt / unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"base model checkpoint not found: {path}. Put the .safetensors file in ComfyUI's "
            "models/checkpoints folder (or pass the path of a diffusers model folder)."
        )
    if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{path}: not a checkpoint file (expected one of {', '.join(_SINGLE_FILE_SUFFIXES)})")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            # Legacy pickle checkpoints: weights only, never arbitrary objects.
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle raise many types for a damaged file
        hint = ("the file is damaged or not a model checkpoint; re-download it" if path.suffix.lower() == ".safetensors"
                else "it is damaged, or a pickle holding more than tensors (refused for safety); use the "
                     ".safetensors version of this model")
        raise ValueError(f"{path}: cannot read this checkpoint ({type(exc).__name__}: {exc}); {hint}") from exc
    while isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    return state_dict


def _describe_keys(state_dict: dict) -> str:
    """A short 'found' summary for error messages: the top key groups and diffusers' own guess."""
    groups: dict[str, int] = {}
    for key in state_dict:
        head = ".".join(key.split(".")[:2])
        groups[head] = groups.get(head, 0) + 1
    top = ", ".join(f"{k}.* ({n})" for k, n in sorted(groups.items(), key=lambda kv: -kv[1])[:6])
    guess = ""
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        model_type = infer_diffusers_model_type(state_dict)
        if model_type not in ("v1", "v2", "xl_base"):
            guess = f"; diffusers identifies it as '{model_type}'"
    except (KeyError, IndexError, ValueError, AttributeError) as exc:  # the guess is only a hint
        logger.debug("diffusers could not name the checkpoint type: %s", exc)
    return f"{len(state_dict)} tensors, key groups {top}{guess}"


def detect_checkpoint_architecture(state_dict: Mapping[str, torch.Tensor], *, name: str = "checkpoint") -> Architecture:
    """The family of an original-layout state dict (``architectures.detect_single_file``); an
    unsupported file is a ``ValueError`` naming the file, what it is and what is supported."""
    try:
        return detect_single_file(state_dict)
    except UnsupportedModel as exc:
        raise ValueError(f"{name}: unsupported checkpoint architecture: {exc} "
                         f"(found {_describe_keys(state_dict)}). Supported: {SUPPORTED}.") from None


def detect_checkpoint_prediction_type(architecture: Architecture, state_dict: Mapping[str, torch.Tensor]
                                      ) -> tuple[str, str]:
    """(prediction_type, why) for a single-file checkpoint (``architectures.single_file_prediction_type``)."""
    try:
        return single_file_prediction_type(architecture, state_dict)
    except UnsupportedModel as exc:
        raise ValueError(f"{exc}. Supported: {SUPPORTED}.") from None


# --------------------------------------------------------------------------------------------
# loading


def _check_choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value != "auto" and value not in allowed:
        raise ValueError(f"{what}={value!r}: expected 'auto' or one of {', '.join(allowed)}")
    return value


SIDECAR_CONFIG_SUFFIX = ".configs"


def sidecar_config_dir(checkpoint: str | os.PathLike) -> Path | None:
    """The ``<stem>.configs/`` folder next to a single-file checkpoint, when it holds a UNet config.

    A folder of that name without ``unet/config.json`` is an error rather than silently ignored:
    whoever made it meant it to describe the checkpoint.
    """
    checkpoint = Path(checkpoint)
    folder = checkpoint.with_name(checkpoint.stem + SIDECAR_CONFIG_SUFFIX)
    if not folder.is_dir():
        return None
    if not any((folder / arch.denoiser_component / "config.json").is_file() for arch in ARCHITECTURES.values()):
        raise FileNotFoundError(
            f"{folder}: this sidecar config folder of {checkpoint.name} has no unet/config.json; it must be a "
            "diffusers model folder with the configs (unet/, vae/, text_encoder/, tokenizer/, scheduler/), or "
            "remove it to use the configs shipped for the architecture")
    return folder


def model_source_paths(path: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> list[Path]:
    """What ``load_base_model(path, config_dir=...)`` reads from disk: the checkpoint (file or
    folder), plus the config folder in effect for a single file (``config_dir``, else a sidecar
    ``<stem>.configs/``). Fingerprints hash these, so editing a sidecar config retrains like
    replacing the checkpoint does. Never raises: a broken sidecar is the loader's error to report."""
    source = Path(path).expanduser()
    paths = [source]
    if config_dir:
        paths.append(Path(config_dir))
    elif not source.is_dir():
        sidecar = source.with_name(source.stem + SIDECAR_CONFIG_SUFFIX)
        if sidecar.is_dir():
            paths.append(sidecar)
    return paths


def _resolve_config_dir(architecture: Architecture, config_dir: str | os.PathLike | None) -> Path:
    folder = Path(config_dir) if config_dir is not None else CONFIG_ROOT / architecture.name
    if not (folder / architecture.denoiser_component / "config.json").is_file():
        raise FileNotFoundError(f"diffusers configs for {architecture.name} not found in {folder} (expected "
                                f"{architecture.denoiser_component}/config.json, "
                                "vae/config.json, text_encoder/config.json, tokenizer/, scheduler/)")
    return folder


def _training_scheduler(config_dir: Path, prediction_type: str, *, zero_terminal_snr: bool = False):
    """DDPMScheduler for training from any SD scheduler config (DDIM / PNDM / Euler share the betas)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(str(config_dir), subfolder="scheduler", local_files_only=True)
    updates: dict[str, Any] = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        updates["rescale_betas_zero_snr"] = True
    if any(scheduler.config.get(k) != v for k, v in updates.items()):
        scheduler = DDPMScheduler.from_config({**scheduler.config, **updates})
    return scheduler


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


def _load_single_file(path: Path, arch: str, prediction_type: str, config_dir: str | os.PathLike | None,
                      torch_dtype: torch.dtype) -> tuple[dict, list[str]]:
    import diffusers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    state_dict = read_checkpoint(path)
    notes = []
    architecture = detect_checkpoint_architecture(state_dict, name=str(path))
    if arch == "auto":
        notes.append(f"architecture {architecture.name} detected from the checkpoint keys")
    elif arch != architecture.name:
        raise ValueError(f"{path}: arch={arch!r} was requested but the checkpoint is {architecture.name}")
    if prediction_type == "auto":
        prediction_type, why = detect_checkpoint_prediction_type(architecture, state_dict)
        notes.append(f"prediction type {prediction_type}: {why}")
    denoiser_overrides = {}
    if config_dir is None:
        config_dir = sidecar_config_dir(path)
        if config_dir is not None:
            notes.append(f"configs from the sidecar folder {config_dir.name}/ next to the checkpoint")
        else:  # the shipped configs
            denoiser_overrides = dict(architecture.single_file_denoiser_overrides.get(prediction_type, {}))
    folder = _resolve_config_dir(architecture, config_dir)
    name = architecture.name

    def component(part: str, load):
        try:
            return load()
        except Exception as exc:  # shape mismatches surface as many error types inside diffusers
            raise ValueError(
                f"{path}: its {part} weights do not fit the {name} config in {folder / part} "
                f"({type(exc).__name__}: {exc}). The file is damaged or a variant of {name} these configs do not "
                "describe; pass config_dir= with matching diffusers configs."
            ) from exc

    # float32 is diffusers' default; passing it explicitly only triggers a spurious "keep in float32" warning.
    dtype = None if torch_dtype == torch.float32 else torch_dtype
    common = {"config": str(folder), "local_files_only": True, "torch_dtype": dtype}
    denoiser_class = getattr(diffusers, architecture.denoiser_class)
    denoiser = component(architecture.denoiser_component, lambda: denoiser_class.from_single_file(
        state_dict, subfolder=architecture.denoiser_component, **common, **denoiser_overrides))
    vae = None
    if any(key.startswith(VAE_PREFIX) for key in state_dict):
        vae = component("vae", lambda: diffusers.AutoencoderKL.from_single_file(state_dict, subfolder="vae", **common))
    else:
        notes.append("the checkpoint has no VAE (first_stage_model.*): train from cached latents or add a VAE")
        logger.warning("%s has no VAE weights (first_stage_model.*)", path)
    text_encoders = [
        component(spec.component, lambda spec=spec: create_diffusers_clip_model_from_ldm(
            _transformers_class(spec.model_class), state_dict, subfolder=spec.component, config=str(folder),
            torch_dtype=dtype, local_files_only=True))
        for spec in architecture.text_encoders
    ]
    tokenizers = [load_clip_tokenizer(folder / spec.tokenizer) for spec in architecture.text_encoders]
    scheduler = _training_scheduler(folder, prediction_type, zero_terminal_snr="ztsnr" in state_dict)
    parts = {"architecture": architecture, "prediction_type": prediction_type, "denoiser": denoiser, "vae": vae,
             "text_encoders": text_encoders, "tokenizers": tokenizers, "noise_scheduler": scheduler,
             "config_dir": str(folder)}
    return parts, notes


def _read_model_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder}: not a diffusers pipeline folder (no model_index.json). Pass a single "
                         f"checkpoint file or a diffusers folder. Supported: {SUPPORTED}.")
    return json.loads(index_file.read_text())


def _folder_architecture(folder: Path) -> tuple[Architecture, str]:
    index = _read_model_index(folder)
    # The denoiser config decides where families share a pipeline class (SD1.x / SD2.x).
    denoiser_configs = [folder / arch.denoiser_component / "config.json" for arch in ARCHITECTURES.values()]
    denoiser_config = next((json.loads(f.read_text()) for f in denoiser_configs if f.is_file()), None)
    try:
        return detect_diffusers_folder(index, denoiser_config)
    except UnsupportedModel as exc:
        raise ValueError(f"{folder}: unsupported architecture: {exc}. Supported: {SUPPORTED}.") from None


def _weights_variant(component_dir: Path) -> str | None:
    """``None`` when plain weights exist, else the variant the folder ships (e.g. ``fp16``), so
    folders downloaded with only ``*.fp16.safetensors`` load too."""
    weights = [p.name for p in component_dir.glob("*.safetensors")] + [p.name for p in component_dir.glob("*.bin")]
    plain = [n for n in weights if n.count(".") == 1 or "-of-" in n.split(".")[0]]
    if plain or not weights:
        return None
    variants = sorted({n.split(".")[-2] for n in weights})
    return "fp16" if "fp16" in variants else variants[0]


# --------------------------------------------------------------------------------------------
# size, from the files' headers


@dataclass(frozen=True)
class ModelSize:
    """A base model's size read from its files' headers, no weights loaded: what a training run's
    memory estimate starts from (``trainer/memory.py``)."""

    architecture: Architecture
    parameters: int  # every weight a run loads: denoiser, text encoders, VAE
    # per denoiser LoRA target (the table's peft names, e.g. "to_q"): the sum of in + out features
    # over its layers, so a rank-r LoRA on it has r times that many parameters
    lora_target_features: Mapping[str, int]


class _Shape:
    """A tensor's shape where detection asks for ``.shape`` / ``.ndim`` (headers only)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def _safetensors_shapes(path: Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {prefix + key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def _component_weight_files(component_dir: Path) -> list[Path]:
    """The ``.safetensors`` files ``from_pretrained`` reads in a diffusers component folder
    (plain, sharded, or the variant ``_weights_variant`` picks)."""
    variant = _weights_variant(component_dir)
    files = sorted(component_dir.glob("*.safetensors"))
    if variant:
        return [f for f in files if f.name.split(".")[-2] == variant]
    return [f for f in files if f.name.count(".") == 1 or "-of-" in f.name.split(".")[0]]


def read_model_size(path: str | os.PathLike) -> ModelSize | None:
    """The size of the base model at ``path`` (single ``.safetensors`` file or diffusers folder),
    from the headers; None when its weights are not all safetensors (a legacy ``.ckpt`` or
    ``.bin`` folder cannot be measured without loading it) or the family is not recognised."""
    source = Path(path).expanduser()
    try:
        if source.is_file():
            if source.suffix.lower() != ".safetensors":
                return None
            shapes = _safetensors_shapes(source)
            architecture = detect_single_file({k: _Shape(v) for k, v in shapes.items()})
            denoiser_prefix = UNET_PREFIX
        elif source.is_dir():
            architecture, _ = _folder_architecture(source)
            shapes = {}
            for component in (architecture.denoiser_component, "vae", *architecture.text_encoder_components):
                files = _component_weight_files(source / component) if (source / component).is_dir() else []
                if not files and component != "vae":
                    return None
                for file in files:
                    shapes.update(_safetensors_shapes(file, prefix=f"{component}/"))
            denoiser_prefix = f"{architecture.denoiser_component}/"
        else:
            return None
    except Exception:  # noqa: BLE001 -- a damaged or unknown file: the loader reports it; no estimate
        return None
    features: dict[str, int] = {}
    targets = (*architecture.lora_attention_modules, *architecture.lora_feed_forward_modules)
    for key, shape in shapes.items():
        if not key.startswith(denoiser_prefix) or len(shape) != 2:
            continue
        for target in targets:
            if key.endswith(f".{target}.weight"):
                features[target] = features.get(target, 0) + shape[0] + shape[1]
    parameters = sum(math.prod(shape) for shape in shapes.values())
    return ModelSize(architecture=architecture, parameters=parameters, lora_target_features=features)


def _load_folder(folder: Path, arch: str, prediction_type: str, torch_dtype: torch.dtype) -> tuple[dict, list[str]]:
    import diffusers

    architecture, why = _folder_architecture(folder)
    notes = [f"architecture {architecture.name}: {why}"]
    if arch not in ("auto", architecture.name):
        raise ValueError(f"{folder}: arch={arch!r} was requested but the folder holds {architecture.name}")
    for name in (architecture.denoiser_component, "scheduler", *architecture.text_encoder_components,
                 *architecture.tokenizer_components):
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder}: the diffusers folder has no {name}/ sub-folder; copy the complete "
                                    "model")
    if prediction_type == "auto":
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        notes.append(f"prediction type {prediction_type}: scheduler/scheduler_config.json")

    def component(name: str, cls):
        try:
            return cls.from_pretrained(str(folder), subfolder=name, torch_dtype=torch_dtype, local_files_only=True,
                                       variant=_weights_variant(folder / name))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{folder / name}: cannot load ({type(exc).__name__}: {exc})") from exc

    denoiser = component(architecture.denoiser_component, getattr(diffusers, architecture.denoiser_class))
    vae = component("vae", diffusers.AutoencoderKL) if (folder / "vae").is_dir() else None
    text_encoders = [component(spec.component, _transformers_class(spec.model_class))
                     for spec in architecture.text_encoders]
    tokenizers = [load_clip_tokenizer(folder / name) for name in architecture.tokenizer_components]
    scheduler = _training_scheduler(folder, prediction_type)
    parts = {"architecture": architecture, "prediction_type": prediction_type, "denoiser": denoiser, "vae": vae,
             "text_encoders": text_encoders, "tokenizers": tokenizers, "noise_scheduler": scheduler,
             "config_dir": str(folder)}
    return parts, notes


def _dit_source_sha256(files: ModelFiles) -> str:
    """The identity of a DiT model's denoising: its diffusion model and VAE files (the text encoders,
    often 5-10 GB, are identified by the run fingerprints instead)."""
    digests = [file_sha256(files.diffusion_model.path)]
    if files.vae.path != files.diffusion_model.path:
        digests.append(file_sha256(files.vae.path))
    return digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _dit_base_model(parts: dict, architecture: Architecture, variant: Variant, *, source: Path, source_format: str,
                    digest: str, config_dir: Path, notes: list[str], source_files: dict) -> BaseModel:
    vae = parts["vae"]
    shift = vae.config.get("shift_factor") if architecture.latent_normalization == "shift_scale" else None
    scaling = float(vae.config.get("scaling_factor")
                    or 1.0) if architecture.latent_normalization != "batch_norm" else 1.0
    return BaseModel(architecture=architecture, prediction_type=FLOW_MATCHING, source_sha256=digest,
                     source_path=str(source), source_format=source_format, vae_scaling_factor=scaling,
                     vae_shift_factor=None if shift is None else float(shift),
                     vae_scale_factor=architecture.latent_scale,
                     resolution=variant.native_resolution, config_dir=str(config_dir), notes=notes, variant=variant,
                     source_files=source_files, **parts)


def _load_dit_files(source: Path, *, arch: str, prediction_type: str, config_dir, text_encoders, vae,
                    torch_dtype: torch.dtype, compute_hash: bool) -> BaseModel:
    files = inspect_model_files(source, text_encoders, vae, config_dir=config_dir, arch=arch)
    if prediction_type not in ("auto", FLOW_MATCHING):
        raise ValueError(f"prediction_type={prediction_type!r}: {files.variant.label} is a flow-matching model "
                         "(it predicts a velocity); leave prediction_type at auto")
    parts = load_model_files(files, torch_dtype)
    source_files = {"base_model": str(files.diffusion_model.path),
                    "text_encoders": [str(part.path) for part in files.text_encoders], "vae": str(files.vae.path)}
    return _dit_base_model(parts, files.architecture, files.variant, source=source, source_format="split_files",
                           digest=_dit_source_sha256(files) if compute_hash else "", config_dir=files.config_dir,
                           notes=list(files.notes), source_files=source_files)


def _load_dit_folder(folder: Path, found: tuple[Architecture, Variant], *, arch: str, torch_dtype: torch.dtype,
                     compute_hash: bool) -> BaseModel:
    architecture, variant = found
    if arch not in ("auto", architecture.name):
        raise ValueError(f"{folder}: arch={arch!r} was requested but the folder holds {architecture.name}")
    parts = load_folder_components(folder, architecture, torch_dtype)
    loaded = ("transformer", "vae", "scheduler", *architecture.text_encoder_components,
              *architecture.tokenizer_components)
    return _dit_base_model(parts, architecture, variant, source=folder, source_format="diffusers",
                           digest=folder_sha256(folder, loaded) if compute_hash else "", config_dir=folder,
                           notes=[f"{variant.label} ({architecture.name}): model_index.json "
                                  f"{architecture.pipeline_class}"],
                           source_files={"base_model": str(folder)})


def load_base_model(
    path: str | os.PathLike,
    *,
    arch: str = "auto",
    prediction_type: str = "auto",
    config_dir: str | os.PathLike | None = None,
    torch_dtype: torch.dtype = torch.float32,
    compute_hash: bool = True,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
) -> BaseModel:
    """Load a base model for training from a single-file checkpoint, a DiT family's split files or
    a diffusers folder.

    Args:
        path: a ``.safetensors`` (or legacy ``.ckpt``) checkpoint in the original layout, a DiT
            diffusion model (ComfyUI layout, with ``text_encoders`` and ``vae``) or full checkpoint,
            or a diffusers pipeline folder.
        arch: ``"auto"`` (detect) or a family of the table (``sd15``, ``flux1``...); a mismatch is an error.
        prediction_type: ``"auto"`` or ``epsilon`` / ``v_prediction`` / ``sample`` (overrides
            detection: see the module docstring for how a single file is classified).
        config_dir: diffusers configs for a single file (``unet/config.json``, ``vae/``,
            ``text_encoder[_2]/``, ``tokenizer[_2]/``, ``scheduler/``); default: the sidecar folder
            ``<checkpoint stem>.configs/`` next to the file when it exists, else the ones shipped for
            the detected architecture. Ignored for a folder.
        torch_dtype: dtype of the loaded modules.
        compute_hash: hash the source (``source_sha256``); hashing a 7 GB file takes ~15 s.
        text_encoders, vae: a DiT family's text-encoder and VAE files (ComfyUI's Load CLIP / Load
            VAE inputs); a full checkpoint may hold them instead.

    Raises:
        FileNotFoundError: the path (or a required sub-folder) does not exist.
        ValueError: unsupported architecture, unreadable / damaged file, weights that do not fit
            the configs, or a bad option value (``split_files.ModelFilesError`` names the input at
            fault among a DiT family's files).
    """
    _check_choice(arch, ARCHITECTURE_NAMES, "arch")
    _check_choice(prediction_type, (*PREDICTION_TYPES, FLOW_MATCHING), "prediction_type")
    source = Path(path).expanduser()
    if source.is_dir() and (dit := folder_architecture(_read_model_index(source), source)) is not None:
        return _finish(_load_dit_folder(source, dit, arch=arch, torch_dtype=torch_dtype, compute_hash=compute_hash))
    if not source.is_dir() and (text_encoders or vae or is_dit_diffusion_model(source)):
        return _finish(_load_dit_files(source, arch=arch, prediction_type=prediction_type, config_dir=config_dir,
                                       text_encoders=text_encoders, vae=vae, torch_dtype=torch_dtype,
                                       compute_hash=compute_hash))
    if source.is_dir():
        parts, notes = _load_folder(source, arch, prediction_type, torch_dtype)
        source_format = "diffusers"
        architecture = parts["architecture"]
        loaded = (architecture.denoiser_component, "vae", "scheduler", *architecture.text_encoder_components,
                  *architecture.tokenizer_components)
        digest = folder_sha256(source, loaded) if compute_hash else ""
    else:
        parts, notes = _load_single_file(source, arch, prediction_type, config_dir, torch_dtype)
        source_format = "single_file"
        digest = file_sha256(source) if compute_hash else ""
    for module in (parts["denoiser"], parts["vae"], *parts["text_encoders"]):
        if module is not None:
            module.eval()
    vae = parts["vae"]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    scaling_factor = (float(vae.config.scaling_factor) if vae is not None
                      else parts["architecture"].vae_scaling_factor)
    for note in notes:
        logger.info("%s: %s", source.name, note)
    return _finish(BaseModel(
        **parts,
        source_sha256=digest,
        source_path=str(source),
        source_format=source_format,
        vae_scaling_factor=scaling_factor,
        vae_scale_factor=vae_scale_factor,
        resolution=int(parts["denoiser"].config.sample_size) * vae_scale_factor,
        notes=notes,
    ), log=False)


def _finish(base: BaseModel, *, log: bool = True) -> BaseModel:
    for module in (base.denoiser, base.vae, *base.text_encoders):
        if module is not None:
            module.eval()
    if log:
        for note in base.notes:
            logger.info("%s: %s", Path(base.source_path).name, note)
    return base


# --------------------------------------------------------------------------------------------
# conditioning


def tokenize_prompts(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [B, 77] padded / truncated to the tokenizer's max length (SD's fixed context)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _size_rows(value, count: int, default: tuple[int, int], what: str) -> list[tuple[int, int]]:
    if value is None:
        return [default] * count
    if len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [tuple(value)] * count
    rows = [tuple(v) for v in value]
    if len(rows) != count or any(len(r) != 2 for r in rows):
        raise ValueError(f"{what}: expected one (height, width) pair or {count} pairs, got {value!r}")
    return rows


def sdxl_time_ids(count: int, *, resolution: int, original_sizes=None, crop_top_lefts=None,
                  target_sizes=None) -> torch.Tensor:
    """SDXL micro-conditioning [B, 6]: original (h, w) + crop top-left (y, x) + target (h, w)."""
    originals = _size_rows(original_sizes, count, (resolution, resolution), "original_sizes")
    crops = _size_rows(crop_top_lefts, count, (0, 0), "crop_top_lefts")
    targets = _size_rows(target_sizes, count, (resolution, resolution), "target_sizes")
    return torch.tensor([[*o, *c, *t] for o, c, t in zip(originals, crops, targets)], dtype=torch.float32)


def encode_prompts(
    base: BaseModel,
    captions: Sequence[str],
    device: torch.device | str = "cpu",
    *,
    original_sizes=None,
    crop_top_lefts=None,
    target_sizes=None,
) -> tuple[torch.Tensor, dict | None]:
    """``(encoder_hidden_states, added_cond_kwargs)`` for the UNet, as diffusers' training examples
    build them.

    SD1.x / SD2.x: the text encoder's last hidden state, ``added_cond_kwargs=None``.
    SDXL (train_text_to_image_lora_sdxl.py): both encoders' penultimate hidden states concatenated
    on the channel axis, plus ``{"text_embeds": pooled projection of encoder 2, "time_ids": [B, 6]}``.
    The size arguments (SDXL only) take one ``(h, w)`` pair or one per caption; default: the model
    resolution, no crop. Gradients flow (no ``no_grad``): wrap the call when encoders are frozen.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("captions: empty list")
    architecture = base.architecture
    hidden_states = []
    pooled = None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
        ids = tokenize_prompts(tokenizer, captions).to(device)
        if architecture.penultimate_text_hidden_states:
            outputs = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled = outputs[0]  # for CLIPTextModelWithProjection (the last encoder): text_embeds
            hidden_states.append(outputs[-1][-2])
        else:
            hidden_states.append(encoder(ids, return_dict=False)[0])
    encoder_hidden_states = hidden_states[0] if len(hidden_states) == 1 else torch.cat(hidden_states, dim=-1)
    added = None
    if architecture.pooled_text_embeds:
        added = {"text_embeds": pooled.reshape(len(captions), -1)}
    if architecture.size_conditioning:
        time_ids = sdxl_time_ids(len(captions), resolution=base.resolution, original_sizes=original_sizes,
                                 crop_top_lefts=crop_top_lefts, target_sizes=target_sizes)
        added["time_ids"] = time_ids.to(device=device, dtype=encoder_hidden_states.dtype)
    return encoder_hidden_states, added

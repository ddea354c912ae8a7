"""The DiT families' model files as ComfyUI users pick them, checked and loaded for diffusers.

A FLUX.1, FLUX.2-klein or Z-Image model comes as the files ComfyUI's loader nodes read:

* the diffusion model (Load Diffusion Model: ``models/diffusion_models/`` or ``models/unet/``), in
  ComfyUI's layout (the original BFL / Tongyi keys), bf16 / fp16 or fp8;
* its text encoder(s) (Load CLIP / DualCLIPLoader: ``models/text_encoders/`` or ``models/clip/``):
  CLIP-L + T5-XXL for FLUX.1, Qwen3 for klein and Z-Image;
* its VAE (Load VAE: ``models/vae/``): FLUX.1's ``ae.safetensors`` (also Z-Image's) or FLUX.2's.

A full checkpoint (``model.diffusion_model.*``, ``vae.*``, ``text_encoders.<name>.*``, as ComfyUI's
CheckpointSave writes and some FLUX.1 releases ship) may stand in for any of them.

``inspect_model_files`` decides the family, its variant and the role of every file from the files'
headers alone (milliseconds, so nodes run it when a prompt is queued) and refuses a combination that
cannot work with a ``ModelFilesError`` naming the input at fault and the file that belongs there.
``load_model_files`` then reads the weights (fp8 dequantised), converts them with diffusers' own
converters and builds the diffusers / transformers modules from the configs shipped in
``models/configs/<variant>/`` (or ``config_dir``, or a ``<stem>.configs/`` sidecar folder), so nothing
is fetched from a model hub.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import (
    DIT_ARCHITECTURES,
    Architecture,
    UnsupportedModel,
    Variant,
    describe_text_encoder,
    detect_diffusion_model,
    detect_variant,
    identify_text_encoder,
    text_encoder_width_expected,
    vae_problem,
)
from .comfy_layout import (
    DIFFUSION_MODEL_PREFIX,
    FileHeader,
    align_keys,
    convert_denoiser,
    convert_vae,
    dequantize_fp8,
    is_quantized,
    read_header,
    read_tensors,
)

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SIDECAR_CONFIG_SUFFIX = ".configs"
CHECKPOINT_TEXT_ENCODERS = "text_encoders."
# Where users keep each kind of file (ComfyUI's folder names, new and old).
USER_FOLDERS = {"base_model": "models/diffusion_models (or models/unet)",
                "text_encoders": "models/text_encoders (or models/clip)", "vae": "models/vae"}


class ModelFilesError(ValueError):
    """A model file that is missing, unreadable or does not belong with the others. ``field`` names
    the input at fault (``base_model``, ``text_encoders``, ``vae``), ``index`` which of several."""

    def __init__(self, field: str, message: str, index: int | None = None):
        super().__init__(message)
        self.field = field
        self.index = index


@dataclass(frozen=True)
class FilePart:
    """A tensor set inside a file: the whole file (``prefix`` "") or one part of a full checkpoint."""

    path: Path
    prefix: str = ""

    def describe(self) -> str:
        return self.path.name + (f" ({self.prefix}*)" if self.prefix else "")


@dataclass(frozen=True)
class ModelFiles:
    """A DiT model's files, checked against each other: which family and variant, which file (or
    part of a checkpoint) is each component, and the configs they load with."""

    architecture: Architecture
    variant: Variant
    diffusion_model: FilePart
    text_encoders: tuple[FilePart, ...]  # in the order of the table entry's text_encoders
    vae: FilePart
    config_dir: Path
    notes: tuple[str, ...] = field(default=())

    @property
    def paths(self) -> list[Path]:
        """Every file read, once each (a checkpoint may hold several parts)."""
        seen: list[Path] = []
        for part in (self.diffusion_model, *self.text_encoders, self.vae):
            if part.path not in seen:
                seen.append(part.path)
        return seen


# -- inspection (headers only) ------------------------------------------------------------------------

def _header(path: str | os.PathLike, field_name: str, index: int | None = None) -> FileHeader:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFilesError(field_name, f"{field_name}: {path} does not exist; put the file in "
                                          f"ComfyUI's {USER_FOLDERS[field_name]} folder", index)
    if path.suffix.lower() != ".safetensors":
        raise ModelFilesError(field_name, f"{field_name}: {path.name} is not a .safetensors file (the DiT families "
                                          "load from .safetensors only)", index)
    try:
        return read_header(path)
    except ValueError as exc:
        raise ModelFilesError(field_name, f"{field_name}: {exc}", index) from None


def is_dit_diffusion_model(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``.safetensors`` file whose (diffusion-model) tensors are a DiT family
    of the table: the loader then reads it as split files."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return False
    try:
        header = read_header(path)
    except ValueError:
        return False
    shapes = header.with_prefix_removed(DIFFUSION_MODEL_PREFIX) or header.shapes
    try:
        detect_diffusion_model(shapes)
    except UnsupportedModel:
        return False
    return True


def sidecar_config_dir(path: Path) -> Path | None:
    folder = path.with_name(path.stem + SIDECAR_CONFIG_SUFFIX)
    return folder if folder.is_dir() else None


def _checkpoint_text_encoder_parts(header: FileHeader) -> list[tuple[str, dict]]:
    """(prefix, shapes) of each text encoder inside a full checkpoint (``text_encoders.<name>.``)."""
    names = sorted({key.split(".")[1] for key in header.tensors
                    if key.startswith(CHECKPOINT_TEXT_ENCODERS) and key.count(".") > 1})
    parts = []
    for name in names:
        prefix = f"{CHECKPOINT_TEXT_ENCODERS}{name}."
        if all(k.startswith(prefix + "transformer.") for k in header.tensors if k.startswith(prefix)):
            prefix += "transformer."  # ComfyUI's checkpoint layout: text_encoders.<name>.transformer.<model keys>
        parts.append((prefix, header.with_prefix_removed(prefix)))
    return parts


def _files_to_give(architecture: Architecture, variant: Variant) -> str:
    encoders = " + ".join(variant.text_encoder_files or [spec.user_file for spec in architecture.text_encoders])
    return (f"{variant.label} needs its text encoder file(s) {encoders} (in ComfyUI's {USER_FOLDERS['text_encoders']}) "
            f"and its VAE {architecture.vae_user_file} (in {USER_FOLDERS['vae']})")


def inspect_model_files(base_model: str | os.PathLike, text_encoders: Sequence[str | os.PathLike] = (),
                        vae: str | os.PathLike | None = None, *, config_dir: str | os.PathLike | None = None,
                        arch: str = "auto") -> ModelFiles:
    """Family, variant and role of every file, from the headers. ``ModelFilesError`` names the
    input at fault: an unreadable or unknown diffusion model, a missing / extra / wrong text encoder
    (or one of the wrong width: Qwen3-8B given to klein 4B), a VAE of another family."""
    base_path = Path(base_model).expanduser()
    header = _header(base_path, "base_model")
    prefix = DIFFUSION_MODEL_PREFIX if any(k.startswith(DIFFUSION_MODEL_PREFIX) for k in header.tensors) else ""
    shapes = header.with_prefix_removed(prefix) if prefix else header.shapes
    try:
        architecture = detect_diffusion_model(shapes)
    except UnsupportedModel as exc:
        raise ModelFilesError("base_model", f"base_model: {base_path.name} is not a diffusion model this trainer "
                                            f"supports: {exc}") from None
    if arch not in ("auto", architecture.name):
        raise ModelFilesError("base_model", f"base_model: arch={arch!r} was requested but {base_path.name} is "
                                            f"{architecture.label} ({architecture.name})")
    configs = Path(config_dir).expanduser() if config_dir else sidecar_config_dir(base_path)
    try:
        variant = detect_variant(architecture, shapes, own_configs=configs is not None)
    except UnsupportedModel as exc:
        raise ModelFilesError("base_model", f"base_model: {base_path.name} is {exc}") from None
    notes = [f"{variant.label} ({architecture.name}) from the keys of {base_path.name}"]
    configs = configs or CONFIG_ROOT / variant.name
    if not (configs / "transformer" / "config.json").is_file():
        raise ModelFilesError("base_model", f"model_config_dir: {configs} has no transformer/config.json; give a "
                                            "diffusers-style folder of configs for this model")

    # text encoders: the given files (any order), else the checkpoint's own
    given = list(text_encoders)
    candidates: list[tuple[FilePart, dict, int | None]] = []
    for index, path in enumerate(given):
        te_header = _header(path, "text_encoders", index)
        te_prefix = ""
        te_shapes = te_header.shapes
        if any(k.startswith(CHECKPOINT_TEXT_ENCODERS) for k in te_header.tensors):  # a checkpoint given as encoder
            parts = _checkpoint_text_encoder_parts(te_header)
            te_prefix, te_shapes = parts[0] if len(parts) == 1 else ("", te_shapes)
        candidates.append((FilePart(te_header.path, te_prefix), te_shapes, index))
    if not given:
        candidates = [(FilePart(base_path, part_prefix), part_shapes, None)
                      for part_prefix, part_shapes in _checkpoint_text_encoder_parts(header)]
    found: dict[int, FilePart] = {}
    widths = text_encoder_width_expected(architecture, shapes)
    for part, part_shapes, index in candidates:
        role = identify_text_encoder(architecture, part_shapes)
        what = describe_text_encoder(part_shapes)
        if role is None:
            files_wanted = variant.text_encoder_files or [s.user_file for s in architecture.text_encoders]
            raise ModelFilesError("text_encoders", f"text_encoders: {part.describe()} is {what}; {variant.label} reads "
                                                   + " + ".join(s.label for s in architecture.text_encoders)
                                                   + f" ({' + '.join(files_wanted)})", index)
        spec = architecture.text_encoders[role]
        if role in found:
            raise ModelFilesError("text_encoders", f"text_encoders: {part.describe()} and {found[role].describe()} are "
                                                   f"both {spec.label}; {variant.label} needs "
                                                   + " + ".join(s.label for s in architecture.text_encoders), index)
        width = spec.width_rule.width(part_shapes) if spec.width_rule else None
        if role in widths and width is not None and width != widths[role]:
            raise ModelFilesError("text_encoders", f"text_encoders: {part.describe()} is {what}, but {base_path.name} "
                                                   f"reads a {spec.label} of width {widths[role]}; give the text "
                                                   f"encoder "
                                                   f"released with this diffusion model", index)
        found[role] = part
    missing = [spec for role, spec in enumerate(architecture.text_encoders) if role not in found]
    if missing:
        raise ModelFilesError("text_encoders", "text_encoders: " + ("none given" if not candidates else "missing "
                              + " + ".join(s.label for s in missing)) + f"; {_files_to_give(architecture, variant)}")

    # the VAE: the given file, else the checkpoint's own
    if vae:
        vae_header = _header(vae, "vae")
        vae_prefix = architecture.checkpoint_vae_prefix if any(
            k.startswith(architecture.checkpoint_vae_prefix) for k in vae_header.tensors) else ""
        vae_part = FilePart(vae_header.path, vae_prefix)
        vae_shapes = vae_header.with_prefix_removed(vae_prefix) if vae_prefix else vae_header.shapes
    elif any(k.startswith(architecture.checkpoint_vae_prefix) for k in header.tensors):
        vae_part = FilePart(base_path, architecture.checkpoint_vae_prefix)
        vae_shapes = header.with_prefix_removed(architecture.checkpoint_vae_prefix)
    else:
        raise ModelFilesError("vae", f"vae: none given; {_files_to_give(architecture, variant)}")
    problem = vae_problem(architecture, vae_shapes)
    if problem:
        raise ModelFilesError("vae", f"vae: {vae_part.describe()}: {problem} (in ComfyUI's {USER_FOLDERS['vae']})")
    return ModelFiles(architecture=architecture, variant=variant, diffusion_model=FilePart(base_path, prefix),
                      text_encoders=tuple(found[i] for i in range(len(architecture.text_encoders))), vae=vae_part,
                      config_dir=configs, notes=tuple(notes))


# -- loading ------------------------------------------------------------------------------------------

def _read(part: FilePart, dtype: torch.dtype, what: str) -> dict[str, torch.Tensor]:
    """The part's tensors, fp8 dequantised to ``dtype`` and floats cast to ``dtype``."""
    tensors, metadata = read_tensors(part.path, part.prefix)
    if is_quantized(tensors):
        tensors = dequantize_fp8(tensors, dtype, metadata, name=f"{what} {part.describe()}")
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _assign(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, what: str, part: FilePart,
            config_dir: Path, allow_missing: Sequence[str] = (), after=None) -> None:
    """Load ``state_dict`` into a model built on the meta device (its tensors become the model's:
    no second copy). Missing or unexpected keys are an error naming the file and the configs."""
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in allow_missing]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{what} {part.describe()}: its weights do not fit the config in {config_dir} "
                         f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                         f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}); the file is damaged or a model "
                         "of another size: pass model_config_dir with configs that describe it")
    if after is not None:
        after()
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"{what} {part.describe()}: no weights for {still_meta[:4]} in the file")


def _empty_model(build):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers (rope tables) real
        return build()


def _load_denoiser(files: ModelFiles, dtype: torch.dtype):
    import diffusers

    architecture = files.architecture
    cls = getattr(diffusers, architecture.denoiser_class)
    config = cls.load_config(str(files.config_dir), subfolder="transformer", local_files_only=True)
    state_dict = convert_denoiser(architecture.denoiser_converter, _read(files.diffusion_model, dtype, "base_model"))
    model = _empty_model(lambda: cls.from_config(config))
    _assign(model, state_dict, what="base_model", part=files.diffusion_model,
            config_dir=files.config_dir / "transformer")
    return model


def _load_text_encoder(files: ModelFiles, index: int, dtype: torch.dtype):
    import transformers

    spec = files.architecture.text_encoders[index]
    part = files.text_encoders[index]
    cls = getattr(transformers, spec.model_class)
    config = cls.config_class.from_pretrained(str(files.config_dir / spec.component), local_files_only=True)
    model = _empty_model(lambda: cls(config))
    own_keys = set(model.state_dict())
    state_dict = align_keys(_read(part, dtype, "text_encoders"), own_keys)
    # Tied copies (T5's encoder.embed_tokens is its shared table) come from their source; files keep
    # one or the other. Extra tensors a model class has no use for (CLIP-L's text_projection, a
    # checkpoint's logit scale) are dropped.
    tied = [k for k in own_keys if k.endswith("embed_tokens.weight") and "shared.weight" in own_keys]
    if "shared.weight" not in state_dict and tied and tied[0] in state_dict:
        state_dict["shared.weight"] = state_dict[tied[0]]
    dropped = sorted(k for k in state_dict if k not in own_keys)
    for key in dropped:
        del state_dict[key]
    if dropped:
        logger.debug("%s: ignoring %d tensors %s has no use for: %s", part.describe(), len(dropped),
                     spec.model_class, dropped[:4])
    _assign(model, state_dict, what=f"text_encoders ({spec.label})", part=part,
            config_dir=files.config_dir / spec.component, allow_missing=tied, after=model.tie_weights)
    return model.eval()


def _load_vae(files: ModelFiles, dtype: torch.dtype):
    import diffusers

    cls = getattr(diffusers, files.architecture.vae_class)
    config = cls.load_config(str(files.config_dir), subfolder="vae", local_files_only=True)
    state_dict = convert_vae(_read(files.vae, dtype, "vae"), config)
    model = _empty_model(lambda: cls.from_config(config))
    if "bn.num_batches_tracked" in model.state_dict() and "bn.num_batches_tracked" not in state_dict:
        state_dict["bn.num_batches_tracked"] = torch.tensor(0)  # a counter the files leave out
    _assign(model, state_dict, what="vae", part=files.vae, config_dir=files.config_dir / "vae")
    return model.eval()


# FLUX.1's T5 tokenizer (google/t5-v1_1-xxl's tokenizer.json, Apache-2.0) is the one tokenizer this
# pack does not ship: no package registry carries it, and every ComfyUI install has it
# (comfy/text_encoders/t5_tokenizer/). The ComfyUI nodes point this variable at ComfyUI's copy (the
# training processes inherit it); from a shell, set it to a folder holding that tokenizer.json.
T5_TOKENIZER_ENV = "VERSAT2I_T5_TOKENIZER"


def load_tokenizer(folder: Path):
    """A tokenizer from a tokenizer folder: complete (the shipped CLIP and Qwen3 ones, a diffusers
    folder's), or a shipped T5 settings file whose vocabulary comes from ``T5_TOKENIZER_ENV``."""
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer folder {folder}")
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    vocabulary = ("tokenizer.json", "spiece.model", "vocab.json")
    if settings.get("tokenizer_class") == "T5TokenizerFast" and not any((folder / f).is_file() for f in vocabulary):
        return t5_tokenizer(settings)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def t5_tokenizer(settings: Mapping[str, Any]):
    """T5's tokenizer from the ``tokenizer.json`` in ``$VERSAT2I_T5_TOKENIZER``, with the shipped
    ``settings`` (special tokens, the 512-token limit FLUX.1-dev's pipeline uses)."""
    from transformers import T5TokenizerFast

    source = os.environ.get(T5_TOKENIZER_ENV, "").strip()
    file = Path(source).expanduser() / "tokenizer.json" if source else None
    if file is None or not file.is_file():
        where = f"{T5_TOKENIZER_ENV}={source!r} holds no tokenizer.json" if source else f"{T5_TOKENIZER_ENV} is not set"
        raise FileNotFoundError(
            f"FLUX.1's T5 tokenizer: {where}. The pack does not ship it; inside ComfyUI it uses ComfyUI's copy. "
            f"From a shell, set {T5_TOKENIZER_ENV} to ComfyUI's comfy/text_encoders/t5_tokenizer folder (or any "
            "folder with google/t5-v1_1-xxl's tokenizer.json), or train from a FLUX.1 diffusers folder (its "
            "tokenizer_2/)")
    keys = ("eos_token", "pad_token", "unk_token", "extra_ids", "model_max_length")
    return T5TokenizerFast(tokenizer_file=str(file), **{key: settings[key] for key in keys if key in settings})


def flow_scheduler(config_dir: Path):
    """The flow-matching scheduler of the model's scheduler config (the training sigmas and the
    sampler: diffusers' recipes build both from it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(config_dir), subfolder="scheduler",
                                                           local_files_only=True)


def load_model_files(files: ModelFiles, torch_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The modules of ``files`` (in eval mode, on the CPU): ``denoiser``, ``vae``, ``text_encoders``,
    ``tokenizers`` and the ``noise_scheduler``, as ``models.loading.BaseModel`` holds them."""
    architecture = files.architecture
    return {
        "denoiser": _load_denoiser(files, torch_dtype).eval(),
        "vae": _load_vae(files, torch_dtype),
        "text_encoders": [_load_text_encoder(files, i, torch_dtype) for i in range(len(architecture.text_encoders))],
        "tokenizers": [load_tokenizer(files.config_dir / spec.tokenizer) for spec in architecture.text_encoders],
        "noise_scheduler": flow_scheduler(files.config_dir),
    }


# -- diffusers folders of the DiT families ------------------------------------------------------------------

def folder_architecture(index: Mapping[str, Any], folder: Path) -> tuple[Architecture, Variant] | None:
    """(family, variant) of a diffusers folder whose ``model_index.json`` names a DiT pipeline (None
    for other pipelines): the variant from its transformer config."""
    class_name = index.get("_class_name")
    for architecture in DIT_ARCHITECTURES.values():
        if architecture.pipeline_class != class_name:
            continue
        config = json.loads((folder / "transformer" / "config.json").read_text())
        for variant in architecture.variants:
            reference = json.loads((CONFIG_ROOT / variant.name / "transformer" / "config.json").read_text())
            if all(config.get(k) == reference.get(k) for k in ("guidance_embeds", "joint_attention_dim", "dim")):
                return architecture, variant
        return architecture, architecture.variants[0]
    return None


def load_folder_components(folder: Path, architecture: Architecture, torch_dtype: torch.dtype) -> dict[str, Any]:
    """The modules of a DiT family's diffusers folder (``model_index.json``, ``transformer/``...)."""
    import diffusers
    import transformers

    def component(name: str, cls):
        try:
            return cls.from_pretrained(str(folder), subfolder=name, torch_dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{folder / name}: cannot load ({type(exc).__name__}: {exc})") from exc

    return {
        "denoiser": component("transformer", getattr(diffusers, architecture.denoiser_class)).eval(),
        "vae": component("vae", getattr(diffusers, architecture.vae_class)).eval(),
        "text_encoders": [component(spec.component, getattr(transformers, spec.model_class)).eval()
                          for spec in architecture.text_encoders],
        "tokenizers": [load_tokenizer(folder / spec.tokenizer) for spec in architecture.text_encoders],
        "noise_scheduler": flow_scheduler(folder),
    }

"""Weight files: where each scorer's files live, how to find them, hash them and read them.

Nothing here touches the network. Every file is looked up under the *search dirs* (ComfyUI's
``models/versat2i`` folders, including the ones extra_model_paths.yaml adds; ``--models-dir`` in the
CLI), in one sub-folder per model family. The exact names the scorers expect:

==================================================== =============================================
file (relative to a search dir)                      where to get it
==================================================== =============================================
``clip/open_clip_model.safetensors``                 OpenAI CLIP ViT-L/14 in open_clip format, the file as
                                                     published: huggingface.co/timm/vit_large_patch14_clip_224.openai
                                                     (the name earlier versions asked for,
                                                     ``clip/ViT-L-14-openai.safetensors``, is found too)
``aesthetic/sac+logos+ava1-l14-linearMSE.pth``       LAION improved aesthetic predictor:
                                                     github.com/christophschuhmann/improved-aesthetic-predictor
                                                     (mirror: huggingface.co/camenduru/improved-aesthetic-predictor)
``hps/HPS_v2.1_compressed.pt``                       HPS v2.1: huggingface.co/xswu/HPSv2
``pickscore/PickScore_v1/``                          PickScore model folder (config.json + model.safetensors or
                                                     pytorch_model.bin): huggingface.co/yuvalkirstain/PickScore_v1
``pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K/``       PickScore's processor: preprocessor_config.json + tokenizer
                                                     files only (not the model weights there):
                                                     huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K
==================================================== =============================================

``.safetensors`` files are read with safetensors; ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` only with
``torch.load(weights_only=True)`` (the published LAION and HPS files are pickles), which refuses
files that would run code when unpickled.

Every file keeps its published name, so a file downloaded by hand (or by ComfyUI's missing-models
dialog) goes into its sub-folder as it is. ``HUB_FILES`` says where each single file is published
on the Hugging Face Hub: ``download.py`` fetches missing ones from there when asked to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..safe_io import (
    readable_name,
    sha256_file,  # noqa: F401 - re-exported for the scorers
)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class WeightFile:
    """A file (or folder) a scorer needs: its path relative to a search dir and where to get it."""

    relative_path: str
    source_hint: str
    is_folder: bool = False
    # For folders: files that must be inside for the folder to count as present.
    required_files: tuple[str, ...] = ()
    # Other names the same file is found under (names earlier versions asked for), tried in order
    # after ``relative_path``.
    alternative_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class HubFile:
    """Where a weight file is published on the Hugging Face Hub (its name there is the file's name)."""

    repo_id: str
    filename: str
    revision: str = "main"

    @property
    def url(self) -> str:
        """The download URL (what ComfyUI's templates declare for their models)."""
        from urllib.parse import quote

        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{quote(self.filename)}"


CLIP_VIT_L_14_OPENAI = WeightFile(
    "clip/open_clip_model.safetensors",
    "https://huggingface.co/timm/vit_large_patch14_clip_224.openai (file open_clip_model.safetensors)",
    alternative_paths=("clip/ViT-L-14-openai.safetensors",),
)
LAION_AESTHETIC_MLP = WeightFile(
    "aesthetic/sac+logos+ava1-l14-linearMSE.pth",
    "https://huggingface.co/camenduru/improved-aesthetic-predictor (file sac+logos+ava1-l14-linearMSE.pth; "
    "published at https://github.com/christophschuhmann/improved-aesthetic-predictor)",
)
HPS_V2_1 = WeightFile(
    "hps/HPS_v2.1_compressed.pt",
    "https://huggingface.co/xswu/HPSv2 (file HPS_v2.1_compressed.pt)",
)
PICKSCORE_MODEL = WeightFile(
    "pickscore/PickScore_v1",
    "https://huggingface.co/yuvalkirstain/PickScore_v1 (config.json and model.safetensors or pytorch_model.bin)",
    is_folder=True,
    required_files=("config.json",),
)
PICKSCORE_PROCESSOR = WeightFile(
    "pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (only preprocessor_config.json, "
    "tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, special_tokens_map.json)",
    is_folder=True,
    required_files=("preprocessor_config.json",),
)


# Single weight files and where they are published (relative path -> Hub file): what
# ``download.download_weight_file`` may fetch, and what the shipped workflows declare.
HUB_FILES: dict[str, HubFile] = {
    CLIP_VIT_L_14_OPENAI.relative_path: HubFile("timm/vit_large_patch14_clip_224.openai",
                                                "open_clip_model.safetensors"),
    LAION_AESTHETIC_MLP.relative_path: HubFile("camenduru/improved-aesthetic-predictor",
                                               "sac+logos+ava1-l14-linearMSE.pth"),
    HPS_V2_1.relative_path: HubFile("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
}


@readable_name
class MissingWeightsError(FileNotFoundError):
    """A weight file (or folder) is not in any search dir. The message names the exact file, the
    sub-folder it belongs in, every folder searched and where to download it."""

    def __init__(
        self,
        relative_path: str,
        search_dirs: Sequence[str | Path],
        *,
        source_hint: str = "",
        is_folder: bool = False,
        required_files: Sequence[str] = (),
        detail: str = "",
    ):
        self.relative_path = relative_path
        self.file_name = Path(relative_path).name
        self.subfolder = Path(relative_path).parent.as_posix()
        self.search_dirs = [Path(d) for d in search_dirs]
        self.source_hint = source_hint
        what = "folder" if is_folder else "file"
        lines = [f"missing weight {what} {self.file_name!r}" + (f" ({detail})" if detail else "")]
        where = f"the {self.subfolder!r} sub-folder of a model folder" if self.subfolder not in ("", ".") \
            else "a model folder"
        if self.search_dirs:
            lines.append(f"Put it in {where}; searched:")
            lines.extend(f"  {Path(d) / relative_path}" for d in self.search_dirs)
        else:
            lines.append(
                f"No model folder was given: pass one (ComfyUI: models/versat2i; CLI: --models-dir) "
                f"and put the {what} at <folder>/{relative_path}, or name the {what} itself (CLI: "
                "--scorer-option ASPECT.<option>=PATH)"
            )
        if required_files:
            lines.append(f"The folder must contain: {', '.join(required_files)}")
        if source_hint:
            lines.append(f"Get it from {source_hint}")
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # OSError's str() would print "[Errno None]" for a single-arg error
        return self.args[0]


@readable_name
class WeightsFormatError(ValueError):
    """A weight file exists but cannot be read as the expected format (truncated, corrupt, pickled
    code, wrong architecture). The message names the file and the fix."""


def resolve_search_dirs(search_dirs: Iterable[str | Path]) -> tuple[Path, ...]:
    """Expand ``~`` and drop duplicates, keeping order (earlier folders win)."""
    seen: dict[Path, None] = {}
    for folder in search_dirs:
        seen.setdefault(Path(folder).expanduser(), None)
    return tuple(seen)


def find_weights(spec: WeightFile, search_dirs: Sequence[str | Path], *, override: str | Path | None = None) -> Path:
    """Find ``spec`` in ``search_dirs`` (or at ``override``: an absolute path, or a path relative to
    the search dirs). Raises MissingWeightsError naming the file and every folder searched."""
    relative = str(override) if override else spec.relative_path
    if Path(relative).expanduser().is_absolute():
        path = Path(relative).expanduser()
        ok = path.is_dir() if spec.is_folder else path.is_file()
        if ok and spec.is_folder:
            ok = all((path / name).is_file() for name in spec.required_files)
        if not ok:
            raise MissingWeightsError(
                path.name, [path.parent], source_hint=spec.source_hint, is_folder=spec.is_folder,
                required_files=spec.required_files, detail=f"{path} does not exist",
            )
        return path
    if spec.is_folder:
        return find_weight_folder(relative, search_dirs, source_hint=spec.source_hint,
                                  required_files=spec.required_files)
    try:
        return find_weight_file(relative, search_dirs, source_hint=spec.source_hint)
    except MissingWeightsError:
        for alternative in () if override else spec.alternative_paths:  # the published name first
            with contextlib.suppress(MissingWeightsError):
                return find_weight_file(alternative, search_dirs)
        raise


def find_weight_file(relative_path: str, search_dirs: Sequence[str | Path], *, source_hint: str = "") -> Path:
    """The first ``<search dir>/<relative_path>`` that is a file; MissingWeightsError otherwise."""
    _check_relative(relative_path)
    for folder in resolve_search_dirs(search_dirs):
        candidate = folder / relative_path
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(relative_path, resolve_search_dirs(search_dirs), source_hint=source_hint)


def find_weight_folder(
    relative_path: str,
    search_dirs: Sequence[str | Path],
    *,
    source_hint: str = "",
    required_files: Sequence[str] = (),
) -> Path:
    """The first ``<search dir>/<relative_path>`` folder holding every one of ``required_files``."""
    _check_relative(relative_path)
    for folder in resolve_search_dirs(search_dirs):
        candidate = folder / relative_path
        if candidate.is_dir() and all((candidate / name).is_file() for name in required_files):
            return candidate
    raise MissingWeightsError(
        relative_path, resolve_search_dirs(search_dirs), source_hint=source_hint, is_folder=True,
        required_files=tuple(required_files),
    )


def _check_relative(relative_path: str) -> None:
    parts = Path(relative_path).parts
    if Path(relative_path).is_absolute() or ".." in parts:
        raise ValueError(f"weight path {relative_path!r} must be relative to a model folder, without '..'")


# -- hashing ---------------------------------------------------------------------------------------

def combine_hashes(named_hashes: Mapping[str, str]) -> str:
    """One sha256 for a model made of several files: the hash of ``name:hash`` lines, sorted by
    name, so it does not depend on where the files sit on disk."""
    if len(named_hashes) == 1:
        return next(iter(named_hashes.values()))
    text = "".join(f"{name}:{value}\n" for name, value in sorted(named_hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


# -- reading ---------------------------------------------------------------------------------------

def load_state_dict(path: str | Path, *, key: str | None = None, source_hint: str = "") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` (safetensors) or ``.pt/.pth/.bin/.ckpt``
    (``torch.load(weights_only=True)``), on the CPU. ``key``: the state dict sits under this entry
    of the file (pyiqa nests its checkpoints under ``"params"``); without it a
    ``{"state_dict": ...}`` wrapper (training checkpoints) is unwrapped. A DataParallel ``module.``
    prefix is dropped. A truncated, corrupt or unsafe file, or one without ``key``, raises
    WeightsFormatError naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WeightsFormatError(
                f"weight file {path} is not a readable safetensors file ({exc}): it is truncated or corrupt"
                f"{_download_again(source_hint)}"
            ) from exc
    elif suffix in PICKLE_SUFFIXES:
        loaded = torch_load_weights_only(path, source_hint=source_hint)
    else:
        raise WeightsFormatError(
            f"weight file {path}: unsupported extension {suffix!r}; expected .safetensors, "
            + ", ".join(PICKLE_SUFFIXES)
        )
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            found = list(loaded)[:6] if isinstance(loaded, Mapping) else type(loaded).__name__
            raise WeightsFormatError(
                f"weight file {path} has no {key!r} entry (found {found}); it is not the published file"
                + (f": get it from {source_hint}" if source_hint else "")
            )
        loaded = loaded[key]
    return unwrap_state_dict(loaded, path)


def _download_again(source_hint: str) -> str:
    return f"; download it again from {source_hint}" if source_hint else "; download it again"


def torch_load_weights_only(path: str | Path, *, source_hint: str = "", data: bytes | None = None) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, so a
    file that would run code when unpickled is refused before anything of it runs. ``data``: the
    file's bytes, already read (they are loaded instead of the file; ``path`` names it in errors).
    Any failure raises WeightsFormatError naming the file and the fix."""
    path = Path(path)
    try:
        return torch.load(io.BytesIO(data) if data is not None else str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            unsafe_fix = f"; use the published file from {source_hint}" if source_hint else ""
            raise WeightsFormatError(
                f"weight file {path} holds pickled objects other than tensors, which are refused for "
                f"safety (torch.load(weights_only=True)); convert it to .safetensors{unsafe_fix}"
            ) from exc
        raise WeightsFormatError(f"weight file {path} is truncated or corrupt ({exc}){_download_again(source_hint)}") \
            from exc
    except Exception as exc:  # noqa: BLE001 - torch's unpickler fails on garbage with IndexError, KeyError, ...
        raise WeightsFormatError(
            f"weight file {path} is truncated or corrupt ({type(exc).__name__}: {exc}){_download_again(source_hint)}"
        ) from exc


def unwrap_state_dict(loaded: object, path: str | Path = "<state dict>") -> dict[str, torch.Tensor]:
    """``{"state_dict": sd}`` -> ``sd``; drop a ``module.`` prefix; check every value is a tensor."""
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsFormatError(
            f"weight file {path} does not hold a state dict (got {type(loaded).__name__}"
            + (", empty" if isinstance(loaded, Mapping) else "") + ")"
        )
    state = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsFormatError(
                f"weight file {path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "expected a plain state dict"
            )
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def describe_load_failure(path: str | Path, what: str, exc: BaseException, source_hint: str = "") -> WeightsFormatError:
    """A WeightsFormatError for a library loader that failed on ``path``."""
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(cause) > 400:
        cause = cause[:400] + "..."
    again = f" (download it again from {source_hint})" if source_hint else ""
    if isinstance(exc, RuntimeError) and "state_dict" in str(exc):
        fix = f"it does not match {what}: use the published file{again}"
    else:
        fix = f"it is truncated, corrupt or not {what}{again}"
    return WeightsFormatError(f"could not load {path} as {what}: {cause}; {fix}")


def weight_files_in(folder: Path) -> list[str]:
    """Names of the model files of a transformers folder (config + weights, sharded or not)."""
    names = ["config.json"]
    for entry in sorted(os.listdir(folder)):
        if entry.endswith((".safetensors", ".bin", ".index.json")):
            names.append(entry)
    return names

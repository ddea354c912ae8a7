"""The MoL file: one learned Mixture-of-LoRA gate, saved next to the aspect LoRAs it mixes.

Format (``<name>.mol.safetensors``, plain safetensors so it loads with no pickle):

tensors
    ``gate.weight.<l>`` ``[N, in_features_l]`` per layer (token gates) or ``gate.weight``
    ``[L, N, prompt_features]`` (prompt gates; layer gates have none); ``gate.bias`` ``[L, N]``;
    ``gate.log_temperature`` ``[L]``; ``gate.prior`` ``[L, N]`` (mean activation over the training
    data); ``gate.input_scale`` ``[L]`` (token gates: each layer's calibrated mean input norm);
    version 2: ``gate.log_scale`` ``[L, N]`` (kind ``scaled_softmax``) and ``gate.timestep_weight``
    ``[L, N, K]`` (timestep gates).
metadata (strings; lists and dicts JSON-encoded)
    ``versat2i_format`` = ``mixture-of-lora``, ``versat2i_mol_version`` = ``2``,
    ``granularity`` (``token`` | ``prompt`` | ``layer``), ``prompt_features``, version 2:
    ``gate_kind`` (``trainer.gate.GATE_KINDS``), ``timestep_knots`` (0 = no timestep input) and
    ``timestep_range`` (the denoiser timestep that the gate reads as noise level 1), ``prompt_input``
    (``context``: the mean of the text tokens; ``pooled``: FLUX.1's CLIP-L vector; absent = context),
    ``experts``: ``[{"aspect", "file", "sha256", "rank", "alpha"}, ...]`` in gate order, ``file``
    relative to the MoL file's folder (normally a bare file name: the LoRAs sit beside it),
    ``layers``: the kohya module names the gate covers (``lora_unet_...``, ``lora_te_...``), in
    gate order, ``layer_in_features``, and free-form ``training`` / ``base_model`` records.

Version 1 files (written before the free-to-combine gate kinds) have no gate kind and no timestep
input: they load as softmax gates, exactly as they were trained.

Loading checks every named LoRA's sha256 against the file on disk: a retrained or swapped LoRA
under the same name would silently make the learned gate meaningless.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..models.lora_files import LORA_FIX, open_safetensors, read_safetensors
from ..safe_io import atomic_file, confined_path, readable_name, sha256_file
from .gate import MixtureGate

logger = logging.getLogger(__name__)

MOL_FORMAT = "mixture-of-lora"
MOL_VERSION = 2
MOL_SUFFIX = ".mol.safetensors"


@readable_name
class LoRAHashMismatchError(ValueError):
    """A LoRA named in a MoL file differs from the one the gate was trained with."""


@dataclass(frozen=True)
class ExpertRecord:
    """One aspect LoRA of a mixture, as recorded in the MoL file."""

    aspect: str
    file: str  # relative to the MoL file's folder
    sha256: str
    rank: int
    alpha: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"aspect": self.aspect, "file": self.file, "sha256": self.sha256, "rank": self.rank, "alpha": self.alpha}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExpertRecord:
        try:
            return cls(
                aspect=str(data["aspect"]),
                file=str(data["file"]),
                sha256=str(data["sha256"]).lower(),
                rank=int(data["rank"]),
                alpha=None if data.get("alpha") is None else float(data["alpha"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"MoL expert record {dict(data)!r}: malformed ({exc})") from exc


@dataclass
class MolFile:
    gate: MixtureGate
    experts: tuple[ExpertRecord, ...]
    path: Path | None = None
    training: dict[str, Any] = field(default_factory=dict)
    base_model: dict[str, Any] = field(default_factory=dict)
    lora_paths: tuple[Path, ...] = ()  # set by resolve_loras (hash-checked)

    @property
    def aspects(self) -> tuple[str, ...]:
        return tuple(record.aspect for record in self.experts)


# -- hashing and LoRA descriptions ------------------------------------------------------------------

def describe_lora(path: str | os.PathLike) -> tuple[int, float | None]:
    """(rank, alpha) of a kohya/peft LoRA file, read from its headers and alpha scalars. The rank
    is the largest ``lora_down`` / ``lora_A`` rank; alpha the first ``.alpha`` found (None if none)."""
    rank, alpha = 0, None
    with open_safetensors(path, what="LoRA file", fix=LORA_FIX) as handle:
        for key in handle.keys():
            if key.endswith((".lora_down.weight", ".lora_A.weight")):
                rank = max(rank, int(handle.get_slice(key).get_shape()[0]))
            elif key.endswith(".alpha") and alpha is None:
                alpha = float(handle.get_tensor(key).float().item())
    if rank == 0:
        raise ValueError(f"LoRA {str(path)!r}: no lora_down / lora_A weights; is this a LoRA file?")
    return rank, alpha


def expert_record(aspect: str, lora_path: str | os.PathLike, mol_dir: str | os.PathLike) -> ExpertRecord:
    """Record an aspect LoRA for a MoL file that will be written into ``mol_dir``."""
    lora_path = Path(lora_path).resolve()
    mol_dir = Path(mol_dir).resolve()
    try:
        relative = lora_path.relative_to(mol_dir).as_posix()
    except ValueError as exc:
        raise ValueError(
            f"LoRA {str(lora_path)!r}: not inside {str(mol_dir)!r}; the MoL file is saved next to its LoRAs, "
            "so write it into the LoRAs' folder (or a folder above them)"
        ) from exc
    rank, alpha = describe_lora(lora_path)
    return ExpertRecord(aspect=aspect, file=relative, sha256=sha256_file(lora_path), rank=rank, alpha=alpha)


# -- save / read ------------------------------------------------------------------------------------

def _tensor_name(state_key: str) -> str:
    """The file's name of a gate state-dict entry (``weights.3`` -> ``gate.weight.3``)."""
    if state_key.startswith("weights."):
        state_key = "weight." + state_key[len("weights."):]
    return "gate." + state_key


def gate_tensors(gate: MixtureGate) -> dict[str, torch.Tensor]:
    """Every persistent tensor of the gate under its file name (module docstring)."""
    return {_tensor_name(key): tensor.detach().float().cpu().contiguous() for key, tensor in gate.state_dict().items()}


def save_mol(
    path: str | os.PathLike,
    gate: MixtureGate,
    experts: Sequence[ExpertRecord],
    *,
    training: Mapping[str, Any] | None = None,
    base_model: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``gate`` + ``experts`` atomically to ``path`` (refuses to replace an existing file
    unless ``overwrite``). ``path`` must already be confined by the caller; ``experts`` come from
    ``expert_record`` against the same folder."""
    path = Path(path)
    if not path.name.endswith(MOL_SUFFIX):
        raise ValueError(f"MoL file {str(path)!r}: the name must end in {MOL_SUFFIX!r} (e.g. 'aspects{MOL_SUFFIX}')")
    if tuple(record.aspect for record in experts) != gate.experts:
        raise ValueError(
            f"experts {[r.aspect for r in experts]}: must match the gate's experts {list(gate.experts)} in order"
        )
    metadata = {
        "versat2i_format": MOL_FORMAT,
        "versat2i_mol_version": str(MOL_VERSION),
        "granularity": gate.granularity,
        "gate_kind": gate.kind,
        "timestep_knots": str(gate.timestep_knots),
        "timestep_range": repr(gate.timestep_range),
        "prompt_features": str(gate.prompt_features or 0),
        "prompt_input": gate.prompt_input,
        "experts": json.dumps([record.to_json() for record in experts]),
        "layers": json.dumps(list(gate.layers)),
        "layer_in_features": json.dumps(list(gate.layer_in_features)),
        "training": json.dumps(dict(training or {}), default=str),
        "base_model": json.dumps(dict(base_model or {}), default=str),
    }
    with atomic_file(path, overwrite=overwrite, what="MoL file") as temp:
        save_file(gate_tensors(gate), str(temp), metadata=metadata)
    logger.info("saved MoL gate (%s %s, %d LoRAs, %d layers) to %s", gate.granularity, gate.kind, len(experts),
                len(gate.layers), path)
    return path


def _json_field(metadata: Mapping[str, str], name: str, path: Path) -> Any:
    if name not in metadata:
        raise ValueError(f"MoL file {str(path)!r}: metadata field {name!r} is missing; the file is damaged or not "
                         "a MoL file")
    try:
        return json.loads(metadata[name])
    except json.JSONDecodeError as exc:
        raise ValueError(f"MoL file {str(path)!r}: metadata field {name!r} is not valid JSON ({exc})") from exc


def read_mol(path: str | os.PathLike) -> MolFile:
    """Read a MoL file (gate + records). Does not touch the LoRAs: see ``resolve_loras``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MoL file {str(path)!r} does not exist; train a gate first (versat2i train-gate)")
    tensors, metadata = read_safetensors(path, what="MoL file", fix="train the gate again (Train Gate or versat2i "
                                                                     "train-gate), or replace it with an intact copy")
    if metadata.get("versat2i_format") != MOL_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a MoL file (metadata versat2i_format={metadata.get('versat2i_format')!r}); "
            "pick a '*.mol.safetensors' written by the gate trainer (a plain LoRA goes into LoraLoader)"
        )
    version = int(metadata.get("versat2i_mol_version", "0"))
    if version > MOL_VERSION:
        raise ValueError(f"MoL file {str(path)!r}: format version {version} is newer than this pack's "
                         f"{MOL_VERSION}; update the pack")
    experts = tuple(ExpertRecord.from_json(item) for item in _json_field(metadata, "experts", path))
    layers = list(_json_field(metadata, "layers", path))
    in_features = list(_json_field(metadata, "layer_in_features", path))
    granularity = metadata.get("granularity", "")
    prompt_features = int(metadata.get("prompt_features", "0") or 0) or None
    try:
        if version >= 2:
            kind, knots = metadata.get("gate_kind", ""), int(metadata.get("timestep_knots", "0"))
            timestep_range = float(metadata.get("timestep_range", "1000.0"))
        else:  # version 1: a softmax gate without timestep input
            kind, knots, timestep_range = "softmax", 0, 1000.0
        gate = MixtureGate([record.aspect for record in experts], layers, in_features, granularity,
                           prompt_features=prompt_features, kind=kind, timestep_knots=knots,
                           timestep_range=timestep_range, prompt_input=metadata.get("prompt_input", "context"))
    except ValueError as exc:
        raise ValueError(f"MoL file {str(path)!r}: {exc}; the file is damaged or was written by a newer pack") from None
    expected = gate_tensors(gate)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"MoL file {str(path)!r}: tensors {missing[:4]} missing; the file is damaged")
    for name, reference in expected.items():
        if tuple(tensors[name].shape) != tuple(reference.shape):
            raise ValueError(
                f"MoL file {str(path)!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected "
                f"{tuple(reference.shape)} from its metadata; the file is damaged"
            )
    gate.load_state_dict({key: tensors[_tensor_name(key)] for key in gate.state_dict()})
    gate.calibrated = [True] * len(gate.layers)
    gate.requires_grad_(False)
    return MolFile(
        gate=gate,
        experts=experts,
        path=path,
        training=dict(_json_field(metadata, "training", path)) if "training" in metadata else {},
        base_model=dict(_json_field(metadata, "base_model", path)) if "base_model" in metadata else {},
    )


def resolve_loras(mol: MolFile, search_dirs: Iterable[str | os.PathLike] = (), *, check_hashes: bool = True) -> MolFile:
    """Find each expert's LoRA file and check its sha256. Looks next to the MoL file first (the
    recorded relative name, confined to that folder), then for the same name in ``search_dirs``
    (e.g. ComfyUI's other ``loras`` folders). Returns ``mol`` with ``lora_paths`` set."""
    if mol.path is None:
        raise ValueError("resolve_loras: this MoL was not read from a file; pass LoRA paths directly")
    roots = [mol.path.parent, *(Path(d) for d in search_dirs)]
    paths = []
    for record in mol.experts:
        found = None
        for root in roots:
            candidate = confined_path(root, record.file, what=f"LoRA file of aspect {record.aspect!r}", writes=False)
            if candidate.is_file():
                found = candidate
                break
        if found is None:
            raise FileNotFoundError(
                f"LoRA {record.file!r} (aspect {record.aspect!r}) named by MoL file {str(mol.path)!r} was not found; "
                f"put it in {str(mol.path.parent)!r} next to the MoL file"
            )
        if check_hashes:
            actual = sha256_file(found)
            if actual != record.sha256:
                raise LoRAHashMismatchError(
                    f"LoRA {str(found)!r} (aspect {record.aspect!r}) has sha256 {actual[:12]}…, but MoL file "
                    f"{mol.path.name!r} was trained with {record.sha256[:12]}…; the LoRA was retrained or replaced. "
                    "Retrain the gate (versat2i train-gate) or restore the original LoRA file"
                )
        paths.append(found)
    mol.lora_paths = tuple(paths)
    return mol


def load_mol(path: str | os.PathLike, search_dirs: Iterable[str | os.PathLike] = ()) -> MolFile:
    """``read_mol`` + ``resolve_loras``: the gate with its hash-checked LoRA paths."""
    return resolve_loras(read_mol(path), search_dirs)

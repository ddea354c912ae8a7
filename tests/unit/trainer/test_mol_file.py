"""MoL file (trainer/mol_file.py): save/load round trip, LoRA hash checks, clear errors. Offline,
tiny tensors, well under a second."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from versat2i.safe_io import file_identity
from versat2i.trainer.gate import MixtureGate
from versat2i.trainer.mol_file import (
    LoRAHashMismatchError,
    expert_record,
    load_mol,
    read_mol,
    save_mol,
)

LAYERS = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          "lora_te_text_model_encoder_layers_0_mlp_fc1"]
IN_FEATURES = [32, 16]


def write_lora(path, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, features in zip(LAYERS, IN_FEATURES):
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, features, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(features, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return path


def trained_gate(granularity, seed=0, **form):
    g = torch.Generator().manual_seed(seed)
    gate = MixtureGate(["aesthetics", "geometry", "lowlevel"], LAYERS, IN_FEATURES, granularity, prompt_features=12,
                       **form)
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g))
        gate.prior.copy_(torch.softmax(torch.randn(gate.prior.shape, generator=g), -1))
    return gate


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "loras" / "versat2i"
    folder.mkdir(parents=True)
    for seed, aspect in enumerate(["aesthetics", "geometry", "lowlevel"]):
        write_lora(folder / f"{aspect}.safetensors", seed)
    return folder


def records(folder, gate):
    return [expert_record(aspect, folder / f"{aspect}.safetensors", folder) for aspect in gate.experts]


@pytest.mark.parametrize("granularity", ["token", "prompt"])
def test_round_trip(lora_dir, granularity):
    gate = trained_gate(granularity)
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate), training={"steps": 7})
    mol = load_mol(path)
    assert mol.aspects == gate.experts
    assert mol.gate.layers == gate.layers and mol.gate.granularity == granularity
    assert mol.training == {"steps": 7}
    assert [p.name for p in mol.lora_paths] == ["aesthetics.safetensors", "geometry.safetensors",
                                                "lowlevel.safetensors"]
    assert mol.experts[0].rank == 4 and mol.experts[0].alpha == 2.0
    for (name, a), (_, b) in zip(gate.state_dict().items(), mol.gate.state_dict().items()):
        assert torch.equal(a, b), name
    # the loaded gate computes the same thing
    hidden = torch.randn(3, 32)
    if granularity == "token":
        torch.testing.assert_close(mol.gate.token_gates(0, hidden), gate.token_gates(0, hidden))
    else:
        context = torch.randn(2, 5, 12)
        torch.testing.assert_close(mol.gate.sample_gates(context), gate.sample_gates(context))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["versat2i_format"] == "mixture-of-lora"
    assert json.loads(metadata["layers"]) == LAYERS
    assert json.loads(metadata["experts"])[1]["file"] == "geometry.safetensors"


@pytest.mark.parametrize(("granularity", "form"), [
    ("token", {"kind": "softmax_n", "timestep_knots": 4}),
    ("prompt", {"kind": "scaled_softmax", "timestep_knots": 3, "timestep_range": 500.0}),
    ("layer", {"kind": "sigmoid"}),
    ("layer", {"kind": "scaled_softmax", "timestep_knots": 2}),
])
def test_round_trip_of_every_gate_form(lora_dir, granularity, form):
    """Version 2 records the gate's kind and timestep input, so the loader rebuilds the same gate."""
    gate = trained_gate(granularity, seed=4, **form)
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate))
    mol = load_mol(path)
    assert (mol.gate.kind, mol.gate.timestep_knots, mol.gate.timestep_range) == (
        gate.kind, gate.timestep_knots, gate.timestep_range)
    assert sorted(mol.gate.state_dict()) == sorted(gate.state_dict())
    for name, value in gate.state_dict().items():
        assert torch.equal(mol.gate.state_dict()[name], value), name
    timestep = torch.tensor([30.0, 700.0])
    if granularity == "token":
        offsets = gate.timestep_offsets(timestep, 2)
        torch.testing.assert_close(mol.gate.timestep_offsets(timestep, 2), offsets)
        hidden = torch.randn(2, 4, 32)
        torch.testing.assert_close(mol.gate.token_gates(0, hidden, offsets=offsets),
                                   gate.token_gates(0, hidden, offsets=offsets))
    else:
        context = torch.randn(2, 5, 12)
        torch.testing.assert_close(mol.gate.sample_gates(context, timestep=timestep),
                                   gate.sample_gates(context, timestep=timestep))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["versat2i_mol_version"] == "2" and metadata["gate_kind"] == gate.kind


def test_a_version_1_file_loads_as_the_softmax_gate_it_was(lora_dir):
    """A MoL file written before gate kinds existed (no gate_kind / timestep metadata) still loads,
    as the softmax gate without timestep input it was trained as."""
    gate = trained_gate("token", seed=2)
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    old = {k: v for k, v in metadata.items() if k not in ("gate_kind", "timestep_knots", "timestep_range")}
    old["versat2i_mol_version"] = "1"
    version_1 = lora_dir / "old.mol.safetensors"
    save_file(tensors, str(version_1), metadata=old)
    mol = load_mol(version_1)
    assert (mol.gate.kind, mol.gate.timestep_knots) == ("softmax", 0)
    hidden = torch.randn(5, 32)
    torch.testing.assert_close(mol.gate.token_gates(0, hidden), gate.token_gates(0, hidden))
    torch.testing.assert_close(mol.gate.token_gates(0, hidden).sum(-1), torch.ones(5))
    # a newer format is refused with the fix
    newer = {**metadata, "versat2i_mol_version": "3"}
    save_file(tensors, str(lora_dir / "new.mol.safetensors"), metadata=newer)
    with pytest.raises(ValueError, match="newer than this pack"):
        read_mol(lora_dir / "new.mol.safetensors")
    damaged = {**metadata, "gate_kind": "softmaxx"}
    save_file(tensors, str(lora_dir / "bad.mol.safetensors"), metadata=damaged)
    with pytest.raises(ValueError, match="gate kind 'softmaxx'"):
        read_mol(lora_dir / "bad.mol.safetensors")


def test_changed_lora_is_a_clear_error(lora_dir):
    gate = trained_gate("token")
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate))
    write_lora(lora_dir / "geometry.safetensors", seed=99)  # retrained under the same name
    with pytest.raises(LoRAHashMismatchError, match="geometry") as excinfo:
        load_mol(path)
    assert "Retrain the gate" in str(excinfo.value)
    (lora_dir / "geometry.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="geometry.safetensors"):
        load_mol(path)


def test_lora_found_in_search_dirs(lora_dir, tmp_path):
    gate = trained_gate("token")
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate))
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = other / "lowlevel.safetensors"
    (lora_dir / "lowlevel.safetensors").rename(moved)
    assert load_mol(path, search_dirs=[other]).lora_paths[2] == moved.resolve()


def test_no_overwrite_and_atomic(lora_dir):
    gate = trained_gate("token")
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        save_mol(path, trained_gate("token", seed=5), records(lora_dir, gate))
    assert path.read_bytes() == before
    save_mol(path, trained_gate("token", seed=5), records(lora_dir, gate), overwrite=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in lora_dir.iterdir() if p.name.startswith(".")) == []  # no temp left over


def test_bad_inputs_are_clear_errors(lora_dir, tmp_path):
    gate = trained_gate("token")
    with pytest.raises(ValueError, match=r"\.mol\.safetensors"):
        save_mol(lora_dir / "mix.safetensors", gate, records(lora_dir, gate))
    with pytest.raises(ValueError, match="must match the gate"):
        save_mol(lora_dir / "mix.mol.safetensors", gate, list(reversed(records(lora_dir, gate))))
    with pytest.raises(ValueError, match="not inside"):
        expert_record("aesthetics", lora_dir / "aesthetics.safetensors", tmp_path / "other")
    with pytest.raises(ValueError, match="not a MoL file"):
        read_mol(lora_dir / "aesthetics.safetensors")  # a plain LoRA
    with pytest.raises(FileNotFoundError, match="train a gate"):
        read_mol(lora_dir / "missing.mol.safetensors")


def test_record_escaping_its_folder_is_refused(lora_dir):
    gate = trained_gate("token")
    bad = records(lora_dir, gate)
    bad[0] = type(bad[0])(aspect="aesthetics", file="../../secret.safetensors", sha256=bad[0].sha256, rank=4)
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, bad)
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        load_mol(path)


def _restore_times(path, stat_before):
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_same_size_swap_with_preserved_mtime_is_still_caught(lora_dir, how):
    """A LoRA swapped for another of the same size with its mtime restored (cp -p, rsync -t, an
    unpacked archive) must not pass on a cached hash."""
    gate = trained_gate("token")
    path = save_mol(lora_dir / "mix.mol.safetensors", gate, records(lora_dir, gate))
    load_mol(path)  # hashes (and caches) every LoRA
    target = lora_dir / "geometry.safetensors"
    before = target.stat()
    other = write_lora(lora_dir.parent / "other.safetensors", seed=99)
    assert other.stat().st_size == before.st_size
    if how == "replaced":
        os.replace(other, target)  # a new inode under the old name
    else:
        target.write_bytes(other.read_bytes())  # same inode
    _restore_times(target, before)
    for _ in range(500):  # ctime has the kernel clock's tick: make sure it moved past the hash
        if target.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.002)
        _restore_times(target, before)  # utime sets ctime to now
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(LoRAHashMismatchError, match="geometry"):
        load_mol(path)


def test_file_identity_changes_with_the_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"first")
    first = file_identity(path)
    assert file_identity(path) == first
    replacement = tmp_path / "b.bin"
    replacement.write_bytes(b"other")
    os.replace(replacement, path)
    os.utime(path, ns=(first[2], first[2]))
    assert file_identity(path)[:3] == first[:3] and file_identity(path) != first  # the inode tells

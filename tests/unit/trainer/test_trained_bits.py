"""Trained LoRAs and gates stay bit for bit what they were (the guard for refactoring the trainer).

Each case trains a tiny random-weight model in-process for a few steps and hashes the tensors of the
file it writes (names, dtypes, shapes and bytes; metadata holds paths and times, so it is left out).
The expected hashes were recorded on main before the trainer was restructured (issue 11) and must
not move when code is reorganised. Floating-point results may differ between CPU instruction sets
and torch builds, so the exact comparison applies where the recording was made (same torch version
and CPU capability, ``RECORDED_ON``); elsewhere the test still trains and checks the tensors
against recorded sums to a tolerance that refactoring errors would exceed.

Run ``python tests/unit/trainer/test_trained_bits.py`` to print the current values (to record
them after an intended change of results, never to make a refactoring pass).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models.lora_training import TINY_SIZE, make_kohya_dataset, tiny_lora_config
from tiny_models.sd import build_tiny_model

RECORDED_ON = {"torch": "2.14.1+cu130", "cpu_capability": "AVX512"}

# case -> (sha256 of the tensors, sum of |values| of the trained part: the LoRA up weights, which start
# at zero, or every tensor of a gate)
EXPECTED = {
    # re-recorded after issue 16 rewrote the gate's forward (gate kinds): every tensor within 4e-6 of
    # the values recorded before it (float rounding order), the same keys and shapes
    "gate-prompt": ("1aa0ef2b52614460f52313fd56d8f76aa14818515f2707939e3b75806d1e83f7", 1156.115298206918),
    "gate-token": ("de376293fb7de409e9531c9a650777f457f211303443c362957420702443037e", 1301.6093721045181),
    "lora-sd15": ("5672521b40b789eb7336da3da80c58840afc762c78120a4f7a6089defdd7bdc1", 38.23152231799031),
    "lora-sd15-text-encoder-ff-snr": ("c863a57f7204d08ec69940085599402b25be1841fcba432c1f77d6136d562c3c",
                                      90.34291100045084),
    "lora-sd2-vpred": ("5766750a65be10a1931939642b034cc53756e268693d46c187ec22555d51e702", 40.99180372610317),
    "lora-sdxl": ("d632a68841e8c70c1f7908ae29f13351298e318b1a877fa3eb228d69bd26d998", 145.59156743940002),
}


def tensor_digest(path: Path) -> tuple[str, float]:
    state = load_file(str(path))
    digest = hashlib.sha256()
    trained = [key for key in state if ".lora_up." in key] or list(state)
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), sum(float(state[key].double().abs().sum()) for key in trained)


def same_platform() -> bool:
    return (torch.__version__ == RECORDED_ON["torch"]
            and torch.backends.cpu.get_cpu_capability() == RECORDED_ON["cpu_capability"])


def _train_lora(root: Path, arch: str, *, single_file: bool = False, **overrides) -> Path:
    from versat2i.trainer import train_lora

    model = build_tiny_model(arch, root / "model", seed=3)
    dataset = make_kohya_dataset(root / "dataset", aspects={"aesthetics": 2}, images_per_aspect=3)
    if single_file:  # the original-layout file, read with the tiny model's own configs
        overrides["model_config_dir"] = str(model.folder)
    config = tiny_lora_config(root, model.checkpoint if single_file else model.folder, dataset,
                              max_train_steps=6, checkpointing_steps=100, **overrides)
    return train_lora.main(train_lora.parse_args(["--config", str(config.save(root / "lora.toml"))]))


def _train_gate(root: Path, granularity: str) -> Path:
    from safetensors.torch import save_file

    from versat2i.trainer import train_gate, train_lora

    model = build_tiny_model("sd15", root / "model", seed=3)
    aspects = ("aesthetics", "lowlevel")
    dataset = make_kohya_dataset(root / "dataset", aspects={a: 1 for a in aspects}, images_per_aspect=2)
    loras = root / "loras"
    lora_config = tiny_lora_config(root, model.folder, dataset, aspect="", output_dir=str(loras),
                                   output_name="aesthetics", work_dir=str(root / "lora-run"), max_train_steps=6,
                                   checkpointing_steps=100, learning_rate=1e-2)
    first = train_lora.main(train_lora.parse_args(["--config", str(lora_config.save(root / "lora.toml"))]))
    state = load_file(str(first))
    second = loras / "lowlevel.safetensors"
    save_file({k: -v if k.endswith(".lora_up.weight") else v for k, v in state.items()}, str(second),
              metadata={"versat2i_aspect": "lowlevel"})
    config = train_gate.GateTrainConfig(
        base_model=str(model.folder), dataset_dir=str(dataset), loras=(str(first), str(second)),
        aspects=aspects, output_dir=str(loras), output_name=f"gate-{granularity}", work_dir=str(root / "gate-run"),
        resolution=TINY_SIZE, bucket_step=TINY_SIZE, train_batch_size=2, max_train_steps=5, learning_rate=0.1,
        checkpointing_steps=100, mixed_precision="no", seed=3, granularity=granularity,
        gate_kind="softmax")  # the MoLE gate these bits were recorded with (the default changed since: issue 16)
    return train_gate.main(train_gate.parse_args(["--config", str(config.save(root / "gate.toml"))]))


CASES = {
    "lora-sd15": lambda root: _train_lora(root, "sd15"),
    "lora-sd15-text-encoder-ff-snr": lambda root: _train_lora(root, "sd15", train_text_encoder=True,
                                                              train_feed_forward=True, snr_gamma=5.0,
                                                              noise_offset=0.05),
    "lora-sd2-vpred": lambda root: _train_lora(root, "sd2", single_file=True, cache_latents=True,
                                               cache_text_embeddings=True),
    "lora-sdxl": lambda root: _train_lora(root, "sdxl", train_text_encoder=True),
    "gate-token": lambda root: _train_gate(root, "token"),
    "gate-prompt": lambda root: _train_gate(root, "prompt"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_tensors_are_unchanged(case, tmp_path):
    digest, total = tensor_digest(CASES[case](tmp_path))
    expected_digest, expected_total = EXPECTED[case]
    assert total == pytest.approx(expected_total, rel=1e-3), f"{case}: tensor sum {total} != {expected_total}"
    if same_platform():
        assert digest == expected_digest, f"{case}: the trained tensors changed ({digest})"


if __name__ == "__main__":  # print the values to record (see the module docstring)
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    torch.set_num_threads(1)
    print(f"RECORDED_ON = {{'torch': {torch.__version__!r}, 'cpu_capability': "
          f"{torch.backends.cpu.get_cpu_capability()!r}}}")
    for name in sorted(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"    {name!r}: {tensor_digest(CASES[name](Path(tmp)))!r},", flush=True)

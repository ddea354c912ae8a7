"""No network at run time (offline.py): the pack's processes are run with the Hugging Face offline
switches *unset* (as a user's shell has them) and a socket tripwire in every process
(``tests/network_tripwire/sitecustomize.py``: each DNS look-up or outside connection is refused and
logged); each must make zero attempts.

The test session sets HF_HUB_OFFLINE for everything else (conftest.py), which is what hid the
training child's look-ups: peft imports bitsandbytes, which asks the ``kernels`` package for a CPU
kernel from the Hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config
from tiny_models.sd import build_tiny_sd15, make_kohya_lora

from versat2i.trainer.launcher import LaunchOptions, run_training

TESTS = Path(__file__).resolve().parents[1]
TRIPWIRE = TESTS / "network_tripwire"
# What a user's shell normally lacks, and conftest.py sets for the test session.
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def online_environment(log: Path) -> dict[str, str]:
    """This process's environment without the offline switches, with the tripwire loaded."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_SWITCHES}
    env["PYTHONPATH"] = os.pathsep.join([str(TRIPWIRE), str(TESTS), env.get("PYTHONPATH", "")])
    env["VERSAT2I_TRIPWIRE_LOG"] = str(log)
    return env


def attempts(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def run_python(code: str, log: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=online_environment(log),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_tripwire_catches_a_look_up(tmp_path):
    """The check itself: a process that resolves a name is caught (else an empty log proves nothing)."""
    log = tmp_path / "net.log"
    result = run_python("""
        import socket
        try:
            socket.getaddrinfo("huggingface.co", 443)
        except OSError as exc:
            print(exc)
    """, log)
    assert "network tripwire" in result.stdout and "getaddrinfo 'huggingface.co'" in attempts(log)


def test_importing_the_pack_opens_no_connection(tmp_path):
    log = tmp_path / "net.log"
    run_python("""
        import versat2i, versat2i.cli, versat2i.loop.run, versat2i.loop.stages, versat2i.rewards.registry
        import versat2i.trainer.train_lora, versat2i.trainer.train_gate, versat2i.trainer.mix_diffusers
        import versat2i.models.loading, versat2i.models.pipelines, versat2i.training_set.writer
    """, log)
    assert attempts(log) == ""


def test_the_scorers_open_no_connection(tmp_path):
    """Every learned scorer (tiny weights under the real file names), loaded and scoring in one
    process, as Load Scorers and Score Images run them inside ComfyUI's process."""
    log = tmp_path / "net.log"
    run_python(f"""
        from pathlib import Path
        from tiny_models.clip import (TINY_CLIP_OPTIONS, TINY_HPS_OPTIONS, random_images, register_tiny_open_clip,
                                      write_tiny_reward_models)
        from tiny_models.iqa import write_pyiqa_checkpoint
        from versat2i.rewards.registry import get_scorer

        models = Path({str(tmp_path / "models")!r})
        register_tiny_open_clip()
        write_tiny_reward_models(models)
        write_pyiqa_checkpoint(models, "cnniqa")
        images = random_images(2, 40, 56)
        for name, options in (("laion-aesthetic-v2", TINY_CLIP_OPTIONS), ("clip-score", TINY_CLIP_OPTIONS),
                              ("clip-iqa", TINY_CLIP_OPTIONS), ("hps-v2.1", TINY_HPS_OPTIONS),
                              ("pickscore-v1", {{}}), ("pyiqa:cnniqa", {{}}), ("mediapipe-anatomy", {{}})):
            scorer = get_scorer(name, search_dirs=[models], **options)
            print(name, scorer.score(images, ["a red cube", "a blue ball"]).tolist())
    """, log)
    assert attempts(log) == ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd15")
    return build_tiny_sd15(root), make_kohya_dataset(root / "dataset", aspects={"aesthetics": 1}, images_per_aspect=2)


def test_a_training_process_opens_no_connection_and_prints_no_kernel_warning(tiny, tmp_path):
    model, dataset = tiny
    log = tmp_path / "net.log"
    config = tiny_lora_config(tmp_path, model.folder, dataset, max_train_steps=2, checkpointing_steps=1)
    output = tmp_path / "train_output.log"
    run_training(["--config", str(config.save(tmp_path / "run.toml"))], options=LaunchOptions(cpu=True),
                 env=online_environment(log), output_log=output)
    assert attempts(log) == ""
    assert "kernels-community" not in output.read_text()  # bitsandbytes' and kernels' notices about the Hub


def test_the_command_opens_no_connection(tiny, tmp_path):
    """``versat2i generate --lora`` loads peft (and so bitsandbytes) in the command's own process."""
    model, _ = tiny
    log = tmp_path / "net.log"
    lora = make_kohya_lora("sd15", tmp_path / "style.safetensors", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    result = subprocess.run(
        [sys.executable, "-m", "versat2i.cli", "generate", "--checkpoint", str(model.folder), "--prompts",
         str(prompts), "--k", "2", "--steps", "2", "--out", str(tmp_path / "out"), "--lora", str(lora), "--quiet"],
        env=online_environment(log), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert attempts(log) == ""

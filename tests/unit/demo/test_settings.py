"""The demo loop's settings name real things: LoRA fields the trainer knows, scorers the registry
builds, the shipped base model, and prompt sets from the world's split."""

from __future__ import annotations

import dataclasses

from versat2i.demo import settings, world
from versat2i.rewards.registry import get_scorer
from versat2i.trainer.config import LoraTrainConfig


def test_lora_and_gate_settings_are_trainer_config_fields():
    from versat2i.trainer.train_gate import GateTrainConfig

    fields = {f.name for f in dataclasses.fields(LoraTrainConfig)}
    assert set(settings.LORA) <= fields
    assert set(settings.LORA_ASPECTS) <= set(settings.SCORERS)
    assert all(set(overrides) <= fields for overrides in settings.LORA_ASPECTS.values())
    assert set(settings.GATE) <= {f.name for f in dataclasses.fields(GateTrainConfig)}


def test_the_demo_loop_config_is_valid(tmp_path):
    from versat2i.loop.config import VARIANT_KINDS
    from versat2i.loop.demo import demo_config

    config = demo_config(tmp_path / "demo")
    assert config.problems(check_paths=False) == []
    assert set(settings.EVALUATION_VARIANTS) <= set(VARIANT_KINDS)
    assert config.validation_prompts()  # the uniform weight is chosen on them


def test_scorers_build_and_cover_every_aspect():
    for aspect, name in settings.SCORERS.items():
        assert get_scorer(name).aspect == aspect
    assert settings.STRONGEST_ASPECT in settings.SCORERS


def test_the_loop_uses_the_shipped_model_and_the_world_split():
    assert (settings.BASE_MODEL_DIR / "model_index.json").is_file()
    assert settings.loop_prompts() + settings.held_out_prompts() != []
    assert set(settings.loop_prompts()).isdisjoint(settings.held_out_prompts())
    assert settings.SAMPLER["height"] == settings.SAMPLER["width"] == world.IMAGE_SIZE
    assert settings.CANDIDATES_PER_PROMPT >= 2

"""Generate Candidates inside a real ComfyUI (imported in-process, CPU; skipped without COMFYUI_PATH).

The reference is ComfyUI's own core sampling: ``nodes.common_ksampler`` (what the KSampler node
runs) with seed_i and a batch of one, on the same tiny random-weight SD1.5 model, CLIP and VAE. Image
i of the node's batch must equal it, whatever the batch size, for a deterministic and for an
ancestral sampler. Offline: no weights, no network.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.comfy

TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
PROMPTS = "a red circle\na blue square"


@pytest.fixture(scope="module")
def tiny(comfy):
    """(MODEL, CLIP, VAE) tiny random-weight ComfyUI objects."""
    import comfy.sd
    from tiny_models.comfy import build_tiny_clip, build_tiny_sd15, init_weights_

    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": dict(TINY_VAE_DDCONFIG)}},
                       dtype=torch.float32)
    init_weights_(vae.first_stage_model, 7)
    return build_tiny_sd15(seed=0), build_tiny_clip(seed=0), vae


@pytest.fixture(scope="module")
def node_module(comfy):
    # Loaded directly by module (the registration list is the lead's nodes/__init__.py).
    return importlib.import_module("versat2i.nodes.generate_candidates")


def core_ksampler(comfy_nodes_module, model, clip, seed: int, prompt: str, *, steps: int, cfg: float,
                  sampler: str, scheduler: str, size: int, negative: str = "") -> torch.Tensor:
    positive = comfy_nodes_module.CLIPTextEncode().encode(clip, prompt)[0]
    negative_cond = comfy_nodes_module.CLIPTextEncode().encode(clip, negative)[0]
    latent = comfy_nodes_module.EmptyLatentImage().generate(size, size, 1)[0]
    return comfy_nodes_module.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative_cond,
                                              latent)[0]["samples"]


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal up to float rounding: 1e-5 of the tensor's scale (random tiny models give latents of
    magnitude ~100, and batched matmuls round differently from single ones)."""
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= 1e-5 * scale, f"{what}: max difference {error:.3g} at scale {scale:.3g}"


def run_node(node_module, tiny, **overrides):
    model, clip, vae = tiny
    inputs = {"model": model, "clip": clip, "vae": vae, "prompts": PROMPTS, "k": 3, "seed": 40, "steps": 3, "cfg": 4.0,
              "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64, "batch_size": 2,
              "negative_prompt": "blurry", "prompts_file": ""}
    inputs.update(overrides)
    return node_module.GenerateCandidates.execute(**inputs)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_each_image_equals_a_core_ksampler_run_with_its_seed(node_module, tiny, comfy, sampler):
    import nodes as comfy_nodes_module  # ComfyUI's nodes.py (the conftest put ComfyUI on sys.path)

    model, clip, vae = tiny
    output = run_node(node_module, tiny, sampler_name=sampler, batch_size=3)
    images, candidates, latent = output.args
    assert images.shape == (6, 64, 64, 3) and latent["samples"].shape == (6, 4, 8, 8)
    assert candidates == {
        "prompts": ["a red circle"] * 3 + ["a blue square"] * 3,
        "seeds": [40, 41, 42, 43, 44, 45],
        "prompt_indices": [0, 0, 0, 1, 1, 1],
        "candidate_indices": [0, 1, 2, 0, 1, 2],
        "image_ids": ["p00000_c000", "p00000_c001", "p00000_c002", "p00001_c000", "p00001_c001", "p00001_c002"],
    }
    for i, (prompt, seed) in enumerate(zip(candidates["prompts"], candidates["seeds"])):
        reference = core_ksampler(comfy_nodes_module, model, clip, seed, prompt, steps=3, cfg=4.0, sampler=sampler,
                                  scheduler="normal", size=64, negative="blurry")
        assert_same(latent["samples"][i:i + 1], reference, f"image {i} (seed {seed})")
    # IMAGE is the VAE decode of those latents, as VAEDecode makes it.
    assert_same(images, vae.decode(latent["samples"]), "decoded images")
    # Different seeds give different images.
    assert (latent["samples"][0] - latent["samples"][1]).abs().max() > 1e-3


def test_batch_size_does_not_change_any_image(node_module, tiny):
    one = run_node(node_module, tiny, batch_size=1).args[2]["samples"]
    three = run_node(node_module, tiny, batch_size=3).args[2]["samples"]
    assert_same(three, one, "batch of 3 vs batch of 1")


def test_score_images_reads_the_candidates(node_module, tiny, comfy_nodes, comfy_dirs):
    """The candidates output wired into Score Images: every image keeps its prompt, seed and indices."""
    images, candidates, _ = run_node(node_module, tiny, k=2).args
    scorers = comfy_nodes["VersaT2I_LoadScorers"].execute(
        device="cpu", aesthetics="analytic:contrast", alignment="disabled", geometry="disabled",
        lowlevel="analytic:sharpness")[0]
    table = comfy_nodes["VersaT2I_ScoreImages"].execute(images=images.detach(), scorers=scorers, prompts="",
                                                         candidates=candidates).args[0]
    assert table.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert table.seeds == [40, 41, 42, 43]
    assert table.prompt_indices == [0, 0, 1, 1] and table.candidate_indices == [0, 1, 0, 1]
    assert table.image_ids == ["p00000_c000", "p00000_c001", "p00001_c000", "p00001_c001"]


def test_prompts_file_from_the_input_folder(node_module, tiny, comfy_dirs, monkeypatch):
    import folder_paths

    input_dir = comfy_dirs["output"].parent / "input"
    input_dir.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(input_dir))
    (input_dir / "prompts.txt").write_text("# my prompts\na red circle\n\na blue square\n", encoding="utf-8")
    from_file = run_node(node_module, tiny, prompts="", prompts_file="prompts.txt", k=1).args[1]
    assert from_file["prompts"] == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        run_node(node_module, tiny, prompts="", prompts_file="../secret.txt")
    assert "not allowed" in node_module.GenerateCandidates.validate_inputs(prompts_file="/etc/passwd")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"prompts": "  \n \n"}, "no prompt given"),
    ({"k": 0}, "k=0"),
    ({"width": 60}, "width=60: must be a multiple of 8"),
    ({"height": 100}, "height=100: must be a multiple of 8"),
    ({"prompts": "a cat\na cat"}, "repeats prompt 0"),
])
def test_bad_inputs_are_clear_errors(node_module, tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_node(node_module, tiny, **overrides)


def test_validate_inputs_takes_one_input_and_the_rest_is_checked_when_the_node_runs(node_module, tiny):
    """ComfyUI attaches a validate_inputs message to every input the function takes: with one input,
    a bad prompts_file is one error on prompts_file. Sizes, k and combos are checked first thing when
    the node runs, each error naming its input (test_bad_inputs_are_clear_errors)."""
    import inspect

    validate = node_module.GenerateCandidates.validate_inputs
    assert list(inspect.signature(validate).parameters) == ["prompts_file"]
    assert validate(prompts_file="") is True and validate() is True
    with pytest.raises(ValueError, match="sampler_name 'euler_fast': not one of ComfyUI's samplers"):
        run_node(node_module, tiny, sampler_name="euler_fast")  # 0.3.64 lets V3 combo values through


def test_cancel_stops_sampling(node_module, tiny, comfy):
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(node_module, tiny)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_schema_has_tooltips_and_custom_output_type(node_module, comfy):
    schema = node_module.GenerateCandidates.GET_SCHEMA()
    assert schema.node_id == "VersaT2I_GenerateCandidates" and schema.category == "VersaT2I/generate"
    for socket in [*schema.inputs, *schema.outputs]:
        assert socket.tooltip, socket.id
    assert list(node_module.GenerateCandidates.RETURN_TYPES) == ["IMAGE", "VERSAT2I_CANDIDATES", "LATENT"]

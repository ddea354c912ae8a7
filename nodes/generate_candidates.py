"""Generate Candidates: N prompts x K seeds sampled with the user's MODEL / CLIP / VAE, each image
carrying its prompt and seed to Score Images and the training-set manifest.

Candidate ``c`` of prompt ``p`` gets seed ``seed + p * k + c`` (the same rule as ``versat2i
generate``), and its noise is ComfyUI's own ``comfy.sample.prepare_noise`` for that seed alone: image
i of the batch is exactly what a core KSampler gives with seed_i and a batch of one. Sampling uses
ComfyUI's ``comfy.sample.sample`` (every sampler and scheduler ComfyUI has), in batches of
``batch_size`` images of one prompt (the prompt's conditioning is shared as with a core KSampler).
Samplers that draw fresh noise at each step (ancestral, SDE, LCM...) take a batch-wide noise
stream, so for them every image is sampled on its own to stay identical to a core KSampler run.

The core KSampler stays usable: wire your own sampler and type the prompts into Score Images.
"""

from __future__ import annotations

import inspect

import folder_paths
import torch
from comfy_api.latest import io

from ..loop.generate import (
    MAX_SEED,
    candidates_info,
    check_prompts,
    plan_candidates,
    read_prompt_file,
)
from ..safe_io import confined_path
from .common import Candidates, category, node_id

# Samplers known to use no per-step noise (the k-diffusion functions without a noise_sampler
# argument are found by inspection; these three are not k-diffusion functions).
_DETERMINISTIC_NON_KDIFFUSION = {"ddim", "uni_pc", "uni_pc_bh2"}


def prompts_from_inputs(prompts: str, prompts_file: str) -> list[str]:
    """The prompt list: one per line of ``prompts``, or of a text file under ComfyUI's input folder."""
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    file_name = (prompts_file or "").strip()
    if file_name and lines:
        raise ValueError("prompts / prompts_file: both are filled in; type the prompts or name a file, not both")
    if file_name:
        path = confined_path(folder_paths.get_input_directory(), file_name, what="prompts_file", writes=False)
        lines = read_prompt_file(path)
    if not lines:
        raise ValueError("prompts: no prompt given; type one prompt per line (or name a .txt file in ComfyUI's "
                         "input folder in prompts_file)")
    return check_prompts(lines)


def sampler_draws_step_noise(sampler_name: str) -> bool:
    """True when the sampler adds fresh noise at each step (its noise stream spans the batch)."""
    import comfy.k_diffusion.sampling as k_diffusion_sampling

    if sampler_name in _DETERMINISTIC_NON_KDIFFUSION:
        return False
    function = getattr(k_diffusion_sampling, f"sample_{sampler_name}", None)
    if function is None:  # a sampler added by another pack: assume it is stochastic (safe, slower)
        return True
    return "noise_sampler" in inspect.signature(function).parameters


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 16 or value % 8:
            raise ValueError(f"{name}={value}: must be a multiple of 8 and at least 16 (latents are 1/8 of the "
                             "image size), e.g. 512")


def empty_latent(model, width: int, height: int) -> torch.Tensor:
    """One empty latent in the model's latent format, as its core Empty Latent node makes it: an SD
    latent at 1/8, adapted by ComfyUI to other channel counts and scales (FLUX.2: 128 channels at
    1/16, as EmptyFlux2LatentImage). ComfyUI 0.3.64's helper takes no scale (no 1/16 format there)."""
    import comfy.model_management
    import comfy.sample

    empty = torch.zeros([1, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
    fix = comfy.sample.fix_empty_latent_channels
    if "downscale_ratio_spacial" in inspect.signature(fix).parameters:
        return fix(model, empty, downscale_ratio_spacial=8)
    return fix(model, empty)


def encode(clip, text: str):
    """CONDITIONING for ``text``, exactly as the core CLIPTextEncode node makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _progress_callback(bar, previewer, *, offset: int, images: int, total: int):
    """Per-step callback: honours Cancel and advances one bar over all images x steps."""
    import comfy.model_management

    def callback(step, x0, _x, _total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel
        preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
        bar.update_absolute(offset + (step + 1) * images, total, preview)

    return callback


def sample_candidates(model, clip, vae, prompts: list[str], *, k: int, seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, width: int, height: int, batch_size: int,
                      negative_prompt: str = "") -> tuple[torch.Tensor, dict[str, list], dict[str, torch.Tensor]]:
    """(IMAGE [N*K,H,W,3], candidates info, LATENT) in prompt-major order."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    # ComfyUI 0.3.64 lets V3 combo values through (an old workflow can hold a renamed sampler).
    for name, value, options in (("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
                                 ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)):
        if value not in options:
            raise ValueError(f"{name} {value!r}: not one of ComfyUI's {name.split('_')[0]}s "
                             f"({', '.join(options[:6])}, ...)")
    if k < 1:
        raise ValueError(f"k={k}: the number of candidates per prompt must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1")
    check_size(width, height)
    plan = plan_candidates(prompts, k=k, base_seed=seed)
    chunk = 1 if sampler_draws_step_noise(sampler_name) else batch_size

    negative = encode(clip, negative_prompt)
    ratio = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
    for name, value in (("width", width), ("height", height)):
        if value % ratio:
            raise ValueError(f"{name}={value}: this model's latents are 1/{ratio} of the image; use a multiple of "
                             f"{ratio}, e.g. {max(ratio, round(value / ratio) * ratio)}")
    empty = empty_latent(model, width, height)
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    bar = comfy.utils.ProgressBar(len(plan) * steps)
    done_steps = 0
    samples = []
    for prompt_index, prompt in enumerate(prompts):
        positive = encode(clip, prompt)
        own = [r for r in plan if r.prompt_index == prompt_index]
        for start in range(0, len(own), chunk):
            batch = own[start:start + chunk]
            # Each image's noise from its own seed, as a core KSampler run with that seed makes it.
            noise = torch.cat([comfy.sample.prepare_noise(empty, r.seed) for r in batch])
            latent_image = empty.repeat([len(batch)] + [1] * (empty.ndim - 1))
            callback = _progress_callback(bar, previewer, offset=done_steps, images=len(batch),
                                          total=len(plan) * steps)
            samples.append(comfy.sample.sample(
                model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                seed=batch[0].seed,
            ))
            done_steps += steps * len(batch)
    latents = torch.cat(samples)
    images = vae.decode(latents)
    if images.ndim == 5:  # video VAEs return [B,T,H,W,C]; one frame per candidate here
        images = images.reshape(-1, *images.shape[-3:])
    return images, candidates_info(plan), {"samples": latents}


class GenerateCandidates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id=node_id("GenerateCandidates"),
            display_name="Generate Candidates (VersaT2I)",
            category=category("generate"),
            description=(
                "Samples K candidates for each prompt (one prompt per line) with your model. Candidate c of prompt p "
                "uses seed + p*k + c, and equals a core KSampler run with that seed. Connect 'candidates' to Score "
                "Images so every image keeps its prompt and seed through to the training-set manifest."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model that samples the candidates."),
                io.Clip.Input("clip", tooltip="The text encoder for the prompts and the negative prompt."),
                io.Vae.Input("vae", tooltip="Decodes the sampled latents into images."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line (blank lines skipped; each prompt once). Leave empty "
                                        "to read prompts_file instead."),
                io.Int.Input("k", default=4, min=1, max=1024,
                             tooltip="Candidates per prompt (the loop keeps the best of them per aspect)."),
                # Fixed on purpose: with the frontend's "control after generate" (default "randomize")
                # every queue would draw new candidates, so scoring, the training set and the LoRAs
                # downstream would all be redone instead of reused.
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="Base seed: candidate c of prompt p gets seed + p*k + c. It stays as typed, so "
                                     "queueing again gives the same candidates and reuses every finished stage; "
                                     "type another seed (e.g. seed + N*k) to draw new candidates for a next round."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per image."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler (as in KSampler). Samplers that add noise at every step "
                                       "(ancestral, SDE) sample one image at a time to stay seed-exact."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The noise schedule (as in KSampler)."),
                io.Int.Input("width", default=512, min=16, max=16384, step=8, tooltip="Image width (multiple of 8)."),
                io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Image height (multiple of 8)."),
                io.Int.Input("batch_size", default=4, min=1, max=4096,
                             tooltip="Images of one prompt sampled at once (memory vs speed); results don't "
                                     "depend on it."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt for every image."),
                io.String.Input("prompts_file", default="", optional=True,
                                tooltip="A .txt file in ComfyUI's input folder with one prompt per line (lines "
                                        "starting with # are comments), used when the prompts box is empty."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images",
                                tooltip="All N x K images, prompt by prompt (the K candidates of a prompt in a row)."),
                Candidates.Output("candidates", display_name="candidates",
                                  tooltip="Each image's prompt, seed and indices; connect to Score Images."),
                io.Latent.Output("latent", display_name="latent", tooltip="The sampled latents, same order."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompts_file: str | None = None) -> bool | str:
        # ComfyUI attaches what this returns to every input it takes, so it takes one: a file name
        # from the web page, refused when queued. The other inputs are checked first thing when the
        # node runs (sample_candidates), each error naming its input: this is the graph's first
        # node, so nothing has been done yet then.
        try:
            if prompts_file:
                confined_path(folder_paths.get_input_directory(), prompts_file, what="prompts_file", writes=False)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, clip, vae, prompts: str, k: int, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, width: int, height: int, batch_size: int, negative_prompt: str,
                prompts_file: str = "") -> io.NodeOutput:
        prompt_list = prompts_from_inputs(prompts, prompts_file)
        images, candidates, latent = sample_candidates(
            model, clip, vae, prompt_list, k=k, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
            scheduler=scheduler, width=width, height=height, batch_size=batch_size, negative_prompt=negative_prompt)
        return io.NodeOutput(images, candidates, latent)


NODES = [GenerateCandidates]

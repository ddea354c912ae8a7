"""Sample previews while a LoRA trains: a few prompts (given, or the training set's first captions)
rendered every ``sample_every_n_steps`` with the LoRA as it is, by the family's diffusers pipeline.

Images go to ``<work_dir>/samples/step-<N>/<i>.png`` (each written under a temporary name, then
renamed), and a ``sample`` event names them: the CLI prints the paths, the node shows the first one
as its progress preview. The prompts are encoded once, before training starts (a run that caches
text embeddings frees its text encoders afterwards), and sampling draws from its own generator, so
previews change nothing about the trained LoRA.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..image_files import to_uint8
from ..models.flow_matching import encode_prompts as encode_flow_prompts
from ..models.loading import encode_prompts
from ..models.pipelines import build_pipeline
from ..safe_io import atomic_write_bytes

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
# SD families: what a preview samples with (the DiT variants carry their own in the table)
SD_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 7.5}


def preview_prompts(config, captions: Sequence[str]) -> list[str]:
    """``config.sample_prompts``, else the first ``sample_count`` distinct training captions."""
    if config.sample_prompts:
        return [str(p) for p in config.sample_prompts]
    return list(dict.fromkeys(captions))[: config.sample_count]


def _conditioning(base, prompts: list[str], device, guidance_scale: float) -> dict[str, Any]:
    """The pipeline keyword arguments that stand in for the prompts (computed now, while the text
    encoders are loaded)."""
    if base.architecture.objective == "flow_matching":
        return encode_flow_prompts(base, prompts, device)
    with torch.no_grad():
        hidden, added = encode_prompts(base, prompts, device)
        kwargs: dict[str, Any] = {"prompt_embeds": hidden}
        if added is not None:
            kwargs["pooled_prompt_embeds"] = added["text_embeds"]
        if guidance_scale > 1.0:  # classifier-free guidance needs the empty prompt's embedding too
            negative, negative_added = encode_prompts(base, [""] * len(prompts), device)
            kwargs["negative_prompt_embeds"] = negative
            if negative_added is not None:
                kwargs["negative_pooled_prompt_embeds"] = negative_added["text_embeds"]
    return kwargs


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    return [v.detach() for v in value]


class PreviewSampler:
    """Renders the preview prompts with the training denoiser (LoRA active) when called."""

    def __init__(self, base, config, prompts: list[str], device, work_dir: Path, denoiser, dtype: torch.dtype):
        self.base, self.prompts, self.device, self.denoiser = base, prompts, device, denoiser
        self.folder = Path(work_dir) / SAMPLES_DIR
        sampling = dict(base.variant.sampling if base.variant is not None else SD_SAMPLING)
        if config.sample_steps:
            sampling["num_inference_steps"] = config.sample_steps
        self.sampling = sampling
        self.seed = config.seed
        side = max(base.architecture.pixel_multiple, config.resolution // base.architecture.pixel_multiple
                   * base.architecture.pixel_multiple)
        self.size = side
        self.dtype = dtype
        self.conditioning = {k: _detached(v) for k, v in
                             _conditioning(base, prompts, device, float(sampling.get("guidance_scale", 0))).items()}

    def __call__(self, step: int) -> list[Path]:
        folder = self.folder / f"step-{step:06d}"
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            pipe = build_pipeline(self.base)
            paths = []
            for index in range(len(self.prompts)):
                kwargs = {k: v[index:index + 1] for k, v in self.conditioning.items()}
                generator = torch.Generator(device=self.device).manual_seed(self.seed + index)
                with torch.no_grad():
                    image = pipe(**kwargs, height=self.size, width=self.size, generator=generator,
                                 output_type="pt", **self.sampling).images[0]
                paths.append(self._save(image.permute(1, 2, 0), folder / f"{index:02d}.png"))
            return paths
        finally:
            if was_training:
                self.denoiser.train()

    @staticmethod
    def _save(image: torch.Tensor, path: Path) -> Path:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image), mode="RGB").save(buffer, format="PNG", compress_level=4)
        return atomic_write_bytes(path, buffer.getvalue(), overwrite=True, what="preview image")

"""Generate K candidate images for each of N prompts with diffusers: the first step of the loop.

``generate_candidates(model, prompts, k=4, out_dir=...)`` samples every (prompt, seed) pair of the
grid with a diffusers pipeline (``StableDiffusionPipeline`` for SD1.x / SD2.x and the demo world,
``StableDiffusionXLPipeline`` for SDXL) built from ``models.loading.load_base_model``'s
modules, so a ComfyUI single-file checkpoint, a diffusers folder or an already loaded model all work.

Seeds: candidate ``c`` of prompt ``p`` gets ``seeds[c]`` when an explicit list of K seeds is given
(the same seeds for every prompt), one seed per image when N x K seeds are given (the loop's
evaluation: every (prompt, seed) pair its own noise), else ``base_seed + p * k + c`` (every image
of the run has its own seed). Each image's starting noise (and a stochastic scheduler's per-step
noise) comes from its own
``torch.Generator`` seeded with its seed, on the CPU: an image depends only on its prompt and seed,
never on its batch-mates, the batch size or the number of GPUs.

Output folder (written under a temporary name, renamed when complete, see ``safe_io``)::

    <out>/<image_id>.png                      8-bit RGB, image_id = p<prompt:05d>_c<candidate:03d>
    <out>/<image_id>.latents.safetensors      optional: key "latents" [C,h,w] float32, already
                                              multiplied by the VAE scaling factor (what the UNet
                                              denoised), metadata {"vae_sha256": <checkpoint sha256>}
    <out>/candidates.jsonl                    one object per image: file, prompt, seed, prompt_index,
                                              candidate_index, image_id (+ latents when saved)
    <out>/generation.json                     settings, model, adapters, counts

``versat2i score <out> --prompts <out>/candidates.jsonl`` scores such a folder with every prompt
and seed carried through to the training-set manifest.

Adapters: ``adapters`` is a callable ``prepare(pipe) -> context manager``; generation runs inside
the ``with`` block, so LoRAs are applied for this call only and the pipeline is restored after.
``LoraAdapters`` covers a single kohya LoRA file and an equal-weight merge of several (diffusers'
``load_lora_weights`` + ``set_adapters``); the gated mixture (``trainer/mix_diffusers.py``) plugs in
the same way.

Several GPUs: run under ``accelerate launch``; the (prompt, seed) list is split between the
processes with ``PartialState.split_between_processes``, every process writes its own images into
the shared temporary folder, and the main process writes the index and publishes the folder.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..image_files import save_png, to_uint8
from ..models.loading import BaseModel
from ..models.pipelines import (
    SCHEDULERS,
    PipelineAdapter,
    build_pipeline,
    describe_adapters,
    load_pipeline,
    make_scheduler,
    pipeline_denoiser,
    process_state,
    resolve_device,
    resolve_dtype,
)
from ..progress import Progress
from ..safe_io import TargetExistsError, atomic_dir
from ..training_set.layout import LATENTS_SUFFIX, entry_id

logger = logging.getLogger(__name__)

INDEX_NAME = "candidates.jsonl"
SUMMARY_NAME = "generation.json"
FORMAT_NAME = "versat2i-candidates"
FORMAT_VERSION = 1
DEFAULT_K = 4
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1 (ComfyUI's seed range too)

ProgressCallback = Callable[[int, int], None]  # (images done, images total)


# -- settings and records ------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationSettings:
    """How each image is sampled. ``width`` / ``height`` None = the model's native resolution."""

    steps: int = 30  # sampling steps
    guidance_scale: float = 7.5  # classifier-free guidance scale (<= 1 turns guidance off)
    scheduler: str = "default"  # default (the checkpoint's), euler, euler_a, ddim, dpmpp_2m... (versat2i generate -h)
    width: int | None = None  # image width, a multiple of 8 (unset: the model's native size)
    height: int | None = None  # image height, a multiple of 8 (unset: the model's native size)
    batch_size: int = 4  # images sampled at once (speed / memory only; never changes an image)
    negative_prompt: str = ""  # negative prompt for every image

    def validate(self) -> None:
        problems = []
        if not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps={self.steps!r}: must be a whole number >= 1")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            problems.append(f"guidance_scale={self.guidance_scale!r}: must be >= 0 (<= 1 turns guidance off)")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler={self.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                problems.append(f"{name}={value!r}: must be a multiple of 8 (and >= 8), e.g. 512")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r}: must be a whole number >= 1")
        if not isinstance(self.negative_prompt, str):
            problems.append("negative_prompt: must be text")
        if problems:
            raise ValueError("generation settings: " + "; ".join(problems))


@dataclass(frozen=True)
class CandidateRecord:
    """One image of the grid: a line of candidates.jsonl."""

    prompt: str
    seed: int
    prompt_index: int
    candidate_index: int
    image_id: str
    file: str | None = None      # image file name inside the output folder (None: not written)
    latents: str | None = None   # latents file name inside the output folder

    def to_dict(self) -> dict[str, Any]:
        record = {"file": self.file, "prompt": self.prompt, "seed": self.seed, "prompt_index": self.prompt_index,
                  "candidate_index": self.candidate_index, "image_id": self.image_id}
        if self.latents is not None:
            record["latents"] = self.latents
        return record


@dataclass
class GenerationResult:
    """What ``generate_candidates`` made. ``records`` / ``images`` / ``latents`` are this process's
    images (all of them unless several processes split the work), in grid order; ``folder`` is the
    published output folder (None when nothing was written)."""

    records: list[CandidateRecord]
    images: torch.Tensor | None = None    # [B,H,W,3] float 0..1 on the CPU (ComfyUI IMAGE layout)
    latents: torch.Tensor | None = None   # [B,C,h,w] float32 on the CPU, scaled like the UNet's input
    folder: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def candidates(self) -> dict[str, list]:
        """Per-image lists in the form Score Images' ``candidates`` input and ``ScoreTable.from_scores``
        take: prompts, seeds, prompt_indices, candidate_indices, image_ids."""
        return candidates_info(self.records)


def candidates_info(records: Sequence[CandidateRecord]) -> dict[str, list]:
    return {
        "prompts": [r.prompt for r in records],
        "seeds": [r.seed for r in records],
        "prompt_indices": [r.prompt_index for r in records],
        "candidate_indices": [r.candidate_index for r in records],
        "image_ids": [r.image_id for r in records],
    }


def check_prompts(prompts: Any, *, what: str = "prompts") -> list[str]:
    """A list of distinct, non-empty prompts (surrounding whitespace removed)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(  # noqa: TRY004 -- a user error, reported like every other bad input
            f"{what}: expected a list of prompt texts (one per prompt), got {type(prompts).__name__}")
    cleaned = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{what}[{i}]: expected text, got {type(prompt).__name__}")  # noqa: TRY004
        cleaned.append(prompt.strip())
    if not cleaned:
        raise ValueError(f"{what}: no prompt given; give at least one prompt (one per line)")
    first_seen: dict[str, int] = {}
    for i, prompt in enumerate(cleaned):
        if not prompt:
            raise ValueError(f"{what}[{i}]: empty prompt; remove it")
        if prompt in first_seen:
            raise ValueError(
                f"{what}[{i}]: {prompt!r} repeats prompt {first_seen[prompt]}; give each prompt once "
                "(raise k for more candidates per prompt)"
            )
        first_seen[prompt] = i
    return cleaned


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {str(path)!r} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} has no prompt; write one prompt per line")
    return prompts


def plan_candidates(prompts: Sequence[str], *, k: int | None = None, seeds: Sequence[int] | None = None,
                    base_seed: int = 0) -> list[CandidateRecord]:
    """The (prompt, seed) grid in prompt-major order (rules in the module docstring).

    ``seeds`` of length K: the same K seeds for every prompt (``k`` defaults to ``len(seeds)``);
    of length N x K: one per image, prompt-major. Without ``seeds``: ``base_seed + p * k + c``
    (``k`` defaults to 4).
    """
    prompts = check_prompts(prompts)
    count = len(prompts)
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
            raise ValueError("seeds: expected a list of whole numbers")
        seeds = list(seeds)
    if k is None:
        k = len(seeds) if seeds is not None else DEFAULT_K
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r}: the number of candidates per prompt must be a whole number >= 1")
    if seeds is None:
        if not isinstance(base_seed, int) or base_seed < 0 or base_seed + count * k - 1 > MAX_SEED:
            raise ValueError(f"base_seed={base_seed!r}: must be a whole number in 0 .. {MAX_SEED - count * k + 1}")
        per_image = [base_seed + p * k + c for p in range(count) for c in range(k)]
    elif len(seeds) == k:
        per_image = [seeds[c] for _ in range(count) for c in range(k)]
    elif len(seeds) == count * k:
        per_image = list(seeds)
    else:
        raise ValueError(
            f"seeds: {len(seeds)} seeds for {count} prompt(s) x k={k}; give k seeds (the same for every prompt) "
            f"or {count * k} (one per image)"
        )
    for seed in per_image:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds: {seed!r} is not a whole number in 0 .. 2**64-1")
    for p in range(count):
        own = per_image[p * k:(p + 1) * k]
        if len(set(own)) != k:
            raise ValueError(f"seeds: prompt {p} would get the same seed twice ({own}); give distinct seeds")
    return [
        CandidateRecord(prompt=prompts[p], seed=per_image[p * k + c], prompt_index=p, candidate_index=c,
                        image_id=entry_id(p, c))
        for p in range(count) for c in range(k)
    ]


@contextlib.contextmanager
def _scheduler_swapped(pipe, name: str) -> Iterator[None]:
    if name == "default":
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original.config, prediction_type=original.config.get("prediction_type"))
    try:
        yield
    finally:
        pipe.scheduler = original


# -- generation ----------------------------------------------------------------------------------

def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _sample_batch(pipe, records: Sequence[CandidateRecord], settings: GenerationSettings, *, width: int,
                  height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [b,H,W,3] float CPU, latents [b,C,h,w] float32 CPU) for one batch."""
    generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in records]
    final: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe, _step, _timestep, callback_kwargs):
        # The latents after the last step are what the pipeline decodes: the UNet's own space
        # (already multiplied by the VAE scaling factor), the form the trainer caches.
        final["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    extra = {}
    if settings.negative_prompt:
        if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(f"negative_prompt: {type(pipe).__name__} takes no negative prompt; leave it empty")
        extra["negative_prompt"] = [settings.negative_prompt] * len(records)
    elif "negative_prompt" in inspect.signature(pipe.__call__).parameters:
        # None (not "") for no negative prompt: SDXL then uses its zero unconditional embedding.
        extra["negative_prompt"] = None
    output = pipe(
        prompt=[r.prompt for r in records],
        **extra,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        width=width,
        height=height,
        generator=generators,
        output_type="pt",
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    images = output.images.permute(0, 2, 3, 1).float().clamp(0.0, 1.0).cpu()
    return images, final["latents"].detach().float().cpu()


def _model_info(base) -> dict[str, Any]:
    info = {name: getattr(base, name) for name in ("arch", "prediction_type", "source_path", "source_sha256",
                                                     "source_format")}
    if base.variant is not None:  # a DiT family: its released model and native size
        info.update(variant=base.variant.name, resolution=base.resolution)
    return info


def _native_size(pipe, model_info: dict[str, Any]) -> int:
    """The model's native image side: the UNet's sample size (SD), else the DiT variant's."""
    sample_size = getattr(pipeline_denoiser(pipe).config, "sample_size", None)
    if sample_size:
        return int(sample_size) * int(pipe.vae_scale_factor)
    return int(model_info.get("resolution") or 1024)


def _write_images(folder: Path, records: Sequence[CandidateRecord], images: torch.Tensor, latents: torch.Tensor,
                  *, save_latents: bool, vae_sha256: str | None) -> None:
    from safetensors.torch import save_file


    for record, image, latent in zip(records, images, latents):
        save_png(to_uint8(image), folder / record.file)
        if save_latents:
            metadata = {"vae_sha256": vae_sha256} if vae_sha256 else {}
            save_file({"latents": latent.contiguous()}, str(folder / record.latents), metadata=metadata)


def generate_candidates(
    model: Any,
    prompts: Sequence[str],
    *,
    k: int | None = None,
    seeds: Sequence[int] | None = None,
    base_seed: int = 0,
    settings: GenerationSettings | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    save_latents: bool = False,
    adapters: PipelineAdapter | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    config_dir: str | os.PathLike | None = None,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    vae_sha256: str | None = None,
    return_images: bool | None = None,
    progress: ProgressCallback | None = None,
    show_progress: bool = True,
    progress_label: str = "generate",
    workers: int = 1,
) -> GenerationResult:
    """Sample K candidates for each prompt (module docstring: seeds, folder layout, adapters).

    Args:
        model: a checkpoint path (single file or diffusers folder; a DiT family's diffusion model
            with ``text_encoders`` and ``vae``), a loaded ``BaseModel`` or a diffusers pipeline. A loaded model
            is moved to ``device`` (in place) but only cast when ``dtype`` names a dtype.
        prompts: N distinct prompt texts.
        k, seeds, base_seed: the seed grid (``plan_candidates``; k defaults to len(seeds), else 4).
        settings: steps, guidance, scheduler, size (default: the model's native size), batch size,
            negative prompt.
        out_dir: write the folder here (atomically; an existing folder is an error unless
            ``overwrite``). None: return the images only.
        save_latents: also write ``<id>.latents.safetensors`` (needs ``out_dir``).
        adapters: ``prepare(pipe) -> context manager`` (``LoraAdapters``, the gate's mixer...).
        vae_sha256: written into the latents files; default: the loaded checkpoint's sha256.
        return_images: keep the images / latents in memory (default: only when ``out_dir`` is None).
        progress: ``(done, total)`` callback, called after each batch.
        show_progress, progress_label: a progress bar (plain log lines when not on a terminal,
            ``progress.Progress``) and its label.
        workers: batches sampled at once in this process, each in a thread of its own with one torch
            thread and its own copy of the pipeline's scheduler (the modules are shared): faster than
            several torch threads on one batch for small models on a CPU. Speed only (every image
            has its own seed); used without adapters only (they may keep per-call state), else 1.
    """
    settings = settings or GenerationSettings()
    settings.validate()
    plan = plan_candidates(prompts, k=k, seeds=seeds, base_seed=base_seed)
    if save_latents and out_dir is None:
        raise ValueError("save_latents: latents are written next to the images; give out_dir too")
    if return_images is None:
        return_images = out_dir is None
    if out_dir is not None:
        plan = [replace(r, file=f"{r.image_id}.png", latents=f"{r.image_id}{LATENTS_SUFFIX}" if save_latents else None)
                for r in plan]
        out_dir = Path(out_dir)
        if out_dir.exists() and not overwrite:  # fail before the model loads

            raise TargetExistsError(f"output folder {str(out_dir)!r} already exists; choose another name, or "
                                    "allow overwriting (overwrite=True / --overwrite)")

    state = process_state(device)
    pipe, model_info = _resolve_pipeline(model, device=device, dtype=dtype, config_dir=config_dir,
                                         text_encoders=text_encoders, vae=vae)
    if vae_sha256 is None:
        vae_sha256 = model_info.get("source_sha256") or None
    if save_latents and not vae_sha256:
        logger.warning("latents are written without a vae_sha256 (the checkpoint was not hashed): the trainer "
                       "will not reuse them")
    native = _native_size(pipe, model_info)
    width, height = settings.width or native, settings.height or native
    resolved = replace(settings, width=width, height=height)

    summary = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info, "settings": asdict(resolved), "prompts": len({r.prompt_index for r in plan}),
        "k": len(plan) // max(len({r.prompt_index for r in plan}), 1), "images": len(plan),
        "seeds": ("explicit" if seeds is not None
                  else f"base_seed + prompt_index * k + candidate_index (base_seed={base_seed})"),
        "latents": bool(save_latents), "vae_sha256": vae_sha256 if save_latents else None,
        "adapters": describe_adapters(adapters), "processes": state.num_processes,
    }

    writer = _OutputFolder(out_dir, overwrite=overwrite, state=state) if out_dir is not None else None
    images_out: list[torch.Tensor] = []
    latents_out: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(writer) if writer is not None else None
        with state.split_between_processes(plan) as own:
            own = list(own)
            bar = Progress(len(own), progress_label, unit="img", enabled=show_progress and state.is_local_main_process)
            done = 0
            # Adapters are applied outside inference mode: modules they create must stay trainable.
            with _scheduler_swapped(pipe, settings.scheduler), \
                    (adapters(pipe) if adapters is not None else contextlib.nullcontext()), torch.inference_mode():

                def sample(batch, on=pipe):
                    images, latents = _sample_batch(on, batch, resolved, width=width, height=height)
                    if folder is not None:
                        _write_images(folder, batch, images, latents, save_latents=save_latents,
                                      vae_sha256=vae_sha256)
                    return images, latents

                batches = list(_batches(own, settings.batch_size))
                for batch, (images, latents) in zip(batches, _sampled(sample, pipe, batches, workers=(
                        workers if adapters is None and state.num_processes == 1 else 1))):
                    if return_images:
                        images_out.append(images)
                        latents_out.append(latents)
                    done += len(batch)
                    bar.update(len(batch))
                    if progress is not None:
                        progress(done, len(own))
            bar.close()
        if writer is not None:
            writer.finish(plan, summary)
    return GenerationResult(
        records=own,
        images=torch.cat(images_out) if images_out else None,
        latents=torch.cat(latents_out) if latents_out else None,
        folder=out_dir if out_dir is not None else None,
        summary=summary,
    )


def _sampled(sample, pipe, batches: Sequence, *, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``sample(batch, on=pipeline)`` of every batch, in order; with ``workers`` > 1 that many at once
    (threads with one torch thread each, each with a shallow copy of ``pipe`` that has its own
    scheduler: the pipeline call keeps its step state there). The caller sees the results in order,
    so its progress callback runs in its own thread; leaving early cancels the batches not started."""
    workers = min(workers, len(batches))
    if workers <= 1:
        for batch in batches:
            yield sample(batch)
        return
    import copy
    import threading
    from concurrent.futures import ThreadPoolExecutor

    copies = []
    for _ in range(workers):
        each = copy.copy(pipe)
        each.scheduler = copy.deepcopy(pipe.scheduler)
        copies.append(each)
    unclaimed, lock, local = iter(copies), threading.Lock(), threading.local()

    def run(batch):
        if not hasattr(local, "pipe"):  # each thread keeps one copy
            with lock:
                local.pipe = next(unclaimed)
        with torch.inference_mode():  # thread-local: the caller's does not reach this thread
            return sample(batch, on=local.pipe)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="versat2i-generate")
    try:
        for future in [pool.submit(run, batch) for batch in batches]:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads_before)


def _resolve_pipeline(model: Any, *, device, dtype, config_dir, text_encoders=(), vae=None):
    if isinstance(model, (str, os.PathLike)):
        # The checkpoint's own scheduler here; generate_candidates swaps in settings.scheduler.
        pipe, base = load_pipeline(model, config_dir=config_dir, device=device, dtype=dtype,
                                   text_encoders=text_encoders, vae=vae)
        return pipe, _model_info(base)
    explicit_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype, torch.device("cpu"))
    target = resolve_device(device)
    if isinstance(model, BaseModel):
        pipe = build_pipeline(model, device=target, dtype=explicit_dtype)
        return pipe, _model_info(model)
    if pipeline_denoiser(model) is not None and hasattr(model, "vae") and callable(model):
        model.to(device=target, dtype=explicit_dtype)
        model.set_progress_bar_config(disable=True)
        return model, {"pipeline": type(model).__name__}
    raise ValueError(
        f"model: expected a checkpoint path, a loaded BaseModel or a diffusers Stable Diffusion pipeline, got "
        f"{type(model).__name__}"
    )


class _OutputFolder:
    """The temporary output folder shared by every process: the main process creates it (through
    ``safe_io.atomic_dir``) and tells the others its name; all write their images into it; the main
    process writes the index and publishes it once everyone is done."""

    def __init__(self, final: Path, *, overwrite: bool, state):
        self.final = final
        self.overwrite = overwrite
        self.state = state
        self._atomic = None
        self.temp: Path | None = None

    def __enter__(self) -> Path:
        if self.state.is_main_process:
            self._atomic = atomic_dir(self.final, overwrite=self.overwrite, what="output folder")
            self.temp = self._atomic.__enter__()
        if self.state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = [str(self.temp) if self.temp is not None else None]
            broadcast_object_list(shared, from_process=0)
            self.temp = Path(shared[0])
        return self.temp

    def finish(self, records: Sequence[CandidateRecord], summary: Mapping[str, Any]) -> None:
        self.state.wait_for_everyone()  # every process has written its images
        if self.state.is_main_process:
            index = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
            (self.temp / INDEX_NAME).write_text(index, encoding="utf-8")
            (self.temp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str),
                                                  encoding="utf-8")

    def __exit__(self, *exc_info) -> bool:
        if self._atomic is not None:
            self._atomic.__exit__(*exc_info)  # publish (or, on an error, remove the temporary folder)
        if self.state.num_processes > 1 and exc_info[0] is None:
            self.state.wait_for_everyone()  # the folder is published before anyone returns
        return False


# -- reading a candidates folder -------------------------------------------------------------------

def read_candidates(folder: str | os.PathLike) -> tuple[list[CandidateRecord], dict[str, Any]]:
    """``(records, generation summary)`` of a folder written by ``generate_candidates``."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {INDEX_NAME}; point at a folder written by "
                                "`versat2i generate`")
    records = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            records.append(CandidateRecord(
                prompt=entry["prompt"], seed=int(entry["seed"]), prompt_index=int(entry["prompt_index"]),
                candidate_index=int(entry["candidate_index"]), image_id=entry["image_id"], file=entry.get("file"),
                latents=entry.get("latents")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{index}, line {number}: not a candidate record ({exc})") from None
    summary_file = folder / SUMMARY_NAME
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    return records, summary

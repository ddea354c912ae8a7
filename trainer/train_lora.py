"""Train one aspect LoRA on a kohya-style training set. Run under ``accelerate launch``.

    python -m accelerate.commands.launch [accelerate options] trainer/launch_entry.py \\
        --config run.toml [--resume latest]

(``trainer/launcher.py`` builds that command; ``versat2i train-lora`` and the Train Aspect LoRA node
use it.) In the shape of diffusers' ``train_text_to_image_lora(_sdxl).py``: peft LoRA layers on the
denoiser's attention projections (optionally its feed-forward layers and the text encoders), as the
family's table entry names them; AdamW, a diffusers lr schedule, accelerate for devices, mixed
precision and gradient accumulation. The loop, exact resume, atomic checkpoints and the JSON-line
events (``trainer/events.py``, also in ``<work_dir>/train_log.jsonl``) are ``training_loop.py``'s,
shared with the gate trainer. The final LoRA is written in kohya keys, atomically, by
``models.lora_files.save_kohya_lora``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..models.comfy_layout import read_header
from ..models.loading import file_sha256
from ..models.lora_files import save_lora
from ..models.split_files import folder_architecture, inspect_model_files, is_dit_diffusion_model
from ..training_set.folders import scan_training_set
from ..training_set.layout import MANIFEST_NAME
from .config import LoraTrainConfig, resolve_mixed_precision
from .events import EventWriter
from .memory_plan import (
    MemoryOptions,
    device_free_bytes,
    load_saved_plan,
    model_sizes,
    offload_frozen_blocks,
    plan_memory,
    save_plan,
    store_frozen_weights_in_fp8,
)
from .objective import (
    compute_loss,
    denoiser_conditioning,
    flow_conditioning,
    flow_loss,
    flow_noised_latents,
    noised_latents,
)
from .previews import PreviewSampler, preview_prompts
from .training_loop import (
    CheckpointHooks,
    TrainingProgram,
    TrainingProgress,
    TrainingRun,
    TrainingStep,
    base_model_identity,
    load_run_base_model,
    loss_curve_points,
    loss_gathered,
    prepare_training_data,
    run_output_path,
    tree_identity,
)

logger = logging.getLogger(__name__)

# peft target module names of transformers' CLIP layers (the denoiser's come from its family's table entry).
TEXT_ENCODER_ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_FEED_FORWARD_MODULES = ["fc1", "fc2"]


# -- helpers ---------------------------------------------------------------------------------------

def lora_targets(architecture, train_feed_forward: bool) -> list[str] | str:
    """peft ``target_modules`` of the family: its module-name suffixes (a list, matched as suffixes),
    or, when a name holds a block-index wildcard (klein's ``single_transformer_blocks.*.attn.to_out``),
    the same set as one regular expression (peft matches a string against the full module name)."""
    names = [*architecture.lora_attention_modules,
             *(architecture.lora_feed_forward_modules if train_feed_forward else ())]
    if not any("*" in name for name in names):
        return names
    alternatives = [re.escape(name).replace(r"\*", r"\d+") for name in names]
    return r"(?:.*\.)?(?:" + "|".join(alternatives) + r")"


def add_lora_adapters(base, config: LoraTrainConfig) -> list[tuple[str, torch.nn.Module]]:
    """Freeze the base model and add peft LoRA layers; returns the (name, module) pairs that train."""
    from peft import LoraConfig, inject_adapter_in_model

    for module in (base.denoiser, base.vae, *base.text_encoders):
        if module is not None:
            module.requires_grad_(False)
    architecture = base.architecture
    denoiser_targets = lora_targets(architecture, config.train_feed_forward)
    # Gaussian init (as in diffusers' examples): B starts at zero, so the untrained LoRA is a no-op.
    base.denoiser.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                         init_lora_weights="gaussian", target_modules=denoiser_targets))
    trainable = [(architecture.denoiser_component, base.denoiser)]
    if config.train_text_encoder:
        te_targets = TEXT_ENCODER_ATTENTION_MODULES + (
            TEXT_ENCODER_FEED_FORWARD_MODULES if config.train_feed_forward else [])
        for index, encoder in enumerate(base.text_encoders):
            # peft directly, not transformers' ``add_adapter``: transformers 5 refuses peft < 0.22 there.
            inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                               init_lora_weights="gaussian", target_modules=te_targets),
                                    encoder, adapter_name="default")
            trainable.append(("text_encoder" if index == 0 else f"text_encoder_{index + 1}", encoder))
    return trainable


@dataclass
class LoraCheckpointHooks(CheckpointHooks):
    """A checkpoint's trained part: the LoRA layers of each trainable module (peft state dicts)."""

    trainable_names: list[str] = field(default_factory=list)

    def save_weights(self, models, weights, folder: Path) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            for name, model in zip(self.trainable_names, models, strict=True):
                state = get_peft_model_state_dict(self.accelerator.unwrap_model(model))
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                          str(folder / f"{name}.lora.safetensors"))
        while weights:  # the frozen base weights are not part of a checkpoint
            weights.pop()

    def load_weights(self, models, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name in self.trainable_names:
            model = self.accelerator.unwrap_model(models.pop(0))
            state = load_file(str(folder / f"{name}.lora.safetensors"))
            result = set_peft_model_state_dict(model, state)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint {folder}: unexpected LoRA keys for {name} ({unexpected[:3]}...)")


def legacy_model_hash(path: str | os.PathLike) -> str | None:
    """A1111's old short model hash, which kohya's sd-scripts store as ``ss_sd_model_hash``: the first
    8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB of the file (``train_util.model_hash``;
    written here because no library we use exports it). None for a diffusers folder, which has no
    such hash."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def lora_metadata(config: LoraTrainConfig, base, *, fingerprint: str, steps: int, num_examples: int,
                  loss_curve: list[list[float]], manifest_sha256: str) -> dict[str, str]:
    """safetensors metadata: kohya ``ss_*`` fields other tools read, plus ``versat2i_*`` fields."""

    dataset = Path(config.dataset_dir)
    legacy_hash = legacy_model_hash(base.source_path)
    return {
        **({"ss_sd_model_hash": legacy_hash} if legacy_hash else {}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_dropout": str(config.dropout),
        "ss_base_model_version": base.architecture.kohya_base_model_version or base.arch,
        "ss_v2": str(base.architecture.kohya_v2),
        "ss_v_parameterization": str(base.prediction_type == "v_prediction"),
        "ss_new_sd_model_hash": base.source_sha256,
        "ss_sd_model_name": Path(base.source_path).name,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.bucketing),
        "ss_learning_rate": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr or config.learning_rate if config.train_text_encoder else 0),
        "ss_unet_lr": str(config.learning_rate),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_steps": str(steps),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": resolve_mixed_precision(config.mixed_precision),
        "ss_seed": str(config.seed),
        "ss_noise_offset": str(config.noise_offset),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_num_train_images": str(num_examples),
        "ss_output_name": Path(config.output_name).name,
        "ss_dataset_dirs": json.dumps({dataset.name: {"aspect": config.aspect}}),
        "versat2i_version": __version__,
        "versat2i_aspect": config.aspect,
        "versat2i_dataset": dataset.name,
        "versat2i_dataset_manifest_sha256": manifest_sha256,
        "versat2i_base_model_sha256": base.source_sha256,
        "versat2i_arch": base.arch,
        **({"versat2i_variant": base.variant.name} if base.variant is not None else {}),
        "versat2i_prediction_type": base.prediction_type,
        "versat2i_fingerprint": fingerprint,
        "versat2i_config": json.dumps(shareable_settings(config), sort_keys=True),
        "versat2i_loss_curve": json.dumps(loss_curve),
    }


def shareable_settings(config: LoraTrainConfig) -> dict[str, Any]:
    """The settings for the LoRA's metadata, with local paths cut to their last part: LoRA files get
    shared, and a full path would publish the user's folder layout (and often their user name)."""
    settings = config.to_dict()
    for name in ("base_model", "dataset_dir", "output_dir", "work_dir", "model_config_dir", "vae"):
        settings[name] = Path(settings[name]).name if settings[name] else ""
    settings["text_encoders"] = [Path(path).name for path in settings["text_encoders"]]
    return settings


def lora_run_fingerprint(config: LoraTrainConfig, *, cpu: bool | None = None) -> str:
    """What decides the trained result: the settings (``mixed_precision`` as it will be used, see
    ``resolve_mixed_precision``; ``cpu`` as there) plus the identity of the base model and data.

    File identity is (relative path, size, mtime) rather than a content hash so that the node can
    recompute it on every queue in milliseconds even for a 7 GB checkpoint.
    """
    return config.with_resolved_precision(cpu=cpu).fingerprint(
        **base_model_identity(config), dataset=tree_identity(Path(config.dataset_dir)))


# -- the DiT families: settings and memory, decided from the files' headers before any weight is read ----

def is_dit_folder(path: str | os.PathLike) -> bool:
    """A diffusers folder of a DiT family (its model_index.json names the family's pipeline)."""
    index = Path(path) / "model_index.json"
    return index.is_file() and folder_architecture(json.loads(index.read_text()), Path(path)) is not None


def dit_model_files(config: LoraTrainConfig):
    """The checked ``ModelFiles`` when the base model is a DiT family's files (None otherwise: an SD
    checkpoint or any diffusers folder, which the loader checks)."""
    if Path(config.base_model).is_dir():
        return None
    if not (config.text_encoders or config.vae or is_dit_diffusion_model(config.base_model)):
        return None
    return inspect_model_files(config.base_model, config.text_encoders, config.vae or None,
                               config_dir=config.model_config_dir or None, arch=config.arch)


def flow_settings_problems(config: LoraTrainConfig, architecture) -> list[str]:
    """Settings that do not apply to a family's objective (each naming the fix)."""
    problems = []
    if architecture.objective == "flow_matching":
        for name, value, why in (("train_text_encoder", config.train_text_encoder, "DiT LoRAs train the denoiser only"),
                                 ("snr_gamma", config.snr_gamma, "min-SNR weighting is for DDPM models; use "
                                                                 "weighting_scheme"),
                                 ("noise_offset", config.noise_offset, "offset noise is for DDPM models")):
            if value:
                problems.append(f"{name}={value!r}: {why}; turn it off for {architecture.label}")
        if config.prediction_type != "auto":
            problems.append(f"prediction_type={config.prediction_type!r}: {architecture.label} is a flow-matching "
                            "model; leave it at auto")
        multiple = architecture.pixel_multiple
        for name in ("resolution", "bucket_step"):
            if getattr(config, name) % multiple:
                value = getattr(config, name)
                problems.append(f"{name}={value}: must be a multiple of {multiple} for {architecture.label} "
                                f"(e.g. {max(multiple, round(value / multiple) * multiple)})")
    else:
        flow_fields = {"weighting_scheme": "none", "fp8_base": False, "offload_blocks": False, "guidance_scale": 0.0}
        for name, default in flow_fields.items():
            if getattr(config, name) != default:
                problems.append(f"{name}={getattr(config, name)!r}: applies to the DiT families only; "
                                f"remove it for {architecture.label}")
    return problems


def plan_dit_memory(config: LoraTrainConfig, files, device: torch.device, weight_dtype: torch.dtype,
                    work_dir: Path) -> tuple[LoraTrainConfig, str]:
    """``config`` with the memory options this run uses (``memory_saving = auto`` resolved once per
    run folder, a resumed run keeps the first start's), and the estimate; ``ValueError`` naming the
    settings to lower when the run cannot fit the device (``trainer/memory_plan.py``)."""
    import diffusers

    architecture = files.architecture
    requested = MemoryOptions(cache_text_embeddings=config.cache_text_embeddings,
                              gradient_checkpointing=config.gradient_checkpointing, fp8_base=config.fp8_base,
                              offload_blocks=config.offload_blocks)
    auto = config.memory_saving == "auto"
    saved = load_saved_plan(work_dir) if auto else None
    header = read_header(files.diffusion_model.path)
    headers = {part.path: read_header(part.path) for part in files.text_encoders}
    denoiser_config = getattr(diffusers, architecture.denoiser_class).load_config(
        str(files.config_dir), subfolder="transformer", local_files_only=True)
    sizes = model_sizes(architecture, denoiser_config, header.part(files.diffusion_model.prefix),
                        [headers[part.path].part(part.prefix) for part in files.text_encoders], rank=config.rank,
                        targets=lora_targets(architecture, config.train_feed_forward))
    weight_bytes = torch.finfo(weight_dtype).bits // 8
    options, estimate = plan_memory(sizes, saved or requested, auto=auto and saved is None,
                                    available=device_free_bytes(device), resolution=config.resolution,
                                    batch_size=config.train_batch_size, weight_bytes=weight_bytes,
                                    offload_possible=device.type == "cuda")
    if auto and saved is None:
        save_plan(work_dir, options, estimate)
    chosen = config.replace(**dataclasses.asdict(options))
    return chosen, f"memory: {', '.join(options.turned_on()) or 'no saving options'}; estimate {estimate.describe()}"


# -- the program -----------------------------------------------------------------------------------

def _train(config: LoraTrainConfig, accelerator, events: EventWriter, resume_from: Path | None) -> Path:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    work_dir = Path(config.work_dir)
    output_path = run_output_path(config)
    fingerprint = lora_run_fingerprint(config)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- 2. data (first: a bad training set fails before the model is loaded) ---------------------
    images = scan_training_set(config.dataset_dir, config.aspect)

    # ---- 3. a DiT family's files: checked, settings and memory decided before any weight is read ----
    files = dit_model_files(config)
    if files is not None:
        problems = flow_settings_problems(config, files.architecture)
        if problems:
            raise ValueError("settings that do not fit this model:\n  - " + "\n  - ".join(problems))
        config, memory_note = plan_dit_memory(config, files, torch.device(device), weight_dtype, work_dir)
        logger.info("%s", memory_note)

    # ---- 4. base model and LoRA layers --------------------------------------------------------------
    # The DiT families load in the training precision (a 12B model in fp32 is 48 GB); SD in fp32.
    dit = files is not None or is_dit_folder(config.base_model)
    base = load_run_base_model(config, torch_dtype=weight_dtype if dit else torch.float32)
    flow = base.architecture.objective == "flow_matching"  # (also a DiT diffusers folder)
    problems = flow_settings_problems(config, base.architecture)
    if problems:
        raise ValueError("settings that do not fit this model:\n  - " + "\n  - ".join(problems))
    if base.vae is None and not config.cache_latents:
        raise ValueError(f"base_model {config.base_model}: has no VAE; set cache_latents = true with "
                         "generation-time latents, or use a checkpoint that includes its VAE")
    if flow and config.fp8_base:  # before the LoRA layers exist (trainer/memory_plan.py)
        store_frozen_weights_in_fp8(base.denoiser, weight_dtype)
    # Seeded right before the LoRA init, so the initial LoRA does not depend on how the base model
    # was loaded (a loader that draws random numbers would otherwise shift it).
    set_seed(config.seed)
    trainable = add_lora_adapters(base, config)
    offload = flow and config.offload_blocks and torch.device(device).type == "cuda"
    if flow:  # loaded in weight_dtype already (and fp8 storage must stay fp8): only placed
        for module in (*base.text_encoders, *([] if offload else [base.denoiser])):
            module.to(device)
    else:
        for module in (base.denoiser, *base.text_encoders):
            module.to(device, dtype=weight_dtype if weight_dtype != torch.float32 else None)
    # The VAE only encodes: half precision as in diffusers' examples, except a VAE that overflows in
    # fp16 (SDXL's; bf16 has float32's range).
    vae_dtype = (torch.float32 if (base.architecture.vae_fp16_overflows and weight_dtype == torch.float16)
                 else weight_dtype)
    if base.vae is not None:
        base.vae.to(device, dtype=vae_dtype if vae_dtype != torch.float32 else None)
    cast_training_params([m for _, m in trainable], dtype=torch.float32)  # LoRA weights train in fp32
    if config.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in base.text_encoders:
                # transformers 5 renamed it (the old name warns, and goes in v6); 4.x has only the old one.
                enable = getattr(encoder, "activation_checkpointing_enable",
                                 None) or encoder.gradient_checkpointing_enable
                enable()
    if offload:  # frozen blocks wait on the CPU; diffusers moves each block group in when it runs
        offload_frozen_blocks(base.denoiser, device)
    elif flow and config.offload_blocks:
        logger.info("offload_blocks: nothing to offload to on %s (weights are in RAM already)", device)

    # ---- 5. dataset, caches (latents, text embeddings); previews encoded while the encoders exist ----
    previews = None
    if config.sample_every_n_steps and accelerator.is_main_process:
        previews = PreviewSampler(base, config, preview_prompts(config, [im.caption for im in images]), device,
                                  work_dir, base.denoiser, weight_dtype)
    dataset, sampler, dataloader = prepare_training_data(config, images, base, device, vae_dtype=vae_dtype)

    # ---- 6. optimiser and schedule -----------------------------------------------------------------
    param_groups = []
    for _, module in trainable:
        params = [p for p in module.parameters() if p.requires_grad]
        lr = config.learning_rate if module is base.denoiser else (config.text_encoder_lr or config.learning_rate)
        param_groups.append({"params": params, "lr": lr})
    optimizer = torch.optim.AdamW(param_groups, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    # As in diffusers' examples: the prepared scheduler steps once per process per update.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)

    # ---- 7. accelerate: prepare, checkpoint hooks, resume ---------------------------------------------
    # An offloaded denoiser's blocks are placed by its hooks, not moved as a whole.
    placement = {"device_placement": [False] + [True] * (len(trainable) + 2)} if offload else {}
    prepared = accelerator.prepare(*[m for _, m in trainable], optimizer, dataloader, lr_scheduler, **placement)
    models = list(prepared[:len(trainable)])
    optimizer, dataloader, lr_scheduler = prepared[len(trainable):]
    denoiser = models[0]
    if config.train_text_encoder:
        # encode_prompts must call the prepared (e.g. DDP-wrapped) encoders so their gradients sync.
        base.text_encoders = models[1:]
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + accelerator.process_index)
    run = TrainingRun(config, accelerator, events, work_dir, TrainingProgress(fingerprint=fingerprint))
    run.resume(LoraCheckpointHooks(accelerator, noise_generator, run.progress,
                                   trainable_names=[n for n, _ in trainable]), resume_from)
    run.emit_start(num_examples=dataset.num_examples, output=output_path, resumed_from=resume_from,
                   **({"variant": base.variant.name} if base.variant is not None else {}))

    # ---- 8. training loop ------------------------------------------------------------------------------
    # The flow-matching sigmas come from the model's own training scheduler (a copy: previews sample
    # with pipelines that reset a scheduler's timesteps).
    sigma_table = base.noise_scheduler.sigmas.clone() if flow else None
    guidance = config.guidance_scale or (base.variant.training_guidance if base.variant is not None else None)

    def forward(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if flow:
            latents, noise, sigmas, noisy = flow_noised_latents(
                batch, base, device, weight_dtype=weight_dtype, vae_dtype=vae_dtype, noise_generator=noise_generator,
                sigma_table=sigma_table, config=config)
            cond = flow_conditioning(batch, base, device, weight_dtype=weight_dtype)
            loss = flow_loss(base, denoiser, latents, noise, sigmas, noisy, cond,
                             weighting_scheme=config.weighting_scheme, guidance=guidance)
            return loss, {"loss": loss_gathered(accelerator, loss, latents.shape[0])}
        latents, noise, timesteps, noisy_latents = noised_latents(
            batch, base, device, weight_dtype=weight_dtype, vae_dtype=vae_dtype,
            noise_generator=noise_generator, noise_offset=config.noise_offset)
        hidden, added = denoiser_conditioning(batch, base, device, weight_dtype=weight_dtype,
                                              text_grad=config.train_text_encoder)
        model_pred = denoiser(noisy_latents, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
        loss = compute_loss(model_pred, latents, noise, timesteps, base.noise_scheduler, base.prediction_type,
                            config.snr_gamma)
        return loss, {"loss": loss_gathered(accelerator, loss, latents.shape[0])}

    def after_step(step: int) -> None:
        if previews is not None and (step % config.sample_every_n_steps == 0 or step == config.max_train_steps):
            paths = previews(step)
            events.emit("sample", step=step, paths=[str(path) for path in paths], prompts=previews.prompts)

    for module in models:
        module.train()
    run.train(TrainingStep(forward=forward, models=models,
                           parameters=lambda: [p for m in models for p in m.parameters() if p.requires_grad],
                           after_step=after_step if previews is not None else None),
              dataloader=dataloader, sampler=sampler, optimizer=optimizer, lr_scheduler=lr_scheduler)

    # ---- 9. the LoRA file --------------------------------------------------------------------------------
    def write_lora() -> dict[str, str]:
        unwrapped = [accelerator.unwrap_model(m) for m in models]
        manifest = Path(config.dataset_dir) / MANIFEST_NAME
        metadata = lora_metadata(config, base, fingerprint=fingerprint, steps=run.progress.global_step,
                                 num_examples=dataset.num_examples, loss_curve=loss_curve_points(run.history),
                                 manifest_sha256=file_sha256(manifest) if manifest.is_file() else "")
        save_lora(output_path, architecture=base.architecture, denoiser=unwrapped[0], text_encoders=unwrapped[1:],
                  metadata=metadata, overwrite=config.overwrite)
        return {"lora_path": str(output_path)}

    run.finish(write_lora)
    return output_path


# ---- 1. configuration, accelerator, events, the locked work folder: training_loop.run_training_program
PROGRAM = TrainingProgram("Train one aspect LoRA (kohya keys) with accelerate + diffusers + peft.", LoraTrainConfig,
                          _train)
parse_args, main = PROGRAM.parse_args, PROGRAM.main

if __name__ == "__main__":
    main(parse_args())

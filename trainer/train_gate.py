"""Train a Mixture-of-LoRA gate over frozen aspect LoRAs. Run under ``accelerate launch``.

    python -m accelerate.commands.launch [accelerate options] trainer/launch_entry.py \\
        trainer.train_gate --config gate.toml [--resume latest]

(``versat2i train-gate`` and the Train Gate node build that command with ``trainer/launcher.py``.)
The loop of ``training_loop.py`` that ``train_lora.py`` also runs (the same data pipeline,
checkpoints, events and resume), with three differences:

* the base model **and the aspect LoRAs** are frozen: the LoRAs are attached as gated forward
  hooks (``mix_diffusers.DiffusersMixture``), and only the gate's parameters train;
* the data is the union of every aspect's folders of the training set;
* the loss is the denoising loss (``objective``: every image of the union weighs the same, or
  ``aspect_balanced``: each aspect's images weigh the same in total, whatever their count) plus
  ``balance_weight`` times the balancing loss (MoLE's ``-log prod q`` or Switch's load balancing),
  which keeps the gate from collapsing onto one LoRA.

The DiT families (FLUX.1, FLUX.2-klein, Z-Image) train with their flow-matching objective
(``objective.flow_loss``, the LoRA trainer's default noise levels and guidance input) from their
split files; their LoRAs are read in diffusers' keys and the gate's layers are the Linears they
adapt (``docs/dit-families.md``).

The gate's form (``gate.py``): ``granularity`` (what it reads: token, prompt or nothing per layer),
``gate_kind`` (softmax weights summing to 1, or kinds free to combine the LoRAs at full strength)
and ``timestep_knots`` (the noise level as a further input).

Output: one MoL file (``trainer/mol_file.py``) next to the LoRAs, written atomically, naming each
LoRA by file name and sha256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .. import __version__
from ..config_file import require_choice, require_positive
from ..models.flow_matching import predict_velocity
from ..models.lora_files import load_kohya_lora, read_lora_metadata
from ..training_set.folders import scan_training_set
from .config import ImageTrainingConfig
from .events import EventWriter
from .gate import BALANCE_KINDS, GATE_KINDS, GRANULARITIES, GateUsage
from .lora_job import check_base_model, launch_in_work_dir, refuse_other_result, reuse_finished, with_run_folder
from .mix_diffusers import DiffusersMixture, gate_for_layers, gate_form, mixture_layers
from .mol_file import MOL_SUFFIX, expert_record, read_mol, save_mol
from .objective import (
    compute_loss,
    denoiser_conditioning,
    flow_conditioning,
    flow_loss,
    flow_noised_latents,
    noised_latents,
)
from .train_lora import dit_model_files, is_dit_folder
from .training_loop import (
    CheckpointHooks,
    TrainingProgram,
    TrainingProgress,
    TrainingRun,
    TrainingStep,
    base_model_identity,
    load_run_base_model,
    loss_curve_points,
    prepare_training_data,
    run_output_path,
    tree_identity,
)

logger = logging.getLogger(__name__)

GATE_PROGRAM = "trainer.train_gate"
# How a DiT gate run draws noise levels: the LoRA trainer's defaults (the recipes' uniform u), so the
# gate learns on the noise levels its LoRAs were trained on by default.
FLOW_NOISE_SAMPLING = SimpleNamespace(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
GATE_STATE_FILE = "gate.safetensors"
OBJECTIVES = ("denoise", "aspect_balanced")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateTrainConfig(ImageTrainingConfig):
    """A gate over ``loras`` (one per aspect), trained on every aspect folder of ``dataset_dir``.

    ``output_dir`` must hold the LoRAs (the MoL file is saved next to them and names them relative
    to its folder); the result is ``<output_dir>/<output_name>.mol.safetensors``.
    """

    loras: tuple[str, ...] = ()  # the aspect LoRA files, in gate order
    aspects: tuple[str, ...] = ()  # their aspect names (empty: each LoRA's versat2i_aspect, else its file stem)
    # The defaults were chosen on the demo world's validation prompts (demo/settings.py): a layer gate of
    # sigmoid weights (each LoRA 0..2, free to combine) scored best of the forms tried; it bakes exactly.
    granularity: str = "layer"  # token | prompt | layer
    gate_kind: str = "sigmoid"  # softmax (sums to 1) | softmax_n | sigmoid | scaled_softmax (free to combine)
    timestep_knots: int = 0  # 0: no timestep input; K >= 2: logit offsets at K noise levels, interpolated
    objective: str = "denoise"  # denoise (every image counts the same) | aspect_balanced (every aspect does)
    balance_loss: str = "mole"  # mole (-log prod q) | switch | none
    balance_weight: float = 0.01  # weight of the balancing loss (0 = none)
    temperature: float = 1.0  # initial softmax temperature (learned)
    prior_decay: float = 0.99  # EMA of the mean gate per layer (what bake merges without a prompt)
    # The gate starts uniform (= the equal-weight merge) and Adam moves a logit by about lr per step:
    # at 1e-3 a 200-step run stays within ~0.2 nats of uniform and ends where it began (measured on the
    # demo world: gated - merge +0.0004); 1e-2 lets it learn a mixture (+0.0026 [+.0015, +.0037]).
    learning_rate: float = 1e-2
    max_train_steps: int = 200
    # cache_text_embeddings (inherited) only when no LoRA adapts the text encoder

    @property
    def output_path(self) -> Path:
        name = self.output_name
        for suffix in (MOL_SUFFIX, ".safetensors"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        return Path(self.output_dir) / (name + MOL_SUFFIX)

    def problems(self, *, check_paths: bool = True) -> list[str]:
        p = super().problems(check_paths=check_paths)
        require_choice(p, "granularity", self.granularity, GRANULARITIES)
        require_choice(p, "gate_kind", self.gate_kind, GATE_KINDS)
        require_choice(p, "objective", self.objective, OBJECTIVES)
        if isinstance(self.timestep_knots, bool) or not isinstance(self.timestep_knots, int) or \
                self.timestep_knots < 0 or self.timestep_knots == 1:
            p.append(f"timestep_knots={self.timestep_knots!r}: 0 (no timestep input) or a whole number >= 2 "
                     "(4 is usual)")
        require_choice(p, "balance_loss", self.balance_loss, BALANCE_KINDS)  # balance_weight: SETTING_RANGES
        require_positive(p, "temperature", self.temperature)
        if not 0.0 <= self.prior_decay < 1.0:
            p.append(f"prior_decay={self.prior_decay}: must be in [0, 1)")
        if len(self.loras) < 2:
            p.append(f"loras: {len(self.loras)} given; a mixture needs at least 2 aspect LoRAs")
        if self.aspects and len(self.aspects) != len(self.loras):
            p.append(f"aspects: {len(self.aspects)} names for {len(self.loras)} LoRAs; give one per LoRA or none")
        if self.aspects and len(set(self.aspects)) != len(self.aspects):
            p.append(f"aspects {list(self.aspects)}: names must be unique")
        if check_paths and self.output_dir.strip():
            root = Path(self.output_dir).resolve()
            for lora in self.loras:
                path = Path(lora)
                if not path.is_file():
                    p.append(f"loras: {lora!r} does not exist; give the aspect LoRA files")
                elif not path.resolve().is_relative_to(root):
                    p.append(f"loras: {lora!r} is not inside output_dir {self.output_dir!r}; the MoL file is saved "
                             "next to its LoRAs, so set output_dir to the LoRAs' folder")
            if not self.aspects and all(Path(lora).is_file() for lora in self.loras):
                try:
                    shared = shared_aspects(self.loras, lora_aspect_names(self.loras))
                except ValueError as exc:
                    p.append(f"loras: {exc}")
                else:
                    p += [f"loras: {', '.join(repr(Path(f).name) for f in files)} are all LoRAs of aspect {aspect!r} "
                          "(their versat2i_aspect metadata, else the file name); a mixture needs one LoRA per aspect: "
                          "give LoRAs of different aspects, or name each one with `aspects` (one name per LoRA)"
                          for aspect, files in shared.items()]
        return p

    def memory_needs(self, size) -> tuple[int, int]:
        # Only the gate trains (a few thousand parameters); the frozen LoRAs load in float32.
        return 0, sum(Path(lora).stat().st_size for lora in self.loras if Path(lora).is_file())


def gate_run_fingerprint(config: GateTrainConfig, *, cpu: bool | None = None) -> str:
    """What decides the trained gate: as ``lora_run_fingerprint`` (the precision as it will be used),
    plus the identity of every LoRA file."""
    return config.with_resolved_precision(cpu=cpu).fingerprint(
        **base_model_identity(config), dataset=tree_identity(Path(config.dataset_dir)),
        loras=[tree_identity(Path(p)) for p in config.loras])


def lora_aspect_name(path: str | Path, metadata: dict[str, str]) -> str:
    """A LoRA's aspect in a mixture: its ``versat2i_aspect`` metadata, else its file stem."""
    return metadata.get("versat2i_aspect") or Path(path).name.removesuffix(".safetensors")


def lora_aspect_names(loras) -> list[str]:
    """Each LoRA file's aspect name, read from its header (``ValueError`` naming a damaged file)."""
    return [lora_aspect_name(path, read_lora_metadata(path)) for path in loras]


def shared_aspects(loras, names: list[str]) -> dict[str, list[str]]:
    """{aspect: the LoRA files of it} for the aspects more than one LoRA has."""
    return {name: [str(path) for path, other in zip(loras, names) if other == name]
            for name in dict.fromkeys(names) if names.count(name) > 1}


def resolve_aspects(config: GateTrainConfig, metadata: list[dict[str, str]]) -> list[str]:
    """Aspect names: the config's, else each LoRA's (``lora_aspect_name``); checked distinct by
    ``GateTrainConfig.problems`` before the run starts."""
    if config.aspects:
        return list(config.aspects)
    names = [lora_aspect_name(path, meta) for path, meta in zip(config.loras, metadata)]
    if shared_aspects(config.loras, names):
        raise ValueError(f"aspects {names}: two LoRAs have the same aspect name; set `aspects` in the config")
    return names


@dataclass
class GateCheckpointHooks(CheckpointHooks):
    """A checkpoint's trained part: the gate (safetensors). The gate is not an accelerate-prepared
    model (hooks inside the denoiser call it, not a forward of its own), so it is saved here rather
    than by ``save_state``."""

    gate: torch.nn.Module | None = None

    def save_weights(self, models, weights, folder: Path) -> None:
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            state = {k: v.detach().contiguous().cpu() for k, v in self.gate.state_dict().items()}
            save_file(state, str(folder / GATE_STATE_FILE))

    def load_weights(self, models, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(folder / GATE_STATE_FILE))
        self.gate.load_state_dict({k: v.to(self.gate.bias.device) for k, v in state.items()})
        self.gate.calibrated = [True] * len(self.gate.calibrated)  # input scales come from the checkpoint


def update_prior(gate, usage: GateUsage, step: int, decay: float, reduce_sum=None) -> None:
    """EMA of each layer's mean gate (warm-started: the first steps count fully, so the uniform
    initial value is forgotten quickly). ``reduce_sum`` (several processes: a sum over them, e.g.
    ``accelerator.reduce``) makes the mean one over every process's batch, so that every process
    keeps the same prior (only the main process's is saved)."""
    rate = min(decay, (1.0 + step) / (10.0 + step))
    sums = torch.zeros_like(gate.prior)
    counts = torch.zeros(gate.prior.shape[0], device=gate.prior.device)
    for layer, (total, count) in usage.layer_totals().items():
        sums[layer] += total.to(sums.device)
        counts[layer] += count
    if reduce_sum is not None:
        sums, counts = reduce_sum(sums), reduce_sum(counts)
    with torch.no_grad():
        for layer in torch.nonzero(counts > 0).flatten().tolist():
            gate.prior[layer].mul_(rate).add_(sums[layer] / counts[layer], alpha=1.0 - rate)


def group_balanced_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean over the groups present of each group's mean of ``values`` ``[B]`` (``groups``: ``[B]``
    group ids): every aspect of a batch weighs the same whatever its number of images."""
    present, inverse = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(len(present), device=values.device, dtype=values.dtype).index_add(0, inverse, values)
    counts = torch.bincount(inverse, minlength=len(present)).to(values.dtype)
    return (sums / counts).mean()


@torch.no_grad()
def calibrate_input_scales(gate, accelerator, run_forward) -> None:
    """Token gates fix each layer's input scale on the first batch (a frozen normalisation
    statistic, see ``gate.py``): measure it in a no-grad pass (``run_forward()``, before the first
    training forward), then average it over the processes, so every process trains the same gate
    (each would otherwise measure its own share of the data)."""
    usage, gate.usage = gate.usage, None
    try:
        run_forward()
    finally:
        gate.usage = usage
    if accelerator.num_processes > 1:
        gate.input_scale.copy_(accelerator.reduce(gate.input_scale.detach().clone(), reduction="mean"))
    gate.calibrated = [True] * len(gate.calibrated)  # a layer the forward never reaches keeps scale 1 (unused)


# -- the program -------------------------------------------------------------------------------------

def _train(config: GateTrainConfig, accelerator, events: EventWriter, resume_from: Path | None) -> Path:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler


    work_dir = Path(config.work_dir)
    output_path = run_output_path(config)
    fingerprint = gate_run_fingerprint(config)
    set_seed(config.seed)
    device = accelerator.device

    # ---- 2. data: every aspect's folders ----------------------------------------------------------
    images = scan_training_set(config.dataset_dir, "")

    # ---- 3. frozen base model, frozen LoRAs, the gate ---------------------------------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # The DiT families load in the training precision (a 12B model in fp32 is 48 GB), as train_lora does.
    dit = dit_model_files(config) is not None or is_dit_folder(config.base_model)
    base = load_run_base_model(config, torch_dtype=weight_dtype if dit else torch.float32)
    flow = base.architecture.objective == "flow_matching"
    for module in (base.denoiser, base.vae, *base.text_encoders):
        if module is not None:
            module.requires_grad_(False)
    loaded = [load_kohya_lora(path) for path in config.loras]
    aspects = resolve_aspects(config, [meta for _, meta in loaded])
    layers = mixture_layers(base, [state for state, _ in loaded], [meta for _, meta in loaded])
    adapts_text_encoder = any(layer.on_text_encoder for layer in layers)
    if config.cache_text_embeddings and adapts_text_encoder:
        raise ValueError("cache_text_embeddings: the LoRAs adapt the text encoder, whose output the gate changes "
                         "every step; set cache_text_embeddings = false")
    for module in (base.denoiser, *base.text_encoders):
        module.to(device, dtype=weight_dtype if weight_dtype != torch.float32 else None)
        module.eval()
    # The SD VAEs encode in float32; a DiT's VAE stays in the precision it was loaded in (train_lora's choice).
    vae_dtype = weight_dtype if flow else torch.float32
    if base.vae is not None:
        base.vae.to(device)
    if config.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
    prompt_features = base.architecture.gate_prompt_features(base.denoiser.config)
    gate = gate_for_layers(aspects, layers, config.granularity, prompt_features, config.temperature,
                           kind=config.gate_kind, timestep_knots=config.timestep_knots,
                           **gate_form(base.architecture)).to(device)
    gate.train()
    mixture = DiffusersMixture(gate, layers, denoiser=base.denoiser, architecture=base.architecture).attach(train=True)
    logger.info("gate: %s granularity, %s, %s, %d LoRAs (%s) on %d layers, %d parameters", config.granularity,
                config.gate_kind, f"{config.timestep_knots} timestep knots" if config.timestep_knots else "no timestep",
                len(aspects), ", ".join(aspects), len(layers), sum(p.numel() for p in gate.parameters()))
    image_aspects = sorted({image.aspect for image in images})
    aspect_of_image = torch.tensor([image_aspects.index(image.aspect) for image in images])

    # ---- 4. dataset, caches (the VAE encodes in float32) -------------------------------------------
    dataset, sampler, dataloader = prepare_training_data(config, images, base, device, vae_dtype=vae_dtype)

    # ---- 5. optimiser: the gate only ---------------------------------------------------------------
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)

    # ---- 6. checkpoints, resume --------------------------------------------------------------------
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + accelerator.process_index)
    run = TrainingRun(config, accelerator, events, work_dir, TrainingProgress(fingerprint=fingerprint))
    run.resume(GateCheckpointHooks(accelerator, noise_generator, run.progress, gate=gate), resume_from,
               inputs="settings, LoRAs or data")
    run.emit_start(num_examples=dataset.num_examples, output=output_path, resumed_from=resume_from,
                   aspects=aspects, layers=len(layers))

    # ---- 7. training loop ----------------------------------------------------------------------------
    # The gate is not an accelerate-prepared model, so its buffers and gradients are synchronised here.
    reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
    mean_mass = torch.full((len(aspects),), 1.0 / len(aspects))

    # The DiT families: the flow-matching objective of their LoRA recipes, with the LoRA trainer's default
    # noise-level sampling (uniform) and guidance input (FLUX.1-dev's 3.5), from the model's own sigmas.
    sigma_table = base.noise_scheduler.sigmas.clone() if flow else None
    guidance = base.variant.training_guidance if base.variant is not None else None

    def flow_forward(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents, noise, sigmas, noisy = flow_noised_latents(
            batch, base, device, weight_dtype=weight_dtype, vae_dtype=vae_dtype, noise_generator=noise_generator,
            sigma_table=sigma_table, config=FLOW_NOISE_SAMPLING)
        cond = flow_conditioning(batch, base, device, weight_dtype=weight_dtype)
        if config.granularity == "token" and not all(gate.calibrated):
            calibrate_input_scales(gate, accelerator,
                                   lambda: predict_velocity(base, base.denoiser, noisy, sigmas, cond, guidance))
        gate.usage = GateUsage(len(aspects))
        per_image = flow_loss(base, base.denoiser, latents, noise, sigmas, noisy, cond,
                              weighting_scheme=FLOW_NOISE_SAMPLING.weighting_scheme, guidance=guidance, per_sample=True)
        return objective_of(per_image, batch)

    def objective_of(per_image: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        denoise = per_image.mean()
        objective = denoise
        if config.objective == "aspect_balanced":
            objective = group_balanced_mean(per_image, aspect_of_image[batch["index"].cpu()].to(per_image.device))
        balance = gate.usage.loss(config.balance_loss)
        return (objective + config.balance_weight * balance,
                {"loss": accelerator.gather(denoise.detach().reshape(1)).mean(), "balance_loss": balance.detach()})

    def forward(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if flow:
            return flow_forward(batch)
        latents, noise, timesteps, noisy_latents = noised_latents(
            batch, base, device, weight_dtype=weight_dtype, vae_dtype=torch.float32, noise_generator=noise_generator)
        if config.granularity == "token" and not all(gate.calibrated):
            def calibration_forward():
                hidden, added = denoiser_conditioning(batch, base, device, weight_dtype=weight_dtype, text_grad=False)
                base.denoiser(noisy_latents, timesteps, hidden, added_cond_kwargs=added, return_dict=False)

            calibrate_input_scales(gate, accelerator, calibration_forward)
        gate.usage = GateUsage(len(aspects))
        # with grad through the text encoders when gated layers sit there (the gate trains through them)
        hidden, added = denoiser_conditioning(batch, base, device, weight_dtype=weight_dtype,
                                              text_grad=adapts_text_encoder)
        model_pred = base.denoiser(noisy_latents, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
        if config.objective == "aspect_balanced":
            per_image = compute_loss(model_pred, latents, noise, timesteps, base.noise_scheduler, base.prediction_type,
                                     0.0, per_sample=True)
            objective = group_balanced_mean(per_image, aspect_of_image[batch["index"].cpu()].to(per_image.device))
            denoise = per_image.mean()
        else:
            objective = denoise = compute_loss(model_pred, latents, noise, timesteps, base.noise_scheduler,
                                               base.prediction_type, 0.0)
        balance = gate.usage.loss(config.balance_loss)
        return (objective + config.balance_weight * balance,
                {"loss": accelerator.gather(denoise.detach().reshape(1)).mean(), "balance_loss": balance.detach()})

    def average_gate_gradients() -> None:  # the gate is not a DDP-wrapped model (hooks call it)
        for parameter in gate.parameters():
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")

    def after_update(batches_seen: int) -> None:
        nonlocal mean_mass
        update_prior(gate, gate.usage, batches_seen, config.prior_decay, reduce_sum=reduce_sum)
        mean_mass = gate.usage.mean_mass().detach().cpu()
        gate.usage = None

    run.train(TrainingStep(forward=forward, parameters=gate.parameters,
                           after_backward=average_gate_gradients if accelerator.num_processes > 1 else None,
                           after_update=after_update,
                           event_fields=lambda: {"gate_mass": [round(float(m), 4) for m in mean_mass]}),
              dataloader=dataloader, sampler=sampler, optimizer=optimizer, lr_scheduler=lr_scheduler)
    mixture.remove()

    # ---- 8. the MoL file ----------------------------------------------------------------------------------
    def write_mol() -> dict[str, str]:
        records = [expert_record(aspect, path, output_path.parent) for aspect, path in zip(aspects, config.loras)]
        training = {
            "versat2i_version": __version__, "steps": run.progress.global_step, "fingerprint": fingerprint,
            "balance_loss": config.balance_loss, "balance_weight": config.balance_weight,
            "gate_kind": config.gate_kind, "timestep_knots": config.timestep_knots, "objective": config.objective,
            "dataset": Path(config.dataset_dir).name, "num_examples": dataset.num_examples,
            "final_gate_mass": [round(float(m), 6) for m in gate.prior.mean(0)],
            "final_mean_gate": [round(float(m), 6) for m in gate.prior_gates().mean(0)],
            "loss_curve": loss_curve_points(run.history), "config": json.loads(config.to_json()),
        }
        base_info = {"arch": base.arch, "sha256": base.source_sha256, "name": Path(base.source_path).name,
                     "prediction_type": base.prediction_type}
        save_mol(output_path, gate.cpu(), records, training=training, base_model=base_info, overwrite=config.overwrite)
        return {"lora_path": str(output_path), "mol_path": str(output_path)}

    run.finish(write_mol)
    return output_path


PROGRAM = TrainingProgram("Train a Mixture-of-LoRA gate over frozen aspect LoRAs.", GateTrainConfig, _train)
parse_args, main = PROGRAM.parse_args, PROGRAM.main


# -- train once: reuse a finished MoL, else run / resume (the node's logic, testable without ComfyUI) --

@dataclass
class GateJobResult:
    mol_path: Path
    loss_curve: list[tuple[int, float]]
    reused: bool
    events: list[dict[str, Any]] = field(default_factory=list)


def read_finished_mol(path: Path) -> tuple[str | None, list[tuple[int, float]]]:
    """(fingerprint, loss curve) recorded in a MoL file; (None, []) if absent or unreadable."""

    try:
        training = read_mol(path).training
    except (ValueError, OSError):
        return None, []
    curve = [(int(s), float(v)) for s, v in training.get("loss_curve", [])]
    return training.get("fingerprint"), curve


def train_gate_or_reuse(config: GateTrainConfig, *, runs_root: str | Path | None = None, options=None, env=None,
                        on_event=None, check_cancel=None, before_launch=None, on_start=None) -> GateJobResult:
    """The finished MoL for ``config``: reused when its recorded fingerprint matches, else trained in
    a child process, resuming the latest checkpoint of an interrupted run with the same inputs (each
    fingerprint has its own work folder ``<runs_root>/<name>-<fingerprint[:12]>``). The same steps
    as the LoRA trainer's ``lora_job.train_or_reuse``."""

    config.validate(check_paths=False)
    # Resolved here, where the launch options are known, and handed to the child as given (as
    # lora_job.prepare_lora_job does): both sides fingerprint the precision the run really uses.
    config = config.with_resolved_precision(cpu=getattr(options, "cpu", None) or None)
    fingerprint = gate_run_fingerprint(config)
    finished = reuse_finished(config.output_path, fingerprint, read_finished_mol)
    if finished is not None:
        return GateJobResult(*finished, reused=True)
    refuse_other_result(config, "MoL file")
    if runs_root is not None:
        name = config.output_path.name.removesuffix(MOL_SUFFIX)
        config = with_run_folder(config, runs_root, name, fingerprint, what="mol_name")
    config.validate()
    scan_training_set(config.dataset_dir, "")  # empty / unreadable data: error now, nothing written
    check_base_model(config)
    result = launch_in_work_dir(config, program=GATE_PROGRAM, options=options, env=env, on_event=on_event,
                                check_cancel=check_cancel, before_launch=before_launch, on_start=on_start)
    return GateJobResult(Path(result.done["mol_path"]), result.losses, reused=False, events=result.events)

"""The settings the demo loop runs with, each chosen by a measurement on the demo world.

The loop (``versat2i loop`` / ``make demo``) reads these as its defaults for the embedded world;
names follow the loop's stages and, for the LoRA, ``trainer.config.LoraTrainConfig``'s fields.

Measured with the shipped base model (39 loop prompts, paired evaluation of about 220-280 images: the
loop prompts with new seeds and the 15 held-out prompts; these comparisons were made with an earlier
evaluation grid whose prompts all shared one seed list; see the demo report for the current run):

- Sampler: DDIM 10 steps without classifier-free guidance. Guidance 3 raised alignment by ~0.04
  but doubles the cost; 20 steps doubles it again for no measurable gain; the demo's time budget
  (5 minutes on 2 cores) pays for more candidates and evaluation seeds instead.
- K = 16 candidates per prompt: best-of-16 beats best-of-8 on every aspect (alignment .849 vs
  .826, aesthetics .927 vs .905), and K=16 LoRAs gained more than K=8 ones (aesthetics +.027 vs
  +.021 at 150 steps).
- Replay: each aspect's training set gets real rendered images, half as many as the selected ones.
  Without replay, the geometry and aesthetics LoRAs cost other aspects up to .03 (the
  over-optimisation of reward-filtered fine-tuning); with replay every off-aspect change stayed
  within [-.004, +.008] and alignment's own gain became significant (+.009).
- LoRA: rank 4 on the attention layers, lr 1e-3, batch 8, 300 steps (150 steps gained about half;
  rank 16, feed-forward layers or a text-encoder LoRA changed little; min-SNR weighting stopped
  learning altogether with this x0-prediction model).
- The aspect with the strongest signal is aesthetics (composition): its LoRA gains 2-8x the
  base's seed-to-seed spread in every configuration tried, so the demo asserts on it.
- Alignment LoRA: 900 steps (the others 300; loop ``[lora_aspects]``). At 300 steps its own gain was
  +.0052 [-.0010, +.011] (216 pairs, CI across zero): the colour half of the alignment reward is
  saturated (.95 on the base), the shape half is near chance (.41, chance .33) and noisy per image
  (sd .23), so the signal is a small shift in shape match. Measured on the same evaluation grid,
  each alternative trained on the same candidates: top-4 images per prompt instead of the best
  (156 + 78 replay): +.0036 [-.0003, +.0076]; lr 3e-3: +.0083 [+.0020, +.015] but lowlevel -.0066
  and geometry -.0051; 600 steps: +.0111 [+.0034, +.0188]; 900 steps: +.0147 [+.0071, +.0225],
  lowlevel -.0049, geometry +.0045. With two training jobs, 600 and 900 steps take the same wall
  time (the other job trains the three 300-step LoRAs meanwhile), so 900. A reweighted alignment
  reward (the shape half alone) cannot help: it scales the gain and its noise alike (the shape
  gain alone is +.011 [-.002, +.024]); 32 candidates would double the generation time.
- Merge baselines (each LoRA weighed the same everywhere): the sum of the LoRAs at full weight is
  worse than their 1/N average (it costs alignment -.036 and lowlevel -.009); the best uniform
  weight on the validation prompts is 0.5; TIES (density .5) and DARE-TIES do about as well as it;
  DARE without sign election ("dare_linear") is a noisy sum and scored below it, so the demo leaves
  it out for time (the loop has it).
- Gate (chosen on the validation prompts, every form trained on the same four LoRAs; table in the
  README): a layer gate (one learned weight per layer and LoRA) of sigmoid weights (each LoRA
  0..2 on its own, 1 at the start), trained on the jointly best image of each prompt
  (``gate_data = "joint"``), lr 1e-2, 200 steps, MoLE balancing .01. MoLE's softmax gates (weights
  summing to 1) stay near the 1/N merge; kinds starting at the sum (softmax x N) inherit its
  alignment loss and the denoising loss does not train it away; trained on the union of the
  aspects' sets (MoLE's data) every free gate scored at most like the best uniform merge, on the
  jointly best images the layer gates beat it on the test prompts (+.036 to +.043 on the
  normalised score over two gate seeds). A timestep input (4 knots) scored the same on validation
  (+.157 vs +.154) and kept more alignment, but cannot be baked: the demo keeps the layer gate,
  which bakes exactly (no sampling cost).
"""

from __future__ import annotations

from . import model, world

BASE_MODEL_DIR = model.BASE_MODEL_DIR
SCORERS = {aspect: f"demo:{aspect}" for aspect in ("aesthetics", "alignment", "geometry", "lowlevel")}
STRONGEST_ASPECT = "aesthetics"

SAMPLER = {
    "height": world.IMAGE_SIZE,
    "width": world.IMAGE_SIZE,
    "num_inference_steps": 10,
    "guidance_scale": 1.0,
}
CANDIDATES_PER_PROMPT = 16
# Seeds: candidate k of prompt i uses CANDIDATE_SEED + K * i + k; evaluation image s of evaluation
# prompt p uses EVAL_SEED + S * p + s (loop/config.py), a range no candidate uses.
CANDIDATE_SEED = 0
EVAL_SEED = 6_000_000

# Real rendered images per selected image in each aspect's training set (world.replay_images).
REPLAY_FRACTION = 0.5

LORA = {
    "rank": 4,
    "alpha": 4.0,
    "learning_rate": 1e-3,
    "train_batch_size": 8,
    "max_train_steps": 300,
    "resolution": world.IMAGE_SIZE,
    "bucketing": False,
    "cache_latents": True,
    "cache_text_embeddings": True,
    "train_feed_forward": False,
    "train_text_encoder": False,
    "mixed_precision": "no",
    "snr_gamma": 0.0,
}

# One aspect's LoRA with its own schedule (loop [lora_aspects]): alignment 900 steps (see the docstring).
LORA_ASPECTS = {"alignment": {"max_train_steps": 900}}

# Overrides of the gate trainer's defaults (trainer.train_gate.GateTrainConfig); the data settings
# (resolution, caches, batch, seed) come from LORA.
GATE = {
    "learning_rate": 1e-2,
    "granularity": "layer",
    "gate_kind": "sigmoid",
}
# The gate trains on the jointly best image of each prompt (loop [dataset] gate_data).
GATE_DATA = "joint"
# A layer gate without timestep input merges exactly: evaluate it baked (no per-step cost).
GATE_MODE = "bake"
# The merge baselines the demo evaluates next to the gate (dare_linear, the sum with random drops, is
# left out for time: it scored below the plain sum in the comparison above).
EVALUATION_VARIANTS = ("base", "lora", "merge", "sum", "uniform", "ties", "dare_ties", "gated")


def loop_prompts() -> list[str]:
    return world.prompt_split()[0]


def held_out_prompts() -> list[str]:
    return world.prompt_split()[1]

"""The demo base model: a tiny Stable-Diffusion-format text-to-image model of the demo world.

It is a real diffusers StableDiffusion folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/), so every production path (StableDiffusionPipeline generation, the LoRA
trainer, the gate trainer, kohya LoRA saving) runs on it unchanged; only the sizes are tiny:

- tokenizer: a transformers ``CLIPTokenizer`` with the real CLIP byte-level BPE, restricted to the
  merges the demo grammar's words need (built from the vocabulary file open_clip ships, so nothing
  is downloaded). Grammar words tokenize exactly as with the full CLIP vocabulary; any other text
  still tokenizes (into smaller pieces). The full 49k-token vocabulary would make the embedding
  table alone larger than the whole model.
- text_encoder: ``CLIPTextModel``, 2 layers, width 64.
- vae: ``AutoencoderKL`` with one block, so ``vae_scale_factor`` is 1: 4 latent channels at full
  resolution, trained to be (nearly) the identity (latent[:3] = 2*rgb - 1, latent[3] = 0; scaling
  factor 1). Latent space is pixel space, so what the UNet gets wrong shows in the image as is.
- unet: ``UNet2DConditionModel``, three levels (32x32, 16x16, 8x8; 16/32/64 channels), text
  cross-attention at 8x8.
- scheduler: ``DDIMScheduler`` with ``prediction_type="sample"`` (x0-prediction) and a cosine noise
  schedule. x0-prediction gave a usable model within minutes where v-prediction did not
  (shared/notes/demo-world-findings.md); the cosine schedule reaches pure noise at t=T, which
  small images need.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from . import world

# Where the shipped, trained model lives (diffusers folder layout).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_MODEL_DIR = WEIGHTS_DIR / "versat2i-demo-base"

TEXT_WIDTH = 64
# Token context: demo captions are 10 tokens with BOS/EOS; 16 instead of CLIP's 77 makes every
# cross-attention ~5x cheaper. Code that reads tokenizer.model_max_length (diffusers pipelines, our
# trainers) adapts; code that hard-codes 77 fails loudly on the position embeddings.
MAX_TOKENS = 16

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "sample",
    # StableDiffusionPipeline rewrites these two to False / 1 with a warning if they differ.
    "clip_sample": False,
    "steps_offset": 1,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",  # sampling starts at t=T (pure noise)
}

UNET_CONFIG = {
    "sample_size": world.IMAGE_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32, 64),
    # Text cross-attention at 8x8 only: attention at 16x16 doubled the sampling time (measured).
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 16,
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32,),
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": world.IMAGE_SIZE,
    "scaling_factor": 1.0,
    "mid_block_add_attention": False,
}


def text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": TEXT_WIDTH,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }


def grammar_words() -> list[str]:
    """Every word a demo caption can contain."""
    words = {"a", "an", "on", "background"}
    words.update(world.SHAPES, world.SHAPE_COLOURS, world.BACKGROUNDS)
    return sorted(words)


def build_tokenizer():
    """A CLIPTokenizer with the real CLIP BPE restricted to the merges the demo grammar needs.

    Restriction keeps every merge whose result is a piece of a grammar word. BPE applies, at each
    step, the lowest-ranked merge among the adjacent pairs; every merge the full vocabulary applies
    to a grammar word is kept, so grammar words split exactly as with the full vocabulary.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    vocab_file = Path(open_clip.__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
    if not vocab_file.is_file():
        raise FileNotFoundError(
            f"{vocab_file} is missing: the demo tokenizer is built from the CLIP BPE vocabulary that "
            "open_clip_torch ships; reinstall it (pip install --force-reinstall open_clip_torch)"
        )
    # The same slice open_clip's SimpleTokenizer takes: 49152 - 256 - 2 merges after the header.
    with gzip.open(vocab_file) as handle:
        lines = handle.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    all_merges = [tuple(line.split()) for line in lines]
    pieces = set()
    for word in grammar_words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for start in range(len(symbols)):
            for end in range(start + 2, len(symbols) + 1):
                pieces.add("".join(symbols[start:end]))
    merges = [merge for merge in all_merges if "".join(merge) in pieces]
    base = list(bytes_to_unicode().values())
    tokens = base + [token + "</w>" for token in base] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def write_slow_tokenizer_files(tokenizer, folder) -> None:
    """Also write ``vocab.json`` + ``merges.txt`` (the classic CLIP tokenizer files) next to the
    ``tokenizer.json`` transformers 5 saves, so transformers 4 (slow ``CLIPTokenizer``) and other
    readers of the SD-1.5 tokenizer layout load the folder too."""
    import json

    folder = Path(folder)
    model_state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_state["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model_state["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_components(seed: int = 0) -> dict:
    """Fresh (random-weight) components of the demo model, keyed as in StableDiffusionPipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    )))
    return {
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
    }


def build_pipeline(components: dict):
    """A StableDiffusionPipeline over demo components (no safety checker: the world is shapes)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )

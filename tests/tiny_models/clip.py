"""Tiny random-weight CLIP-family reward models, written in the published file formats.

Everything is built offline from configs in code, with the *real* file names and layouts, so the
production loaders read them exactly as they read the downloaded files:

* open_clip state dicts (``clip/ViT-L-14-openai.safetensors``, or ``.pt``) of a tiny open_clip
  config registered with ``open_clip.add_model_config`` (embedding width 768 like ViT-L/14, so the
  full-size LAION MLP reads it); scorers are pointed at it with ``TINY_CLIP_OPTIONS``;
* the LAION aesthetic MLP state dict with the published keys and full shapes
  (``layers.{0,2,4,6,7}``, 768 -> 1024 -> 128 -> 64 -> 16 -> 1), saved with ``torch.save`` as the
  original ``.pth``;
* an HPS v2.1-style ``.pt`` checkpoint: ``{"state_dict": <open_clip state dict>}``;
* PickScore as a transformers ``save_pretrained`` folder of a tiny ``CLIPConfig`` plus a processor
  folder (``preprocessor_config.json`` + a CLIP BPE tokenizer rebuilt from the vocabulary open_clip
  ships, so token ids match the real tokenizer).

``write_tiny_reward_models(models_dir)`` writes all of them; benchmarks reuse the writers with
full-size architectures (``write_open_clip_weights(path, open_clip.create_model("ViT-L-14-quickgelu"))``).
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

TINY_CLIP = "versat2i-tiny-clip"  # stands in for ViT-L-14-quickgelu (same embed_dim, QuickGELU)
TINY_HPS = "versat2i-tiny-hps"  # stands in for ViT-H-14 (plain GELU, another embed_dim)
TINY_IMAGE_SIZE = 32

TINY_OPEN_CLIP_CONFIGS = {
    TINY_CLIP: {
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    TINY_HPS: {
        "embed_dim": 64,
        "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}

# Options that point the CLIP-based scorers at the tiny architectures.
TINY_CLIP_OPTIONS = {"clip_architecture": TINY_CLIP}
TINY_HPS_OPTIONS = {"hps_architecture": TINY_HPS}

CLIP_FILE = "clip/ViT-L-14-openai.safetensors"
AESTHETIC_FILE = "aesthetic/sac+logos+ava1-l14-linearMSE.pth"
HPS_FILE = "hps/HPS_v2.1_compressed.pt"
PICKSCORE_MODEL_DIR = "pickscore/PickScore_v1"
PICKSCORE_PROCESSOR_DIR = "pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K"

_registered: Path | None = None


def register_tiny_open_clip() -> None:
    """Register the tiny open_clip configs (once per process)."""
    global _registered
    import open_clip

    if _registered is not None and all(open_clip.get_model_config(n) for n in TINY_OPEN_CLIP_CONFIGS):
        return
    folder = Path(tempfile.mkdtemp(prefix="versat2i-open-clip-configs-"))
    for name, config in TINY_OPEN_CLIP_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    _registered = folder


def build_open_clip(architecture: str = TINY_CLIP, *, seed: int = 0) -> torch.nn.Module:
    """An open_clip model with random weights (reproducible per seed, global RNG untouched)."""
    import open_clip

    if architecture in TINY_OPEN_CLIP_CONFIGS:
        register_tiny_open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(architecture, pretrained=None)
        # open_clip initialises some tensors to constants (zeros / ones); perturb every tensor so
        # a loader that skipped one would give different scores.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name != "logit_scale":
                    param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def write_open_clip_weights(path: str | Path, model_or_state, *, wrap_state_dict: bool = False) -> Path:
    """Save an open_clip state dict with open_clip's key names: ``.safetensors`` via safetensors,
    anything else via ``torch.save`` (optionally wrapped as ``{"state_dict": ...}``, like HPS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if wrap_state_dict else state, str(path))
    return path


LAION_MLP_SHAPES = OrderedDict([
    ("layers.0.weight", (1024, 768)), ("layers.0.bias", (1024,)),
    ("layers.2.weight", (128, 1024)), ("layers.2.bias", (128,)),
    ("layers.4.weight", (64, 128)), ("layers.4.bias", (64,)),
    ("layers.6.weight", (16, 64)), ("layers.6.bias", (16,)),
    ("layers.7.weight", (1, 16)), ("layers.7.bias", (1,)),
])


def laion_mlp_state_dict(*, seed: int = 0, gain: float = 3.0) -> OrderedDict:
    """Random values under the published key names and shapes (uniform like nn.Linear's init,
    times ``gain`` so the scores of different images differ visibly: the MLP has no activations
    and reads unit-norm embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in LAION_MLP_SHAPES.items():
        fan_in = LAION_MLP_SHAPES[key.replace(".bias", ".weight")][1]
        bound = gain / fan_in ** 0.5
        state[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    state["layers.7.bias"] += 5.0  # the real predictor's outputs sit around 5
    return state


def write_laion_mlp(path: str | Path, *, seed: int = 0, state: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if state is not None else laion_mlp_state_dict(seed=seed), str(path))
    return path


def clip_bpe_tokenizer():
    """A transformers CLIPTokenizer with the real CLIP BPE (ids match open_clip's tokenizer),
    rebuilt from the vocabulary file open_clip ships: no download."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


def tiny_transformers_clip_config(*, image_size: int = TINY_IMAGE_SIZE):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=24,
    )


def write_pickscore_folders(models_dir: str | Path, *, seed: int = 0,
                            image_size: int = TINY_IMAGE_SIZE) -> tuple[Path, Path]:
    """``pickscore/PickScore_v1`` (tiny CLIPModel, save_pretrained) and the processor folder."""
    from transformers import CLIPModel

    models_dir = Path(models_dir)
    model_dir, processor_dir = models_dir / PICKSCORE_MODEL_DIR, models_dir / PICKSCORE_PROCESSOR_DIR
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_transformers_clip_config(image_size=image_size)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))  # as the published model
    model.save_pretrained(str(model_dir))
    processor_dir.mkdir(parents=True, exist_ok=True)
    # The laion repo's preprocessor_config.json is in the legacy feature-extractor layout (sizes
    # as plain ints); write that layout, with the tiny size.
    (processor_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": image_size,
    }, indent=2))
    clip_bpe_tokenizer().save_pretrained(str(processor_dir))
    return model_dir, processor_dir


def write_tiny_reward_models(models_dir: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Every CLIP-family weight file/folder, under the real names, in ``models_dir``."""
    models_dir = Path(models_dir)
    paths = {
        "clip": write_open_clip_weights(models_dir / CLIP_FILE, build_open_clip(TINY_CLIP, seed=seed)),
        "aesthetic": write_laion_mlp(models_dir / AESTHETIC_FILE, seed=seed),
        "hps": write_open_clip_weights(models_dir / HPS_FILE, build_open_clip(TINY_HPS, seed=seed + 1),
                                       wrap_state_dict=True),
    }
    paths["pickscore_model"], paths["pickscore_processor"] = write_pickscore_folders(models_dir, seed=seed + 2)
    return paths


def random_images(count: int, height: int = 40, width: int = 56, *, seed: int = 0) -> torch.Tensor:
    """ComfyUI IMAGE batch [B,H,W,3] in 0..1 with some structure (smooth gradients + noise)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.rand(count, 3, height, width, generator=generator) * 0.2
    return (smooth * 0.8 + noise).clamp(0, 1).permute(0, 2, 3, 1).contiguous()

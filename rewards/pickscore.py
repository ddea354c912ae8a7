"""Text-image alignment / human preference: PickScore v1 (``pickscore-v1``), optional.

PickScore (Kirstain et al. 2023) is CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences. As in its
reference code:

    pickscore(image, prompt) = logit_scale.exp() * cos(E_img(image), E_txt(prompt))

(logit_scale.exp() is 100 for the published model, so scores are around 18-24). The model is a
transformers ``CLIPModel`` read from a local folder; its processor (image size, mean/std and the
tokenizer) comes from the laion CLIP-ViT-H-14 folder the reference code uses. Preprocessing runs on
tensors with the processor's parameters (shorter side to 224, bicubic, centre crop, normalise), and
each prompt is tokenized and encoded on its own (truncated to 77 tokens), cached per prompt.

Folders: ``pickscore/PickScore_v1/`` and ``pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K/`` (see
``weights.py``); if the first also holds ``preprocessor_config.json`` and tokenizer files, the second
is optional. Options: ``pickscore_model``, ``pickscore_processor`` (folder paths).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..safe_io import sha256_file
from .base import Scorer, ScoringBatch
from .cache import MODELS, stamp_files
from .clip_backbone import CPU_CHUNK_SIZE, PromptEmbeddingCache, TensorPreprocess, _pair
from .registry import ScorerOptions
from .weights import (
    PICKSCORE_MODEL,
    PICKSCORE_PROCESSOR,
    MissingWeightsError,
    combine_hashes,
    describe_load_failure,
    find_weights,
    weight_files_in,
)

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "special_tokens_map.json")
_PIL_RESAMPLE_TO_MODE = {2: "bilinear", 3: "bicubic"}


class PickScoreModel:
    """The transformers CLIP model, its tokenizer and tensor preprocessing; shared via the cache."""

    def __init__(self, model, tokenizer, preprocess: TensorPreprocess, model_dir: Path, processor_dir: Path):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_dir = model_dir
        self.processor_dir = processor_dir
        self.files = pickscore_files(model_dir, processor_dir)
        # Hashed at load time: the files may be replaced later, the loaded weights not.
        self.weights_hash = combine_hashes({f"{p.parent.name}/{p.name}": sha256_file(p) for p in self.files})
        self._text_cache = PromptEmbeddingCache(self._encode_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> PickScoreModel:
        device = torch.device(device)
        if self.device != device:
            self.model.to(device)
        return self

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device))
        return F.normalize(_embedding(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, prompts) -> torch.Tensor:
        """Normalised embeddings ``[len(prompts), D]``; each prompt tokenized alone, truncated to 77 tokens."""
        return self._text_cache(prompts, self.device)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_embedding(self.model.get_text_features(**tokens)).float(), dim=-1)[0].cpu()


def pickscore_files(model_dir: Path, processor_dir: Path) -> tuple[Path, ...]:
    """Every file the model is built from: the model's config and weights, the processor's files."""
    return tuple(model_dir / name for name in weight_files_in(model_dir)) + tuple(
        processor_dir / name for name in PROCESSOR_FILES if (processor_dir / name).is_file()
    )


def _embedding(output) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in ``pooler_output``), 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_pickscore(model_dir: Path, processor_dir: Path) -> PickScoreModel:
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError) as exc:
        raise describe_load_failure(model_dir, "a transformers CLIPModel folder (PickScore_v1)", exc,
                                    PICKSCORE_MODEL.source_hint) from exc
    try:
        image_processor = CLIPImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise describe_load_failure(processor_dir, "a CLIP processor folder (preprocessor_config.json + tokenizer)",
                                    exc, PICKSCORE_PROCESSOR.source_hint) from exc
    crop = image_processor.crop_size if image_processor.do_center_crop else None
    shortest = image_processor.size["shortest_edge"]
    preprocess = TensorPreprocess(
        size=_pair((crop["height"], crop["width"]) if crop else shortest),
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        resize_mode="shortest",
        interpolation=_PIL_RESAMPLE_TO_MODE.get(int(image_processor.resample), "bicubic"),
    )
    return PickScoreModel(model, tokenizer, preprocess, model_dir, processor_dir)


class PickScoreScorer(Scorer):
    scorer_id = "pickscore-v1"
    aspect = "alignment"
    needs_prompts = True

    @property
    def chunk_size(self) -> int:  # see clip_backbone.CPU_CHUNK_SIZE; ViT-H-14 on accelerators: 8
        return CPU_CHUNK_SIZE if self.device.type == "cpu" else 8

    def __init__(self, pick: PickScoreModel, *, device: torch.device | str = "cpu"):
        super().__init__(device)
        self.pick = pick
        self.feature_key = ("pickscore.image_embedding", id(pick))

    def to(self, device) -> PickScoreScorer:
        self.pick.to(device)
        return super().to(device)

    def weight_files(self) -> tuple[Path, ...]:
        return self.pick.files

    @property
    def weights_hash(self) -> str:
        return self.pick.weights_hash

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        images = batch.feature(self.feature_key, lambda: self.pick.encode_images(batch.images))
        texts = self.pick.text_embeddings(batch.prompts)
        scale = self.pick.model.logit_scale.exp().float()
        return scale * (images * texts).sum(dim=-1)


def find_pickscore_folders(options: ScorerOptions) -> tuple[Path, Path]:
    model_dir = find_weights(PICKSCORE_MODEL, options.search_dirs, override=options.extra.get("pickscore_model"))
    if len(weight_files_in(model_dir)) == 1:  # config.json but no weights
        raise MissingWeightsError(
            "model.safetensors", [model_dir], source_hint=PICKSCORE_MODEL.source_hint,
            detail=f"{model_dir} has config.json but no model.safetensors / pytorch_model.bin",
        )
    try:
        processor_dir = find_weights(PICKSCORE_PROCESSOR, options.search_dirs,
                                     override=options.extra.get("pickscore_processor"))
    except MissingWeightsError:
        if options.extra.get("pickscore_processor") is None and (model_dir / "preprocessor_config.json").is_file():
            return model_dir, model_dir  # a PickScore folder that ships its own processor files
        raise
    return model_dir, processor_dir


def make_scorer(options: ScorerOptions) -> PickScoreScorer:
    options.check_extra(("pickscore_model", "pickscore_processor"), PickScoreScorer.scorer_id)
    model_dir, processor_dir = find_pickscore_folders(options)
    pick = MODELS.get_or_load(
        ("pickscore", str(model_dir.resolve()), str(processor_dir.resolve())),
        lambda: load_pickscore(model_dir, processor_dir),
        stamp=stamp_files(pickscore_files(model_dir, processor_dir)),  # a replaced tokenizer file reloads too
    )
    return PickScoreScorer(pick, device=options.device)

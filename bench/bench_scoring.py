"""Benchmark: score 4 aspects of N images with the pack vs a naive baseline, in the same run.

    .venv/bin/python bench/bench_scoring.py                    # 32 images, 512 px, 1 thread
    .venv/bin/python bench/bench_scoring.py --images 8 --size 256 --architecture versat2i-tiny-clip

Aspects: aesthetics = laion-aesthetic-v2, alignment = clip-score, lowlevel = clip-iqa, geometry =
mediapipe-anatomy when its extra works here, else analytic:sharpness (the output says which).

Weights: full-size OpenAI CLIP ViT-L/14 architecture with *random* weights (speed does not depend
on the values), written to a temp models dir under the real names and formats
(``clip/ViT-L-14-openai.safetensors``, ``aesthetic/sac+logos+ava1-l14-linearMSE.pth``).

- pack: ``get_scorer`` per aspect + one ``score_aspects`` call: the three CLIP aspects share one
  model and one image pass per chunk, tensor preprocessing, batched chunks, text embeddings
  cached per prompt. Timed cold (models loaded from disk inside the timing) and warm (the next
  call, models cached, as when a ComfyUI graph runs again).
- naive: what scorer nodes commonly do: per aspect its own model loaded from disk on every call,
  then a Python loop over the images (PIL conversion, open_clip's PIL preprocessing, one image
  and its prompt through the model at a time).

Both compute the same scores; the script prints the largest difference (PIL's uint8 rounding makes
them differ slightly) so a broken pack would show. The ratio is pack time / naive time (goal <= 0.4).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the weight writers (not the repo root)

PROMPTS = [
    "a portrait of an old fisherman, dramatic light",
    "a red sports car on a mountain road",
    "a bowl of ramen, studio photo",
    "two hands holding a cup of coffee",
    "a watercolor painting of a lighthouse in a storm",
    "a cat sleeping on a stack of books",
    "a futuristic city at night, neon lights",
    "a woman running on a beach at sunrise",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="scoring device (default cpu)")
    parser.add_argument("--chunk-size", type=int, default=None, help="pack chunk size (default: the scorers')")
    parser.add_argument("--architecture", default="ViT-L-14-quickgelu",
                        help="open_clip architecture of the random CLIP (versat2i-tiny-clip for a smoke run)")
    parser.add_argument("--geometry", default="auto",
                        help="geometry scorer: auto (mediapipe-anatomy, else analytic:sharpness) or a name")
    return parser.parse_args(argv)


def write_models(models_dir: Path, architecture: str) -> None:
    from tiny_models.clip import AESTHETIC_FILE, CLIP_FILE, build_open_clip, write_laion_mlp, write_open_clip_weights

    write_open_clip_weights(models_dir / CLIP_FILE, build_open_clip(architecture, seed=0))
    write_laion_mlp(models_dir / AESTHETIC_FILE, seed=0)


def pick_geometry(choice: str, models_dir: Path, device: str) -> tuple[str, str]:
    """(scorer name, why) for the geometry aspect."""
    from versat2i.rewards.registry import get_scorer

    if choice != "auto":
        return choice, "asked for"
    try:
        scorer = get_scorer("mediapipe-anatomy", search_dirs=[models_dir], device=device)
        import torch

        scorer.score(torch.rand(1, 64, 64, 3), ["probe"])
        return "mediapipe-anatomy", "mediapipe extra works here"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the weight-free fallback
        return "analytic:sharpness", f"mediapipe-anatomy unavailable ({type(exc).__name__}: {str(exc)[:120]})"


# -- naive baseline ------------------------------------------------------------------------------

def naive_clip_aspect(aspect: str, architecture: str, models_dir: Path, images, prompts, device: str):
    """One aspect the naive way: load the model from disk, then one image at a time through PIL."""
    import numpy as np
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from tiny_models.clip import AESTHETIC_FILE, CLIP_FILE

    model = open_clip.create_model(architecture, pretrained=str(models_dir / CLIP_FILE), device=device).eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer(architecture)
    if aspect == "aesthetics":
        from versat2i.rewards.aesthetic_laion import load_aesthetic_mlp

        mlp = load_aesthetic_mlp(models_dir / AESTHETIC_FILE).to(device)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
            pixels = preprocess(pil).unsqueeze(0).to(device)
            embedding = F.normalize(model.encode_image(pixels), dim=-1)
            if aspect == "aesthetics":
                scores.append(float(mlp(embedding)))
            elif aspect == "alignment":
                text = F.normalize(model.encode_text(tokenizer([prompt]).to(device)), dim=-1)
                scores.append(float(100 * (embedding * text).sum().clamp(min=0)))
            else:  # lowlevel: CLIP-IQA
                text = F.normalize(model.encode_text(tokenizer(["Good photo.", "Bad photo."]).to(device)), dim=-1)
                scores.append(float((100 * embedding @ text.T).softmax(-1)[0, 0]))
    return torch.tensor(scores)


def naive_geometry(name: str, models_dir: Path, images, prompts, device: str):
    import torch

    from versat2i.rewards.registry import get_scorer

    scorer = get_scorer(name, search_dirs=[models_dir], device=device, cache=False)  # built on this call
    return torch.cat([scorer.score(images[i:i + 1], prompts[i:i + 1]) for i in range(images.shape[0])])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    from tiny_models.clip import random_images, register_tiny_open_clip

    from versat2i.rewards import cache
    from versat2i.rewards.base import score_aspects
    from versat2i.rewards.registry import get_scorer

    register_tiny_open_clip()
    images = random_images(args.images, args.size, args.size, seed=0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    clip_options = {"clip_architecture": args.architecture}

    with tempfile.TemporaryDirectory(prefix="versat2i-bench-models-") as tmp:
        models_dir = Path(tmp)
        started = time.perf_counter()
        write_models(models_dir, args.architecture)
        print(f"wrote random {args.architecture} + LAION MLP weights in {time.perf_counter() - started:.1f} s")
        geometry, why = pick_geometry(args.geometry, models_dir, args.device)
        names = {"aesthetics": "laion-aesthetic-v2", "alignment": "clip-score", "lowlevel": "clip-iqa",
                 "geometry": geometry}
        print(f"geometry scorer: {geometry} ({why})")

        def pack_call():
            clip_names = ("laion-aesthetic-v2", "clip-score", "clip-iqa")
            scorers = {aspect: get_scorer(name, search_dirs=[models_dir], device=args.device,
                                          **(clip_options if name in clip_names else {}))
                       for aspect, name in names.items()}
            return score_aspects(scorers, images, prompts, chunk_size=args.chunk_size)

        cache.clear()
        started = time.perf_counter()
        pack_scores = pack_call()
        pack_cold = time.perf_counter() - started
        started = time.perf_counter()
        pack_scores_warm = pack_call()
        pack_warm = time.perf_counter() - started

        naive_times, naive_scores = {}, {}
        for aspect, name in names.items():
            cache.clear()
            started = time.perf_counter()
            if aspect == "geometry":
                naive_scores[aspect] = naive_geometry(name, models_dir, images, prompts, args.device)
            else:
                naive_scores[aspect] = naive_clip_aspect(aspect, args.architecture, models_dir, images, prompts,
                                                         args.device)
            naive_times[aspect] = time.perf_counter() - started
        naive_total = sum(naive_times.values())

    print(f"\n{args.images} images at {args.size}x{args.size} px, {args.threads} torch thread(s), device {args.device}")
    for aspect in names:
        difference = float((pack_scores[aspect] - naive_scores[aspect]).abs().max())
        same_warm = torch.equal(pack_scores[aspect], pack_scores_warm[aspect])
        print(f"  {aspect:<10} {names[aspect]:<20} naive {naive_times[aspect]:8.2f} s   "
              f"max |pack - naive| = {difference:.2e}   warm == cold: {same_warm}")
    print(f"naive baseline (model per aspect, reloaded, per-image loop): {naive_total:8.2f} s")
    print(f"pack, cold (loads models inside the timing):                 {pack_cold:8.2f} s   "
          f"ratio {pack_cold / naive_total:.3f}x")
    print(f"pack, warm (models cached, the next call):                   {pack_warm:8.2f} s   "
          f"ratio {pack_warm / naive_total:.3f}x   (goal <= 0.4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

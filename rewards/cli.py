"""``versat2i score`` and ``versat2i build-dataset``: the score and filter steps from a shell.

    versat2i score IMAGES_DIR [--prompts prompts.txt|prompts.jsonl] [--aspect ASPECT[=SCORER] ...]
                   [--models-dir DIR ...] [--scorer-option ASPECT.KEY=VALUE ...] [--device auto]
                   [--chunk-size N] [--out scores.jsonl]
    versat2i build-dataset SCORES --images IMAGES_DIR --out ROOT --name NAME
                   [--threshold [ASPECT=]SPEC ...] [--repeats [ASPECT=]N ...] [--aspects a,b] [--overwrite]

Both validate every input before doing any heavy work or writing anything; a bad input is one
error line (printed by the top-level ``versat2i`` command) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..aspects import aspect_name_problem

logger = logging.getLogger(__name__)

PROMPT_SOURCES_HELP = (
    "where prompts come from: a text file with one prompt per line, matched to the images in sorted "
    "order (blank lines are skipped; identical lines are one prompt with several candidates); or a "
    ".jsonl file with one {\"file\": ..., \"prompt\": ..., \"seed\": ...} object per image (\"file\" "
    "relative to the images folder; optional \"prompt_index\"/\"candidate_index\"). Without "
    "--prompts, each image's caption file <image stem>.txt next to it is its prompt."
)


class _LazyHelpFormatter(argparse.HelpFormatter):
    """Fills ``@DEFAULT_SCORERS@`` / ``@IMAGE_EXTENSIONS@`` only when help is printed: building the
    parser must not import torch (the registry does), so ``versat2i --help`` stays fast."""

    def format_help(self) -> str:
        text = super().format_help()
        if "@DEFAULT_SCORERS@" in text:
            text = text.replace("@DEFAULT_SCORERS@", ", ".join(f"{a}={s}" for a, s in _default_scorers().items()))
        if "@IMAGE_EXTENSIONS@" in text:
            text = text.replace("@IMAGE_EXTENSIONS@", ", ".join(_image_extensions()))
        return text


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    score = subparsers.add_parser(
        "score", help="score a folder of images for each aspect -> a scores table / JSONL",
        description="Score every image of a folder for each aspect and print a table; --out writes "
        "the scores (with prompts, seeds and scorer ids) for `versat2i build-dataset`.",
        epilog="Image files: @IMAGE_EXTENSIONS@. Default scorers: @DEFAULT_SCORERS@.",
        formatter_class=_LazyHelpFormatter,
    )
    score.add_argument("images", type=Path, help="folder of images, sorted by name (numbers compared as numbers)")
    score.add_argument("--prompts", type=Path, help=PROMPT_SOURCES_HELP)
    score.add_argument(
        "--aspect", action="append", default=[], metavar="ASPECT[=SCORER]",
        help="an aspect to score and (optionally) its scorer, e.g. 'lowlevel=pyiqa:musiq' or "
        "'sharp=analytic:sharpness'; repeat for several. Default: every aspect with its default scorer "
        "(listed below)",
    )
    score.add_argument("--models-dir", action="append", default=[], type=Path, metavar="DIR",
                       help="folder with the scorers' weight files (sub-folders clip/, aesthetic/, hps/, ...); "
                       "repeatable")
    score.add_argument(
        "--scorer-option", action="append", default=[], metavar="ASPECT.KEY=VALUE",
        help="an option of one aspect's scorer, e.g. an explicit weight file instead of the one in --models-dir: "
        "'aesthetics.aesthetic_weights=~/sac+logos+ava1-l14-linearMSE.pth', 'aesthetics.clip_weights=FILE', "
        "'lowlevel.weights=FILE' (pyiqa), or a setting: 'geometry.no_person_score=0.5'. File options (names "
        "ending in 'weights', '_model' or '_processor') are paths, relative ones to the current folder; other "
        "values are read as JSON when they parse (numbers, lists), else as text. Each scorer's options: "
        "docs/scorers.md; repeatable",
    )
    score.add_argument("--device", default="auto",
                       help="torch device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    score.add_argument("--chunk-size", type=int, default=None, metavar="N",
                       help="images loaded and scored at once (default: the scorers' own chunk size)")
    score.add_argument("--out", type=Path, help="write the scores here (.jsonl or .json)")
    score.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    score.add_argument("--quiet", action="store_true", help="don't print the table")
    score.set_defaults(func=run_score)


def _default_scorers() -> dict[str, str]:
    from .registry import DEFAULT_SCORERS

    return DEFAULT_SCORERS


def _image_extensions() -> tuple[str, ...]:
    from ..image_files import IMAGE_FILE_EXTENSIONS

    return IMAGE_FILE_EXTENSIONS


# -- inputs -------------------------------------------------------------------------------------

def _natural_key(name: str) -> list:
    """'img2' sorts before 'img10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden files skipped), in natural name order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {str(folder)!r} not found")
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _image_extensions()
    ]
    if not files:
        raise ValueError(
            f"images folder {str(folder)!r} has no images ({', '.join(_image_extensions())}); "
            "point it at the generated images"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_prompts(images: Sequence[Path], folder: Path, prompts_file: Path | None) -> dict:
    """Prompts (and seeds, prompt/candidate indices where known) for ``images``, in their order."""
    names = [p.relative_to(folder).as_posix() for p in images]
    seeds: list[int | None] = [None] * len(images)
    prompt_indices = candidate_indices = None
    if prompts_file is None:
        missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(
                f"no prompt for {len(missing)} image(s) ({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}): "
                "put each prompt in <image stem>.txt next to its image, or pass --prompts"
            )
        prompts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    elif not prompts_file.is_file():
        raise FileNotFoundError(f"prompts file {str(prompts_file)!r} not found")
    elif prompts_file.suffix.lower() == ".jsonl":
        by_file: dict[str, dict] = {}
        for line_number, line in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"prompts file {str(prompts_file)!r}, line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and isinstance(entry.get("prompt"), str)):
                raise ValueError(
                    f"{where}: expected {{\"file\": \"<image name>\", \"prompt\": \"...\", \"seed\": 123}}"
                )
            file_name = Path(entry["file"]).as_posix()
            if file_name in by_file:
                raise ValueError(f"{where}: {file_name!r} appears twice; give one entry per image")
            by_file[file_name] = entry
        missing = [n for n in names if n not in by_file]
        unknown = sorted(set(by_file) - set(names))
        if missing or unknown:
            raise ValueError(
                f"prompts file {str(prompts_file)!r} does not match the images: "
                + (f"no entry for {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"entries for missing images {unknown[:5]}{'...' if len(unknown) > 5 else ''}" if unknown else "")
                + "; give exactly one entry per image file"
            )
        entries = [by_file[n] for n in names]
        prompts = [e["prompt"] for e in entries]
        seeds = [e.get("seed") for e in entries]
        if all("prompt_index" in e and "candidate_index" in e for e in entries):
            prompt_indices = [e["prompt_index"] for e in entries]
            candidate_indices = [e["candidate_index"] for e in entries]
    else:
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"prompts file {str(prompts_file)!r} is not UTF-8 text") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if len(prompts) != len(images):
            raise ValueError(
                f"prompts file {str(prompts_file)!r} has {len(prompts)} prompt(s) for {len(images)} image(s); "
                "give one line per image, in the images' sorted order (repeat a prompt for each of its candidates)"
            )
    return {"prompts": prompts, "seeds": seeds, "prompt_indices": prompt_indices,
            "candidate_indices": candidate_indices, "image_ids": names}


def parse_aspects(specs: Sequence[str]) -> dict[str, str]:
    """``["lowlevel=pyiqa:musiq", "aesthetics"]`` -> ``{aspect: scorer name}``; checks the scorer
    names against the registry without building anything."""
    from .registry import DEFAULT_SCORERS, SCORERS, list_scorers, split_name

    if not specs:
        return dict(DEFAULT_SCORERS)
    aspects: dict[str, str] = {}
    for spec in specs:
        aspect, _, scorer = spec.partition("=")
        aspect, scorer = aspect.strip(), scorer.strip()
        problem = aspect_name_problem(aspect, what=f"--aspect {spec!r}: aspect")
        if problem:
            raise ValueError(problem)
        if aspect in aspects:
            raise ValueError(f"--aspect {spec!r}: aspect {aspect!r} given twice")
        if not scorer:
            if aspect not in DEFAULT_SCORERS:
                raise ValueError(
                    f"--aspect {spec!r}: unknown aspect without a scorer; known aspects: "
                    f"{', '.join(DEFAULT_SCORERS)}, or name a scorer: '{aspect}=analytic:sharpness'"
                )
            scorer = DEFAULT_SCORERS[aspect]
        if split_name(scorer)[0] not in SCORERS:
            raise ValueError(
                f"--aspect {spec!r}: unknown scorer {scorer!r}; known scorers: {', '.join(list_scorers())}"
            )
        aspects[aspect] = scorer
    return aspects


def parse_scorer_options(specs: Sequence[str], aspects: Sequence[str], *,
                         cwd: Path | None = None) -> dict[str, dict[str, object]]:
    """``["aesthetics.aesthetic_weights=/w/mlp.pth", "geometry.no_person_score=0.5"]`` ->
    ``{aspect: {option: value}}``. File options (``registry.is_path_option``) become absolute paths
    (relative ones from ``cwd``, default the current folder) and must exist; other values are JSON
    when they parse, else text. Whether the scorer knows the option is its own check."""
    from .registry import is_path_option

    options: dict[str, dict[str, object]] = {}
    for spec in specs:
        target, sep, value = spec.partition("=")
        aspect, dot, key = target.strip().partition(".")
        aspect, key = aspect.strip(), key.strip()
        if not sep or not dot or not aspect or not key:
            raise ValueError(
                f"--scorer-option {spec!r}: expected ASPECT.KEY=VALUE, "
                "e.g. 'aesthetics.aesthetic_weights=/path/file.pth'"
            )
        if aspect not in aspects:
            raise ValueError(
                f"--scorer-option {spec!r}: aspect {aspect!r} is not scored; scored aspects: {', '.join(aspects)}"
            )
        if key in options.get(aspect, {}):
            raise ValueError(f"--scorer-option {spec!r}: {aspect}.{key} is given twice")
        value = value.strip()
        if is_path_option(key):
            if not value:
                raise ValueError(f"--scorer-option {spec!r}: {aspect}.{key} is empty; give the path of the file "
                                 "(or folder) to use")
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = (cwd or Path.cwd()) / path
            if not path.exists():
                raise FileNotFoundError(
                    f"--scorer-option {spec!r}: weight file {str(path)!r} not found; give the path of the file "
                    "(or folder) to use"
                )
            parsed: object = str(path)
        else:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
        options.setdefault(aspect, {})[key] = parsed
    return options


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _check_out(out: Path | None, overwrite: bool) -> None:
    from ..safe_io import TargetExistsError, target_problem

    if out is None:
        return
    if out.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"--out {str(out)!r}: use a .jsonl or .json file name")
    problem = target_problem(out, what="--out")
    if problem:
        raise ValueError(problem)
    if out.exists() and not overwrite:
        raise TargetExistsError(f"--out {str(out)!r} already exists; choose another name or pass --overwrite")


def progress_callback(total: int, description: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """``(update(done, total), close())`` of a ``progress.Progress`` over ``total`` images."""
    from ..progress import Progress

    bar = Progress(total, description, unit="img")
    return (lambda done, _total: bar.set(done)), bar.close


def score_folder(
    images: Sequence[Path],
    prompts: Sequence[str],
    scorers: dict,
    *,
    chunk_size: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[str]]:
    """Score image files chunk by chunk (only one chunk is in memory); images of different sizes
    are scored in separate calls, which never changes a score (scorers are batch-independent).
    Returns the scores (``AspectScores``, with the judged masks) and each file's
    ``pixels_sha256``."""
    import torch

    from ..image_files import load_image_file
    from .base import AspectScores, score_aspects
    from .score_table import pixels_sha256

    size = chunk_size or min(s.chunk_size for s in scorers.values())
    if size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {size}")
    results = {aspect: torch.empty(len(images)) for aspect in scorers}
    judged = {aspect: torch.ones(len(images), dtype=torch.bool) for aspect in scorers}
    fingerprints: list[str] = []
    for start in range(0, len(images), size):
        rows = list(range(start, min(start + size, len(images))))
        loaded = {}
        for row in rows:
            pixels = load_image_file(images[row])
            fingerprints.append(pixels_sha256(pixels))
            loaded[row] = torch.from_numpy(pixels).float().div_(255.0)
        by_size: dict[tuple[int, int], list[int]] = {}
        for row, pixels in loaded.items():
            by_size.setdefault(tuple(pixels.shape[:2]), []).append(row)
        for group in by_size.values():
            batch = torch.stack([loaded[row] for row in group]).to(device)
            scores = score_aspects(scorers, batch, [prompts[row] for row in group], chunk_size=size)
            for aspect, values in scores.items():
                results[aspect][group] = values
                judged[aspect][group] = scores.judged[aspect]
        if progress is not None:
            progress(rows[-1] + 1, len(images))
    return AspectScores(results, judged), fingerprints


# -- commands -------------------------------------------------------------------------------------

def run_score(args: argparse.Namespace) -> int:
    from ..image_files import check_image_file
    from .registry import get_scorer
    from .score_table import ScoreTable

    # Cheap checks first, so a typo fails before any model loads.
    _check_out(args.out, args.overwrite)
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    images = list_images(args.images)
    inputs = read_prompts(images, args.images, args.prompts)
    aspect_scorers = parse_aspects(args.aspect)
    scorer_options = parse_scorer_options(args.scorer_option, list(aspect_scorers))
    for models_dir in args.models_dir:
        if not models_dir.is_dir():
            raise FileNotFoundError(f"--models-dir {str(models_dir)!r} is not a folder")
    # The table's own checks (seeds, prompt/candidate indices) before scoring, on placeholder scores.
    ScoreTable.from_scores({"check": [0.0] * len(images)}, {"check": {"id": "check", "weights_hash": "none"}},
                           inputs["prompts"], seeds=inputs["seeds"], prompt_indices=inputs["prompt_indices"],
                           candidate_indices=inputs["candidate_indices"], image_ids=inputs["image_ids"])
    # Header check up front: a non-image or RGBA file fails now, before any model loads. (A
    # truncated file fails while scoring; --out is only written at the end, so nothing is written.)
    for path in images:
        check_image_file(path)
    device = _pick_device(args.device)

    built: dict[tuple, object] = {}
    scorers = {}
    for aspect, name in aspect_scorers.items():
        options = scorer_options.get(aspect, {})
        key = (name, json.dumps(options, sort_keys=True))
        if key not in built:
            built[key] = get_scorer(name, search_dirs=args.models_dir, device=device, **options)
        scorers[aspect] = built[key]

    update, close = progress_callback(len(images), "score")
    try:
        results, fingerprints = score_folder(images, inputs["prompts"], scorers, chunk_size=args.chunk_size,
                                             device=device, progress=update)
    finally:
        close()
    table = ScoreTable.from_scores(
        results, scorers, inputs["prompts"], seeds=inputs["seeds"], prompt_indices=inputs["prompt_indices"],
        candidate_indices=inputs["candidate_indices"], image_ids=inputs["image_ids"], fingerprints=fingerprints,
    )
    if not args.quiet:
        print(table.to_text())
    if args.out is not None:
        table.save(args.out, overwrite=args.overwrite)
        logger.info("wrote %d image scores to %s", len(table), args.out)
    return 0

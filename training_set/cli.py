"""``versat2i build-dataset``: scores + the scored images -> a kohya-style training set, the best image
of each prompt per aspect (``writer.write_training_set``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build-dataset", help="scores + images -> kohya-style training set, best image per prompt and aspect",
        description="Keep the best image of each prompt for each aspect (if it passes the aspect's "
        "threshold) and write <out>/<name>/<repeats>_<aspect>/<id>.png + .txt, manifest.jsonl and dataset.json.",
    )
    build.add_argument("scores", type=Path, help="scores file written by `versat2i score --out` (.jsonl or .json)")
    build.add_argument("--images", type=Path, required=True, help="the folder that was scored")
    build.add_argument("--out", type=Path, required=True, help="folder that receives the training set folder")
    build.add_argument("--name", required=True, help="training set folder name inside --out (sub-folders allowed)")
    build.add_argument(
        "--threshold", action="append", default=[], metavar="[ASPECT=]SPEC",
        help="keep a prompt's best image only if it passes: 'none' (default: always keep), a score "
        "('5.5', kept when >=), or a percentile of all the aspect's scores ('p75' or '75%%', kept when "
        ">=). Without ASPECT= it applies to every aspect; repeatable",
    )
    build.add_argument("--repeats", action="append", default=[], metavar="[ASPECT=]N",
                       help="kohya repeats per aspect folder (default 10); repeatable")
    build.add_argument("--aspects", help="comma-separated aspects to build (default: every scored aspect)")
    build.add_argument("--joint", action="store_true",
                       help="instead of a folder per aspect, one folder <repeats>_joint with the image of each prompt "
                            "best at all the aspects at once (mean of each aspect's standardised score): the data "
                            "to train a mixture gate on (Train Gate / versat2i train-gate); --threshold does not apply")
    build.add_argument("--overwrite", action="store_true", help="replace an existing training set of that name")
    build.set_defaults(func=run_build_dataset)


def _split_specs(specs: Sequence[str], flag: str) -> tuple[str | None, dict[str, str]]:
    """``["p50", "aesthetics=5.5"]`` -> (default "p50", {"aesthetics": "5.5"})."""
    default, per_aspect = None, {}
    for spec in specs:
        aspect, sep, value = spec.partition("=")
        if not sep:
            if default is not None:
                raise ValueError(f"{flag} {spec!r}: a value for every aspect was already given ({default!r})")
            default = spec.strip()
        else:
            if aspect.strip() in per_aspect:
                raise ValueError(f"{flag} {spec!r}: aspect {aspect.strip()!r} given twice")
            per_aspect[aspect.strip()] = value.strip()
    return default, per_aspect


def run_build_dataset(args: argparse.Namespace) -> int:
    # Imported here: they load torch, and `versat2i --help` must stay fast.
    from ..rewards.cli import progress_callback
    from ..rewards.score_table import ScoreTable
    from ..rewards.selection import JOINT, Threshold, select_best_per_prompt, with_joint_scores
    from ..safe_io import confined_path, folder_problem
    from .layout import DEFAULT_REPEATS
    from .writer import write_training_set

    problem = folder_problem(args.out, what="--out")  # a file, read-only, not writable: before any work
    if problem:
        raise ValueError(problem)
    confined_path(args.out, args.name, what="--name")  # too long, reserved, escaping
    table = ScoreTable.load(args.scores)
    aspects = table.aspects
    if args.aspects:
        aspects = [a.strip() for a in args.aspects.split(",") if a.strip()]
        unknown = [a for a in aspects if a not in table.scores]
        if unknown or not aspects:
            raise ValueError(
                f"--aspects {args.aspects!r}: not scored: {unknown}; scored aspects: {', '.join(table.aspects)}"
            )

    default_threshold, per_aspect_threshold = _split_specs(args.threshold, "--threshold")
    default_repeats, per_aspect_repeats = _split_specs(args.repeats, "--repeats")
    for flag, given in (("--threshold", per_aspect_threshold), ("--repeats", per_aspect_repeats)):
        unknown = [a for a in given if a not in aspects]
        if unknown:
            raise ValueError(f"{flag}: aspect(s) {unknown} are not being built; aspects: {', '.join(aspects)}")
    thresholds = {a: Threshold.parse(per_aspect_threshold.get(a, default_threshold)) for a in aspects}

    def whole_number(text: str, aspect: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--repeats for {aspect!r}: {text!r} is not a whole number") from None

    repeats = {
        a: whole_number(per_aspect_repeats.get(a, default_repeats or str(DEFAULT_REPEATS)), a) for a in aspects
    }

    if not args.images.is_dir():
        raise FileNotFoundError(f"--images folder {str(args.images)!r} not found")
    needed = set()
    if args.joint:
        if args.threshold:
            raise ValueError("--threshold: the joint selection keeps the jointly best image of every prompt; drop it")
        if per_aspect_repeats:
            raise ValueError("--repeats ASPECT=N: --joint writes one folder; give --repeats N")
        table = with_joint_scores(table, aspects)
        selection = select_best_per_prompt(table, "none", aspects=[JOINT])
        repeats = {JOINT: whole_number(default_repeats or str(DEFAULT_REPEATS), JOINT)}
    else:
        selection = select_best_per_prompt(table, thresholds, aspects=aspects)
    for chosen in selection.aspects.values():
        needed.update(chosen.kept)
    paths: list[Path | None] = [None] * len(table)
    for row, image_id in enumerate(table.image_ids):
        if image_id is None:
            raise ValueError(
                f"{args.scores}: image {row} has no image_id (file name); build-dataset needs scores written by "
                "`versat2i score`"
            )
        paths[row] = confined_path(args.images, image_id, what=f"{args.scores}: image_id of image {row}",
                                   writes=False)
        if row in needed and not paths[row].is_file():
            raise FileNotFoundError(
                f"image {image_id!r} (from {args.scores}) not found in --images {str(args.images)!r}"
            )

    update, close = progress_callback(sum(len(s.kept) for s in selection.aspects.values()), "writing")
    try:
        written = write_training_set(
            args.out, args.name, table, selection, paths, repeats=repeats, overwrite=args.overwrite,
            extra_summary={"scores_file": str(args.scores)}, progress=update,
        )
    finally:
        close()
    print(selection.summary())
    state = ", unchanged: it holds this content already" if written.reused else ""
    print(f"training set: {written.path} ({len(written.entries)} images{state})")
    return 0

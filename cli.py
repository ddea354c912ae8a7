"""The ``versat2i`` command: one subcommand per loop stage, each a thin wrapper over a library call.

Each area owns its subcommands (``rewards/cli.py``, ``training_set/cli.py``, ``trainer/cli.py``,
``loop/cli.py``); this file
only wires them together, and imports them lazily so ``versat2i --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .offline import go_offline
from .safe_io import WriteFailedError, describe_os_error

# area module -> its ``add_subcommands(subparsers)``; relative to this package.
SUBCOMMAND_MODULES = (".rewards.cli", ".training_set.cli", ".trainer.cli", ".loop.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="versat2i",
        description="VersaT2I self-improvement loop: generate, score, filter, train aspect LoRAs, mix.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name, __package__).add_subcommands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    go_offline()  # before any library loads: nothing the command runs may reach the network
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line knows the demo world's scorers (``demo:<aspect>``), so `versat2i score` and a
    # loop config of the demo world can name them; inside ComfyUI they stay out of the lists.
    # Imported here, after parsing: it loads torch, and `versat2i --help` must stay fast.
    from .demo.rewards import register_scorers as register_demo_scorers

    register_demo_scorers()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, ImportError, OSError) as exc:
        # User errors and what the system refused (disk full, permission, read-only, a name too
        # long): one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            raise
        message = describe_os_error(exc) if isinstance(exc, OSError) and not isinstance(
            exc, (FileNotFoundError, WriteFailedError)) else str(exc)
        print(f"versat2i {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The script ``accelerate launch`` runs: import the pack by its file location, then run a program.

    launch_entry.py trainer.train_lora --config run.toml [--resume latest]

The first argument names a module of the pack (relative to it) with ``parse_args(argv)`` and
``main(args)``, e.g. ``trainer.train_lora``; the rest are that program's arguments.

ComfyUI-Manager installs only ``requirements.txt``, so the pack is usually not pip-installed, and a
pip-installed copy may be another version than the one next to this file. This script therefore
loads *this* folder's pack as the package ``versat2i`` (as ComfyUI loads custom nodes: by file
location), whatever is installed. The pack's ``__init__.py`` imports nothing heavy, so this is safe.
"""

import importlib.util
import logging
import os
import re
import sys

TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))
PACK_ROOT = os.path.dirname(TRAINER_DIR)
PACKAGE_NAME = "versat2i"


def import_pack():
    # ``python <script>`` puts the script's folder first on sys.path: trainer/config.py, events.py,
    # cli.py... would shadow any top-level module of the same name. Take it off.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != TRAINER_DIR]
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, os.path.join(PACK_ROOT, "__init__.py"), submodule_search_locations=[PACK_ROOT])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = package
    spec.loader.exec_module(package)
    return package


# Set by trainer/launcher.py (its PARENT_ENV, the same name: this script runs before the pack is
# imported): "<pid>:<start time>" of the launching process. A launcher already gone when this
# process starts (killed while we imported) stops the run at once too.
PARENT_ENV = "VERSAT2I_PARENT"
PARENT_POLL_S = 0.2  # a psutil lookup: cheap, and a dead launcher stops the run within a step or so


def parent_is_alive(token):
    """Whether the process named by ``token`` (``launcher.parent_token``) still runs."""
    import psutil

    pid, _, started = token.partition(":")
    try:
        process = psutil.Process(int(pid))
        return f"{process.create_time():.3f}" == started and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def exit_when_parent_dies(token, poll_s=PARENT_POLL_S):
    """Watch the launching process from a daemon thread; when it is gone without having cancelled
    this run (killed -9, crashed), stop at once. Checkpoints are written atomically, so the last one
    stays usable and the next run resumes from it."""
    import threading
    import time

    # psutil is imported here, before the thread starts: imported from the thread it raced with
    # import_pack() rewriting sys.path in the main thread ("No module named 'psutil'" / 'array'
    # killed the watch in 2 of 5 demo trainings, leaving them to run on after their launcher died).
    import psutil  # noqa: F401

    def watch():
        while parent_is_alive(token):
            time.sleep(poll_s)
        print(f"the process that launched this training ({token.partition(':')[0]}) is gone; stopping "
              "(the last checkpoint is kept: the next run resumes from it)", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="versat2i-parent-watch", daemon=True).start()


def run(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", argv[0]):
        sys.exit("usage: launch_entry.py <pack module, e.g. trainer.train_lora> [program arguments]")
    if os.environ.get(PARENT_ENV):
        exit_when_parent_dies(os.environ[PARENT_ENV])
    import_pack()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes (pulled in by peft when the optional pyiqa extra installed it) warns at import that
    # it found no CPU 4-bit kernel, and kernels that it could not check one offline; nothing here uses them.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    program = importlib.import_module(f"{PACKAGE_NAME}.{argv[0]}")
    program.main(program.parse_args(argv[1:]))


if __name__ == "__main__":
    run()

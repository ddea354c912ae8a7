"""The pack's import graph is a strict stack (read from the source with ``ast``, in-function imports
included), and the two training programs share their loop instead of repeating it.

Layers, bottom to top; a module may import its own layer and any lower one, never a higher one:

0. ``safe_io``, ``aspects``, ``config_file``, ``image_files``, ``progress``, ``offline``: rules, file
   handling and progress display every part uses, and the offline environment of the pack's processes
1. ``rewards`` (score), ``models`` (the model families: detection, loading, pipelines, LoRA files)
2. ``training_set`` (the filtered set's format: it writes score tables), ``demo`` (the demo world)
3. ``trainer`` (LoRA and gate training)
4. ``loop`` (the stages end to end, evaluation, report)
5. ``nodes`` (ComfyUI), ``cli`` and the package root

Imports of the pack's own modules sit at the top of a module, where readers (and grep) see them.
The exceptions, each for start-up time: the package root's ``comfy_entrypoint`` (ComfyUI imports the
root before it asks for nodes), and the command-line modules (``versat2i --help`` must not load torch).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import versat2i

PACK = Path(versat2i.__file__).resolve().parent
LAYERS = (
    {"safe_io", "aspects", "config_file", "image_files", "progress", "offline"},
    {"rewards", "models"},
    {"training_set", "demo"},
    {"trainer"},
    {"loop"},
    {"nodes", "cli", "__init__"},
)
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}
# (module, why) pairs allowed to import pack modules inside functions.
LAZY_IMPORTS_ALLOWED = {
    "__init__": "comfy_entrypoint: the node modules need ComfyUI, which imports the root first",
    "cli": "`versat2i --help` stays fast: subcommand modules and the demo scorers load torch",
    "rewards.cli": "subcommands import what they run (`versat2i --help` stays fast)",
    "training_set.cli": "subcommands import what they run (`versat2i --help` stays fast)",
    "trainer.cli": "subcommands import what they run (`versat2i --help` stays fast)",
    "loop.cli": "subcommands import what they run (`versat2i --help` stays fast)",
}
NOT_PACK_CODE = ("tests", "bench", "tools", "build", "versat2i-demo")


def pack_modules() -> dict[str, Path]:
    """Dotted module name (relative to the package) -> file, for every module of the pack."""
    modules = {}
    for path in sorted(PACK.rglob("*.py")):
        parts = path.relative_to(PACK).with_suffix("").parts
        if parts[0].startswith(".") or parts[0] in NOT_PACK_CODE or "configs" in parts:
            continue
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported pack module, line, inside a function?) for every relative import of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                base = package[: len(package) - (child.level - 1)] if child.level > 1 else package
                target = [*base, *(child.module.split(".") if child.module else [])]
                if child.module is None:  # from . import a, b
                    found.extend((".".join([*target, alias.name]), child.lineno, nested) for alias in child.names)
                else:
                    found.append((".".join(target), child.lineno, nested))
            visit(child, nested)

    visit(tree, False)
    return found


def top(name: str) -> str:
    return name.split(".")[0] if name else "__init__"


def test_every_pack_module_is_in_a_layer():
    unknown = sorted({top(m) for m in pack_modules()} - set(LAYER_OF))
    assert not unknown, f"modules outside every layer: {unknown}; add them to LAYERS (and to the docstring)"


def test_imports_only_go_down():
    upward = []
    for module, path in pack_modules().items():
        for target, line, _ in imports_of(module, path):
            source_top, target_top = top(module), top(target) if target else "__init__"
            if source_top == target_top or target == "":
                continue  # its own package; or the package root, which every layer may ask for __version__
            if target_top not in LAYER_OF:
                continue
            if LAYER_OF[target_top] > LAYER_OF[source_top]:
                upward.append(f"{path.relative_to(PACK)}:{line}: {module} (layer {LAYER_OF[source_top]}) imports "
                              f"{target} (layer {LAYER_OF[target_top]})")
    assert not upward, "imports that do not go down the stack:\n" + "\n".join(upward)


def test_pack_imports_sit_at_the_top_of_modules():
    lazy = []
    for module, path in pack_modules().items():
        if module in LAZY_IMPORTS_ALLOWED:
            continue
        lazy += [f"{path.relative_to(PACK)}:{line}: imports {target} inside a function"
                 for target, line, inside in imports_of(module, path) if inside]
    assert not lazy, ("in-function imports of the pack's own modules (move them to the top; only heavy "
                      "third-party libraries are imported inside functions):\n" + "\n".join(lazy))


def test_the_check_sees_in_function_and_upward_imports(tmp_path):
    """The walker itself: an upward import hidden in a function is found."""
    path = tmp_path / "x.py"
    path.write_text("from ..safe_io import a\n\ndef f():\n    from ..loop.run import b\n")
    assert imports_of("trainer.x", path) == [("safe_io", 1, False), ("loop.run", 4, True)]


def _code_windows(path: Path, size: int = 6) -> dict[tuple[str, ...], int]:
    """Every run of ``size`` consecutive code lines (stripped; blank lines, comments and import
    statements left out), mapped to its first line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    import_lines = {n for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for n in range(node.lineno, node.end_lineno + 1)}
    lines = [(number, text.strip()) for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if text.strip() and not text.strip().startswith("#") and number not in import_lines]
    return {tuple(t for _, t in lines[i:i + size]): lines[i][0] for i in range(len(lines) - size + 1)}


def test_the_two_training_programs_repeat_no_block_of_six_lines():
    lora, gate = PACK / "trainer" / "train_lora.py", PACK / "trainer" / "train_gate.py"
    shared = set(_code_windows(lora)) & set(_code_windows(gate))
    where = sorted(_code_windows(lora)[w] for w in shared)
    assert not shared, f"train_lora.py lines {where} repeat in train_gate.py: move that code to training_loop.py"


@pytest.mark.parametrize("rule, pattern, home", [
    ("ASPECTS", r"^ASPECTS\s*=", "aspects.py"),
    ("the aspect-name rule", r"re\.compile\(r\"\^\[A-Za-z0-9\]\[A-Za-z0-9_", "aspects.py"),
    ("the manifest file name", r"\"manifest\.jsonl\"", "training_set/layout.py"),
    ("the model families", r"^ARCHITECTURES\s*=|^ARCHITECTURES:", "models/architectures.py"),
])
def test_each_rule_is_defined_once(rule, pattern, home):
    roots = [PACK / name for name in ("tools", "bench")] + [p for p in PACK.iterdir() if p.suffix == ".py"]
    files = [p for root in roots for p in ([root] if root.is_file() else root.rglob("*.py"))]
    files += [path for path in pack_modules().values()]
    defining = sorted({str(p.relative_to(PACK)) for p in files
                       if re.search(pattern, p.read_text(encoding="utf-8"), re.MULTILINE)})
    assert defining == [home], f"{rule} is defined in {defining}; define it in {home} only and import it"

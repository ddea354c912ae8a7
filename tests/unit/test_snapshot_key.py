"""The key of the node-definition snapshot (``harness.node_code_sha256``, recorded in
tests/data/object_info.json): what changes it and what does not.

Without ComfyUI, tests/unit/test_workflows_schema.py trusts the snapshot only while the key matches
the code in nodes/*.py. An edit that cannot change a definition the snapshot holds (a comment, a
docstring, a tooltip, a description, the layout of a line) must leave the key alone, so it needs no
ComfyUI run to regenerate the snapshot; a change to what ComfyUI serves (a default, a display name,
a new node file) must change it. Each case edits a copy of the real node files.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
from harness import node_code_sha256

REPO = Path(__file__).resolve().parents[2]
NODES = REPO / "nodes"
# A node file that has each kind of text the cases below edit.
NEEDED = (r'tooltip="', r'description=\(\s*"', r"default=\d+\b", r'display_name="', r"\n\s+def ")


def node_file_with_every_edit_target() -> Path:
    for path in sorted(NODES.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.startswith('"""') and all(re.search(pattern, text) for pattern in NEEDED):
            return path
    raise AssertionError(f"no file in {NODES} has all of {NEEDED}; pick other edits for this test")


@pytest.fixture
def copy_of_the_pack(tmp_path) -> Path:
    shutil.copytree(NODES, tmp_path / "nodes", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def edit(repo: Path, name: str, change) -> None:
    path = repo / "nodes" / name
    before = path.read_text(encoding="utf-8")
    after = change(before)
    assert after != before, "the edit did not apply"
    compile(after, str(path), "exec")  # still valid Python
    path.write_text(after, encoding="utf-8")


def add_comments(text: str) -> str:
    text = text.replace("from __future__ import annotations", "from __future__ import annotations  # a comment", 1)
    return re.sub(r"\n(\s+)def ", r"\n\1# a comment on its own line\n\1def ", text, count=1)


def reword_docstrings(text: str) -> str:
    """Reword the module's docstring and the first function or class docstring."""
    tree = ast.parse(text)
    documented = [node for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)]
    assert ast.get_docstring(tree) and documented, "a module docstring and a documented function are needed"
    lines = text.splitlines(keepends=True)
    for docstring in (documented[0].body[0].value, tree.body[0].value):  # later one first: offsets stay valid
        line, start = lines[docstring.lineno - 1], docstring.col_offset
        assert line[start:start + 3] in ('"""', "'''"), line
        lines[docstring.lineno - 1] = line[:start + 3] + "Reworded. " + line[start + 3:]
    return "".join(lines)


def reword_tooltip_and_description(text: str) -> str:
    text = text.replace('tooltip="', 'tooltip="Reworded. ', 1)
    return re.sub(r'(description=\(\s*")', r"\1Reworded. ", text, count=1)


def relayout(text: str) -> str:
    """Spaces around keyword ``=`` and a blank line at the end: same code, other layout."""
    return text.replace("default=", "default = ") + "\n\n"


def change_a_default(text: str) -> str:
    return re.sub(r"default=(\d+)\b", lambda m: f"default={int(m.group(1)) + 1}", text, count=1)


def rename_a_display_name(text: str) -> str:
    return text.replace('display_name="', 'display_name="Renamed ', 1)


def test_the_key_of_a_copy_is_the_key_of_the_pack(copy_of_the_pack):
    assert node_code_sha256(copy_of_the_pack) == node_code_sha256(REPO)


@pytest.mark.parametrize("change", [add_comments, reword_docstrings, reword_tooltip_and_description, relayout])
def test_edits_that_cannot_change_a_definition_keep_the_key(copy_of_the_pack, change):
    before = node_code_sha256(copy_of_the_pack)
    edit(copy_of_the_pack, node_file_with_every_edit_target().name, change)
    assert node_code_sha256(copy_of_the_pack) == before


@pytest.mark.parametrize("change", [change_a_default, rename_a_display_name])
def test_a_change_to_a_definition_changes_the_key(copy_of_the_pack, change):
    before = node_code_sha256(copy_of_the_pack)
    edit(copy_of_the_pack, node_file_with_every_edit_target().name, change)
    assert node_code_sha256(copy_of_the_pack) != before


def test_a_new_or_renamed_node_file_changes_the_key(copy_of_the_pack):
    before = node_code_sha256(copy_of_the_pack)
    source = node_file_with_every_edit_target()
    shutil.copy(source, copy_of_the_pack / "nodes" / "a_new_node.py")
    with_new = node_code_sha256(copy_of_the_pack)
    assert with_new != before
    (copy_of_the_pack / "nodes" / "a_new_node.py").rename(copy_of_the_pack / "nodes" / "another_name.py")
    assert node_code_sha256(copy_of_the_pack) not in (before, with_new)


def test_a_code_change_inside_a_tooltip_call_still_counts(copy_of_the_pack):
    """Only the tooltip / description values are left out, not the call they sit in."""
    before = node_code_sha256(copy_of_the_pack)
    edit(copy_of_the_pack, node_file_with_every_edit_target().name,
         lambda text: re.sub(r'\(\s*"([A-Za-z_]+)",(\s*)tooltip="', r'("\1_renamed",\2tooltip="', text, count=1))
    assert node_code_sha256(copy_of_the_pack) != before

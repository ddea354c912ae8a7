"""safe_io: confined names and atomic writes (offline, filesystem only)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from versat2i import safe_io
from versat2i.safe_io import TargetExistsError, atomic_dir, atomic_file, atomic_write_text, confined_path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "output"
    folder.mkdir()
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# -- confined_path ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("run1", "run1"),
    ("sub/run1", "sub/run1"),
    ("sub\\run1", "sub/run1"),
    ("./run1", "run1"),
    ("sub//run1", "sub/run1"),
    ("ünïcode name", "ünïcode name"),
])
def test_confined_path_accepts_relative_names(root, name, expected):
    assert confined_path(root, name) == root.resolve() / expected


@pytest.mark.parametrize("name, fragment", [
    ("", "empty"),
    ("   ", "empty"),
    (".", "no folder or file part"),
    ("..", "'..'"),
    ("../escape", "'..'"),
    ("a/../../escape", "'..'"),
    ("a/..", "'..'"),
    ("a\\..\\..\\escape", "'..'"),
    ("/etc/passwd", "absolute"),
    ("\\\\server\\share", "absolute"),
    ("C:\\Windows", "absolute"),
    ("c:relative", "absolute"),
    ("a\x00b", "control characters"),
    ("a\nb", "control characters"),
    ("name:stream", "':'"),
    ("trailing.", "ends with '.'"),
    ("sub/ padded", "space"),
])
def test_confined_path_rejects_escapes_and_odd_names(root, name, fragment):
    with pytest.raises(ValueError) as info:
        confined_path(root, name, what="dataset name")
    message = str(info.value)
    assert message.startswith("dataset name"), message
    assert fragment in message
    assert listing(root) == []


def test_confined_path_rejects_non_text(root):
    with pytest.raises(ValueError, match="expected a text name"):
        confined_path(root, Path("run1"))  # type: ignore[arg-type]


def test_confined_path_rejects_symlink_escape(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    for name in ("link", "link/run1", "link/deeper/run1"):
        with pytest.raises(ValueError, match="outside"):
            confined_path(root, name)


def test_confined_path_rejects_symlinked_parent_escape(root, tmp_path):
    # root/a/b is a symlink to a folder outside; root/a/b/c must be refused even though 'a' is real.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "a").mkdir()
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        confined_path(root, "a/b/c")


def test_confined_path_rejects_file_symlink_escape(root, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    (root / "innocent.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="outside"):
        confined_path(root, "innocent.txt")


def test_confined_path_rejects_symlink_loops(root):
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(ValueError, match="can.t be resolved"):
        confined_path(root, "loop/run1")


def test_confined_path_allows_symlinks_that_stay_inside(root):
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert confined_path(root, "alias/run1") == (root / "real" / "run1").resolve()


def test_confined_path_follows_a_symlinked_root(tmp_path, root):
    # ComfyUI's output folder is often a symlink to a bigger disk: that is not an escape.
    linked_root = tmp_path / "linked_output"
    linked_root.symlink_to(root, target_is_directory=True)
    assert confined_path(linked_root, "run1") == root.resolve() / "run1"


def test_confined_path_refuses_the_root_itself(root):
    with pytest.raises(ValueError):
        confined_path(root, "./")


# -- atomic_dir ---------------------------------------------------------------------------------

def test_atomic_dir_publishes_complete_folder_under_final_name(root):
    final = root / "set"
    with atomic_dir(final) as temp:
        assert temp.parent == final.parent and temp.name.startswith(".set.tmp-") and temp != final
        (temp / "a.txt").write_text("hello")
        assert not final.exists()  # nothing visible before the body finishes
    assert (final / "a.txt").read_text() == "hello"
    assert listing(root) == ["set", "set/a.txt"]


def test_atomic_dir_failure_leaves_nothing(root):
    final = root / "nested" / "deeper" / "set"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as temp:
            (temp / "a.txt").write_text("partial")
            raise RuntimeError("boom")
    assert listing(root) == []  # no final, no temp, and the parents it created are gone again


def test_atomic_dir_keeps_existing_parents_on_failure(root):
    (root / "keep").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(root / "keep" / "set"):
            raise KeyboardInterrupt  # Cancel / Ctrl-C cleans up too
    assert listing(root) == ["keep"]


def test_atomic_dir_refuses_existing_target_before_any_work(root):
    final = root / "set"
    final.mkdir()
    (final / "old.txt").write_text("old")
    body_ran = False
    with pytest.raises(TargetExistsError, match="already exists") as info:
        with atomic_dir(final):
            body_ran = True
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileExistsError)
    assert not body_ran
    assert listing(root) == ["set", "set/old.txt"]


def test_atomic_dir_overwrite_replaces_and_cleans_up(root):
    final = root / "set"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # the old one stays until the new one is complete
    assert listing(root) == ["set", "set/new.txt"]


def test_atomic_dir_overwrite_failure_keeps_old(root):
    final = root / "set"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(final, overwrite=True) as temp:
            (temp / "new.txt").write_text("new")
            raise OSError("disk full")
    assert listing(root) == ["set", "set/old.txt"]


def test_atomic_dir_overwrite_rename_failure_restores_old(root, monkeypatch):
    final = root / "set"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_rename = os.rename
    calls = []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> backup succeeded; new -> final fails
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(safe_io.os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(final, overwrite=True) as temp:
            (temp / "new.txt").write_text("new")
    assert listing(root) == ["set", "set/old.txt"]  # old is back; no backup, no temp


def test_atomic_dir_overwrite_refuses_to_replace_a_file_with_a_folder(root):
    (root / "set").write_text("a file")
    with pytest.raises(ValueError, match="same kind"):
        with atomic_dir(root / "set", overwrite=True) as temp:
            (temp / "x").write_text("x")
    assert (root / "set").read_text() == "a file"
    assert listing(root) == ["set"]


# -- atomic_file ---------------------------------------------------------------------------------

def test_atomic_file_writes_via_temp_path(root):
    final = root / "model.safetensors"
    with atomic_file(final) as temp:
        assert temp.parent == root and temp != final and temp.name.startswith(".model.safetensors.tmp-")
        assert not temp.exists()
        temp.write_bytes(b"weights")
    assert final.read_bytes() == b"weights"
    assert listing(root) == ["model.safetensors"]


def test_atomic_file_refuses_existing_and_overwrites_when_asked(root):
    final = root / "report.txt"
    atomic_write_text(final, "first")
    with pytest.raises(TargetExistsError):
        atomic_write_text(final, "second")
    assert final.read_text() == "first"
    atomic_write_text(final, "third", overwrite=True)
    assert final.read_text() == "third"
    assert listing(root) == ["report.txt"]


def test_atomic_file_failure_cleans_temp(root):
    with pytest.raises(RuntimeError):
        with atomic_file(root / "x.bin") as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert listing(root) == []


def test_atomic_file_writer_that_writes_nothing_is_an_error(root):
    with pytest.raises(RuntimeError, match="did not create"):
        with atomic_file(root / "x.bin"):
            pass
    assert listing(root) == []


def test_atomic_file_never_replaces_a_target_that_appears_during_the_write(root):
    final = root / "x.bin"
    with pytest.raises(TargetExistsError):
        with atomic_file(final) as temp:
            temp.write_bytes(b"new")
            final.write_bytes(b"someone else's")  # appears after the up-front check
    assert final.read_bytes() == b"someone else's"
    assert listing(root) == ["x.bin"]


# -- the name rule (issue 15: long legal names lost whole runs at their final save) -------------------

LONGEST = 255 - 14  # 241 bytes: the filesystem's 255 less the 14 of the temporary name ".<name>.tmp-<8 hex>"


def test_the_longest_accepted_name_can_be_written_as_a_file_and_a_folder_and_one_more_byte_is_refused(root):
    for size in (LONGEST, LONGEST - 1):
        name = "x" * size
        path = confined_path(root, name)
        atomic_write_text(path, "data")  # writes ".<name>.tmp-<8 hex>" first: 14 bytes more
        atomic_write_text(path, "again", overwrite=True)
        path.unlink()
        with atomic_dir(confined_path(root, f"sub/{name}")) as temp:
            (temp / "f").write_text("x")
        with atomic_dir(confined_path(root, f"sub/{name}"), overwrite=True) as temp:  # ".<name>.old-..." too
            (temp / "f").write_text("y")
    with pytest.raises(ValueError) as info:
        confined_path(root, "x" * (LONGEST + 1), what="lora_name")
    message = str(info.value)
    assert message.startswith("lora_name") and "242 bytes long" in message and "at most 241 bytes" in message
    assert "shorten it" in message
    assert listing(root) == sorted(["sub", "sub/" + "x" * LONGEST, "sub/" + "x" * LONGEST + "/f",
                                    "sub/" + "x" * (LONGEST - 1), "sub/" + "x" * (LONGEST - 1) + "/f"])


def test_name_length_counts_bytes_not_characters(root):
    accepted = "é" * (LONGEST // 2)  # 2 bytes each
    atomic_write_text(confined_path(root, accepted), "x")
    with pytest.raises(ValueError, match="bytes long"):
        confined_path(root, "é" * (LONGEST // 2 + 1))


def test_every_part_of_a_name_is_checked_and_over_255_bytes_is_refused_even_for_reading(root):
    with pytest.raises(ValueError, match="at most 241 bytes"):
        confined_path(root, "x" * 250 + "/leaf")
    with pytest.raises(ValueError, match="at most 255 bytes"):
        confined_path(root, "x" * 256, writes=False)
    assert confined_path(root, "x" * 255, writes=False) == root.resolve() / ("x" * 255)  # may exist: readable


@pytest.mark.parametrize("name", ["CON", "con", "Nul", "aux.txt", "PRN.tar.gz", "COM1", "lpt9.safetensors",
                                  "com\u00b9", "CONIN$", "sub/nul", "con .txt"])
def test_windows_device_names_are_refused_in_any_case_with_or_without_extension(root, name):
    with pytest.raises(ValueError) as info:
        confined_path(root, name, what="dataset name")
    assert str(info.value).startswith("dataset name") and "reserved device name on Windows" in str(info.value)
    assert listing(root) == []


@pytest.mark.parametrize("name", ["CONSOLE", "icon", "com10", "lpt", "nul_run", "my.con", "auxiliary.txt"])
def test_names_that_only_resemble_device_names_are_accepted(root, name):
    assert confined_path(root, name).name == name


def test_a_too_long_whole_path_is_refused(root):
    deep = "/".join(["d" * 200] * 20)  # 4020 bytes: no room left below it
    with pytest.raises(ValueError, match="path is .* bytes long"):
        confined_path(root, deep)


def test_folder_problem_names_a_file_in_the_way_and_an_unwritable_place(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in safe_io.folder_problem(tmp_path / "file", what="--out")
    problem = safe_io.folder_problem(tmp_path / "file" / "below", what="--out")
    assert problem.startswith("--out") and "is a file, not a folder" in problem
    assert safe_io.folder_problem(tmp_path / "new" / "deeper", what="--out") is None
    monkeypatch.setattr(safe_io, "_read_only", lambda folder: True)
    assert "read-only filesystem" in safe_io.folder_problem(tmp_path / "new", what="output_dir")
    monkeypatch.setattr(safe_io, "_read_only", lambda folder: False)
    monkeypatch.setattr(safe_io.os, "access", lambda path, mode: False)  # root passes every permission check
    assert "not writable by this user" in safe_io.folder_problem(tmp_path / "new", what="output_dir")


# -- what the system refuses: one line naming the file and the fix -----------------------------------------

@pytest.mark.parametrize("error, expected", [
    (OSError(28, "No space left on device"), "no space left on the disk; free space on it"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), "no space left on the disk"),
    (OSError(36, "File name too long"), "a name is too long"),
    (PermissionError(13, "Permission denied"), "permission denied; choose a place you can write to"),
    (OSError(30, "Read-only file system"), "the filesystem is read-only"),
])
def test_a_failed_write_is_one_line_naming_the_file_and_the_fix_and_leaves_nothing(root, error, expected):
    final = root / "sub" / "lora.safetensors"
    with pytest.raises(safe_io.WriteFailedError) as info:
        with atomic_file(final, what="LoRA file") as temp:
            temp.write_bytes(b"half")
            raise error
    message = str(info.value)
    assert message.startswith(f"LoRA file {str(final)!r}: could not be written: ") and expected in message, message
    assert "\n" not in message and isinstance(info.value, OSError)
    assert listing(root) == []  # no temporary, and the parent made for it is gone


def test_torch_short_write_counts_as_a_full_disk_only_when_the_disk_is_full(root, monkeypatch):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 37760 vs 37652")
    assert safe_io.os_error_code(torch_error, root) is None
    monkeypatch.setattr(safe_io, "_free_bytes", lambda folder: 4096)
    assert safe_io.os_error_code(torch_error, root) == 28


def test_a_writer_bug_is_not_dressed_up_as_a_system_error(root):
    with pytest.raises(KeyError):
        with atomic_file(root / "x.bin") as temp:
            temp.write_bytes(b"half")
            raise KeyError("bug")
    assert listing(root) == []


# -- permissions ---------------------------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_published_files_get_the_umask_mode_even_from_writers_that_make_private_files(root, umask, mode):
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_file(root / "lora.safetensors") as temp:
            save_file({"x": torch.zeros(2)}, str(temp))  # safetensors creates 0600 files
        with atomic_dir(root / "set") as temp:
            save_file({"x": torch.zeros(2)}, str(temp / "a.latents.safetensors"))
            (temp / "a.txt").write_text("caption")
    finally:
        os.umask(old)
    for path in (root / "lora.safetensors", root / "set" / "a.latents.safetensors", root / "set" / "a.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_parent_folder_made_meanwhile_by_another_writer_is_not_an_error(tmp_path, monkeypatch):
    """Two training jobs of a loop start at once and both make their runs folder: the slower mkdir
    finds it made (before: "config file ...: could not be written: it already exists")."""
    real_mkdir = Path.mkdir

    def mkdir_right_after_another_writer(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)  # the other writer's
        return real_mkdir(self, *args, **kwargs)  # ours: FileExistsError

    monkeypatch.setattr(Path, "mkdir", mkdir_right_after_another_writer)
    written = atomic_write_text(tmp_path / "runs" / "job" / "config.toml", "x = 1\n")
    assert written.read_text() == "x = 1\n"

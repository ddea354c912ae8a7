"""Confined paths and atomic writes: what every writer in the pack (datasets, LoRAs, gate files,
reports) goes through.

Two guarantees:

* ``confined_path(root, name)`` turns a user-supplied relative name (from a node's text box or a
  CLI flag) into a path that stays inside ``root``: no ``..``, no absolute paths or drive letters,
  no control characters, and no way out through a symlink (the result is resolved, symlinked
  parents included, and checked for containment).
* ``atomic_dir`` / ``atomic_file`` (and the ``atomic_write_bytes`` / ``atomic_write_text``
  helpers) write under a hidden temporary name in the target's parent folder
  (``.<name>.tmp-<random>``), flush it to disk, then rename it to the final name. Nothing
  half-written is ever visible under the final name; the temporary is removed when the write
  raises. An existing target is never replaced unless ``overwrite=True``, and then it is swapped
  out so that at every moment either the old or the new version exists in full.

The standard library has the pieces (``os.replace``, ``tempfile``) but no "write a folder
atomically, refuse to clobber" helper, hence this small module.

Limits: the checks guard against names coming from a web page or a command line, not against a
local process racing us to swap folders for symlinks between the check and the write. A process
killed mid-write (power loss, SIGKILL) can leave a ``.<name>.tmp-*`` folder behind; it is hidden
and never mistaken for a finished result.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


PUBLIC_PACKAGE = "versat2i"


def readable_name(cls: type) -> type:
    """Class decorator for the pack's exceptions: give them the module name ``versat2i.<module>``.

    ComfyUI imports the pack under its folder path (the module of ``safe_io`` is then
    ``/.../custom_nodes/ComfyUI-VersaT2I.safe_io``) and shows an error's type as ``module.Class``;
    with this the type reads ``versat2i.safe_io.TargetExistsError`` there, as it does for the
    installed package (``pip install``, the ``versat2i`` command)."""
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__file__", None)
    if source is not None and Path(source).resolve().is_relative_to(_PACK_ROOT):
        relative = Path(source).resolve().relative_to(_PACK_ROOT).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        cls.__module__ = ".".join((PUBLIC_PACKAGE, *parts))
    return cls


_PACK_ROOT = Path(__file__).resolve().parent


@readable_name
class TargetExistsError(ValueError, FileExistsError):
    """The final name already exists and ``overwrite`` was not given. A ValueError (a user error
    the CLI and nodes report in one line) and a FileExistsError (for callers that catch that).

    ``reason`` says what exists (and why it is not reused), ``fix`` how to go on; a front end words
    the fix its own way with ``with_fix`` (a node names its 'overwrite' input, the CLI its flag)."""

    def __init__(self, reason: str, *, path: str | os.PathLike | None = None,
                 fix: str = "choose another name, or allow overwriting (overwrite=True / --overwrite) to replace it"):
        self.reason, self.fix = reason, fix
        self.path = None if path is None else Path(path)
        super().__init__(f"{reason}; {fix}" if fix else reason)

    def __str__(self) -> str:  # OSError's str() would add "[Errno ...]" for some argument counts
        return self.args[0]

    def with_fix(self, fix: str) -> TargetExistsError:
        """The same error with another fix (the front end's words for 'overwrite')."""
        return type(self)(self.reason, path=self.path, fix=fix)


def confined_path(root: str | os.PathLike, user_name: str, *, what: str = "name") -> Path:
    """Resolve ``user_name`` (relative, '/' or '\\' separated) inside ``root`` and return the
    resolved absolute path. Raises ValueError naming ``what`` and the fix when the name is empty,
    absolute, has a drive letter, '..', ':' or control characters, or resolves (through symlinks,
    the leaf or any parent) to a place outside ``root`` or to ``root`` itself.

    ``root`` need not exist yet; it is resolved too, so a root that is itself a symlink is fine.
    """
    if not isinstance(user_name, str):
        raise ValueError(f"{what}: expected a text name, got {type(user_name).__name__}")
    if not user_name.strip():
        raise ValueError(f"{what}: the name is empty; type a folder or file name such as 'my_run'")
    if _CONTROL.search(user_name):
        raise ValueError(f"{what} {user_name!r}: contains control characters (NUL, newline, tab...); remove them")
    if user_name.startswith(("/", "\\")) or _DRIVE.match(user_name):
        raise ValueError(
            f"{what} {user_name!r}: absolute paths are not allowed; give a name relative to {str(root)!r} "
            "such as 'my_run' or 'subfolder/my_run'"
        )
    parts = [part for part in re.split(r"[/\\]", user_name) if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise ValueError(
            f"{what} {user_name!r}: '..' is not allowed (it would leave {str(root)!r}); use a plain name "
            "such as 'my_run' or 'subfolder/my_run'"
        )
    if any(":" in part for part in parts):
        # A ':' is a drive letter or an NTFS alternate data stream on Windows.
        raise ValueError(f"{what} {user_name!r}: ':' is not allowed in names; use '_' or '-' instead")
    if any(part != part.strip() or part.endswith(".") for part in parts):
        # Windows silently strips trailing dots and spaces, so two names would map to one folder.
        raise ValueError(f"{what} {user_name!r}: a path part starts/ends with a space or ends with '.'; remove it")
    if not parts:
        raise ValueError(f"{what} {user_name!r}: the name has no folder or file part; type a name such as 'my_run'")

    try:
        root_resolved = Path(root).expanduser().resolve()
        target = root_resolved.joinpath(*parts).resolve()  # follows symlinks in the leaf and every parent
    except (OSError, RuntimeError) as exc:  # symlink loop (RuntimeError before Python 3.13, OSError after)
        raise ValueError(
            f"{what} {user_name!r}: can't be resolved inside {str(root)!r} ({exc}); choose another name"
        ) from None
    if target == root_resolved or not target.is_relative_to(root_resolved):
        raise ValueError(
            f"{what} {user_name!r}: resolves to {str(target)!r}, outside {str(root_resolved)!r} "
            "(through a symlink); choose a name that is not a symlink out of that folder"
        )
    return target


# -- atomic writes -----------------------------------------------------------------------------

def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to ``final``: ``.<name>.<kind>-<random>``; never ``final`` itself."""
    return final.with_name(f".{final.name}.{kind}-{secrets.token_hex(4)}")


def _fsync_path(path: Path, *, directory: bool) -> None:
    # Directories can't be opened for fsync on Windows; skip there (renames are still atomic).
    if directory and os.name == "nt":
        return
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. certain network mounts) refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under ``path`` so the rename never publishes empty files."""
    if path.is_dir():
        for folder, _dirs, files in os.walk(path):
            for file_name in files:
                _fsync_path(Path(folder, file_name), directory=False)
            _fsync_path(Path(folder), directory=True)
    else:
        _fsync_path(path, directory=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _refuse_existing(final: Path, what: str) -> None:
    if os.path.lexists(final):
        raise TargetExistsError(f"{what} {str(final)!r} already exists", path=final)


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failed write can remove them."""
    created: list[Path] = []
    for folder in reversed([parent, *parent.parents]):
        if not folder.exists():
            folder.mkdir()
            created.append(folder)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when still empty


def _publish(temp: Path, final: Path, *, overwrite: bool, what: str) -> None:
    """Move the finished ``temp`` to ``final``; see the module docstring for the guarantees."""
    if not os.path.lexists(final):
        if temp.is_dir():
            # rename(2) of a folder fails on an existing non-empty folder or a file, so a target that
            # appeared since the check is never lost (at worst an empty folder is replaced).
            os.rename(temp, final)
        else:
            # link(2) fails if the name exists, unlike rename(2), which would silently replace it.
            try:
                os.link(temp, final)
            except FileExistsError:  # appeared since the check
                if not overwrite:
                    _refuse_existing(final, what)
                os.replace(temp, final)
            except OSError:  # filesystem without hard links (FAT, some network mounts)
                os.rename(temp, final)
            else:
                temp.unlink()
        return
    if not overwrite:
        _refuse_existing(final, what)
    if final.is_dir() != temp.is_dir() or final.is_symlink():
        kind = "symlink" if final.is_symlink() else "folder" if final.is_dir() else "file"
        raise ValueError(
            f"{what} {str(final)!r} exists and is a {kind}; "
            "it can only be replaced by the same kind of thing; remove it by hand or choose another name"
        )
    if not temp.is_dir():
        os.replace(temp, final)  # atomic for files: readers see the old or the new file, never neither
        return
    # Folders can't be swapped in one call: move the old one aside, move the new one in, then delete
    # the old one. If the second rename fails, the old folder is put back.
    backup = temp_sibling(final, "old")
    os.rename(final, backup)
    try:
        os.rename(temp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def _atomic(final: str | os.PathLike, *, overwrite: bool, directory: bool, what: str) -> Iterator[Path]:
    final = Path(final)
    if final.name in ("", ".", ".."):
        raise ValueError(f"{what} {str(final)!r}: not a file or folder name")
    if not overwrite:
        _refuse_existing(final, what)  # fail before any work is done; checked again when publishing
    created = _make_parents(final.parent)
    temp = temp_sibling(final)
    try:
        if directory:
            temp.mkdir()
        yield temp
        if (directory and not temp.is_dir()) or (not directory and not temp.is_file()):
            raise RuntimeError(f"{what}: the writer did not create {'a folder' if directory else 'a file'} at {temp}")
        _fsync_tree(temp)
        _publish(temp, final, overwrite=overwrite, what=what)
        _fsync_path(final.parent, directory=True)
    except BaseException:
        _remove(temp)
        _remove_empty(created)
        raise


def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False, what: str = "folder"):
    """Context manager: yields an empty temporary folder next to ``final``; fill it, and on a
    normal exit it is renamed to ``final``. On an exception the temporary folder is deleted and
    ``final`` is untouched. Raises ``TargetExistsError`` up front (before the body runs) when
    ``final`` exists and ``overwrite`` is False. Missing parent folders are created (and removed
    again if the write fails)."""
    return _atomic(final, overwrite=overwrite, directory=True, what=what)


def atomic_file(final: str | os.PathLike, *, overwrite: bool = False, what: str = "file"):
    """Context manager: yields a temporary path (not yet created) next to ``final``; write the file
    there (e.g. ``safetensors.torch.save_file(tensors, path)``), and on a normal exit it is flushed
    and renamed to ``final``. Same guarantees as ``atomic_dir``."""
    return _atomic(final, overwrite=overwrite, directory=False, what=what)


def atomic_write_bytes(final: str | os.PathLike, data: bytes, *, overwrite: bool = False, what: str = "file") -> Path:
    with atomic_file(final, overwrite=overwrite, what=what) as temp:
        temp.write_bytes(data)
    return Path(final)


def atomic_write_text(
    final: str | os.PathLike, text: str, *, overwrite: bool = False, what: str = "file", encoding: str = "utf-8"
) -> Path:
    return atomic_write_bytes(final, text.encode(encoding), overwrite=overwrite, what=what)


# -- file identity and hashing -------------------------------------------------------------------

FileIdentity = tuple[str, int, int, int, int]
_HASH_CACHE: dict[FileIdentity, str] = {}
_HASH_LOCK = threading.Lock()


def file_identity(path: str | os.PathLike) -> FileIdentity:
    """(resolved path, size, mtime_ns, inode, ctime_ns): changes whenever the file is replaced
    (a new inode, even with the same size and a preserved mtime) or rewritten in place (the
    kernel sets ctime on every write or metadata change, and it cannot be set back by hand)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, cached per ``file_identity`` so a multi-GB file (about 1 s per GB)
    is hashed once per process and a graph re-run doesn't rehash."""
    key = file_identity(path)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(key[0], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    return value

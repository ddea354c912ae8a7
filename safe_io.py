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

Names: ``name_problem`` is the one rule for a file or folder name the pack creates: it fits the
filesystem's 255-byte limit together with the longest sibling written next to it (the temporary
``.<name>.tmp-<8 hex>``, 14 bytes longer), and it is no Windows device name (``CON``, ``nul.txt``,
``COM1``...). ``confined_path`` applies it to every part of a name, so the nodes (at queue time)
and the configs (in ``problems()``) refuse a name before any work, instead of a run failing at its
final save. ``folder_problem`` checks a folder the user names (exists as a file? writable?).

Errors: a write that fails for a reason of the system (disk full, permission, read-only, name too
long) raises ``WriteFailedError``: an ``OSError`` whose message is one line naming the file and the
fix (``describe_os_error``), which the CLI and the nodes show as it is.

Permissions: every file published gets the mode a new file gets from the process umask (``0644``
under the usual ``022``), like any other tool; some writers (safetensors) create ``0600`` files.

Limits: the checks guard against names coming from a web page or a command line, not against a
local process racing us to swap folders for symlinks between the check and the write. A process
killed mid-write (power loss, SIGKILL) can leave a ``.<name>.tmp-*`` folder behind; it is hidden
and never mistaken for a finished result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
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


# -- names ---------------------------------------------------------------------------------------

NAME_MAX_BYTES = 255  # one file or folder name: ext4, XFS, btrfs, APFS, ZFS (NTFS: 255 UTF-16 units)
TEMP_KINDS = ("tmp", "old")  # temp_sibling kinds: the writer's temporary, and the old version being replaced
# ".<name>.<kind>-<8 hex>": what a written name grows by while it is being written
TEMP_NAME_EXTRA_BYTES = len(".") + len(".") + max(map(len, TEMP_KINDS)) + len("-") + 8
PATH_MAX_BYTES = 4096  # Linux PATH_MAX, the whole path
# Room kept below a folder the pack names, for what it writes inside (a training run's
# "checkpoints/.checkpoint-<step>.partial/text_encoder_2.lora.safetensors" is ~70 bytes).
PATH_RESERVE_BYTES = 256
# Windows device names (as Python 3.13's ntpath.isreserved lists them; this pack runs on 3.10+):
# reserved with any extension ("nul.txt"), in any case, with trailing spaces.
WINDOWS_RESERVED_NAMES = frozenset({
    "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
    *(f"COM{c}" for c in "123456789\u00b9\u00b2\u00b3"), *(f"LPT{c}" for c in "123456789\u00b9\u00b2\u00b3"),
})


def _shown(name: str, limit: int = 40) -> str:
    return repr(name if len(name) <= limit else name[:limit] + "...")


def name_problem(name: str, *, what: str = "name", writes: bool = True, atomic: bool | None = None) -> str | None:
    """Why ``name`` (one file or folder name, no separators) cannot be created, naming ``what`` and
    the fix; None if it can. ``writes``: the pack creates it, so it must be a name every OS can hold
    (no Windows device name), and with ``atomic`` (the default when writing) it is written under a
    temporary sibling ``TEMP_NAME_EXTRA_BYTES`` longer, which must fit too; ``atomic=False`` for a
    folder made in place (a training run's folder). ``writes=False`` for a name that is only read
    (it need only exist)."""
    atomic = writes if atomic is None else atomic
    size = len(os.fsencode(name))
    limit = NAME_MAX_BYTES - (TEMP_NAME_EXTRA_BYTES if atomic else 0)
    if size > limit:
        why = (f"at most {limit} bytes ({NAME_MAX_BYTES}, less {TEMP_NAME_EXTRA_BYTES} for the temporary name it is "
               "written under first)" if atomic else f"at most {NAME_MAX_BYTES} bytes")
        return f"{what}: {_shown(name)} is {size} bytes long; a file or folder name has {why}; shorten it"
    if writes and name.partition(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED_NAMES:
        return (f"{what}: {name!r} is a reserved device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any "
                "extension); choose another name")
    return None


def relative_name_problem(user_name: str, *, what: str = "name", writes: bool = True,
                          atomic: bool | None = None) -> str | None:
    """Why ``user_name`` (relative, '/' or '\\' separated) cannot name something inside a folder:
    empty, absolute, a drive letter, '..', ':', control characters, a part that starts/ends with a
    space or ends with '.', or a part ``name_problem`` refuses. None if it can. Needs no folder: what
    a node checks at queue time before the folder is known."""
    if not isinstance(user_name, str):
        return f"{what}: expected a text name, got {type(user_name).__name__}"
    if not user_name.strip():
        return f"{what}: the name is empty; type a folder or file name such as 'my_run'"
    if _CONTROL.search(user_name):
        return f"{what} {_shown(user_name)}: contains control characters (NUL, newline, tab...); remove them"
    if user_name.startswith(("/", "\\")) or _DRIVE.match(user_name):
        return (f"{what} {_shown(user_name)}: absolute paths are not allowed; give a relative name such as 'my_run' or "
                "'subfolder/my_run'")
    parts = name_parts(user_name)
    if any(part == ".." for part in parts):
        return (f"{what} {_shown(user_name)}: '..' is not allowed; use a plain name such as 'my_run' or "
                "'subfolder/my_run'")
    if any(":" in part for part in parts):
        # A ':' is a drive letter or an NTFS alternate data stream on Windows.
        return f"{what} {_shown(user_name)}: ':' is not allowed in names; use '_' or '-' instead"
    if any(part != part.strip() or part.endswith(".") for part in parts):
        # Windows silently strips trailing dots and spaces, so two names would map to one folder.
        return f"{what} {_shown(user_name)}: a path part starts/ends with a space or ends with '.'; remove it"
    if not parts:
        return f"{what} {_shown(user_name)}: the name has no folder or file part; type a name such as 'my_run'"
    for part in parts:
        problem = name_problem(part, what=what, writes=writes, atomic=atomic)
        if problem:
            return problem
    return None


def name_parts(user_name: str) -> list[str]:
    """The folder and file names of a relative name ('/' or '\\' separated; '' and '.' dropped)."""
    return [part for part in re.split(r"[/\\]", user_name) if part not in ("", ".")]


def path_problem(path: str | os.PathLike, *, what: str, writes: bool = True) -> str | None:
    """Why ``path`` (absolute or relative to the working folder, e.g. a config's ``output_dir``)
    cannot be used: a part longer than ``NAME_MAX_BYTES`` or, with ``writes``, a whole path that
    leaves no ``PATH_RESERVE_BYTES`` below it. None if it can."""
    text = os.fspath(path)
    for part in name_parts(text):
        problem = name_problem(part, what=what, writes=False)
        if problem:
            return problem
    size = len(os.fsencode(os.path.abspath(text)))
    limit = PATH_MAX_BYTES - (PATH_RESERVE_BYTES if writes else 0)
    if size > limit:
        return f"{what}: the path is {size} bytes long; at most {limit} bytes are possible here; use a shorter path"
    return None


def folder_problem(folder: str | os.PathLike, *, what: str) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), naming ``what``: a path
    ``path_problem`` refuses, the folder or a parent is a file, or the nearest existing folder is
    read-only or not writable. None if they can (the disk can still fill up)."""
    problem = path_problem(folder, what=what)
    if problem:
        return problem
    folder = Path(os.path.abspath(os.fspath(folder)))
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder:
            return f"{what} {str(folder)!r}: is a file, not a folder; give a folder"
        return f"{what} {str(folder)!r}: {str(existing)!r} is a file, not a folder; give a path made of folders"
    if _read_only(existing):
        return f"{what} {str(folder)!r}: {str(existing)!r} is on a read-only filesystem; choose a writable folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{what} {str(folder)!r}: {str(existing)!r} is not writable by this user; choose a folder you can "
                "write to, or change its permissions")
    return None


def target_problem(path: str | os.PathLike, *, what: str) -> str | None:
    """Why the pack cannot write a file or folder at ``path`` (atomically: ``name_problem`` on its
    name, ``folder_problem`` on its folder), naming ``what``; None if it can."""
    path = Path(os.path.abspath(os.fspath(path)))
    return name_problem(path.name, what=what) or folder_problem(path.parent, what=what)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs on Windows
        return False


def confined_path(root: str | os.PathLike, user_name: str, *, what: str = "name", writes: bool = True,
                  atomic: bool | None = None) -> Path:
    """Resolve ``user_name`` (relative, '/' or '\\' separated) inside ``root`` and return the
    resolved absolute path. Raises ValueError naming ``what`` and the fix when
    ``relative_name_problem`` refuses the name (``writes`` / ``atomic``: the pack will create it,
    see ``name_problem``), when the whole path is too long, or when it resolves (through symlinks,
    the leaf or any parent) to a place outside ``root`` or to ``root`` itself.

    ``root`` need not exist yet; it is resolved too, so a root that is itself a symlink is fine.
    """
    problem = relative_name_problem(user_name, what=what, writes=writes, atomic=atomic)
    if problem:
        raise ValueError(problem)
    parts = name_parts(user_name)
    try:
        root_resolved = Path(root).expanduser().resolve()
        target = root_resolved.joinpath(*parts).resolve()  # follows symlinks in the leaf and every parent
    except (OSError, RuntimeError) as exc:  # symlink loop (RuntimeError before Python 3.13, OSError after)
        raise ValueError(
            f"{what} {_shown(user_name)}: can't be resolved inside {str(root)!r} ({exc}); choose another name"
        ) from None
    if target == root_resolved or not target.is_relative_to(root_resolved):
        raise ValueError(
            f"{what} {user_name!r}: resolves to {str(target)!r}, outside {str(root_resolved)!r} "
            "(through a symlink); choose a name that is not a symlink out of that folder"
        )
    problem = path_problem(target, what=f"{what} {_shown(user_name)}", writes=writes)
    if problem:
        raise ValueError(problem)
    return target


# -- OS errors as one line ---------------------------------------------------------------------

# errno -> (what happened, the fix), for the failures a user causes or can remedy.
_OS_ERROR_TEXTS = {
    errno.ENOSPC: ("no space left on the disk", "free space on it, or choose a folder on another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space in your quota, or choose a folder on another disk"),
    errno.ENAMETOOLONG: (f"a name is too long (at most {NAME_MAX_BYTES} bytes per name)", "use a shorter name"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give a path made of folders"),
    errno.EISDIR: ("it is a folder, not a file", "give a file name"),
    errno.EACCES: ("permission denied", "choose a place you can write to, or change its permissions"),
    errno.EPERM: ("the operation is not permitted", "choose a place you can write to, or change its permissions"),
    errno.EROFS: ("the filesystem is read-only", "choose a folder on a writable disk"),
    errno.ENOENT: ("no such file or folder (or it cannot be created there)", "check the path"),
    errno.EEXIST: ("it already exists", "choose another name"),
}
_ERRNO_IN_TEXT = re.compile(r"(?:\[Errno |os error |code: )(\d+)")


class WriteFailedError(OSError):
    """Writing ``path`` failed for a reason of the system (``errno`` as the underlying error);
    ``str()`` is one line naming the file and the fix."""

    def __init__(self, code: int | None, message: str, path: str | os.PathLike | None = None):
        super().__init__(code, message, None if path is None else os.fspath(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def os_error_code(exc: BaseException, folder: str | os.PathLike | None = None) -> int | None:
    """The errno behind ``exc``: its own, a cause's, or one written in the message of a library
    error that wraps it (safetensors' "os error 28", torch's "[Errno 28]"). torch's zip writer
    reports a short write as "unexpected pos": a full disk when ``folder``'s disk has < 1 MiB free."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        text = str(exc)
        match = _ERRNO_IN_TEXT.search(text)
        if match:
            return int(match.group(1))
        if "No space left on device" in text or "StorageFull" in text:
            return errno.ENOSPC
        if "unexpected pos" in text and folder is not None and _free_bytes(folder) < (1 << 20):
            return errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(folder: str | os.PathLike) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def describe_os_error(exc: BaseException, *, what: str = "", path: str | os.PathLike | None = None,
                      action: str = "") -> str:
    """One line for an OS-level failure: ``<what> <path>: <action>: <what happened>; <the fix>``.
    ``path`` defaults to the error's own file name."""
    if isinstance(exc, WriteFailedError):
        return exc.message
    code = os_error_code(exc, Path(path).parent if path else None)
    if path is None and isinstance(exc, OSError):
        path = exc.filename
    subject = " ".join(part for part in (what, repr(os.fspath(path)) if path is not None else "") if part) or "error"
    if action:
        subject += f": {action}"
    if code in _OS_ERROR_TEXTS:
        happened, fix = _OS_ERROR_TEXTS[code]
        return f"{subject}: {happened}; {fix}"
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).splitlines() or [""])[0]
    detail = detail or type(exc).__name__
    return f"{subject}: {detail}"


def write_failed(exc: BaseException, *, what: str, path: str | os.PathLike) -> WriteFailedError | None:
    """``WriteFailedError`` for ``exc`` when it is an OS-level failure (errno known), else None."""
    if isinstance(exc, WriteFailedError):
        return exc
    if isinstance(exc, ValueError):  # a writer's own check (or TargetExistsError) names its input already
        return None
    code = os_error_code(exc, Path(path).parent)
    if code is None:
        return None
    return WriteFailedError(code, describe_os_error(exc, what=what, path=path, action="could not be written"), path)


# -- permissions ---------------------------------------------------------------------------------

def new_file_mode(folder: str | os.PathLike) -> int:
    """The permission bits a new file in ``folder`` gets (the process umask, and the folder's
    default ACL where it has one), found by creating one: reading the umask needs ``os.umask``,
    which changes it for every thread for a moment."""
    probe = temp_sibling(Path(folder) / "mode", "mode")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)


def give_new_file_mode(path: str | os.PathLike, mode: int) -> None:
    """Set ``mode`` on the file ``path`` or on every file under the folder ``path``: writers that
    create private (0600) files (safetensors) would otherwise keep them from the other users and
    processes sharing a models folder."""
    if os.name == "nt":  # no POSIX permission bits
        return
    path = Path(path)
    files = [path] if not path.is_dir() else [Path(d, f) for d, _, names in os.walk(path) for f in names]
    for file in files:
        if not file.is_symlink() and stat.S_IMODE(file.stat().st_mode) != mode:
            os.chmod(file, mode)


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


def _make_parents(parent: Path, created: list[Path]) -> None:
    """mkdir -p, adding the folders it created to ``created`` (deepest last, also when a mkdir fails)
    so a failed write can remove them."""
    for folder in reversed([parent, *parent.parents]):
        if not folder.exists():
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by another writer (parallel training jobs)
                if not folder.is_dir():
                    raise
                continue
            created.append(folder)


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
    created: list[Path] = []
    temp = temp_sibling(final)
    try:
        _make_parents(final.parent, created)
        mode = new_file_mode(final.parent)
        if directory:
            temp.mkdir()
        yield temp
        if (directory and not temp.is_dir()) or (not directory and not temp.is_file()):
            raise RuntimeError(f"{what}: the writer did not create {'a folder' if directory else 'a file'} at {temp}")
        give_new_file_mode(temp, mode)
        _fsync_tree(temp)
        _publish(temp, final, overwrite=overwrite, what=what)
        _fsync_path(final.parent, directory=True)
    except BaseException as exc:
        failed = write_failed(exc, what=what, path=final) if isinstance(exc, Exception) else None
        _remove(temp)
        _remove_empty(created)
        if failed is not None and failed is not exc:
            raise failed from exc
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

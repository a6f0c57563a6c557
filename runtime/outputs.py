"""Writing an output file without ever destroying data: the one way leank writes a file.

Every writer (convert, mask make/show/train/examples, eval's JSON, checkpoints) goes through here:

- `check_output` runs before any slow work, so that a bad path fails in a second, not after an hour of
  training. It refuses an existing file unless `force`, a path that is one of the command's inputs (also
  through a symbolic link, a hard link or `./`), anything that is not a regular file or a new name
  (a directory, a device such as /dev/null, a named pipe, a socket), a missing directory and a directory
  this process cannot write to.
- `atomic_write` checks again, then hands out a temporary file beside the target (`.NAME.leank-tmp-PID`),
  flushes it to disk and renames it over the target. Any failure, Ctrl-C included, removes the temporary
  file and leaves the old target as it was. A run killed outright (SIGKILL, power loss) cannot clean up:
  the next write to the same target removes the temporaries of writers that no longer run.

A symbolic link as the target is followed: the file it points to is replaced and the link stays.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from leank.errors import LeankError

TMP_MARK = ".leank-tmp-"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (or cannot be looked at): not the same file
        return False


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Iterable[str | os.PathLike[str] | None] = (), what: str = "") -> Path:
    """Check that `path` may be written; returns the path to write (symbolic links followed).

    `inputs` are the files the same command reads (None entries are skipped); `what` names the option
    in messages (e.g. "--png"). Raises `LeankError` with one line naming the problem.
    """
    given = Path(path)
    label = f"{what} {given}" if what else str(given)
    if str(path) == "" or given.name in ("", ".", ".."):
        raise LeankError(f"{label}: not a file name")
    target = Path(os.path.realpath(given))  # follows symbolic links, collapses ./ and ..
    if given.is_symlink() and not target.exists() and not target.parent.is_dir():
        raise LeankError(f"{label}: a symbolic link to {target}, whose directory does not exist")
    for source in inputs:
        if source is not None and (_same_file(target, Path(source)) or target == Path(os.path.realpath(source))):
            raise LeankError(f"{label}: is an input of this command ({source}); write to another path")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise LeankError(f"{label}: cannot be looked at ({e.strerror or e})") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise LeankError(f"{label}: is {_kind(st.st_mode)}, not a file leank may replace")
        if not force:
            raise LeankError(f"{label}: already exists (use --force to overwrite)")
    parent = target.parent
    if not parent.is_dir():
        raise LeankError(f"{label}: directory {given.parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LeankError(f"{label}: directory {given.parent} is not writable")
    return target


def temporary_path(dst: Path, pid: int | None = None) -> Path:
    """The hidden file `dst` is written to before the rename: `.NAME.leank-tmp-PID` beside it."""
    return dst.parent / f".{dst.name}{TMP_MARK}{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process; no PID we could have had: not ours
        return True
    return pid > 0


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Remove the temporaries a killed writer of `dst` left behind (those whose PID no longer runs, and
    this process's own); returns what was removed. A writer still running keeps its file."""
    prefix = f".{dst.name}{TMP_MARK}"
    removed = []
    try:
        entries = list(os.scandir(dst.parent if str(dst.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if not (pid_text.isascii() and pid_text.isdigit()) or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(pid_text)
        if pid == os.getpid() or not _alive(pid):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Iterable[str | os.PathLike[str] | None] = (), what: str = "") -> Iterator[Path]:
    """`with atomic_write(path) as tmp:` write the whole file to `tmp`; on a clean exit it replaces `path`.

    The checks of `check_output` run first (again, if the caller ran them before the work). The temporary
    file is created empty (mode 0666 less the umask) so that writers which open it by name keep those
    permissions. On any exception, KeyboardInterrupt included, it is removed and `path` is untouched.
    """
    target = check_output(path, force=force, inputs=inputs, what=what)
    label = f"{what} {path}" if what else str(path)
    remove_stale_temporaries(target)
    tmp = temporary_path(target)
    try:  # from the temporary's creation on, whatever happens (Ctrl-C included) ends in the finally below
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise LeankError(f"{label}: cannot write ({e.strerror or e})") from None
        yield tmp
        _fsync(tmp)
        # checked again just before the rename: something else may have appeared meanwhile
        check_output(target, force=True, inputs=inputs, what=what)
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)
    except OSError as e:
        raise LeankError(f"{label}: writing failed ({e.strerror or e}); no output was left behind") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def write_bytes(path: str | os.PathLike[str], data: bytes, **checks) -> None:
    """Write `data` to `path` atomically (keyword arguments as `check_output`)."""
    with atomic_write(path, **checks) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str, **checks) -> None:
    """Write UTF-8 `text` to `path` atomically (keyword arguments as `check_output`)."""
    write_bytes(path, text.encode("utf-8"), **checks)

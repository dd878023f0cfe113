"""Where the tools write, checked before any work: an output never replaces an input, goes where it can be
written, and never deletes or overwrites what the tool did not make (unless `--overwrite` says so); temporaries
of killed runs are cleaned; a run directory is locked while a run uses it."""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import tempfile

from minorsft_megatron.errors import UserError

LOCK_FILE = ".minorsft.lock"


class PathError(UserError):
    """An output location that cannot or must not be written; one line naming the flag or key and the path."""


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_apart(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """No output (flag -> path) is an input, another output, or a directory holding an input."""
    named_outputs = [(name, path) for name, path in outputs.items() if path]
    for out_name, out in named_outputs:
        for in_name, inp in inputs.items():
            if inp and (_same(out, inp) or (os.path.isdir(out) and _inside(inp, out))):
                raise PathError(f"{out_name} {out} is (or holds) {in_name} {inp}: an output never replaces an input")
    for i, (name_a, a) in enumerate(named_outputs):
        for name_b, b in named_outputs[i + 1:]:
            if _same(a, b):
                raise PathError(f"{name_a} and {name_b} are the same file {a}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _can_write_in(directory: str) -> bool:
    """Whether a file can be created in `directory` (tried, not inferred from permission bits: root ignores them,
    a read-only file system does not)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".minorsft-probe-")
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def check_writable_dir(path: str, what: str) -> None:
    """`path` is, or can be created as, a directory this process can write in."""
    if not path:
        raise PathError(f"{what}: an empty path")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise PathError(f"{what} {path}: {existing} is a file, not a directory")
    if not _can_write_in(existing):
        raise PathError(f"{what} {path}: {existing} is not writable")


def check_writable_file(path: str, what: str) -> None:
    """`path` can be written as a file: not a directory, and its directory exists or can be created, writable."""
    if not path:
        raise PathError(f"{what}: an empty path")
    if os.path.isdir(path):
        raise PathError(f"{what} {path}: is a directory")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what)


def make_parent(path: str) -> None:
    """Create the directory a file output goes into, if missing (checked writable beforehand)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def check_fresh_dir(path: str, what: str, overwrite: bool = False) -> None:
    """`path` is a directory this tool may fill: absent or empty, or (`overwrite`) anything but a file."""
    if os.path.isfile(path):
        raise PathError(f"{what} {path}: is a file")
    check_writable_dir(path, what)
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise PathError(f"{what} {path}: not empty; choose a new directory, or pass --overwrite to replace it")


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory `tmp` to `final`, replacing what is there (checked beforehand)."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Remove `path.tmp<pid>` files and directories left by processes that no longer run."""
    for candidate in glob.glob(glob.escape(path) + ".tmp*"):
        suffix = candidate[len(path) + len(".tmp"):]
        if suffix.isdigit() and not _alive(int(suffix)):
            shutil.rmtree(candidate, ignore_errors=True) if os.path.isdir(candidate) else os.remove(candidate)


class DirectoryLock:
    """An exclusive lock on a directory for as long as this process runs (or until release): a second run on it
    is refused, naming the holder's pid. The lock file is released by the kernel if the process dies."""

    def __init__(self, directory: str, what: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, LOCK_FILE)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise PathError(f"{what} {directory} is in use by another run (pid {holder}); wait for it to end or "
                            "choose another directory")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()

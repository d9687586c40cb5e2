"""Write files and folders so that an interrupted run never leaves a half-written result.

Everything is first written under a temporary name beside its destination, then renamed;
a rename within one filesystem is atomic, so readers see either the old result or the new one.
The result gets the permissions a plain write would give it (the umask's), not the owner-only
ones of a temporary file: a lab's shared filesystem must be able to read a cache or a run.
A temporary is named after its target, host and process, so the next write of the same target
removes what a killed writer left (``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pathanat.errors import OutputBusyError, OutputExistsError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else by the
    set-and-restore that is the only portable way."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _temporary_prefix(path: Path) -> str:
    # who writes it, host and process, so a later write can tell a dead writer's
    return f".{path.name}.{_host()}-{os.getpid()}."


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries that killed writes of ``path`` left beside it: those of a process
    of this host that no longer runs (a live writer's, or another host's, are left alone)."""
    host = _host()
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{host}-*.tmp-write"):
        pid = tmp.name[len(f".{path.name}.{host}-"):].split(".", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp-write",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path``.

    An existing ``path`` is an error unless ``overwrite``; then it is swapped out only after the
    new folder is complete, so a failure leaves the old one untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(path):
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        yield from _swapped_in(path)


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``path`` for the whole write, so a second writer of the same
    folder stops at once rather than both succeeding and the last one silently winning."""
    with exclusive(path.with_name(f".{path.name}.lock"),
                   f"{path} is being written by another process right now"):
        yield


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold the file ``lock`` (an flock) while the block runs; a second holder stops at once
    with ``busy`` as its message. An flock dies with its process, so a killed holder leaves no
    lock behind (its file stays until the next holder finishes)."""
    lock = Path(lock)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(
                f"{busy} (it holds {lock}); wait for it to finish, or write elsewhere"
            ) from None
        try:
            yield
        finally:
            # removed while still held: a writer that opened it before fails its non-blocking
            # lock; one that comes after makes a new file, and finds the finished result
            lock.unlink(missing_ok=True)


def _swapped_in(path: Path) -> Iterator[Path]:
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp-write",
                                dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.tmp-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

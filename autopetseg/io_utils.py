"""Atomic file writes, lock files, and JSON helpers.

Every file a stage writes goes to a temporary name in the same folder first and is then
renamed with ``os.replace``, so an interrupted run never leaves a half-written file under
the final name. The file gets the permissions any file the user creates gets (``0666`` less the
umask), not ``mkstemp``'s private ``0600``.

A temporary name says who writes it: ``.<name>.tmp-<pid>@<host>-<random><suffix>``. A run that
was killed leaves it behind (a checkpoint of tens of MB, a half-written mask); each stage calls
``remove_stale_temporaries`` on its output folder when it starts, which deletes the temporaries
whose writer is gone (same host, process not running) or that nobody touched for
``STALE_TEMPORARY_SECONDS`` (another host's, or an older name without the writer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# A temporary nobody modified for this long belongs to no running writer: each atomic write
# finishes within seconds (the largest, a checkpoint, is tens of MB).
STALE_TEMPORARY_SECONDS = 3600.0
_TEMP_MARK = ".tmp-"
_TEMP_WRITER = re.compile(r"\.tmp-(\d+)@([A-Za-z0-9_]+)-")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)+$")
_umask_lock = threading.Lock()


def host_tag() -> str:
    """This machine's name as it appears in temporary file names."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux, else by setting and restoring it
    (POSIX has no getter; the swap would briefly change it for other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps the extension for writers that look at it (SimpleITK, numpy, torch). The
    file ends up with the user's default permissions (module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{_TEMP_MARK}{os.getpid()}@{host_tag()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix or "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if os.name == "posix":
            os.chmod(tmp, default_file_mode())  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its files
    return True


def is_stale_temporary(path: Path, now: float | None = None, max_age_s: float = STALE_TEMPORARY_SECONDS) -> bool:
    """Whether ``path`` is an ``atomic_path`` temporary that no running writer will finish."""
    name = path.name
    if not name.startswith("."):
        return False
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    writer = _TEMP_WRITER.search(name)
    if writer is not None and writer.group(2) == host_tag() and int(writer.group(1)) != os.getpid():
        if not _pid_running(int(writer.group(1))):
            return True
    if age <= max_age_s:
        return False
    # Old: one of ours (any host), a lock file of an older version, or an older version's
    # temporary name ``.<file>.<8 random chars of mkstemp><suffix>``.
    return writer is not None or name.endswith(".lock") or _OLD_TEMP_NAME.match(name) is not None


def remove_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the stale temporaries of killed runs in ``folder`` (and below, with ``recursive``);
    returns what was removed. Files of writers still running are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    pattern = "**/.*" if recursive else ".*"
    for path in folder.glob(pattern):
        if path.is_file() and is_stale_temporary(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def file_lock(lock_path: str | Path) -> Iterator[None]:
    """An exclusive lock (POSIX ``flock``) held through the block; the lock file is removed when
    released, so none is left behind. Where ``fcntl`` is missing (Windows) nothing is locked.

    Removing a lock file is safe with the usual check: after locking, the holder makes sure the
    file it locked is still the one at ``lock_path`` (another holder may have removed it in the
    meantime), and starts over if not.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if not same:
                continue  # the previous holder removed it: lock the new one
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
            return
        finally:
            handle.close()  # closing releases the lock


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def nan_to_none(obj: Any) -> Any:
    """``nan`` → ``None`` throughout dicts and lists (JSON has no NaN; ``write_json`` refuses it)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (dataclasses, numpy scalars and arrays allowed) as indented JSON, atomically."""
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(_to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save one array as ``.npy`` (memory-mappable with ``np.load(..., mmap_mode='r')``), atomically."""
    with atomic_path(path, ".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))

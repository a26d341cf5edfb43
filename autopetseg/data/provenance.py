"""What a cached case was made from: each source file's path, size, modification time and a cheap
content hash, and what changed since.

Every cache entry (the cropped stage, the preprocessed case, the fingerprint's cases) records the
stamps of the PET, CT and label it was made from (``case_sources``). A later run compares them
with the files now on disk (``changed_sources``): a file whose size, modification time or content
hash differs, or a file that appeared or went away, makes the entry stale and the case is made
again. The path is recorded for people but not compared, so a dataset moved with its times kept
(``mv``, ``cp -a``, ``rsync -a``) is not redone.

The content hash is cheap on purpose (it is computed for every case on every run): BLAKE2b of the
file size, the first and the last ``EDGE_BYTES`` and ``N_BLOCKS`` blocks spread over the file. A
``.gz`` file ends with the CRC-32 and the length of its whole uncompressed content, so for the
usual ``.nii.gz`` any content change shows in the last bytes; an uncompressed file edited where
no block reads it, to the same size and with its modification time put back, would go unseen.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from autopetseg.data.records import CaseRecord

ROLES = ("pet", "ct", "label")
EDGE_BYTES = 64 * 1024
N_BLOCKS = 16
BLOCK_BYTES = 4 * 1024
COMPARED = ("size", "mtime_ns", "sample_hash")  # the path is recorded, not compared (see the module doc)


def sample_hash(path: str | Path, size: int | None = None) -> str:
    """BLAKE2b (128 bits) of the size, both ends and ``N_BLOCKS`` spread blocks of the file."""
    size = os.stat(path).st_size if size is None else size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= 2 * EDGE_BYTES + N_BLOCKS * BLOCK_BYTES:
            digest.update(f.read())
            return digest.hexdigest()
        digest.update(f.read(EDGE_BYTES))
        step = (size - 2 * EDGE_BYTES) // (N_BLOCKS + 1)
        for k in range(1, N_BLOCKS + 1):
            f.seek(EDGE_BYTES + k * step)
            digest.update(f.read(BLOCK_BYTES))
        f.seek(size - EDGE_BYTES)
        digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def file_stamp(path: str | Path) -> dict:
    """``{"path", "size", "mtime_ns", "sample_hash"}`` of one file."""
    stat = os.stat(path)
    return {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns),
            "sample_hash": sample_hash(path, stat.st_size)}


def case_sources(record: CaseRecord) -> dict[str, dict | None]:
    """The stamp of each source file of a case (``None`` for a role without a file). Take it before
    reading the files: a file that changes while it is read then shows as changed next time."""
    return {role: None if getattr(record, role) is None else file_stamp(getattr(record, role)) for role in ROLES}


def _describe(role: str, old: dict, new: dict) -> str:
    if old["size"] != new["size"]:
        return f"{role} changed ({old['size']} -> {new['size']} bytes)"
    if old["sample_hash"] != new["sample_hash"]:
        return f"{role} content changed"
    return f"{role} modified since"


def changed_sources(record: CaseRecord, recorded: dict | None) -> list[str]:
    """What differs between the case's files now and ``recorded`` (``case_sources`` of an earlier
    run), one phrase per role; empty when nothing did. No record at all counts as changed."""
    if not isinstance(recorded, dict):
        return ["no record of the source files"]
    changes = []
    for role in ROLES:
        path, old = getattr(record, role), recorded.get(role)
        if path is None or old is None:
            if (path is None) != (old is None):
                changes.append(f"{role} {'added' if old is None else 'removed'}")
            continue
        try:
            stat = os.stat(path)
        except OSError:
            changes.append(f"{role} unreadable")
            continue
        if not isinstance(old, dict) or any(k not in old for k in COMPARED):
            changes.append(f"{role}: no record of the file")
            continue
        new = {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}
        if new["size"] == old["size"]:
            new["sample_hash"] = sample_hash(path, stat.st_size)
        else:
            new["sample_hash"] = None
        if any(new[k] != old[k] for k in COMPARED):
            changes.append(_describe(role, old, new))
    return changes

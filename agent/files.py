"""Files the agent and the control plane write whole: written beside the target and renamed over it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def plain_mode() -> int:
    """The mode a plain open() would give a new file under the process's umask (mkstemp's is 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write beside the target, flush to disk and rename over it: a reader (the poll) sees the old file or the new
    one. `mode` defaults to the existing file's (an operator's file keeps its permissions), else 0600."""
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)

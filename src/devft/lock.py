"""One live devft process per output directory: an exclusive `flock` on DIR/.devft.lock.

The kernel drops an flock when its process dies, however it dies, so a lock left by a run
killed with `kill -9` never blocks `devft run --resume`. The lock is re-entrant within a
process (the runner, the ServerApp and `compare` nest their locks on the same directory).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devft.errors import DevFTError

LOCK_FILE = ".devft.lock"

_HELD: dict[str, list[int]] = {}  # resolved directory -> [file descriptor, depth]
_GUARD = threading.Lock()


class OutputInUseError(DevFTError):
    """Another live devft process writes into the same output directory."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


@contextmanager
def output_lock(directory: str | Path, command: str = "devft") -> Iterator[None]:
    """Hold DIR's lock for the block; a DIR held by another live process is an error."""
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
        else:
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputInUseError(
                    f"{directory} is in use by a live devft run ({holder}); wait for it to end, "
                    "or pass another --out") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {command}\n".encode())
            _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                fcntl.flock(held[0], fcntl.LOCK_UN)
                os.close(held[0])

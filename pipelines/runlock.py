"""One submit per run id: a lock file in the run directory that names its holder.

Two processes writing one run directory doubled every row of metrics.jsonl, or crashed one of
them. The lock is an flock on `<run_dir>/.lock`, so the kernel drops it when its holder dies
however it dies; the file holds the holder's PID and host for the refusal message. A lock
file left by a dead process is not locked, so the next submit simply takes it over. Where a
filesystem has no flock, the PID in the file decides (alive on this host: refused).
"""

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from components.errors import ConfigError

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _refuse(run_id: str, holder: dict, path: Path) -> ConfigError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return ConfigError(f"run_id: {run_id} is already running ({who}); wait for it to finish or choose another "
                       f"run_id (if it is not running, delete {path})")


class RunLock:
    """Held from acquire() to release() (or the end of the process)."""

    def __init__(self, run_dir: Path, run_id: str):
        self.path, self.run_id = Path(run_dir) / LOCK_FILE, run_id
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise _refuse(self.run_id, _holder(self.path), self.path) from None
                fd = self._without_flock()
            # The previous holder may have removed the file between our open and our lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def _without_flock(self) -> int:
        holder = _holder(self.path)
        if holder.get("host") == socket.gethostname() and holder.get("pid") not in (None, os.getpid()) \
                and _alive(int(holder["pid"])):
            raise _refuse(self.run_id, holder, self.path)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter that opened it sees a new inode
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

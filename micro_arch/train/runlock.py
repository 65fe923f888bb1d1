"""One trainer per run folder: an OS lock on RUN_DIR/run.lock while a trainer writes the folder.

The lock is flock(2) on the file: the kernel releases it when its holder ends, however it ends (a crash
or kill -9 included), so a stale lock never needs cleaning up. While held, the file names its holder
(pid, host, since when) for the message a second trainer gets; a clean release empties it again, so a
resume that changes nothing leaves the folder byte-identical. Under DDP the trainer's rank 0 holds it;
`micro-arch run --nproc N` checks it before starting the workers, so a refusal is one line.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from micro_arch.errors import MicroArchError

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

LOCK_FILE = "run.lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def refusal(self, name_holder: bool = True) -> str | None:
        """Take the lock; None when taken, else the one-line message that says who holds it."""
        if fcntl is None or self.fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MicroArchError(f"{self.run_dir}: cannot open its lock file {self.path} ({err.strerror}); a trainer "
                                 "writes the run folder, so it must be writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return self._held_by_another()
            return None  # a file system without locks (ENOLCK, EOPNOTSUPP): train unguarded, as before locks
        self.fd = fd
        if not name_holder:
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
        return None

    def acquire(self) -> None:
        message = self.refusal()
        if message:
            raise MicroArchError(message)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty again: nobody holds it
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def _held_by_another(self) -> str:
        try:
            words = self.path.read_text().split()
        except OSError:
            words = []
        info = dict(zip(words[::2], words[1::2]))
        who = (f"pid {info['pid']} on host {info.get('host', '?')}, since {info.get('since', '?')}" if "pid" in info
               else "a process that has just started")
        return (f"{self.run_dir}: another trainer is writing this run folder ({who}; it holds {self.path}); a run "
                "folder has one writer: wait for that trainer to finish, or stop it (Ctrl-C saves a checkpoint) "
                "and resume then")


def refuse_if_locked(run_dir: str | Path) -> None:
    """A one-line refusal when another trainer holds the run folder now (taken and let go at once)."""
    lock = RunLock(run_dir)
    if not lock.run_dir.is_dir():
        return
    message = lock.refusal(name_holder=False)
    if message:
        raise MicroArchError(message)
    if lock.fd is not None:  # let go at once, the file as it was
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)

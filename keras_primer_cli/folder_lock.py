"""One writer per folder: an exclusive `flock` on `<folder>/.lock` (stdlib only).

Used by the training run folder (`keras_primer.training.run_dir.RunLock`)
and by the export output folder (`keras-primer export --out`). The kernel
drops the lock when its process dies (even on `kill -9`), so a crash never
leaves a stale lock; the lock file records who holds it, so a second
process can name the first.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> with FolderLock(folder, "training process"):
...     try:
...         FolderLock(folder, "training process").acquire()
...     except FolderLockedError as error:
...         print(str(error).split("(")[0].endswith("in use by another training process "))
True
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable

LOCK_FILE = ".lock"
# The holder's command line in the lock file is cut here (marked " ...").
MAX_COMMAND_BYTES = 300


class FolderLockedError(ValueError):
    """Another process holds the folder's lock; the message names it."""


class FolderLock:
    """An exclusive lock on a folder (Linux and macOS `flock`).

    Args:
        folder: The folder (created if needed).
        holder: What kind of process this is ("training process", "export"),
            recorded in the lock file for the messages of a process that finds it held.
        on_wait: When given, `acquire` waits for the lock instead of raising,
            calling `on_wait(message)` once first (the message names the holder).

    Raises:
        FolderLockedError: (from `acquire`, without `on_wait`) another
            process holds it; the message names that process.
    """

    def __init__(
        self,
        folder: str,
        holder: str = "process",
        on_wait: Callable[[str], None] | None = None,
    ):
        self.folder = folder
        self.holder = holder
        self.on_wait = on_wait
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd = None

    def _holder(self, fd: int) -> tuple[str, str]:
        """`(kind, who)` of the process holding the lock, read from its record."""
        record = b""
        with contextlib.suppress(OSError):
            record = os.pread(fd, 4096, 0)
        kind, _, who = record.partition(b"\n") if b"\n" in record else (b"", b"", record)
        return (
            kind.decode("utf-8", "surrogateescape").strip() or "process",
            who.decode("utf-8", "surrogateescape").strip() or "unknown",
        )

    def acquire(self) -> FolderLock:
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = self._lock()
            # The holder may have removed the lock file (with the folder it had
            # created) before letting go: then this lock guards nothing; retry.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                os.makedirs(self.folder, exist_ok=True)
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self._fd = fd
        return self

    def _record(self) -> bytes:
        """Who holds the lock, as bytes: its kind on the first line (so that a
        waiting process of another kind names it), then the process; the
        command line as the bytes it was given (`os.fsencode`: a path need
        not be UTF-8 on Linux)."""
        owner = (
            f"{self.holder}\npid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
        ).encode("utf-8", "surrogateescape")
        command = b" ".join(os.fsencode(arg) for arg in sys.argv)
        if len(command) > MAX_COMMAND_BYTES:
            command = command[:MAX_COMMAND_BYTES] + b" ..."
        return owner + command

    def _lock(self) -> int:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            kind, who = self._holder(fd)
            message = f"{self.folder} is in use by another {kind} ({who})."
            if self.on_wait is None:
                os.close(fd)
                raise FolderLockedError(
                    f"{message} Wait for it to finish (or stop it), or pass another --out."
                ) from None
            self.on_wait(f"{message} Waiting for it to finish.")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""Ctrl-C that is never lost, and never lands mid-commit (stdlib only).

CPython turns SIGINT into `KeyboardInterrupt` wherever the main thread is.
Raised inside a garbage-collector callback (JAX registers one), a `__del__`
or a weakref callback, it is printed as "Exception ignored" and lost, and a
command would go on and finish with status 0. `INTERRUPTS` records every
SIGINT instead:

* outside a collection it raises `KeyboardInterrupt` at once;
* during a collection it raises nothing there (where it would be lost) and
  sends SIGINT again a moment later, until it lands outside one;
* `check()` raises `KeyboardInterrupt` for any SIGINT received, so a
  command checks before it commits anything;
* inside `deferred()` (a commit: a few renames) it raises nothing; the
  commit checks at its end and undoes itself if one came;
* after `finish()` (the work is complete) it changes nothing.

A command runs inside `INTERRUPTS.installed()` (main thread only); a
process that inherited SIGINT ignored (a background job of a script) gets
Ctrl-C back too.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator

# Seconds before SIGINT is sent again when it arrived during a collection.
_RESEND_AFTER_S = 0.05


class Interrupts:
    """The SIGINT handler of a command; see the module docstring."""

    def __init__(self):
        self.received = False
        self._deferred = 0
        self._finished = False
        self._collecting = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Makes SIGINT go through this handler for the block (main thread only;
        elsewhere the block runs with the handler it has)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self.received, self._deferred, self._finished = False, 0, False
        previous = signal.signal(signal.SIGINT, self._handle)
        if self._gc_started not in gc.callbacks:
            gc.callbacks.insert(0, self._gc_started)  # the first to run at "start"
            gc.callbacks.append(self._gc_stopped)  # the last to run at "stop"
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _gc_started(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._collecting = True

    def _gc_stopped(self, phase: str, info: dict) -> None:
        if phase == "stop":
            self._collecting = False

    def _handle(self, signum, frame) -> None:
        self.received = True
        if self._deferred or self._finished:
            return
        if self._collecting:  # a raise here would be printed and lost
            timer = threading.Timer(_RESEND_AFTER_S, os.kill, (os.getpid(), signal.SIGINT))
            timer.daemon = True
            timer.start()
            return
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raises `KeyboardInterrupt` if a SIGINT came (even one that was lost)."""
        if self.received and not self._finished:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Checks, then runs the block without raising for SIGINT; the block
        calls `check()` at its end (and undoes its work if that raises)."""
        self.check()
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def finish(self) -> None:
        """The command's work is done: a later SIGINT changes nothing and raises nothing."""
        self._finished = True


#: The one handler of this process.
INTERRUPTS = Interrupts()

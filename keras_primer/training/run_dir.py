"""A run folder as a small database with one writer.

* `RunLock`: an exclusive `flock` on `<out>/.lock`, held for the whole run
  and released by the kernel when the process dies (even on `kill -9`), so
  a crash never leaves a stale lock. A second process on the same folder
  gets an error naming the first.
* `atomic_write`: write a temporary sibling, `fsync`, `os.replace`, then
  `fsync` the folder. A reader sees the old file or the new one, never half.
* `CheckpointStore`: one file per checkpoint (`checkpoints/step-<N>.npz`,
  committed with `atomic_write`) holding every variable of the model and of
  the optimizer (seed-generator states included: the RNG), the step, the
  wall time and the history rows up to that step. The newest two are kept.

Framework-free (standard library and NumPy): the driver hands in arrays.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> store = CheckpointStore(folder)
>>> store.commit(3, [np.zeros(2, "float32")], {"history": []})
>>> store.load_latest()["step"]
3
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sys
import time
import zipfile

import numpy as np

from keras_primer_cli.folder_lock import FolderLock
from keras_primer_cli.folder_lock import FolderLockedError as RunLockedError  # noqa: F401

# Fault injection for tests: "STEP:PHASE" kills this process with SIGKILL
# when checkpoint commit of STEP reaches PHASE; "STEP:PHASE:wait=PATH"
# pauses there until PATH exists (see `fault_point`).
FAULT_ENV = "KERAS_PRIMER_FAULT"
PHASES = ("before_write", "before_rename", "after_rename", "after_history", "after_best")


def fault_point(step: int, phase: str) -> None:
    """Test hook: at `step` and `phase` named by `$KERAS_PRIMER_FAULT`, kills
    the process (SIGKILL: no clean-up, like a crash) or, with `:wait=PATH`,
    waits until PATH exists. Does nothing otherwise.

    Lets the fault-injection tests stop or hold a run at an exact point of
    writing a checkpoint.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or not wanted.startswith(f"{step}:{phase}"):
        return
    action = wanted[len(f"{step}:{phase}") :]
    if action.startswith(":wait="):
        path = action[len(":wait=") :]
        deadline = time.monotonic() + 600
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    elif not action:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(ValueError):
    """A checkpoint is damaged or does not fit the model."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", suffix: str = ""):
    """Yields a file to write `path` through; commits it only if the block ends cleanly.

    The temporary file is `<dir>/.<name>.tmp-<pid><suffix>` (`suffix`: for
    writers that want a given extension, like Keras' `.keras`).
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{suffix}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def commit_file(tmp: str, path: str) -> None:
    """`fsync`s the finished file `tmp` and renames it onto `path` (atomic)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, data: dict) -> None:
    """`data` as indented JSON, written atomically."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


class RunLock(FolderLock):
    """An exclusive lock on a run folder (`keras_primer_cli.folder_lock`).

    Args:
        folder: The run folder (created if needed).

    Raises:
        RunLockedError: (from `acquire`) another process holds it; the
            message names that process.
    """

    def __init__(self, folder: str):
        super().__init__(folder, "training process")


_NAME = re.compile(r"^step-(\d{8})\.npz$")


class CheckpointStore:
    """Checkpoints of one run, `<folder>/step-<N>.npz`, each committed atomically.

    A checkpoint holds `arrays` (the variables, in the model's order) and a
    JSON `state` dict (step, wall time, history rows, ...).

    Args:
        folder: Where the checkpoints live (created on first commit).
        keep: How many of the newest to keep.
    """

    def __init__(self, folder: str, keep: int = 2):
        self.folder = folder
        self.keep = keep

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step:08d}.npz")

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        if not os.path.isdir(self.folder):
            return []
        return sorted(int(m.group(1)) for n in os.listdir(self.folder) if (m := _NAME.match(n)))

    def remove_leftovers(self) -> None:
        """Deletes temporary files of commits that a crash interrupted."""
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            if name.startswith(".") and ".tmp-" in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.folder, name))

    def commit(self, step: int, arrays: list[np.ndarray], state: dict) -> None:
        """Writes checkpoint `step` in one atomic step, then drops the oldest."""
        fault_point(step, "before_write")
        os.makedirs(self.folder, exist_ok=True)
        state = dict(state, step=int(step), format=1)
        members = {f"v{i:05d}": np.asarray(a) for i, a in enumerate(arrays)}
        members["state"] = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8)
        path = self.path(step)
        tmp = os.path.join(self.folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **members)
        fault_point(step, "before_rename")
        commit_file(tmp, path)
        fault_point(step, "after_rename")
        for old in self.steps()[: -self.keep]:
            with contextlib.suppress(OSError):
                os.remove(self.path(old))

    def load(self, step: int) -> dict:
        """`{"step", "state", "arrays"}` of checkpoint `step`.

        Raises:
            CheckpointError: The file is truncated or damaged (zip CRC), with
                the fix.
        """
        path = self.path(step)
        try:
            with np.load(path, allow_pickle=False) as data:
                state = json.loads(bytes(data["state"]).decode("utf-8"))
                count = sum(1 for k in data.files if k.startswith("v"))
                arrays = [data[f"v{i:05d}"] for i in range(count)]
        except (
            zipfile.BadZipFile,
            ValueError,
            KeyError,
            EOFError,
            OSError,
            UnicodeDecodeError,
        ) as e:
            older = [s for s in self.steps() if s < step]
            fix = (
                f"move it away to resume from the previous checkpoint (step {older[-1]})"
                if older
                else "delete it to start the run again"
            )
            raise CheckpointError(
                f"Checkpoint {path} is damaged or truncated ({type(e).__name__}: {e}); "
                f"{fix}, or pass another --out."
            ) from None
        if state.get("step") != step or state.get("format") != 1:
            raise CheckpointError(
                f"Checkpoint {path} holds step {state.get('step')} (format "
                f"{state.get('format')}); it was not written by this version for step {step}. "
                "Move it away, or pass another --out."
            )
        return {"step": step, "state": state, "arrays": arrays}

    def load_latest(self) -> dict | None:
        """The newest checkpoint (see `load`), or None when there is none."""
        steps = self.steps()
        return self.load(steps[-1]) if steps else None


def write_history_csv(path: str, rows: list[dict]) -> None:
    """`rows` (dicts) as a CSV file, written atomically (columns: union, in order)."""
    import csv

    if not rows:  # nothing evaluated yet: no file, rather than one without a header
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())

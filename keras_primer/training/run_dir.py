"""A run folder as a small database with one writer.

* `RunLock`: an exclusive `flock` on `<out>/.lock`, held for the whole run
  and released by the kernel when the process dies (even on `kill -9`), so
  a crash never leaves a stale lock. A second process on the same folder
  gets an error naming the first.
* `atomic_write`: write a temporary sibling, `fsync`, `os.replace`, then
  `fsync` the folder. A reader sees the old file or the new one, never half.
  The sibling's name (`temp_path`) and its recognizer (`remove_temp_files`)
  are one template (`keras_primer_cli.ownership.ATOMIC_WRITE`): a clean-up
  removes only names a run writes, never a user's `.draft.tmp-1`.
* `check_folder_owned`, `claim_folder` (stage 2 of `driver.train`): a
  folder is a run's only with our `run.json` (any other non-empty folder is
  refused before any work), and a run removes only the temporary files it
  writes.
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

from keras_primer_cli.errors import ConfigError
from keras_primer_cli.folder_lock import LOCK_FILE, FolderLock
from keras_primer_cli.folder_lock import FolderLockedError as RunLockedError  # noqa: F401
from keras_primer_cli.ownership import ATOMIC_WRITE, RUN_RECORD, read_run_record

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


# Extensions a temporary sibling may end in: Keras saves only to names ending in `.keras`.
TEMP_SUFFIXES = ("", ".keras")


def temp_path(path: str, suffix: str = "") -> str:
    """A new temporary sibling of `path`: `<dir>/.<name>.tmp-<pid>-<hex><suffix>`."""
    if suffix not in TEMP_SUFFIXES:
        raise ValueError(f"`suffix` must be one of {TEMP_SUFFIXES}. Received: {suffix!r}")
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, ATOMIC_WRITE.name(target=name, suffix=suffix))


def remove_temp_files(folder: str, targets) -> list[str]:
    """Removes the temporary siblings (`temp_path`) of `targets` in `folder`
    that a killed writer left; call it holding the folder's lock.

    Args:
        targets: The names written in `folder` (exact names, or a regex of them).

    Returns:
        The removed names. Any other file, whatever its name, stays.
    """
    if not os.path.isdir(folder):
        return []
    ours = ATOMIC_WRITE.pattern(target=targets, suffix=TEMP_SUFFIXES)
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if ours.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", suffix: str = ""):
    """Yields a file to write `path` through; commits it only if the block ends cleanly.

    The temporary file is `temp_path(path, suffix)` (`suffix`: for writers
    that want a given extension, like Keras' `.keras`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path, suffix)
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


# Files of a run folder written through a temporary sibling (`atomic_write`):
# a temporary file is ours to remove only if it stands for one of these.
ATOMIC_OUTPUTS = (
    RUN_RECORD,
    "history.csv",
    "best.keras",
    "model.keras",
    "samples.txt",
    "summary.json",
)
# What a run writes into its folder (`--out`): a folder holding any other
# file is not refused only if it is a run folder (it has our `run.json`).
RUN_OUTPUTS = ATOMIC_OUTPUTS + (
    "checkpoints",
    "data",
    "tokenizer.model",
    "learning_curve.png",
    "tensorboard",
)
# The folder of process i > 0 of a multi-host run, inside process 0's `--out`.
WORKER_FOLDER = re.compile(r"worker-[1-9]\d*")
# Folders a run writes into: each must be a folder (or not exist yet).
RUN_FOLDERS = ("checkpoints", "data", "tensorboard")


def check_folder_owned(out: str) -> None:
    """Refuses an `--out` that is not new, empty or a run folder (our `run.json`).

    Call before anything is written to `out`. What a killed start of a run
    leaves before its `run.json` (the lock, the temporary file of `run.json`,
    the `worker-<i>` folders of the other processes of a multi-host run, each
    one new, empty or a run folder itself) does not count; anything else does,
    whatever its name.

    Raises:
        ConfigError: `out` holds other files (the message names those a run
            would overwrite), or a `run.json` that is not a run record.
    """
    if not os.path.isdir(out):
        return
    record = os.path.join(out, RUN_RECORD)
    if os.path.lexists(record):
        read_run_record(record)  # a run folder only with our run.json
        return
    foreign = sorted(name for name in os.listdir(out) if not _left_by_a_start(out, name))
    if not foreign:
        return
    clashes = [name for name in foreign if name in RUN_OUTPUTS]
    what = (
        f"a run would overwrite {', '.join(clashes)}"
        if clashes
        else f"it holds {len(foreign)} other file(s) ({', '.join(foreign[:5])})"
    )
    raise ConfigError(
        f"--out {out} is not a keras-primer run folder (no run.json) and is not empty: "
        f"{what}. Pass a new or empty folder as --out."
    )


def _left_by_a_start(out: str, name: str) -> bool:
    """Whether `out/name` is what a killed start of a run leaves before its `run.json`."""
    path = os.path.join(out, name)
    if name == LOCK_FILE or ATOMIC_WRITE.matches(name, target=(RUN_RECORD,)):
        return os.path.isfile(path) and not os.path.islink(path)
    if WORKER_FOLDER.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path):
        try:
            check_folder_owned(path)
        except ConfigError:
            return False
        return True
    return False


def claim_folder(out: str) -> None:
    """Checks, under the run's lock, that every folder the run writes into is
    a folder, and removes temporary files that a killed run left."""
    refuse_old_layout(out)
    for name in RUN_FOLDERS:
        path = os.path.join(out, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(
                f"{path} is a file, but the run keeps its {name} in a folder of that name. "
                "Move the file away, or pass another --out."
            )
    CheckpointStore(os.path.join(out, "checkpoints")).remove_leftovers()
    # Our atomic writes that a kill interrupted; this process holds the lock.
    remove_temp_files(out, ATOMIC_OUTPUTS)


def refuse_old_layout(out: str) -> None:
    """Refuses a folder written by keras-primer before checkpoints/ existed."""
    if os.path.isdir(os.path.join(out, "backup")) and not os.path.isdir(
        os.path.join(out, "checkpoints")
    ):
        raise ConfigError(
            f"{out} was written by an older keras-primer (a backup/ folder, no checkpoints/), "
            "which this version cannot resume safely. Pass another --out."
        )


#: The name of a checkpoint file (its group: the step).
CHECKPOINT_NAME = re.compile(r"step-(\d{8})\.npz")


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
        return sorted(
            int(m.group(1)) for n in os.listdir(self.folder) if (m := CHECKPOINT_NAME.fullmatch(n))
        )

    def remove_leftovers(self) -> None:
        """Deletes temporary files of commits that a crash interrupted."""
        remove_temp_files(self.folder, CHECKPOINT_NAME)

    def commit(self, step: int, arrays: list[np.ndarray], state: dict) -> None:
        """Writes checkpoint `step` in one atomic step, then drops the oldest."""
        fault_point(step, "before_write")
        os.makedirs(self.folder, exist_ok=True)
        state = dict(state, step=int(step), format=1)
        members = {f"v{i:05d}": np.asarray(a) for i, a in enumerate(arrays)}
        members["state"] = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8)
        path = self.path(step)
        tmp = temp_path(path)
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

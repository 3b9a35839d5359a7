"""Fault injection: runs killed (SIGKILL) at exact points of checkpointing,
concurrent runs, damaged checkpoints, and every case of issue 12 that
concerns training, each as a regression test.

A killed run is a subprocess that `$KERAS_PRIMER_FAULT=STEP:PHASE` kills
with SIGKILL inside `CheckpointStore.commit` / `RunRecorder` (no clean-up,
like a power cut for the process); the test then reruns the same settings
and compares the final weights, optimizer state and RNG states (bit for bit)
and the history with one uninterrupted run.

Backends: the whole kill matrix runs on TensorFlow and PyTorch; on JAX one
case (a kill mid-epoch, after a commit) runs, because every JAX subprocess
pays XLA compilation again. The in-process cases run on every backend.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from test_training import TINY as TRAINING_TINY

from keras_primer.training import RunConfig, train
from keras_primer.training.run_dir import (
    FAULT_ENV,
    CheckpointStore,
    RunLock,
    RunLockedError,
    temp_path,
)

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A hang guard only (many times a loaded 2-core machine's time): a test fails
# for a wrong result, never for a slow box (issue 20).
HANG_GUARD_S = 1800
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sonnets.txt")

# Dropout on, so the RNG state must survive a resume too.
TINY = TRAINING_TINY.replace(dropout=0.1)
# Columns that are the same in any run of the same definition (the training
# loss is a running mean over the batches one process ran in the epoch, and
# times differ).
EXACT = ("step", "val_loss", "val_accuracy", "val_perplexity", "val_bits_per_char", "learning_rate")


def _config(out, **kwargs):
    values = dict(
        out=str(out),
        data=SAMPLE,
        preset=TINY,
        sample_tokens=0,
        verbose=0,
        tensorboard=False,  # jit_compile "auto", as in test_training
    )
    values.update(kwargs)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (checkpoints at 3, 6, 9 and the final 10)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = train(_config(out))
    return out, summary


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _final(out):
    checkpoint = CheckpointStore(os.path.join(out, "checkpoints")).load_latest()
    return checkpoint["arrays"], checkpoint["state"]["history"]


def _assert_same_run(out, reference_out):
    arrays, history = _final(out)
    ref_arrays, ref_history = _final(reference_out)
    assert len(arrays) == len(ref_arrays)
    for i, (a, b) in enumerate(zip(arrays, ref_arrays)):
        np.testing.assert_array_equal(a, b, err_msg=f"state array {i}")
    assert [r["step"] for r in history] == [5, 10]
    for row, ref in zip(history, ref_history):
        assert {k: row[k] for k in EXACT} == {k: ref[k] for k in EXACT}
    # The history.csv view matches the committed rows: every evaluation once.
    import csv

    with open(os.path.join(out, "history.csv")) as f:
        assert [int(float(r["step"])) for r in csv.DictReader(f)] == [5, 10]
    leftovers = [n for _, _, names in os.walk(out) for n in names if ".tmp-" in n]
    assert not leftovers, leftovers


_KILLED_RUN = textwrap.dedent("""
    import json, sys
    from keras_primer.training import RunConfig, TrainPreset, train
    preset = TrainPreset(**json.loads(sys.argv[2]))
    train(RunConfig(out=sys.argv[1], data=sys.argv[3], preset=preset, sample_tokens=0,
                    verbose=0, tensorboard=False))
""")


def _run_killed_at(out, preset, kill_at):
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND=BACKEND, **{FAULT_ENV: kill_at})
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_RUN,
            str(out),
            json.dumps(dataclasses.asdict(preset)),
            SAMPLE,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


_NOT_JAX = pytest.mark.skipif(
    BACKEND == "jax", reason="JAX recompiles in every subprocess; one kill case runs on JAX"
)


@pytest.mark.parametrize(
    "kill_at, checkpoint_interval, resumes_from",
    [
        # Mid-epoch, right after checkpoint 6 was committed.
        pytest.param("6:after_rename", 3, 6),
        # Before the first commit's rename (issues 5 and 7: a temporary file
        # is left, no checkpoint, nothing evaluated yet): starts again at 0.
        pytest.param("3:before_rename", 3, 0, marks=_NOT_JAX),
        # Issue 1: the row of step 10 reached history.csv, its checkpoint
        # did not: resumes at 5 and logs step 10 exactly once.
        pytest.param("10:after_history", 5, 5, marks=_NOT_JAX),
        # best.keras written at the last step, final checkpoint not.
        pytest.param("10:after_best", 3, 9, marks=[_NOT_JAX, pytest.mark.tensorflow_only]),
    ],
)
def test_killed_run_resumes_identical_to_an_uninterrupted_one(
    tmp_path, reference, kill_at, checkpoint_interval, resumes_from
):
    out = tmp_path / "run"
    preset = TINY.replace(checkpoint_interval=checkpoint_interval)
    _run_killed_at(out, preset, kill_at)
    assert not (out / "model.keras").exists()
    summary = train(_config(out, preset=preset))
    assert summary["resumed_from_step"] == resumes_from
    assert summary["steps"] == 10
    _assert_same_run(out, reference[0])
    assert summary["val_loss"] == reference[1]["val_loss"]
    assert keras.saving.load_model(str(out / "best.keras")).compiled


def test_final_checkpoint_at_the_last_step_and_extending(tmp_path, reference, capsys):
    # Issue 3: 10 steps with checkpoints every 3 still ends with a checkpoint at 10.
    out = _copy(reference, tmp_path)
    assert CheckpointStore(str(out / "checkpoints")).steps() == [9, 10]
    before = (out / "model.keras").read_bytes()
    summary = train(_config(out, preset=TINY.replace(steps=12)))
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12
    assert [r["step"] for r in summary["history"]] == [5, 10, 12]
    assert "extending the run from 10 to 12 steps" in capsys.readouterr().err
    assert (out / "model.keras").read_bytes() != before
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 12 and record["changes"][-1]["kind"] == "steps"
    with pytest.raises(ValueError, match=r"checkpoint at step 12, past --steps 11"):
        train(_config(out, preset=TINY.replace(steps=11)))


@pytest.mark.parametrize(
    "change, shown",
    [
        (dict(seed=1), "seed: 0 -> 1"),
        (dict(preset=TINY.replace(batch_size=8)), "batch_size: 4 -> 8"),
        (dict(preset=TINY.replace(learning_rate=1e-3)), "schedule.learning_rate: 0.003 -> 0.001"),
        ("data", "data.files: [sonnets.txt sha256:"),
    ],
)
def test_changed_run_definition_is_refused_with_a_diff(tmp_path, reference, change, shown):
    # Issue 2: a rerun on an existing --out with other settings used to continue silently.
    out = _copy(reference, tmp_path)
    if change == "data":
        other = tmp_path / "other" / "sonnets.txt"
        other.parent.mkdir()
        other.write_text(open(SAMPLE).read() + "\nOne more line.\n")
        change = dict(data=str(other))
    with pytest.raises(ValueError) as caught:
        train(_config(out, **change))
    message = str(caught.value)
    assert shown in message, message
    assert "another --out" in message and "--fine-tune" in message
    assert "\n" not in message


@pytest.mark.tensorflow_only
def test_fine_tune_accepts_a_changed_definition_but_not_another_model(tmp_path, reference):
    out = _copy(reference, tmp_path)
    with pytest.raises(ValueError, match=r"model: 'primer_ez' -> 'transformer'.*cannot change"):
        train(_config(out, model="transformer", fine_tune=True))
    # Steps to train under the new settings (issue 20: none is refused).
    summary = train(_config(out, seed=1, fine_tune=True, preset=TINY.replace(steps=12)))
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12
    record = json.loads((out / "run.json").read_text())
    assert record["definition"]["seed"] == 1
    assert record["changes"] == [
        {"step": 10, "kind": "fine_tune", "changed": ["seed: 0 -> 1"]},
        {"step": 10, "kind": "steps", "changed": ["steps: 10 -> 12"]},
    ]


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, reference):
    # Issue 6: NaN losses used to be trained on, saved and exited 0.
    out = _copy(reference, tmp_path)
    model_before = (out / "model.keras").read_bytes()
    # Checkpoints only at the last step, so the NaN surely comes first.
    explode = TINY.replace(steps=14, learning_rate=1e30, checkpoint_interval=100)
    with pytest.raises(
        ValueError, match=r"NaN or infinite at step 1[1-4].*last good checkpoint \(step 10\)"
    ):
        train(_config(out, preset=explode, fine_tune=True))
    assert CheckpointStore(str(out / "checkpoints")).steps() == [9, 10]
    assert (out / "model.keras").read_bytes() == model_before
    arrays, _ = _final(out)
    assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")


def test_second_writer_on_one_out_is_refused_naming_the_first(tmp_path):
    # Issue 4: two trainers on one --out used to corrupt each other's files.
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(out / ".lock")!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"training process\\npid %d: the other trainer" % os.getpid())
            print("locked", flush=True)
            time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunLockedError,
            match=rf"in use by another training process \(pid {holder.pid}: the other trainer\).*another --out",
        ):
            train(_config(out))
        assert not (out / "checkpoints").exists() and not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no stale lock: the kernel dropped it.
    with RunLock(str(out)):
        with pytest.raises(RunLockedError):
            RunLock(str(out)).acquire()


@pytest.mark.tensorflow_only
def test_concurrent_trainers_one_wins_the_other_exits_2(tmp_path):
    out = tmp_path / "run"
    go = tmp_path / "go"
    command = [
        sys.executable,
        "-m",
        "keras_primer_cli.train",
        "--out",
        str(out),
        "--data",
        SAMPLE,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--sequence-length",
        "16",
        "--eval-interval",
        "2",
        "--checkpoint-interval",
        "2",
        "--sample-tokens",
        "0",
        "--verbose",
        "0",
        "--no-tensorboard",
        "--jit-compile",
        "false",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow")
    # The first trainer holds at its first commit until `go` exists.
    first = subprocess.Popen(
        command,
        env=dict(env, **{FAULT_ENV: f"2:before_write:wait={go}"}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        import time

        deadline = time.time() + HANG_GUARD_S
        while not (out / "history.csv").exists() and time.time() < deadline:
            time.sleep(0.2)  # step 2's row is written just before its commit
        second = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        go.touch()
        _, first_err = first.communicate(timeout=HANG_GUARD_S)
    finally:
        first.kill()
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr and "another --out" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    with open(out / "history.csv") as f:
        assert len(f.read().strip().splitlines()) == 3  # header + steps 2 and 4


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_checkpoint_gives_one_clear_error(tmp_path, reference, damage):
    # Issue 7: a truncated backup gave an h5py traceback.
    out = _copy(reference, tmp_path)
    path = out / "checkpoints" / "step-00000010.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(
        ValueError,
        match=r"step-00000010\.npz is damaged or truncated .*previous checkpoint \(step 9\)",
    ):
        train(_config(out))
    # Moved away, the previous checkpoint resumes the run to the same end.
    path.rename(tmp_path / "damaged.npz")
    summary = train(_config(out))
    assert summary["resumed_from_step"] == 9
    _assert_same_run(out, reference[0])


def test_empty_history_file_does_not_block_a_resume(tmp_path, reference):
    # Issue 5: an empty history.csv made every resume fail with a TypeError.
    out = _copy(reference, tmp_path)
    (out / "history.csv").write_text("")
    summary = train(_config(out))
    assert [r["step"] for r in summary["history"]] == [5, 10]
    assert (out / "history.csv").read_text().count("\n") == 3


# ----- issue 20: a run folder's own files, damaged or left behind


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ('{"definition": 5}', "without a `definition` object"),
        ("", "not JSON"),
        ("not json {", "not JSON"),
    ],
)
def test_damaged_run_json_is_one_line_naming_the_file(
    tmp_path, reference, capsys, content, problem
):
    # Issue 20: TypeError / AttributeError / "Expecting value" without the file or the fix.
    from keras_primer_cli.train import main

    out = _copy(reference, tmp_path)
    (out / "run.json").write_text(content)
    argv = ["--out", str(out), "--data", SAMPLE, "--sample-tokens", "0", "--steps", "10"]
    assert main(argv + ["--sequence-length", "16", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{out / 'run.json'} is not a keras-primer run record: {problem}" in err
    assert "another --out" in err
    assert (out / "run.json").read_text() == content


def test_rerun_of_a_finished_run_reports_the_measured_throughput(tmp_path, reference):
    # Issue 20: a rerun that trains nothing printed "nan tokens/s" and wrote null.
    out = _copy(reference, tmp_path)
    summary = train(_config(out))
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 10
    measured = summary["history"][-1]["tokens_per_second"]
    assert summary["tokens_per_second"] == measured and math.isfinite(measured)
    assert json.loads((out / "summary.json").read_text())["tokens_per_second"] == measured


def test_fine_tune_that_trains_no_step_is_refused_and_not_recorded(tmp_path, reference):
    # Issue 20: `--fine-tune` with an unchanged --steps recorded a change and trained nothing.
    out = _copy(reference, tmp_path)
    before = (out / "run.json").read_text()
    with pytest.raises(ValueError, match=r"--steps 10 leaves no step to train.*larger than 10"):
        train(_config(out, preset=TINY.replace(learning_rate=1e-3), fine_tune=True))
    assert (out / "run.json").read_text() == before


def test_leftover_temporary_models_of_a_killed_run_are_removed(tmp_path, reference):
    # Issue 20: a resumed run left `.best.keras.tmp-*.keras` behind.
    out = _copy(reference, tmp_path)
    for name in ("best.keras", "model.keras"):
        with open(temp_path(str(out / name), suffix=".keras"), "wb") as f:
            f.write(b"half a zip")
    assert len([n for n in os.listdir(out) if ".tmp-" in n]) == 2
    train(_config(out))
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_checkpoints_path_that_is_a_file_is_refused_before_training(tmp_path, reference):
    # Issue 20: found only at the first checkpoint, after training had started.
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a folder")
    history = (out / "history.csv").read_text()
    with pytest.raises(ValueError, match=r"checkpoints is a file, but the run keeps"):
        train(_config(out, preset=TINY.replace(steps=12)))
    assert (out / "history.csv").read_text() == history  # nothing trained


def test_checkpoint_of_another_backend_resumes(tmp_path, reference):
    # Issue 20: switching --backend failed with "adam_w/iteration: () int32 vs
    # () int64": the backends keep their integer counters at different widths.
    out = _copy(reference, tmp_path)
    store = CheckpointStore(str(out / "checkpoints"))
    latest = store.load_latest()
    other = {np.dtype("int32"): np.int64, np.dtype("int64"): np.int32}
    arrays = [a.astype(other[a.dtype]) if a.dtype in other else a for a in latest["arrays"]]
    assert any(a.dtype != b.dtype for a, b in zip(arrays, latest["arrays"]))
    state = dict(latest["state"], backend="another")
    store.commit(10, arrays, state)
    summary = train(_config(out, preset=TINY.replace(steps=12)))
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12


def test_failed_resume_leaves_run_json_without_the_change(tmp_path, reference):
    # Issue 20: a resume that failed (another backend) left run.json recording
    # an extension that never happened.
    out = _copy(reference, tmp_path)
    before = (out / "run.json").read_text()
    path = out / "checkpoints" / "step-00000010.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged or truncated"):
        train(_config(out, preset=TINY.replace(steps=12)))
    assert (out / "run.json").read_text() == before

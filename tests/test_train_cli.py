"""`keras-primer train`'s front end: flags declared once, checked before any work,
answered without importing a framework; errors as one line with exit code 2."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from export_helpers import SIGINT_PREAMBLE

from keras_primer_cli.errors import printable
from keras_primer_cli.run_config import (
    PRESETS,
    RunConfig,
    build_train_parser,
    config_from_args,
)
from keras_primer_cli.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A hang guard only (many times a loaded 2-core machine's time): a test fails
# for a wrong result, never for a slow box (issue 20).
HANG_GUARD_S = 1800
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sonnets.txt")
HEAVY = ("keras", "tensorflow", "jax", "torch", "keras_primer")


def _framework_free(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs `main(argv)` in a bare interpreter and reports what it imported."""
    script = textwrap.dedent(f"""
        import sys
        from keras_primer_cli.train import main
        try:
            status = main({argv!r})
        except SystemExit as e:
            status = e.code
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print("STATUS", status, "HEAVY", heavy, file=sys.stderr)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("KERAS_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )


@pytest.mark.tensorflow_only
def test_help_needs_no_framework():
    result = _framework_free(["--help"])
    assert "STATUS 0 HEAVY []" in result.stderr, result.stderr
    assert "--vocab-size VOCAB_SIZE" in result.stdout and "--fine-tune" in result.stdout
    assert "nanoGPT shakespeare_char" in result.stdout  # preset descriptions


@pytest.mark.tensorflow_only
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number. Received: nan."),
        (["--learning-rate", "0"], "--learning-rate must be in (0.0, inf)"),
        (
            ["--prompt", ""],
            "Every prompt must be a non-empty string (a prompt is empty). Received: ''.",
        ),
        (["--steps", "0"], "--steps must be at least 1. Received: 0."),
        (["--dropout", "1"], "--dropout must be in [0.0, 1.0)"),
        (["--val-fraction", "0.7"], "--val-fraction must be in (0.0, 0.5]"),
        (["--sample-tokens", "-1"], "--sample-tokens must be 0 or more"),
        (
            ["--tokenizer", "sentencepiece", "--vocab-size", "100"],
            "--vocab-size must be at least 300",
        ),
        (["--data", "/no/such/corpus.txt"], "--data /no/such/corpus.txt does not exist"),
        (
            ["--distribution", "mirrored", "--backend", "jax"],
            "mirrored (tf.distribute) needs the TensorFlow backend",
        ),
        (["--distribution", "data_parallel", "--backend", "torch"], "needs the JAX backend"),
        (["--multi-host"], "--multi-host (keras.distribution.initialize) needs --distribution"),
    ],
)
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, flags, message):
    # Issue 11: `--prompt ""` used to be refused after the whole training run;
    # issue 6: `--learning-rate nan` trained to NaN and exited 0.
    out = tmp_path / "run"
    result = _framework_free(["--out", str(out), *flags])
    assert "STATUS 2 HEAVY []" in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("STATUS")]
    assert lines == [f"keras-primer train: error: {lines[0].split('error: ', 1)[1]}"]
    assert message in lines[0]
    assert not out.exists()  # nothing written


@pytest.mark.tensorflow_only
def test_parser_is_derived_from_run_config():
    parser = build_train_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert set(flags) == set(fields)  # one flag per field, no other
    for name, f in fields.items():
        assert flags[name].help.startswith(f.metadata["help"]), name
    # Defaults: parsing just --out gives RunConfig's own defaults.
    parsed = config_from_args(parser.parse_args(["--out", "o"]))
    assert parsed == RunConfig(out="o")
    assert set(flags["preset"].choices) == set(PRESETS)
    assert set(flags["precision"].choices) == {"float32", "mixed_bfloat16", "mixed_float16"}
    parsed = config_from_args(
        parser.parse_args(
            [
                "--out",
                "o",
                "--prompt",
                "a",
                "--prompt",
                "b",
                "--no-download",
                "--jit-compile",
                "false",
            ]
        )
    )
    assert parsed.prompts == ["a", "b"] and parsed.download is False and parsed.jit_compile is False


@pytest.mark.tensorflow_only
def test_backend_flag_takes_effect_without_a_second_interpreter(tmp_path):
    (tmp_path / "small.txt").write_text("too small for one window")
    script = textwrap.dedent(f"""
        import os, sys
        from keras_primer_cli.train import main
        status = main(["--out", {str(tmp_path / "o")!r}, "--data", {str(tmp_path / "small.txt")!r},
                       "--backend", "torch", "--sample-tokens", "0"])
        import keras
        print("STATUS", status, keras.backend.backend(), os.getpid(), file=sys.stderr)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert "too small" in result.stderr, result.stderr[-3000:]
    assert "STATUS 2 torch" in result.stderr, result.stderr[-3000:]
    assert "oneDNN custom operations" not in result.stderr  # backend logs quiet


def test_expected_failures_are_one_line_and_debug_shows_the_traceback(
    tmp_path, capsys, monkeypatch
):
    # Issue 9: OSError and ImportError surfaced as tracebacks.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["--out", str(blocker / "run"), "--data", SAMPLE, "--sample-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a_file" in err and "--debug" in err

    from keras_primer.training import driver

    def missing(config):
        raise ModuleNotFoundError("No module named 'sentencepiece'")

    monkeypatch.setattr(driver, "locate_corpus", missing)
    argv = ["--out", str(tmp_path / "run"), "--data", SAMPLE, "--sample-tokens", "0"]
    assert main(argv) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("keras-primer train: error: No module named 'sentencepiece'")
    )
    with pytest.raises(ModuleNotFoundError):
        main(argv + ["--debug"])


def test_damaged_checkpoint_is_one_line_with_the_fix(tmp_path, capsys):
    from keras_primer.training.definition import run_definition
    from keras_primer.training.run_data import locate_corpus
    from keras_primer.training.run_dir import CheckpointStore, write_json_atomic
    from keras_primer.training.run_setup import resolve_preset

    out = tmp_path / "run"
    argv = [
        "--out",
        str(out),
        "--data",
        SAMPLE,
        "--sample-tokens",
        "0",
        "--steps",
        "4",
        "--sequence-length",
        "16",
        "--batch-size",
        "2",
    ]
    config = config_from_args(build_train_parser().parse_args(argv))
    preset = resolve_preset(config)
    definition = run_definition(config, preset, locate_corpus(config))
    write_json_atomic(str(out / "run.json"), {"definition": definition, "steps": 4, "changes": []})
    store = CheckpointStore(str(out / "checkpoints"))
    store.commit(4, [], {"history": []})
    with open(store.path(4), "r+b") as f:
        f.truncate(40)
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1
    assert "step-00000004.npz is damaged or truncated" in err and "delete it" in err


@pytest.mark.tensorflow_only
def test_sequence_length_beyond_memory_is_refused_with_the_numbers(tmp_path):
    # Issue 20: `--sequence-length 100000` ran into an out-of-memory traceback.
    out = tmp_path / "run"
    result = _framework_free(["--out", str(out), "--sequence-length", "100000"])
    assert "STATUS 2 HEAVY []" in result.stderr, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith("STATUS")]
    assert line.startswith("keras-primer train: error: --sequence-length 100000 with --batch-size")
    assert "GiB for one step's attention scores" in line and "more than this machine's" in line
    assert not out.exists()


@pytest.mark.tensorflow_only
def test_import_keras_primer_leaves_out_the_driver_run_folder_and_pipeline():
    # Issue 21: `import keras_primer` loaded the training driver and the data pipeline.
    script = textwrap.dedent("""
        import sys
        import keras_primer
        heavy = ("keras_primer.training.driver", "keras_primer.training.run_dir",
                 "keras_primer.training.run_setup", "keras_primer.training.fit_loop",
                 "keras_primer.data.pipeline", "keras_primer.training.callbacks")
        print("LOADED", sorted(m for m in heavy if m in sys.modules))
        from keras_primer.training import train, plan_segments, RunConfig
        from keras_primer.data import load_splits, WindowDataset
        print("LAZY NAMES OK", train.__module__, load_splits.__module__)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert "LOADED []" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "LAZY NAMES OK keras_primer.training.driver keras_primer.data.pipeline" in result.stdout


def test_out_that_is_not_a_run_folder_is_refused_naming_what_it_would_overwrite(tmp_path, capsys):
    # Issue 20: a folder of the user's own history.csv, model.keras and summary.json
    # (no run.json) was overwritten with rc 0.
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("history.csv", "model.keras", "summary.json"):
        (out / name).write_text("the user's own")
    argv = ["--out", str(out), "--data", SAMPLE, "--sample-tokens", "0", "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "not a keras-primer run folder (no run.json)" in err
    assert "would overwrite history.csv, model.keras, summary.json" in err
    assert sorted(os.listdir(out)) == ["history.csv", "model.keras", "summary.json"]
    assert all((out / n).read_text() == "the user's own" for n in os.listdir(out))


def test_spm_model_that_is_not_a_model_names_the_file(tmp_path, capsys):
    # Issue 20: a SentencePiece INTERNAL message without the file.
    pytest.importorskip("sentencepiece")
    fake = tmp_path / "fake.model"
    fake.write_text("not a sentencepiece model\n")
    out = tmp_path / "run"
    argv = ["--out", str(out), "--data", SAMPLE, "--sample-tokens", "0"]
    assert main(argv + ["--tokenizer", "sentencepiece", "--spm-model", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--spm-model {fake} is not a usable SentencePiece model" in err
    assert not out.exists()


def test_binary_data_is_refused_as_not_text(tmp_path, capsys):
    # Issue 20: `--data` accepted a binary file as text.
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--data", str(binary), "--sample-tokens", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--data file {binary} is not text (it holds NUL bytes)" in err
    assert not (out / "data").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("name", [".draft.tmp-1", "worker-notes.txt", ".run.json.tmp-1"])
def test_user_files_named_like_ours_are_not_taken_for_ours(tmp_path, capsys, name):
    # Issue 32: `.draft.tmp-1` was taken for a temporary file of ours and deleted
    # (rc 0); a folder holding only `worker-notes.txt` was taken for a run folder.
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("the user's own")
    argv = ["--out", str(out), "--data", SAMPLE, "--sample-tokens", "0", "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "not a keras-primer run folder (no run.json)" in err and name in err
    assert os.listdir(out) == [name] and (out / name).read_text() == "the user's own"


def test_a_start_that_was_killed_is_ours_to_take_over(tmp_path):
    # What a killed start leaves before its run.json: the lock, run.json's
    # temporary file, another host's empty worker folder. Nothing else.
    from keras_primer.training.run_dir import check_folder_owned, temp_path

    out = tmp_path / "run"
    (out / "worker-1").mkdir(parents=True)
    (out / "worker-1" / ".lock").write_text("pid 1")
    (out / ".lock").write_text("pid 1")
    ours = temp_path(str(out / "run.json"))
    with open(ours, "w") as f:
        f.write("{")
    check_folder_owned(str(out))  # not refused
    (out / "worker-1" / "notes.txt").write_text("the user's own")
    with pytest.raises(ValueError, match=r"it holds 1 other file\(s\) \(worker-1\)"):
        check_folder_owned(str(out))


def test_only_temporary_files_of_our_exact_names_are_removed(tmp_path):
    from keras_primer.training.run_dir import claim_folder, temp_path

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ours = [
        temp_path(str(out / "model.keras"), suffix=".keras"),
        temp_path(str(out / "history.csv")),
        temp_path(str(out / "checkpoints" / "step-00000003.npz")),
    ]
    users = [
        out / ".draft.tmp-1",
        out / ".history.csv.tmp-1",  # no unique suffix
        out / ".notes.txt.tmp-1-0123abcd",  # not a file a run writes
        out / "checkpoints" / ".step-3.npz.tmp-1-0123abcd",
    ]
    for path in ours + users:
        with open(path, "w") as f:
            f.write("x")
    claim_folder(str(out))
    assert not [p for p in ours if os.path.exists(p)]
    assert all(p.read_text() == "x" for p in users)


def test_lock_records_the_command_line_as_the_bytes_it_was_given(tmp_path, monkeypatch):
    # Issue 32: a non-UTF-8 byte in argv failed train and export at the lock.
    from keras_primer_cli.folder_lock import FolderLock

    argv = [b"keras-primer", b"train", b"--out", b"runs/bad\xff", b"--prompt", b"\xfe"]
    monkeypatch.setattr(sys, "argv", [os.fsdecode(a) for a in argv])
    with FolderLock(str(tmp_path), "training process"):
        record = (tmp_path / ".lock").read_bytes()
    assert record.endswith(b": " + b" ".join(argv)), record


def test_prompt_that_is_not_unicode_is_refused_only_when_used(tmp_path, capsys):
    # Issue 32: the generation contract's Unicode rule judges the bytes given.
    argv = ["--out", str(tmp_path / "run"), "--data", SAMPLE, "--prompt", os.fsdecode(b"x\xff")]
    assert main(argv + ["--sample-tokens", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--prompt: Every prompt must be valid Unicode text" in err
    assert "Received: b'x\\xff' (invalid UTF-8 at byte 1)" in err
    assert not (tmp_path / "run").exists()


def test_prompt_with_a_special_byte_is_refused_before_training(tmp_path, capsys):
    # Issue 32: with the byte tokenizer a NUL (the pad id) in --prompt was refused
    # only at the sample step, after the whole training run.
    argv = ["--out", str(tmp_path / "run"), "--data", SAMPLE, "--prompt", "a\x00b"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "U+0000 at character 1 is the special id 0" in err
    assert not (tmp_path / "run").exists()
    # SentencePiece encodes a NUL as a byte piece: not refused by this check.
    from keras_primer_cli.run_config import check_prompt

    assert check_prompt("a\x00b") == "a\x00b"


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_paths_that_are_not_utf8_round_trip(tmp_path):
    # Issue 32: `--out $'runs/bad\xff'` (or an unused `--prompt $'\xff'`) failed at
    # the lock; then TensorBoard's writer. Each argument must come back as its bytes:
    # in the lock file, in run.json (a corpus file name), on a strict stdout.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    file_name = b"sonnets\xfe.txt"
    with open(os.path.join(os.fsencode(corpus), file_name), "wb") as f, open(SAMPLE, "rb") as s:
        f.write(s.read())
    out = os.path.join(os.fsencode(tmp_path), b"runs", b"bad\xff")
    argv = [b"--out", out, b"--data", os.fsencode(corpus), b"--steps", b"2"]
    argv += [b"--sequence-length", b"16", b"--batch-size", b"2", b"--sample-tokens", b"0"]
    argv += [b"--prompt", b"x\xff"]
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow", PYTHONIOENCODING="utf-8")
    command = [sys.executable.encode(), b"-m", b"keras_primer_cli.train", *argv]
    for attempt in ("first", "rerun"):
        result = subprocess.run(
            command, env=env, capture_output=True, timeout=HANG_GUARD_S, cwd=ROOT
        )
        assert result.returncode == 0, (attempt, result.stderr[-3000:])
        assert f"Outputs in {printable(os.fsdecode(out))}".encode() in result.stdout
    assert b"skip TensorBoard logs (TensorFlow writes only to UTF-8 paths)" in result.stderr
    with open(os.path.join(out, b".lock"), "rb") as f:
        assert f.read().endswith(b" ".join(argv))
    with open(os.path.join(out, b"run.json"), encoding="utf-8") as f:
        files = json.load(f)["definition"]["data"]["files"]
    assert [os.fsencode(name) for name, _ in files] == [file_name]


def test_run_folder_inside_data_is_not_corpus_and_extends(tmp_path, capsys):
    # Issue 32: with --out inside the --data folder, the run's own samples.txt
    # became corpus, and extending the run was refused as "a different run".
    data = tmp_path / "corpus"
    data.mkdir()
    with open(SAMPLE, encoding="utf-8") as f, open(data / "sonnets.txt", "w") as g:
        g.write(f.read())
    out = data / "runs" / "a"
    argv = ["--out", str(out), "--data", str(data), "--sequence-length", "16"]
    argv += ["--batch-size", "2", "--sample-tokens", "4", "--no-tensorboard", "--verbose", "0"]
    assert main(argv + ["--steps", "2"]) == 0, capsys.readouterr().err
    assert (out / "samples.txt").exists()
    capsys.readouterr()
    assert main(argv + ["--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "different run" not in err and "extending the run from 2 to 3 steps" in err
    assert (
        f"skips 1 folder(s) written by keras-primer (run folders and exports, never corpus): {out}"
        in err
    )
    files = json.loads((out / "run.json").read_text())["definition"]["data"]["files"]
    assert [name for name, _ in files] == ["sonnets.txt"]


# Runs `keras-primer train ARGV` in a fresh interpreter that sends itself SIGINT
# (what Ctrl-C sends) at one point (argv[1]).
_INTERRUPTED_TRAIN = SIGINT_PREAMBLE + textwrap.dedent("""
    if where == "before_keras":
        import keras_primer_cli.train as cli

        use_backend = cli._use_backend

        def interrupted(backend):
            assert "keras" not in sys.modules
            interrupt()
            use_backend(backend)

        cli._use_backend = interrupted
    else:
        import keras
        from keras_primer.training import driver

        make_callbacks = driver.make_callbacks

        def at_the_second_step(batch, logs=None):
            if batch != 1:
                return
            if where == "training":
                interrupt()
            else:
                interrupt_during_gc()

        def with_an_interrupt(run, lm, extra=None):
            callbacks = make_callbacks(run, lm, extra)
            callbacks.all.append(keras.callbacks.LambdaCallback(on_train_batch_end=at_the_second_step))
            return callbacks

        driver.make_callbacks = with_an_interrupt

    from keras_primer_cli.train import main

    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("where", ["before_keras", "training", "collecting_garbage"])
def test_ctrl_c_ends_training_with_130_and_one_line(tmp_path, where):
    # Issue 32: the same Ctrl-C contract as the export's (a lost one would train on).
    out = tmp_path / "run"
    argv = ["--out", str(out), "--data", SAMPLE, "--steps", "200", "--sequence-length", "16"]
    argv += ["--batch-size", "2", "--sample-tokens", "0", "--verbose", "0", "--no-tensorboard"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "runtime")]))
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_TRAIN, where, *argv, "--backend", "tensorflow"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == 130, result.stderr[-3000:]
    outcome = (
        "nothing written to --out"
        if where == "before_keras"
        else "the last checkpoint is kept; rerun the same command to resume"
    )
    assert result.stderr == f"keras-primer train: interrupted: {outcome}\n"
    if where == "before_keras":
        assert not out.exists()
    else:
        assert not (out / "model.keras").exists()  # stopped long before the last step


# Runs `keras-primer train ARGV` (argv[2:]) in a bare interpreter in which the
# modules named in argv[1] (comma-separated) cannot be imported.
_WITHOUT_MODULES = textwrap.dedent("""
    import sys
    for name in filter(None, sys.argv[1].split(",")):
        sys.modules[name] = None  # as if it were not installed
    from keras_primer_cli.train import main
    status = main(sys.argv[2:])
    print("STATUS", status, "KERAS", "keras" in sys.modules, file=sys.stderr)
""")


@pytest.mark.tensorflow_only
@pytest.mark.parametrize(
    "keras_backend, flags, missing, message",
    [
        (
            "nonsense",
            [],
            "",
            "KERAS_BACKEND='nonsense' is not a Keras backend keras-primer runs on: set it to one "
            "of tensorflow, jax, torch (or unset it), or pass --backend.",
        ),
        (
            None,
            ["--backend", "torch"],
            "torch",
            "--backend torch needs the `torch` package, which is not installed: "
            'pip install "keras-primer[torch]", or choose another backend.',
        ),
        (
            None,
            ["--backend", "jax"],
            "jax",
            "--backend jax needs the `jax` package, which is not installed: "
            'pip install "keras-primer[jax]", or choose another backend.',
        ),
        (
            "jax",
            [],
            "jax",
            "KERAS_BACKEND=jax needs the `jax` package, which is not installed: "
            'pip install "keras-primer[jax]", or choose another backend.',
        ),
    ],
)
def test_backend_choice_is_checked_in_one_line(tmp_path, keras_backend, flags, missing, message):
    # Issue 32: `KERAS_BACKEND=nonsense` was "Unable to import backend : nonsense";
    # `--backend torch` without torch had no install hint.
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "runtime")]))
    env.pop("KERAS_BACKEND", None)
    if keras_backend:
        env["KERAS_BACKEND"] = keras_backend
    argv = ["--out", str(out), "--data", SAMPLE, *flags]
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MODULES, missing, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    lines = result.stderr.splitlines()
    assert lines == [f"keras-primer train: error: {message}", "STATUS 2 KERAS False"], lines
    assert not out.exists()

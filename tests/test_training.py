"""Training driver, outputs, step-exact resume, schedule, CLI errors."""

import csv
import json
import math
import os
import warnings

import keras
import numpy as np
import pytest

from keras_primer.training import RunConfig, TrainPreset, plan_segments, train
from keras_primer.training.optimizer import learning_rate_schedule

TINY = TrainPreset(
    num_layers=1,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    sequence_length=16,
    dropout=0.0,
    batch_size=4,
    steps=10,
    learning_rate=3e-3,
    min_learning_rate=3e-4,
    warmup_steps=2,
    eval_interval=5,
    eval_windows=8,
    checkpoint_interval=3,
)


def _config(out, data, **kwargs):
    defaults = dict(
        out=str(out),
        data=data,
        preset=TINY,
        sample_tokens=8,
        verbose=0,
        tensorboard=False,
        # jit_compile stays "auto": XLA on JAX (eager JAX compiles every op of
        # every new shape: a tiny run takes 72 s eager, 20 s jitted on 2 cores),
        # graph mode on TensorFlow's CPU and PyTorch's eager mode.
    )
    defaults.update(kwargs)
    return RunConfig(**defaults)


def test_schedule_warmup_then_cosine():
    schedule = learning_rate_schedule(1.0, 0.1, warmup_steps=4, total_steps=14)
    lr = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 3, 4, 9, 14, 20)]
    np.testing.assert_allclose(lr, [0.25, 0.8125, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    # keras' own schedule, so a saved optimizer needs nothing of ours to load.
    assert type(schedule) is keras.optimizers.schedules.CosineDecay


@pytest.mark.tensorflow_only
def test_plan_segments_align_epochs_with_eval_points():
    assert plan_segments(0, 10, 5) == [(0, 0, 2, 5)]
    assert plan_segments(6, 10, 5) == [(6, 1, 2, 4)]
    assert plan_segments(3, 12, 5) == [(3, 0, 1, 2), (5, 1, 2, 5), (10, 2, 3, 2)]
    assert plan_segments(10, 10, 5) == []


@pytest.mark.slow
def test_train_writes_every_output(tmp_path, sample_text_path):
    data = sample_text_path
    summary = train(_config(tmp_path / "run", data, model="transformer"))
    out = tmp_path / "run"
    for name in (
        "model.keras",
        "best.keras",
        "history.csv",
        "learning_curve.png",
        "samples.txt",
        "summary.json",
        "run.json",
        "checkpoints/step-00000010.npz",
    ):
        assert (out / name).exists(), name
    assert summary["steps"] == 10
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [5, 10]
    assert {"loss", "val_loss", "val_bits_per_char", "wall_time", "tokens_per_second"} <= set(
        rows[0]
    )
    saved = json.load(open(out / "summary.json"))
    for key in ("val_loss", "val_bits_per_char", "tokens_per_second", "wall_time_s"):
        assert math.isfinite(saved[key]) and saved[key] > 0, key
    # Byte-level Shakespeare is ASCII: bits per char = loss / ln 2.
    assert saved["val_bits_per_char"] == pytest.approx(saved["val_loss"] / math.log(2), rel=1e-3)
    assert saved["val_loss"] < math.log(256)  # it learned something
    assert saved["samples"]["ROMEO:"].startswith("ROMEO:")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = keras.saving.load_model(str(out / "model.keras"))
    assert not [w for w in caught if "compile()" in str(w.message)], [
        str(w.message) for w in caught
    ]
    assert lm.backbone.use_dconv is False
    # Compiled as saved: the optimizer state continues at step 10, same sampler.
    assert isinstance(lm.optimizer, keras.optimizers.AdamW)
    assert int(keras.ops.convert_to_numpy(lm.optimizer.iterations)) == 10
    # The one sampling default: greedy, so model.keras, samples.txt and the
    # exports generate the same text.
    assert type(lm.sampler).__name__ == "ContractSampler" and lm.sampler.options.greedy
    assert saved["samples"]["ROMEO:"].startswith(lm.generate("ROMEO:", max_length=12))
    assert keras.saving.load_model(str(out / "best.keras")).compiled


@pytest.mark.tensorflow_only
def test_resume_with_another_vocabulary_is_an_error(tmp_path, sample_text_path):
    data = sample_text_path
    tiny = TINY.replace(steps=1, eval_interval=1)
    train(_config(tmp_path / "run", data, preset=tiny, sample_tokens=0))
    with pytest.raises(
        ValueError, match=r"tokenizer.kind: 'bytes' -> 'sentencepiece'.*cannot change"
    ):
        train(
            _config(
                tmp_path / "run",
                data,
                preset=tiny,
                tokenizer="sentencepiece",
                vocabulary_size=320,
                fine_tune=True,
            )
        )


@pytest.mark.tensorflow_only
def test_cli_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    from keras_primer_cli.train import main

    monkeypatch.delenv("KERAS_PRIMER_SHAKESPEARE", raising=False)
    status = main(["--out", str(tmp_path / "o"), "--no-download"])
    assert status == 2
    err = capsys.readouterr().err
    assert "KERAS_PRIMER_SHAKESPEARE" in err and "--data" in err
    (tmp_path / "small.txt").write_text("tiny corpus")
    assert main(["--out", str(tmp_path / "o2"), "--data", str(tmp_path / "small.txt")]) == 2
    assert "too small" in capsys.readouterr().err


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_sentencepiece_training_run(tmp_path, sample_text_path):
    data = sample_text_path
    summary = train(
        _config(
            tmp_path / "run",
            data,
            tokenizer="sentencepiece",
            vocabulary_size=400,
            preset=TINY.replace(steps=4, eval_interval=2),
        )
    )
    assert (tmp_path / "run" / "tokenizer.model").exists()
    assert summary["tokenizer"]["vocabulary_size"] == 400
    # Bits per character account for several characters per piece.
    ratio = summary["val_bits_per_char"] / (summary["val_loss"] / math.log(2))
    assert 0.2 < ratio < 0.9, ratio
    assert summary["samples"]["ROMEO:"].startswith("ROMEO:")


def test_feedback_model_trains(tmp_path, sample_text_path):
    data = sample_text_path
    summary = train(
        _config(
            tmp_path / "fb", data, model="feedback", preset=TINY.replace(steps=2, eval_interval=2)
        )
    )
    assert summary["steps"] == 2 and math.isfinite(summary["val_loss"])


@pytest.mark.tensorflow_only
def test_steps_to_reach_interpolates():
    from keras_primer.training.compare_report import steps_to_reach

    history = [
        {"step": 10, "val_loss": 3.0},
        {"step": 20, "val_loss": 2.0},
        {"step": 30, "val_loss": 1.5},
    ]
    assert steps_to_reach(history, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(history, 3.5) == 10.0
    assert steps_to_reach(history, 1.0) is None


@pytest.mark.tensorflow_only
@pytest.mark.slow
@pytest.mark.parametrize("seeds", [None, (0, 1)])
def test_comparison_writes_table_and_plot(tmp_path, sample_text_path, seeds):
    from keras_primer.training.compare import compare

    data = sample_text_path
    base = _config(
        tmp_path / "cmp", data, preset=TINY.replace(steps=4, eval_interval=2), sample_tokens=0
    )
    result = compare(base, ("primer_ez", "transformer"), seeds=seeds)
    models = ["primer_ez", "transformer"]
    if seeds is None:
        assert [row["model"] for row in result["rows"]] == models
    else:
        assert [(r["seed"], r["model"]) for r in result["rows"]] == [
            (s, m) for s in seeds for m in models
        ]
        for seed in seeds:
            summary = json.loads(
                (tmp_path / "cmp" / "transformer" / f"seed-{seed}" / "summary.json").read_text()
            )
            assert summary["config"]["seed"] == seed
        # Different seeds: different weights and batches, so different losses.
        losses = [r["val_loss"] for r in result["rows"] if r["model"] == "transformer"]
        assert losses[0] != losses[1]
        # The baseline reaches its own final loss at its last step in every seed.
        assert result["spread"]["transformer"]["step_ratio"]["mean"] == 1.0
    for name in ("comparison.md", "comparison.csv", "comparison.png", "comparison.json"):
        assert (tmp_path / "cmp" / name).exists(), name
    assert "primer_ez" in (tmp_path / "cmp" / "comparison.md").read_text()


class _OptimizerSpy(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.optimizer = self.model.optimizer


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_run(tmp_path, sample_text_path, precision):
    data = sample_text_path
    config = _config(
        tmp_path / precision,
        data,
        precision=precision,
        preset=TINY.replace(steps=2, eval_interval=2),
    )
    if precision == "mixed_float16" and keras.backend.backend() == "jax":
        import jax

        if jax.default_backend() == "cpu":
            with pytest.raises(ValueError, match="Use mixed_bfloat16 on a CPU"):
                train(config)
            return
    spy = _OptimizerSpy()
    summary = train(config, extra_callbacks=[spy])
    assert summary["precision"] == precision and math.isfinite(summary["val_loss"])
    # float16 needs loss scaling against underflow; bfloat16 does not.
    scaled = isinstance(spy.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")
    lm = keras.saving.load_model(str(tmp_path / precision / "model.keras"))
    assert lm.backbone.dtype_policy.name == precision
    assert {v.dtype for v in lm.backbone.weights} == {"float32"}  # float32 master weights
    assert lm.backbone.compute_dtype == precision.split("_")[1]


# ----- the pipeline's stages, one at a time -----


@pytest.mark.tensorflow_only
def test_run_definition_keys_on_content_and_diff_names_each_change(tmp_path, sample_text_path):
    from keras_primer.training.definition import definition_diff, run_definition
    from keras_primer.training.run_data import locate_corpus

    config = _config(tmp_path / "run", sample_text_path)
    corpus = locate_corpus(config)
    ((name, size, sha),) = corpus.fingerprint
    assert name == "sonnets.txt" and size == os.path.getsize(sample_text_path) and len(sha) == 64
    definition = run_definition(config, TINY, corpus)
    assert definition["data"]["files"] == [[name, sha]]
    # A copy elsewhere is the same data; a changed seed and schedule are not the same run.
    copy = tmp_path / "elsewhere" / "sonnets.txt"
    copy.parent.mkdir()
    copy.write_bytes(open(sample_text_path, "rb").read())
    moved = run_definition(
        _config(tmp_path / "run", str(copy)), TINY, locate_corpus(_config(tmp_path, str(copy)))
    )
    assert definition_diff(definition, moved) == []
    other = run_definition(
        _config(tmp_path / "run", sample_text_path, seed=2), TINY.replace(warmup_steps=3), corpus
    )
    assert definition_diff(definition, other) == ["schedule.warmup_steps: 2 -> 3", "seed: 0 -> 2"]


@pytest.mark.tensorflow_only
def test_reconcile_run_fresh_same_extended(tmp_path):
    from keras_primer.training.definition import reconcile_run

    notes = []
    definition = {"model": "primer_ez", "seed": 0}
    reconcile_run(str(tmp_path), definition, 10, None, say=notes.append)
    assert json.load(open(tmp_path / "run.json"))["steps"] == 10
    reconcile_run(str(tmp_path), definition, 10, 10, say=notes.append)
    assert notes == []
    record = reconcile_run(str(tmp_path), definition, 20, 10, say=notes.append)
    assert record["steps"] == 20 and "extending the run from 10 to 20 steps" in notes[0]
    with pytest.raises(ValueError, match=r"seed: 0 -> 1.*another --out.*--fine-tune"):
        reconcile_run(str(tmp_path), dict(definition, seed=1), 20, 10)


@pytest.mark.tensorflow_only
def test_missing_optional_packages_are_said_once_and_the_run_finishes(
    tmp_path, sample_text_path, monkeypatch, capsys
):
    from keras_primer.training import run_setup

    monkeypatch.setattr(run_setup, "_installed", lambda package: False)
    summary = train(
        _config(
            tmp_path / "run",
            sample_text_path,
            tensorboard=True,
            sample_tokens=0,
            preset=TINY.replace(steps=2, eval_interval=2),
        )
    )
    err = capsys.readouterr().err
    assert err.count("will skip") == 1
    assert "learning_curve.png (matplotlib is not installed)" in err and "TensorBoard" in err
    assert summary["files"]["learning_curve"] is None and summary["steps"] == 2
    assert not (tmp_path / "run" / "learning_curve.png").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.tensorflow_only
def test_library_train_refuses_another_backend_than_the_running_one(tmp_path, sample_text_path):
    other = "jax" if keras.backend.backend() != "jax" else "torch"
    with pytest.raises(
        ValueError, match=rf"runs Keras on '{keras.backend.backend()}', not '{other}'"
    ):
        train(_config(tmp_path / "run", sample_text_path, backend=other))
    assert not (tmp_path / "run").exists()

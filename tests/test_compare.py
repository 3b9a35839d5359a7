"""Time to quality against keras-hub GPT-2 (`keras_primer.training.compare`).

Most tests use hand-made histories (no training): the oracles are worked out
by hand from the curves below. One tiny end-to-end run checks that the GPT-2
arm is keras-hub's model of the same size and that every arm of a seed sees
the very same batches.
"""

import csv
import hashlib
import json
import math

import pytest

pytestmark = pytest.mark.tensorflow_only


def _summary(losses, final, steps=20, seconds_per_step=0.5):
    """A `summary.json` as `train` writes it, with the fields the report reads."""
    history = [
        {"step": step, "val_loss": loss, "wall_time": step * seconds_per_step}
        for step, loss in losses
    ]
    return {
        "parameters": 100,
        "steps": steps,
        "val_loss": final,
        "val_bits_per_char": final / math.log(2.0),
        "tokens_per_second": 500.0 / seconds_per_step,
        "wall_time_s": steps * seconds_per_step,
        "history": history,
    }


# --------------------------------------------------------- time to target


def test_steps_to_reach_first_crossing_interpolated():
    from keras_primer.training.compare_report import steps_to_reach

    # Falls to 2.0 between steps 10 (3.0) and 20 (1.0), goes back above it,
    # and falls below it again: the first crossing counts, interpolated.
    history = [
        {"step": 10, "val_loss": 3.0, "wall_time": 4.0},
        {"step": 15, "loss": 2.5},  # a row without validation is skipped
        {"step": 20, "val_loss": 1.0, "wall_time": 8.0},
        {"step": 30, "val_loss": 2.4, "wall_time": 12.0},
        {"step": 40, "val_loss": 0.5, "wall_time": 16.0},
    ]
    assert steps_to_reach(history, 2.0) == pytest.approx(15.0)
    assert steps_to_reach(history, 2.0, key="wall_time") == pytest.approx(6.0)
    # 3/4 of the way from 3.0 to 1.0.
    assert steps_to_reach(history, 1.5) == pytest.approx(17.5)
    # Below the first evaluation already: nothing is known before it.
    assert steps_to_reach(history, 3.5) == 10.0
    # Exactly equal counts as reached.
    assert steps_to_reach(history, 1.0) == pytest.approx(20.0)
    # Never reached.
    assert steps_to_reach(history, 0.1) is None
    assert steps_to_reach([], 1.0) is None


# Keras-hub GPT-2 (the reference) ends at 2.0 after 20 steps in every seed.
# seed 0: Primer EZ crosses 2.0 halfway between steps 10 (2.5) and 20 (1.5):
#         15 steps -> 0.75; at 1 s/step, 15 s against GPT-2's 10 s -> 1.5.
#         The Transformer never gets there (2.2) -> not reached.
# seed 1: Primer EZ is at 2.0 at its first evaluation: 10 steps, 5 s -> 0.5, 0.5.
#         The Transformer crosses at 18 (2.4 -> 1.9 between 10 and 20) -> 0.9.
# seed 2: Primer EZ never gets below 2.2 -> not reached; Transformer at 20 -> 1.0.
GPT2 = _summary([(10, 3.0), (20, 2.0)], 2.0)
BY_SEED = {
    0: {
        "gpt2": GPT2,
        "primer_ez": _summary([(10, 2.5), (20, 1.5)], 1.5, seconds_per_step=1.0),
        "transformer": _summary([(10, 2.6), (20, 2.2)], 2.2),
    },
    1: {
        "gpt2": GPT2,
        "primer_ez": _summary([(10, 2.0), (20, 1.8)], 1.8),
        "transformer": _summary([(10, 2.4), (20, 1.9)], 1.9),
    },
    2: {
        "gpt2": GPT2,
        "primer_ez": _summary([(10, 2.6), (20, 2.2)], 2.2),
        "transformer": _summary([(10, 2.5), (20, 2.0)], 2.0),
    },
}


def test_rows_against_gpt2():
    from keras_primer.training.compare_report import comparison_rows, reference_model

    assert reference_model(BY_SEED[0]) == "gpt2"
    rows = {r["model"]: r for r in comparison_rows(BY_SEED[0])}
    primer = rows["primer_ez"]
    assert (primer["steps_to_target"], primer["seconds_to_target"]) == (15.0, 15.0)
    assert (primer["step_ratio"], primer["time_ratio"]) == (0.75, 1.5)
    assert primer["train_time_ratio"] == 1.5  # 0.75 of the steps at half the tokens/s
    assert rows["gpt2"]["train_time_ratio"] == 1.0
    # GPT-2 reaches its own final loss at its last step and evaluation.
    assert (rows["gpt2"]["step_ratio"], rows["gpt2"]["time_ratio"]) == (1.0, 1.0)
    transformer = rows["transformer"]
    assert transformer["steps_to_target"] is None and transformer["time_ratio"] is None
    # Without GPT-2 the Transformer is the target (the older comparison).
    rows = {
        r["model"]: r
        for r in comparison_rows({m: BY_SEED[0][m] for m in ("primer_ez", "transformer")})
    }
    assert rows["primer_ez"]["steps_to_target"] == pytest.approx(13.0)  # 2.5 -> 1.5 crosses 2.2
    assert rows["transformer"]["step_ratio"] == 1.0
    # Feedback + MDHA against the Feedback Transformer, its baseline: the same
    # curves under the Feedback names (the target: 2.2 after 20 steps).
    rows = {
        r["model"]: r
        for r in comparison_rows(
            {"feedback_primer_ez": BY_SEED[0]["primer_ez"], "feedback": BY_SEED[0]["transformer"]}
        )
    }
    assert rows["feedback_primer_ez"]["steps_to_target"] == pytest.approx(13.0)
    assert rows["feedback_primer_ez"]["step_ratio"] == pytest.approx(0.65)
    assert rows["feedback"]["step_ratio"] == 1.0
    # None of them: no target, no time-to-target columns.
    rows = comparison_rows({"primer_ez": BY_SEED[0]["primer_ez"]})
    assert rows[0]["step_ratio"] is None


def test_spread_statistics():
    from keras_primer.training.compare_report import spread

    stats = spread([0.75, 0.5, None])
    assert stats["n"] == 2 and stats["missing"] == 1
    assert stats["mean"] == pytest.approx(0.625)
    # sample std (n - 1): sqrt((0.125^2 + 0.125^2) / 1)
    assert stats["std"] == pytest.approx(0.1768, abs=1e-4)
    assert (stats["min"], stats["max"]) == (0.5, 0.75)
    assert spread([0.4])["std"] is None  # one seed: no spread
    assert spread([None, None])["mean"] is None


def test_report_seeds_against_gpt2(tmp_path):
    from keras_primer.training.compare_report import report_seeds

    result = report_seeds(BY_SEED, str(tmp_path))
    assert result["seeds"] == [0, 1, 2] and result["reference"] == "gpt2"
    # Seed 0's Primer EZ trains at half GPT-2's tokens/s: 0.75 * 2 = 1.5.
    assert result["per_seed"] == {
        0: {"step_ratio": 0.75, "time_ratio": 1.5, "train_time_ratio": 1.5},
        1: {"step_ratio": 0.5, "time_ratio": 0.5, "train_time_ratio": 0.5},
        2: {"step_ratio": None, "time_ratio": None, "train_time_ratio": None},
    }
    assert result["primer_step_ratio"] == pytest.approx(0.625)
    assert result["primer_time_ratio"] == pytest.approx(1.0)
    assert result["primer_train_time_ratio"] == pytest.approx(1.0)
    ratio = result["primer_step_ratio_spread"]
    assert (ratio["n"], ratio["missing"]) == (2, 1)
    assert ratio["std"] == pytest.approx(0.1768, abs=1e-4)
    # The Transformer: seed 0 never, seed 1 at 18 steps (9 s), seed 2 at 20 (10 s).
    transformer = result["spread"]["transformer"]
    assert transformer["steps_to_target"] == {
        "n": 2,
        "missing": 1,
        "mean": 19.0,
        "std": pytest.approx(1.4142, abs=1e-4),
        "min": 18.0,
        "max": 20.0,
    }
    assert transformer["seconds_to_target"]["mean"] == pytest.approx(9.5)
    assert transformer["step_ratio"]["mean"] == pytest.approx(0.95)
    losses = result["spread"]["primer_ez"]["val_loss"]
    assert losses["mean"] == pytest.approx((1.5 + 1.8 + 2.2) / 3, abs=1e-4)
    assert (losses["min"], losses["max"]) == (1.5, 2.2)
    assert result["spread"]["gpt2"]["val_loss"]["std"] == 0.0

    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 + 3 * 4  # a row per seed and model, 4 statistics per model
    mean = next(r for r in rows if r["seed"] == "mean" and r["model"] == "primer_ez")
    assert float(mean["step_ratio"]) == pytest.approx(0.625)
    assert float(mean["steps_to_target"]) == pytest.approx(12.5)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["per_seed"]["2"] == {
        "step_ratio": None,
        "time_ratio": None,
        "train_time_ratio": None,
    }
    text = (tmp_path / "comparison.md").read_text()
    assert "0.625 ± 0.1768 [0.5, 0.75] (n=2 of 3)" in text
    assert "keras-hub GPT-2 (`gpt2`)" in text
    assert "2: not reached" in text
    assert (tmp_path / "comparison.png").exists()


def test_report_seeds_refuses_seeds_with_other_models(tmp_path):
    from keras_primer.training.compare_report import report_seeds

    uneven = {0: BY_SEED[0], 1: {"gpt2": GPT2, "primer_ez": BY_SEED[1]["primer_ez"]}}
    with pytest.raises(ValueError, match="same models"):
        report_seeds(uneven, str(tmp_path))


def test_report_only_reads_every_seed(tmp_path):
    from recipes.compare import main

    for seed, summaries in BY_SEED.items():
        for model, summary in summaries.items():
            folder = tmp_path / model / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(summary))
    argv = ["--out", str(tmp_path), "--models", "gpt2,primer_ez,transformer", "--report-only"]
    assert main(argv + ["--seeds", "0,1,2"]) == 0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["primer_step_ratio"] == pytest.approx(0.625)
    # A seed that has no finished run, a malformed list and unknown or
    # repeated models are errors (exit 2).
    assert main(argv + ["--seeds", "0,3"]) == 2
    assert main(argv + ["--seeds", "0,x"]) == 2
    assert main(argv + ["--seeds", "1,1"]) == 2
    bad = ["--out", str(tmp_path), "--report-only", "--seeds", "0"]
    assert main(bad + ["--models", "gpt2,gpt3"]) == 2
    assert main(bad + ["--models", "gpt2,gpt2"]) == 2
    assert main(bad + ["--models", "gpt2", "--warmup-steps", "-1"]) == 2


# --------------------------------------------------------- the GPT-2 arm


def test_gpt2_arm_is_keras_hub_gpt2_of_the_same_size():
    import keras_hub

    from keras_primer.models.registry import build_causal_lm
    from keras_primer.tokenizers import keras_tokenizer
    from keras_primer_cli.presets import get_preset
    from keras_primer_runtime.generation import ByteCodec

    preset = get_preset("tiny")
    tokenizer = keras_tokenizer(ByteCodec())
    gpt2 = build_causal_lm("gpt2", preset, tokenizer)
    ours = build_causal_lm("transformer", preset, tokenizer)
    assert isinstance(gpt2, keras_hub.models.GPT2CausalLM)
    assert isinstance(gpt2.backbone, keras_hub.models.GPT2Backbone)
    sizes = (
        "vocabulary_size",
        "num_layers",
        "num_heads",
        "hidden_dim",
        "intermediate_dim",
        "max_sequence_length",
    )
    for size in sizes:
        assert getattr(gpt2.backbone, size) == getattr(ours.backbone, size), size
    assert gpt2.backbone.max_sequence_length == preset.sequence_length
    # Same shapes throughout: our Transformer baseline has GPT-2's parameters.
    assert gpt2.backbone.count_params() == ours.backbone.count_params()
    # Both read the same preprocessor's ids.
    assert type(gpt2.preprocessor) is type(ours.preprocessor)


def test_feedback_primer_ez_arm_is_feedback_with_primer_ez_changes():
    import numpy as np

    from keras_primer.models.feedback import FeedbackCausalLM
    from keras_primer.models.registry import build_causal_lm
    from keras_primer.tokenizers import keras_tokenizer
    from keras_primer_cli.presets import get_preset
    from keras_primer_runtime.generation import ByteCodec

    preset = get_preset("tiny")
    tokenizer = keras_tokenizer(ByteCodec())
    plain = build_causal_lm("feedback", preset, tokenizer)
    primer = build_causal_lm("feedback_primer_ez", preset, tokenizer)
    assert isinstance(primer, FeedbackCausalLM)
    assert not plain.backbone.use_dconv and primer.backbone.use_dconv
    assert primer.backbone.get_config()["activation"] == "squared_relu"
    # The only new weights are the convolutions' kernels (one per channel of
    # each head, for queries per layer and for the shared keys/values).
    head_channels = preset.hidden_dim
    extra = primer.backbone.count_params() - plain.backbone.count_params()
    assert extra == 3 * head_channels * (preset.num_layers + 2)
    tokens = np.array([[1, 70, 71, 72, 73]], "int32")
    logits = primer({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)})
    assert logits.shape == (1, 5, tokenizer.vocabulary_size())


def test_shared_sentencepiece_model(tmp_path, sample_text_path):
    import dataclasses

    from keras_primer.training import RunConfig
    from keras_primer.training.compare import shared_tokenizer

    base = RunConfig(
        out=str(tmp_path), data=sample_text_path, tokenizer="sentencepiece", vocabulary_size=400
    )
    config = shared_tokenizer(base, str(tmp_path))
    assert config.spm_model == str(tmp_path / "tokenizer.model")
    first = (tmp_path / "tokenizer.model").read_bytes()
    # A rerun reuses it (the runs' definitions keep their hash).
    assert shared_tokenizer(base, str(tmp_path)).spm_model == config.spm_model
    assert (tmp_path / "tokenizer.model").read_bytes() == first
    with pytest.raises(ValueError, match="has 400 pieces, not --vocab-size 420"):
        shared_tokenizer(dataclasses.replace(base, vocabulary_size=420), str(tmp_path))
    # Bytes, or a given model, are left alone.
    assert shared_tokenizer(dataclasses.replace(base, tokenizer="bytes"), "x").spm_model is None
    given = dataclasses.replace(base, spm_model="my.model")
    assert shared_tokenizer(given, str(tmp_path)) is given


@pytest.mark.slow
def test_every_arm_sees_the_same_batches(tmp_path, sample_text_path, monkeypatch):
    """Tiny end-to-end run: GPT-2 and Primer EZ, two seeds, 3 steps each."""
    from keras_primer.data import pipeline
    from keras_primer.training import RunConfig
    from keras_primer.training import compare as compare_module
    from keras_primer_cli.presets import get_preset

    batches = {}  # (model, seed) -> [(global step, digest of the batch)]
    current = {}
    real_train, real_getitem = compare_module.train, pipeline.WindowDataset.__getitem__

    def recording_train(config):
        current["run"] = (config.model, config.seed)
        batches[current["run"]] = []
        return real_train(config)

    def recording_getitem(self, index):
        x, y = real_getitem(self, index)
        digest = hashlib.sha256(x["token_ids"].tobytes() + y.tobytes()).hexdigest()
        batches[current["run"]].append((self.start_step + index, digest))
        return x, y

    monkeypatch.setattr(compare_module, "train", recording_train)
    monkeypatch.setattr(pipeline.WindowDataset, "__getitem__", recording_getitem)
    preset = get_preset(
        "tiny",
        num_layers=1,
        hidden_dim=16,
        intermediate_dim=32,
        sequence_length=16,
        batch_size=4,
        steps=3,
        warmup_steps=1,
        eval_interval=3,
        eval_windows=4,
    )
    base = RunConfig(
        out=str(tmp_path),
        data=sample_text_path,
        preset=preset,
        sample_tokens=0,
        verbose=0,
        tensorboard=False,
    )
    result = compare_module.compare(base, ("gpt2", "primer_ez"), seeds=(0, 1))

    for seed in (0, 1):
        gpt2, primer = batches[("gpt2", seed)], batches[("primer_ez", seed)]
        assert sorted({step for step, _ in gpt2}) == [0, 1, 2]
        assert sorted(set(gpt2)) == sorted(set(primer))
        # Everything that defines a run but the model is the same.
        definitions = [
            json.loads((tmp_path / m / f"seed-{seed}" / "run.json").read_text())["definition"]
            for m in ("gpt2", "primer_ez")
        ]
        assert definitions[0].pop("model") == "gpt2"
        assert definitions[1].pop("model") == "primer_ez"
        assert definitions[0] == definitions[1]
    assert set(batches[("gpt2", 0)]) != set(batches[("gpt2", 1)])  # seeds differ

    summary = json.loads((tmp_path / "gpt2" / "seed-0" / "summary.json").read_text())
    assert (
        summary["parameters"]
        == json.loads((tmp_path / "primer_ez" / "seed-0" / "summary.json").read_text())[
            "parameters"
        ]
        - 3 * 16 * 3
    )  # Primer EZ adds a 3-tap conv per q/k/v channel
    assert result["reference"] == "gpt2"
    assert result["spread"]["gpt2"]["step_ratio"]["mean"] == 1.0
    assert [r["model"] for r in result["rows"]] == ["gpt2", "primer_ez"] * 2
    assert math.isfinite(result["spread"]["primer_ez"]["val_loss"]["mean"])

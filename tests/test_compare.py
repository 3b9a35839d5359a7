"""The several-seed comparison report, on hand-made histories (no training).

The oracle is worked out by hand from the histories below: each seed's
Primer EZ ratio is where its validation loss (linearly interpolated between
evaluations) first reaches that seed's Transformer final loss, divided by
the Transformer's steps.
"""

import csv
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
        "tokens_per_second": 1000.0,
        "wall_time_s": steps * seconds_per_step,
        "history": history,
    }


# Transformer final loss 2.0 in every seed (20 steps).
# seed 0: Primer EZ crosses 2.0 halfway between steps 10 (2.5) and 20 (1.5): 15 -> 0.75.
# seed 1: Primer EZ is at 2.0 at its first evaluation, step 10 -> 0.5.
# seed 2: Primer EZ never gets below 2.2 -> not reached.
BY_SEED = {
    0: {
        "primer_ez": _summary([(10, 2.5), (20, 1.5)], 1.5, seconds_per_step=1.0),
        "transformer": _summary([(10, 3.0), (20, 2.0)], 2.0),
    },
    1: {
        "primer_ez": _summary([(10, 2.0), (20, 1.8)], 1.8),
        "transformer": _summary([(10, 3.0), (20, 2.0)], 2.0),
    },
    2: {
        "primer_ez": _summary([(10, 2.6), (20, 2.2)], 2.2),
        "transformer": _summary([(10, 3.0), (20, 2.0)], 2.0),
    },
}


def test_spread_statistics():
    from keras_primer.training.compare import spread

    stats = spread([0.75, 0.5, None])
    assert stats["n"] == 2 and stats["missing"] == 1
    assert stats["mean"] == pytest.approx(0.625)
    # sample std (n - 1): sqrt((0.125^2 + 0.125^2) / 1)
    assert stats["std"] == pytest.approx(0.1768, abs=1e-4)
    assert (stats["min"], stats["max"]) == (0.5, 0.75)
    assert spread([0.4])["std"] is None  # one seed: no spread
    assert spread([None, None])["mean"] is None


def test_report_seeds_ratios_mean_and_spread(tmp_path):
    from keras_primer.training.compare import report_seeds

    result = report_seeds(BY_SEED, str(tmp_path))
    assert result["seeds"] == [0, 1, 2]
    assert result["per_seed"] == {0: 0.75, 1: 0.5, 2: None}
    assert result["primer_step_ratio"] == pytest.approx(0.625)
    ratio = result["primer_step_ratio_spread"]
    assert (ratio["n"], ratio["missing"]) == (2, 1)
    assert ratio["std"] == pytest.approx(0.1768, abs=1e-4)
    # seed 0's Primer EZ ran at 1 s/step against the Transformer's 0.5: 15 s / 10 s.
    row = next(r for r in result["rows"] if r["seed"] == 0 and r["model"] == "primer_ez")
    assert row["time_to_baseline"] == pytest.approx(1.5)
    losses = result["spread"]["primer_ez"]["val_loss"]
    assert losses["mean"] == pytest.approx((1.5 + 1.8 + 2.2) / 3, abs=1e-4)
    assert (losses["min"], losses["max"]) == (1.5, 2.2)

    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 + 2 * 4  # a row per seed and model, 4 statistics per model
    mean = next(r for r in rows if r["seed"] == "mean" and r["model"] == "primer_ez")
    assert float(mean["steps_to_baseline"]) == pytest.approx(0.625)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["per_seed"] == {"0": 0.75, "1": 0.5, "2": None}
    text = (tmp_path / "comparison.md").read_text()
    assert "0.625 ± 0.1768 [0.5, 0.75] (n=2 of 3)" in text
    assert "2: not reached" in text
    assert (tmp_path / "comparison.png").exists()


def test_report_only_reads_every_seed(tmp_path):
    from recipes.compare import main

    for seed, summaries in BY_SEED.items():
        for model, summary in summaries.items():
            folder = tmp_path / model / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(summary))
    argv = ["--out", str(tmp_path), "--models", "primer_ez,transformer", "--report-only"]
    assert main(argv + ["--seeds", "0,1,2"]) == 0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["primer_step_ratio"] == pytest.approx(0.625)
    # A seed that has no finished run, and a malformed list, are errors (exit 2).
    assert main(argv + ["--seeds", "0,3"]) == 2
    assert main(argv + ["--seeds", "0,x"]) == 2
    assert main(argv + ["--seeds", "1,1"]) == 2

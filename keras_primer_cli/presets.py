"""Model sizes and training budgets, by name (stdlib only).

`keras-primer train --preset` lists them; the architecture fields are shared
by every model of the registry (`keras_primer_cli.model_registry`).

>>> get_preset("tiny", steps=10).steps
10
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from keras_primer_cli.errors import ConfigError


@dataclass
class TrainPreset:
    """Architecture and optimisation settings of one run.

    The architecture fields are shared by every `--model`; `intermediate_dim`
    is 4x the width as in nanoGPT.

    >>> PRESETS["tiny"].replace(steps=10).steps
    10
    """

    num_layers: int
    num_heads: int
    hidden_dim: int
    intermediate_dim: int
    sequence_length: int
    dropout: float
    batch_size: int
    steps: int
    learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    clipnorm: float = 1.0
    eval_interval: int = 100
    eval_windows: int = 64
    checkpoint_interval: int = 50
    description: str = ""

    def replace(self, **changes) -> TrainPreset:
        """A copy with `changes` (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"Unknown preset fields: {sorted(unknown)}.")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, TrainPreset] = {
    # Seconds on a CPU: smoke runs and tests of the whole pipeline.
    "tiny": TrainPreset(
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=256,
        sequence_length=64,
        dropout=0.0,
        batch_size=16,
        steps=200,
        learning_rate=3e-3,
        min_learning_rate=3e-4,
        warmup_steps=20,
        eval_interval=50,
        eval_windows=32,
        checkpoint_interval=25,
        description="2x64, context 64: CPU smoke runs",
    ),
    # `make demo`: a few minutes on a 2-core CPU, recognisable Shakespeare.
    "cpu": TrainPreset(
        num_layers=3,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=512,
        sequence_length=64,
        dropout=0.0,
        batch_size=16,
        steps=1000,
        learning_rate=3e-3,
        min_learning_rate=3e-4,
        # Not 50: warming up to 3e-3 in 50 steps gave every seed's Transformer
        # one-step loss spikes (5-12 nats; the one examined came from a
        # single Adam step on layer 0's value kernel), and the seed hit while
        # still at the unigram plateau stayed ~0.3 nats behind for 800 steps.
        warmup_steps=200,
        eval_interval=250,
        eval_windows=64,
        checkpoint_interval=250,
        description="3x128, context 64: the CPU demo (minutes)",
    ),
    # nanoGPT's shakespeare_char configuration (a GPU run).
    "shakespeare_char": TrainPreset(
        num_layers=6,
        num_heads=6,
        hidden_dim=384,
        intermediate_dim=1536,
        sequence_length=256,
        dropout=0.2,
        batch_size=64,
        steps=5000,
        learning_rate=1e-3,
        min_learning_rate=1e-4,
        warmup_steps=100,
        eval_interval=250,
        eval_windows=200,
        checkpoint_interval=250,
        description="6x384, 6 heads, context 256: nanoGPT shakespeare_char (GPU)",
    ),
}


def get_preset(name: str | TrainPreset, **overrides) -> TrainPreset:
    """The preset called `name` (or a `TrainPreset` itself), with `overrides`
    (None values ignored).

    Raises:
        ConfigError: Unknown name (the message lists the known ones).
    """
    if isinstance(name, TrainPreset):
        return name.replace(**overrides)
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}. Choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides)

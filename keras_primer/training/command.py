"""`keras-primer train`: train a causal LM on a text corpus."""

from __future__ import annotations

import argparse
import os
import sys

from keras_primer.training.distribution import KINDS as DISTRIBUTIONS
from keras_primer.training.presets import PRESETS

BACKENDS = ("tensorflow", "jax", "torch")


def build_parser(prog: str = "keras-primer train") -> argparse.ArgumentParser:
    """The argument parser of `keras-primer train` (and `recipes/train.py`)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train Primer EZ, the Transformer baseline or the Feedback "
        "Transformer on Tiny Shakespeare or any text file/folder.",
    )
    p.add_argument("--model", default="primer_ez", choices=("primer_ez", "transformer", "feedback"))
    p.add_argument("--data", default=None, help="text file or folder (default: Tiny "
                   "Shakespeare from $KERAS_PRIMER_SHAKESPEARE, else downloaded)")
    p.add_argument("--out", required=True, help="output folder (resumes if it holds a backup)")
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--sequence-length", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations")
    p.add_argument("--checkpoint-interval", type=int, default=None, help="steps between backups")
    p.add_argument("--tokenizer", default="bytes", choices=("bytes", "sentencepiece"))
    p.add_argument("--vocab-size", type=int, default=1024, help="SentencePiece vocabulary size")
    p.add_argument("--spm-model", default=None, help="existing SentencePiece .model to use")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="float32",
                   choices=("float32", "mixed_bfloat16", "mixed_float16"))
    p.add_argument("--jit-compile", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--distribution", default="none", choices=DISTRIBUTIONS,
                   help="JAX: data_parallel, model_parallel (with --multi-host: several hosts); "
                   "TensorFlow: mirrored (one host)")
    p.add_argument("--multi-host", action="store_true",
                   help="JAX: keras.distribution.initialize() first; the cluster comes from "
                   "KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES and _PROCESS_ID")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="Keras backend (must be chosen before Keras is imported)")
    p.add_argument("--prompt", action="append", default=None, help="sample prompt (repeatable)")
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--no-download", action="store_true", help="never download Tiny Shakespeare")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return p


def set_backend(backend: str | None, argv: list[str] | None = None) -> None:
    """Makes Keras run on `backend` for this command.

    The backend is fixed when Keras is imported, and importing
    `keras_primer` imports Keras. When the running Keras has another
    backend, the command starts again in a fresh interpreter with
    `KERAS_BACKEND=backend` (the process is replaced; `argv` are the
    arguments of `keras-primer train`).

    Raises:
        ValueError: The fresh interpreter still runs another backend, or
            there are no `argv` to start it with.
    """
    if not backend:
        return
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
        return
    import keras

    running = keras.backend.backend()
    if running == backend:
        return
    if argv is None or os.environ.get(_RESTARTED) == backend:
        raise ValueError(
            f"Keras is already running on {running!r} and cannot switch to {backend!r}; "
            f"set KERAS_BACKEND={backend} in the environment."
        )
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, KERAS_BACKEND=backend, **{_RESTARTED: backend})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "keras_primer.cli", "train", *argv], env)


# Set in the restarted process, so a backend that still does not take
# effect gives an error instead of an endless loop of restarts.
_RESTARTED = "KERAS_PRIMER_RESTARTED_FOR_BACKEND"


def config_from_args(args: argparse.Namespace):
    """A `RunConfig` from parsed arguments."""
    from keras_primer.training.driver import RunConfig

    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    return RunConfig(
        model=args.model,
        out=args.out,
        data=args.data,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        learning_rate=args.learning_rate,
        dropout=args.dropout,
        eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval,
        tokenizer=args.tokenizer,
        vocabulary_size=args.vocab_size,
        spm_model=args.spm_model,
        val_fraction=args.val_fraction,
        seed=args.seed,
        precision=args.precision,
        jit_compile=jit,
        distribution=args.distribution,
        multi_host=args.multi_host,
        prompts=args.prompt or ["ROMEO:"],
        sample_tokens=args.sample_tokens,
        verbose=args.verbose,
        download=not args.no_download,
        tensorboard=not args.no_tensorboard,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `keras-primer train`; returns the exit status.

    Bad settings and data problems (`ValueError`) print one clear line and
    return 2 instead of a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        set_backend(args.backend, argv)
        from keras_primer.training.driver import train

        summary = train(config_from_args(args))
    except ValueError as e:
        print(f"keras-primer train: error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{summary['model']}: {summary['steps']} steps, val loss "
        f"{summary['val_loss']:.4f}, val bits/char {summary['val_bits_per_char']:.3f}, "
        f"{summary['tokens_per_second']:.0f} tokens/s, {summary['wall_time_s']:.1f} s\n"
        f"Outputs in {os.path.abspath(args.out)} (summary.json, best.keras, "
        "learning_curve.png, samples.txt)."
    )
    for prompt, text in summary["samples"].items():
        print(f"\n--- {prompt!r} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

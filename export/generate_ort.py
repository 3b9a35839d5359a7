#!/usr/bin/env python
"""Generate text with ONNX Runtime from `exported/onnx` (no Keras/TensorFlow needed at run time).

python export/generate_ort.py exported/onnx "ROMEO:" --max-new-tokens 64 --temperature 0.8 --top-p 0.9
python export/generate_ort.py exported/onnx "ROMEO:" --stream
"""

import argparse
import sys

from keras_primer_runtime.ort_generator import OrtGenerator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="print each piece of text as it is chosen (one prompt)",
    )
    parser.add_argument(
        "--provider",
        action="append",
        default=None,
        help="ONNX Runtime provider (repeatable; default CUDA if available, else CPU)",
    )
    args = parser.parse_args(argv)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        generator = OrtGenerator(args.onnx_dir, int8=args.int8, providers=args.provider)
        if args.stream:
            if len(args.prompts) != 1:
                raise ValueError("--stream takes one prompt.")
            for piece in generator.stream(args.prompts[0], args.max_new_tokens, **options):
                print(piece, end="", flush=True)
            print()
            return 0
        texts = generator.generate(
            args.prompts,
            args.max_new_tokens,
            **options,
        )
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

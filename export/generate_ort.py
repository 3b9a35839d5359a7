#!/usr/bin/env python
"""Generate text with ONNX Runtime from `exported/onnx` (no TensorFlow needed at run time).

    python export/generate_ort.py exported/onnx "ROMEO:" --max-new-tokens 64 --sampler top_p --top-p 0.9
"""

import argparse
import sys

from keras_primer.export.ort_generator import OrtGenerator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sampler", choices=["greedy", "top_k", "top_p"], default="greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--int8", action="store_true")
    args = parser.parse_args(argv)
    generator = OrtGenerator(args.onnx_dir, int8=args.int8)
    try:
        texts = generator.generate(
            args.prompts, args.max_new_tokens, sampler=args.sampler, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

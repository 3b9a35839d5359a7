#!/usr/bin/env python
"""Send a request to a running TF Serving (REST or gRPC).

python export/serving_request.py --model primer "ROMEO:" "JULIET:"
python export/serving_request.py --model primer --grpc localhost:8500 --max-new-tokens 16 --temperature 0.8 --top-k 20 "ROMEO:"
"""

import argparse
import json
import sys

from keras_primer_runtime import serving_client as sc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--model", default="primer")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument(
        "--grpc", default=None, help="host:port of the gRPC endpoint (default: use REST)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        signature, inputs = sc.generate_inputs(
            args.prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.grpc:
        outputs = sc.predict_grpc(args.grpc, sc.grpc_request(args.model, signature, inputs))
        texts = [x.decode("utf-8") for x in outputs["outputs"]]
    else:
        answer = sc.predict_rest(
            sc.rest_url(args.host, args.port, args.model), sc.rest_body(signature, inputs)
        )
        texts = answer["outputs"]["outputs"]
    print(json.dumps(texts, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

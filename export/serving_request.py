#!/usr/bin/env python
"""Send a request to a running TF Serving (REST or gRPC).

python export/serving_request.py --model primer "ROMEO:" "JULIET:"
python export/serving_request.py --model primer --grpc localhost:8500 --max-new-tokens 16 --temperature 0.8 --top-k 20 "ROMEO:"

A bad argument, or no TF Serving answering, is one line on stderr with exit
status 2 (`--debug` shows the traceback); Ctrl-C exits with 130.
"""

import argparse
import json
import sys
import urllib.error

from keras_primer_cli.errors import (
    EXIT_EXPECTED_FAILURE,
    EXIT_INTERRUPTED,
    error_line,
    interrupted_line,
)
from keras_primer_cli.logging_setup import quiet_backend_logs
from keras_primer_runtime import serving_client as sc

PROG = "serving_request.py"


class NoAnswer(Exception):
    """TF Serving did not answer the request, or answered with an error."""


def _rest(args, signature, inputs):
    url = sc.rest_url(args.host, args.port, args.model)
    try:
        answer = sc.predict_rest(url, sc.rest_body(signature, inputs))
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")
        try:
            detail = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            detail = body
        raise NoAnswer(f"TF Serving at {url} answered {error.code}: {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise NoAnswer(
            f"No TF Serving answered at {url} ({reason}): start it (export/README.md), or "
            "pass the --host and --port it listens on."
        ) from error
    return answer["outputs"]["outputs"]


def _grpc(args, signature, inputs):
    import grpc

    request = sc.grpc_request(args.model, signature, inputs)
    try:
        outputs = sc.predict_grpc(args.grpc, request)
    except grpc.RpcError as error:
        code = error.code().name if error.code() else "UNKNOWN"
        raise NoAnswer(
            f"The gRPC request to {args.grpc} failed ({code}: {error.details()}): start TF "
            "Serving with --port for gRPC (export/README.md), or pass the --grpc host:port "
            "it listens on."
        ) from error
    return [x.decode("utf-8") for x in outputs["outputs"]]


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
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    quiet_backend_logs(False)  # the gRPC request is built with TensorFlow
    try:
        signature, inputs = sc.generate_inputs(
            args.prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
        )
        texts = _grpc(args, signature, inputs) if args.grpc else _rest(args, signature, inputs)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(interrupted_line(PROG, "no answer was printed"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NoAnswer, ValueError) as error:
        if args.debug:
            raise
        print(error_line(error, PROG), file=sys.stderr)
        return EXIT_EXPECTED_FAILURE
    print(json.dumps(texts, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Requests for a keras-primer model served by TensorFlow Serving.

Builds (and optionally sends) REST and gRPC `Predict` requests for the three
signatures of `export_saved_model`, validating inputs first with the checks
and texts of `keras_primer_runtime.generation` (the ones the signatures
assert), so mistakes become clear `ValueError`s on the client. Imports with
the standard library and NumPy; gRPC needs `tensorflow-serving-api` (and
`grpcio`), imported when a gRPC function is called.

>>> from keras_primer_runtime import serving_client as sc
>>> sc.rest_body(*sc.generate_inputs(["ROMEO:"]))
{'signature_name': 'generate', 'inputs': {'prompts': ['ROMEO:']}}
>>> sc.rest_url("localhost", 8501, "primer")
'http://localhost:8501/v1/models/primer:predict'
"""

import json
import re
import urllib.parse
import urllib.request

import numpy as np

from keras_primer_runtime import generation

SIGNATURES = ("serving_default", "generate", "generate_with_options")
# A TF Serving model name is a folder under the model base path, a path
# segment of the REST URL (`/v1/models/NAME:predict`, so no `/` or `:`) and a
# string in `models.config`: letters, digits, `_`, `-` and `.`, starting with a
# letter or digit (so never `.`, `..` or a hidden folder), at most 128 chars.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: `max_new_tokens` of `generate_with_options` when only other options are given.
DEFAULT_MAX_NEW_TOKENS = 32


def generate_inputs(
    prompts, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None
):
    """Inputs of `generate` (prompts only) or `generate_with_options`.

    Returns `(signature_name, inputs)`. Any option given selects
    `generate_with_options`, whose missing options get neutral values
    (greedy, no top-k/top-p cut, seed 0, 32 new tokens).
    """
    prompts = generation.check_prompts(prompts)
    options = (max_new_tokens, temperature, top_k, top_p, seed)
    if all(o is None for o in options):
        return "generate", {"prompts": prompts}
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    max_new_tokens = generation.check_max_new_tokens(max_new_tokens)
    if max_new_tokens > INT32_MAX:
        raise ValueError(
            f"`max_new_tokens` does not fit the signature's int32 input. Received: {max_new_tokens}"
        )
    checked = generation.check_sampling(
        0.0 if temperature is None else temperature,
        0 if top_k is None else top_k,
        1.0 if top_p is None else top_p,
        0 if seed is None else seed,
    )
    return "generate_with_options", {
        "prompts": prompts,
        "max_new_tokens": int(max_new_tokens),
        "temperature": checked.temperature,
        "top_k": checked.top_k,
        "top_p": checked.top_p,
        "seed": checked.seed,
    }


def _int32_array(values, name):
    array = np.asarray(values)
    if array.dtype.kind not in "iu" or array.ndim != 2 or 0 in array.shape:
        raise ValueError(
            f"`{name}` must be a non-empty integer array of shape [batch, length]; "
            f"received dtype {array.dtype}, shape {array.shape}."
        )
    # Checked before the cast: astype(int32) would wrap 2**40 to 0.
    if array.min() < INT32_MIN or array.max() > INT32_MAX:
        raise ValueError(f"`{name}` holds values outside int32, the signature's dtype.")
    return array.astype(np.int32)


def logits_inputs(token_ids, padding_mask=None):
    """Inputs of `serving_default`: int32 `[batch, length]` ids and mask."""
    token_ids = _int32_array(token_ids, "token_ids")
    if token_ids.min() < 0:
        raise ValueError("`token_ids` contains a negative id.")
    padding_mask = np.ones_like(token_ids) if padding_mask is None else np.asarray(padding_mask)
    if padding_mask.shape != token_ids.shape:
        raise ValueError(
            f"`padding_mask` must have shape {token_ids.shape}; received {padding_mask.shape}."
        )
    padding_mask = _int32_array(padding_mask, "padding_mask")
    if not np.isin(padding_mask, (0, 1)).all():
        raise ValueError("`padding_mask` must hold only 0 (padding) and 1 (token).")
    return "serving_default", {
        "token_ids": token_ids.tolist(),
        "padding_mask": padding_mask.tolist(),
    }


# A host name, an IPv4 address or a bracketed IPv6 address: nothing that adds
# a path, a query, credentials or a port to the URL (`localhost/../x`).
HOST_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def check_model_name(model_name) -> str:
    """`model_name` if TF Serving can serve it (the rule `keras-primer export --name` applies).

    >>> check_model_name("../admin")
    Traceback (most recent call last):
    ...
    ValueError: `model_name` '../admin' is not a TF Serving model name: use letters, digits, '_', '-' and '.', starting with a letter or digit, at most 128 characters.
    """
    if not isinstance(model_name, str) or not MODEL_NAME_PATTERN.fullmatch(model_name):
        raise ValueError(
            f"`model_name` {model_name!r} is not a TF Serving model name: use letters, digits, "
            "'_', '-' and '.', starting with a letter or digit, at most 128 characters."
        )
    return model_name


def rest_url(host, port, model_name, version=None):
    """The REST predict URL of a model (http only).

    >>> rest_url("localhost/../x", 8501, "primer")
    Traceback (most recent call last):
    ...
    ValueError: `host` 'localhost/../x' is not a host name or IP address (IPv6 in brackets); a path or port does not belong there.
    """
    if not isinstance(host, str) or not HOST_PATTERN.fullmatch(host):
        raise ValueError(
            f"`host` {host!r} is not a host name or IP address (IPv6 in brackets); a path or "
            "port does not belong there."
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"`port` must be an integer from 1 to 65535. Received: {port!r}")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(f"`version` must be an integer >= 1. Received: {version!r}")
    version_part = f"/versions/{version}" if version is not None else ""
    return f"http://{host}:{port}/v1/models/{check_model_name(model_name)}{version_part}:predict"


def rest_body(signature, inputs, form="inputs"):
    """JSON body of a REST predict call: columnar `inputs` or row `instances`.

    The row form needs every input batched along axis 0, so it does not fit
    `generate_with_options` (its options are scalars).
    """
    if signature not in SIGNATURES:
        raise ValueError(f"Unknown signature {signature!r}; expected one of {SIGNATURES}.")
    if form == "inputs":
        return {"signature_name": signature, "inputs": inputs}
    if form != "instances":
        raise ValueError("`form` must be 'inputs' or 'instances'.")
    columns = {k: v for k, v in inputs.items()}
    sizes = {len(v) if isinstance(v, list) else None for v in columns.values()}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"The `instances` form needs every input batched along axis 0; signature {signature!r} "
            "has scalar inputs. Use form='inputs'."
        )
    (size,) = sizes
    instances = [{k: v[i] for k, v in columns.items()} for i in range(size)]
    if len(columns) == 1:  # a single named input may be sent bare
        instances = [next(iter(x.values())) for x in instances]
    return {"signature_name": signature, "instances": instances}


def rest_inputs_to_numpy(signature, body):
    """What TF Serving feeds the signature for a REST body (for tests)."""
    dtypes = {
        "token_ids": np.int32,
        "padding_mask": np.int32,
        "prompts": object,
        "max_new_tokens": np.int32,
        "temperature": np.float32,
        "top_k": np.int32,
        "top_p": np.float32,
        "seed": np.int32,
    }
    if "inputs" in body:
        columns = body["inputs"]
    else:
        rows = body["instances"]
        if rows and not isinstance(rows[0], dict):
            name = "prompts" if signature != "serving_default" else "token_ids"
            rows = [{name: r} for r in rows]
        columns = {k: [r[k] for r in rows] for k in rows[0]}
    out = {}
    for key, value in columns.items():
        if dtypes[key] is object:
            out[key] = np.array([v.encode("utf-8") for v in value], object)
        else:
            out[key] = np.asarray(value, dtypes[key])
    return out


def predict_rest(url, body, timeout=60):
    """POSTs `body` to an http(s) `url` and returns the decoded JSON answer."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"`url` must be an http:// or https:// URL; received scheme {scheme!r}.")
    request = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def grpc_request(model_name, signature, inputs, version=None):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest`."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2

    spec = model_pb2.ModelSpec(name=check_model_name(model_name), signature_name=signature)
    if version is not None:
        spec.version.value = int(version)
    request = predict_pb2.PredictRequest(model_spec=spec)
    for key, value in rest_inputs_to_numpy(signature, {"inputs": inputs}).items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def predict_grpc(target, request, timeout=60):
    """Sends a `PredictRequest` to `target` ("host:8500"); returns numpy outputs."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

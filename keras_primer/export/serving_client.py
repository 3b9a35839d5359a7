"""Requests for a keras-primer model served by TensorFlow Serving.

Builds (and optionally sends) REST and gRPC `Predict` requests for the three
signatures of `export_saved_model`, validating inputs first so that mistakes
become clear `ValueError`s on the client instead of server errors. Only
NumPy is needed for REST; gRPC needs `tensorflow-serving-api` (and `grpcio`).

    from keras_primer.export import serving_client as sc
    body = sc.rest_body("generate", sc.generate_inputs(["ROMEO:"]))
    url = sc.rest_url("localhost", 8501, "primer")   # POST json=body
    request = sc.grpc_request("primer", "generate", sc.generate_inputs(["ROMEO:"]))
"""

import json
import urllib.request

import numpy as np

SIGNATURES = ("serving_default", "generate", "generate_with_options")


def _check_prompts(prompts):
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("`prompts` must be a non-empty string or list of strings.")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt {i} must be a string; received {type(prompt).__name__}.")
        if not prompt:
            raise ValueError(f"Prompt {i} is empty; send at least one character.")
        out.append(prompt)
    return out


def generate_inputs(prompts, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None):
    """Inputs of `generate` (prompts only) or `generate_with_options`.

    Returns `(signature_name, inputs)`. Any option given selects
    `generate_with_options`, whose missing options get neutral values
    (greedy, no top-k/top-p cut, seed 0, 32 new tokens).
    """
    prompts = _check_prompts(prompts)
    options = (max_new_tokens, temperature, top_k, top_p, seed)
    if all(o is None for o in options):
        return "generate", {"prompts": prompts}
    max_new_tokens = 32 if max_new_tokens is None else max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer; received {max_new_tokens!r}.")
    temperature = 0.0 if temperature is None else float(temperature)
    top_k = 0 if top_k is None else int(top_k)
    top_p = 1.0 if top_p is None else float(top_p)
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("Need temperature >= 0, top_k >= 0 and 0 < top_p <= 1.")
    return "generate_with_options", {
        "prompts": prompts,
        "max_new_tokens": int(max_new_tokens),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": 0 if seed is None else int(seed),
    }


def logits_inputs(token_ids, padding_mask=None):
    """Inputs of `serving_default`: int32 `[batch, length]` ids and mask."""
    token_ids = np.asarray(token_ids)
    if token_ids.dtype.kind not in "iu" or token_ids.ndim != 2 or 0 in token_ids.shape:
        raise ValueError(
            f"`token_ids` must be a non-empty integer array of shape [batch, length]; "
            f"received dtype {token_ids.dtype}, shape {token_ids.shape}."
        )
    padding_mask = np.ones_like(token_ids) if padding_mask is None else np.asarray(padding_mask)
    if padding_mask.shape != token_ids.shape:
        raise ValueError(f"`padding_mask` must have shape {token_ids.shape}; received {padding_mask.shape}.")
    return "serving_default", {
        "token_ids": token_ids.astype(np.int32).tolist(),
        "padding_mask": padding_mask.astype(np.int32).tolist(),
    }


def rest_url(host, port, model_name, version=None):
    version_part = f"/versions/{int(version)}" if version is not None else ""
    return f"http://{host}:{port}/v1/models/{model_name}{version_part}:predict"


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
        "token_ids": np.int32, "padding_mask": np.int32, "prompts": object,
        "max_new_tokens": np.int32, "temperature": np.float32, "top_k": np.int32,
        "top_p": np.float32, "seed": np.int32,
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
    """POSTs `body` and returns the decoded JSON answer."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def grpc_request(model_name, signature, inputs, version=None):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest`."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2

    spec = model_pb2.ModelSpec(name=model_name, signature_name=signature)
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

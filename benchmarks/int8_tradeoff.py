"""int8 vs fp32 ONNX Runtime: next-token agreement on held-out text and CPU
time at batch 8, for several quantization settings (issue 31 item 5).

    python benchmarks/int8_tradeoff.py --onnx-dir EXPORT/onnx --text tinyshakespeare.txt \
        --work /tmp/int8/variants [--settings fp32,dynamic_matmul,...] [--repeats 7]

EXPORT/onnx is a fp32 export (`keras-primer export MODEL --out EXPORT`); each
setting writes its own int8 `model.onnx` / `decoder_step.onnx` copies under
`--work` from those fp32 graphs. The held-out text is the end of `--text`
(`--val-fraction`, 0.1 as in training: the split of
`keras_primer.data.pipeline`, on token ids). Prints one JSON object a line:

* `size`: bytes of the two int8 graphs against fp32.
* `agreement`: the fraction of positions of held-out windows (each
  `max_sequence_length` long, through `model.onnx`) where the setting's argmax
  equals fp32's; the decode step's agreement on the same text fed one token
  at a time (teacher forcing: both read the true text, each carries its own
  cache); and greedy continuations of 8 held-out prompts through
  `OrtGenerator.generate`: per row, the first new token that differs from
  fp32's (null: none).
* `speed`: CPU seconds (`time.process_time()`, one intra-op thread) of
  `OrtGenerator.generate` with the 8 prompts (greedy), and of one raw decode
  step at batch 8 at a few past lengths; medians of `--repeats` rounds, the
  settings interleaved within each round; `ratio` = fp32 / setting (> 1:
  faster than fp32).

Settings (`SETTINGS`): `dynamic_*` is `quantize_dynamic` (int8 weights per
output channel, activations per tensor on the fly); `dynamic_matmul*` on the
graph as tf2onnx writes it (only the feed-forward and LM head MatMuls have
constant weights there), `dynamic_all_weights*` after `gemms_as_matmuls` (the
QKV and output projections too), `preprocessed_*` after ORT's
`quant_pre_process`; `static_*` is `quantize_static` (MatMuls with constant
weights, calibrated on training text: windows for `model.onnx`, the inputs of
a fp32 decode for `decoder_step.onnx`); `nbits8_*` is weight-only 8-bit
`MatMulNBits`. Suffixes: `_reduce_range` (7-bit weights), `_gather` (the
embedding tables too), `_no_head` (LM head left in float32), `_no_ffn_out`
(feed-forward down projections left in float32), `_no_first_last` (the
feed-forward MatMuls of the first and last layers left in float32).
`export_int8` is what `keras-primer export --int8` writes
(`keras_primer.export.onnx_int8.quantize_int8`).

Not part of CI: it needs a trained export and takes minutes.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

SETTINGS = (
    "fp32",
    "export_int8",  # what `--int8` writes: `keras_primer.export.onnx_int8.quantize_int8`
    "dynamic_matmul",  # what `--int8` wrote before issue 31.5
    "dynamic_matmul_reduce_range",
    "dynamic_matmul_gather",
    "dynamic_matmul_no_head",
    "dynamic_matmul_no_first_last_no_head",
    "preprocessed_dynamic_matmul",
    # Gemm with constant weights as MatMul + Add (`gemms_as_matmuls`), then dynamic
    "dynamic_all_weights",
    "dynamic_all_weights_no_head",
    "dynamic_all_weights_no_ffn_out",
    "dynamic_all_weights_no_ffn_out_no_head",
    "static_qdq_matmul",
    "static_qoperator_matmul",
    # Weight-only 8-bit blocks (`MatMulNBits`, com.microsoft); accuracy level 4
    # computes in int8 with the activations quantized per block of 32 too.
    "nbits8_block32_int8_compute",
    "nbits8_block128_int8_compute",
    "nbits8_block32_fp32_compute",
    "nbits8_block32_int8_compute_no_ffn_out",
)
PROMPT_TOKENS = 16


def _held_out(onnx_dir, text_path, val_fraction):
    from keras_primer_runtime.generation import load_tokenizer

    _, codec = load_tokenizer(onnx_dir)
    with open(text_path, encoding="utf-8") as f:
        ids = np.asarray(codec.encode(f.read()), np.int32)
    split = int(round(len(ids) * (1.0 - val_fraction)))
    return ids[:split], ids[split:], codec


def _windows(ids, length, count):
    starts = np.linspace(0, len(ids) - length - 1, count).astype(int)
    return np.stack([ids[s : s + length] for s in starts])


def _session(path, threads=1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


# === Settings =============================================================


def _excluded(setting, path):
    """Names of the nodes of `path` that `setting` leaves in float32: its
    `_no_head` (the LM head MatMul, `token_embedding`), `_no_ffn_out` (the
    feed-forward down projections, whose input is the squared ReLU) and
    `_no_first_last` (the MatMuls of the first and last transformer layers
    that carry their TF scope: the feed-forward ones) parts."""
    import onnx

    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "MatMul"]
    exclude = []
    if "_no_head" in setting:
        exclude += [n.name for n in nodes if "token_embedding" in n.name]
    if "_no_ffn_out" in setting:
        exclude += [n.name for n in nodes if "feed_forward" in n.name and "Tensordot_1/" in n.name]
    if "_no_first_last" in setting:
        layers = sorted(
            {
                int(n.name.split("transformer_layer_")[1].split("_")[0])
                for n in nodes
                if "transformer_layer_" in n.name
            }
        )
        exclude += [
            n.name
            for n in nodes
            if any(f"transformer_layer_{i}_" in n.name for i in (layers[0], layers[-1]))
        ]
    return exclude


def _matmul_nbits8(src, dst, block_size, accuracy_level, exclude=()):
    """Every MatMul with a 2-D initializer B as `MatMulNBits` (com.microsoft),
    8-bit symmetric blocks of `block_size` along K, ORT's own block quantizer
    (what `MatMulNBitsQuantizer` calls; that class needs `onnx_ir`)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    from keras_primer.export.onnx_graph import drop_unused_initializers  # imports keras_primer

    model = onnx.load(src)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or node.name in exclude:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        rows, cols = w.shape
        k_blocks = (rows + block_size - 1) // block_size
        w = np.pad(w, ((0, k_blocks * block_size - rows), (0, 0)))
        packed = np.zeros((cols, k_blocks, block_size), np.uint8)
        scales = np.zeros((cols, k_blocks), np.float32)
        zero_points = np.zeros((cols, k_blocks), np.uint8)
        quantize_matmul_8bits(packed, w, scales, zero_points, block_size, cols, rows, True)
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed, weight.name + "_Q8"),
                numpy_helper.from_array(scales, weight.name + "_Q8_scales"),
            ]
        )
        attrs = dict(K=rows, N=cols, bits=8, block_size=block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], weight.name + "_Q8", weight.name + "_Q8_scales"],
                list(node.output),
                node.name + "_Q8",
                domain="com.microsoft",
                **attrs,
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    if all(o.domain != "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, dst)
    return dst


def _export_int8(src, dst):
    import onnx

    from keras_primer.export.onnx_int8 import quantize_int8  # imports keras_primer
    from keras_primer_runtime.export_folder import METADATA_KEY

    props = {p.key: p.value for p in onnx.load(src, load_external_data=False).metadata_props}
    return quantize_int8(src, dst, props[METADATA_KEY])


class _Feeds:
    """`CalibrationDataReader` over a list of feed dicts."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # not needed by MinMax
        pass


def _calibration_feeds(kind, fp32_path, train_ids, max_len, states, rows=8):
    """Feeds from training text: windows for `model.onnx`; the step inputs of
    a fp32 decode over training text (prefill of PROMPT_TOKENS, then one
    token a step, the growing past included) for `decoder_step.onnx`."""
    windows = _windows(train_ids, max_len, rows)
    if kind == "model":
        return [
            {"input_ids": windows[i : i + 2], "attention_mask": np.ones_like(windows[i : i + 2])}
            for i in range(0, rows, 2)
        ]
    session = _session(fp32_path)
    past_names = [i.name for i in session.get_inputs()][2:]
    empty = {
        t["past"]: np.zeros(
            [{"batch": rows, "length": 0}.get(d, d) for d in t["shape"]], np.float32
        )
        for t in states
    }
    feeds, state = [], empty
    position = 0
    chunks = [windows[:, :PROMPT_TOKENS]] + [
        windows[:, p : p + 1] for p in range(PROMPT_TOKENS, max_len)
    ]
    for chunk in chunks:
        feed = {"input_ids": chunk, "cache_position": np.asarray(position, np.int32), **state}
        feeds.append(feed)
        outputs = session.run(None, feed)
        state = dict(zip(past_names, outputs[1:]))
        position += chunk.shape[1]
    return feeds[::3]


def make_setting(name, fp32_paths, work, train_ids, config):
    """Writes the setting's int8 copies of `model.onnx` and `decoder_step.onnx`
    into `work/name/`; returns their paths (the fp32 paths for `fp32`)."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from keras_primer.export.onnx_int8 import gemms_as_matmuls  # imports keras_primer

    if name == "fp32":
        return dict(fp32_paths)
    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for kind, src in fp32_paths.items():
        dst = os.path.join(folder, os.path.basename(src))
        dynamic = dict(
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"] if "_gather" in name else ["MatMul"],
            reduce_range="_reduce_range" in name,
        )
        if name == "export_int8":
            paths[kind] = _export_int8(src, dst)
            continue
        if name.startswith("preprocessed_"):
            pre = dst + ".pre.onnx"
            quant_pre_process(src, pre, skip_symbolic_shape=True)
        elif name.startswith("dynamic_matmul"):
            pre = src
        else:
            pre = gemms_as_matmuls(src, dst + ".pre.onnx")
        exclude = _excluded(name, pre)
        if "dynamic_" in name:
            quantize_dynamic(pre, dst, nodes_to_exclude=exclude, **dynamic)
        elif name.startswith("static_"):
            fmt = QuantFormat.QDQ if "qdq" in name else QuantFormat.QOperator
            quantize_static(
                pre,
                dst,
                _Feeds(
                    _calibration_feeds(
                        kind, src, train_ids, int(config["max_sequence_length"]), config["states"]
                    )
                ),
                quant_format=fmt,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                extra_options={"MatMulConstBOnly": True},
            )
        elif name.startswith("nbits8_"):
            block = int(name.split("block")[1].split("_")[0])
            accuracy_level = 4 if "int8_compute" in name else 0
            _matmul_nbits8(pre, dst, block, accuracy_level, exclude)
        else:
            raise ValueError(f"unknown setting {name}")
        paths[kind] = dst
    return paths


# === Measurements =========================================================


def _generator(onnx_dir, step_path):
    """`OrtGenerator` (one intra-op thread) whose decode step is `step_path`."""
    from keras_primer_runtime.ort_generator import OrtGenerator

    generator = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"], intra_op_num_threads=1)
    generator._step = _session(step_path)
    return generator


def window_agreement(reference, session, windows, batch=16):
    agree = []
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        a = reference.run(["logits"], feeds)[0].argmax(-1)
        b = session.run(["logits"], feeds)[0].argmax(-1)
        agree.append((a == b).ravel())
    agree = np.concatenate(agree)
    return float(agree.mean()), int(agree.size)


def step_agreement(reference, generator, windows):
    """Both decode the same text one token a step (after a PROMPT_TOKENS
    prefill); the fraction of steps where their argmaxes agree."""
    agree = []
    states = [reference.empty_state(len(windows)), generator.empty_state(len(windows))]
    logits = [None, None]
    for k, g in enumerate((reference, generator)):
        logits[k], states[k] = g.step(windows[:, :PROMPT_TOKENS], 0, states[k])
    for p in range(PROMPT_TOKENS, windows.shape[1]):
        agree.append(logits[0].argmax(-1) == logits[1].argmax(-1))
        for k, g in enumerate((reference, generator)):
            logits[k], states[k] = g.step(windows[:, p : p + 1], p, states[k])
    agree = np.concatenate(agree)
    return float(agree.mean()), int(agree.size)


def first_divergence(reference_ids, ids, prompt_lengths):
    """Per row, the index among the new tokens of the first one that differs
    from the reference's (None: none differs)."""
    rows = []
    for a, b, start in zip(reference_ids, ids, prompt_lengths):
        diff = [i - start for i, (x, y) in enumerate(zip(a, b)) if x != y]
        rows.append(diff[0] if diff else None)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx-dir", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--windows", type=int, default=8192, help="held-out positions, about")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()

    from keras_primer_runtime.export_folder import read_export

    config = read_export(args.onnx_dir)
    max_len = int(config["max_sequence_length"])
    fp32_paths = {
        kind: os.path.join(args.onnx_dir, config["files"][kind])
        for kind in ("model", "decoder_step")
    }
    train_ids, val_ids, codec = _held_out(args.onnx_dir, args.text, args.val_fraction)
    windows = _windows(val_ids, max_len, max(1, args.windows // max_len))
    step_windows = _windows(val_ids[len(val_ids) // 2 :], max_len, 48)
    new_tokens = min(args.new_tokens, max_len - PROMPT_TOKENS - 1)
    prompts = [
        codec.decode(w[:PROMPT_TOKENS].tolist()) for w in _windows(val_ids, PROMPT_TOKENS, 8)
    ]
    print(
        json.dumps(
            {
                "onnx_dir": args.onnx_dir,
                "max_sequence_length": max_len,
                "held_out_tokens": int(len(val_ids)),
                "window_positions": int(windows.size),
                "prompts": prompts,
                "new_tokens": new_tokens,
            }
        ),
        flush=True,
    )
    names = args.settings.split(",")
    settings = {}
    reference = _session(fp32_paths["model"])
    reference_gen = _generator(args.onnx_dir, fp32_paths["decoder_step"])
    reference_greedy = reference_gen.generate(
        prompts, max_new_tokens=new_tokens, return_token_ids=True
    )
    fp32_size = sum(os.path.getsize(p) for p in fp32_paths.values())
    for name in names:
        start = time.time()
        paths = make_setting(name, fp32_paths, args.work, train_ids, config)
        generator = _generator(args.onnx_dir, paths["decoder_step"])
        settings[name] = generator
        if name == "fp32":
            continue
        full, full_n = window_agreement(reference, _session(paths["model"]), windows)
        step, step_n = step_agreement(reference_gen, generator, step_windows)
        greedy = generator.generate(prompts, max_new_tokens=new_tokens, return_token_ids=True)
        size = sum(os.path.getsize(p) for p in paths.values())
        print(
            json.dumps(
                {
                    "setting": name,
                    "agreement": {
                        "model_onnx_windows": round(full, 4),
                        "positions": full_n,
                        "decoder_step_teacher_forced": round(step, 4),
                        "step_positions": step_n,
                        "greedy_first_divergence": first_divergence(
                            reference_greedy,
                            greedy,
                            [len(reference_gen.tokenize(p)) for p in prompts],
                        ),
                    },
                    "size": {"bytes": size, "over_fp32": round(size / fp32_size, 3)},
                    "seconds_to_build": round(time.time() - start, 1),
                }
            ),
            flush=True,
        )
    if args.skip_speed:
        return
    # Speed: the settings interleaved in each round; CPU seconds, one thread.
    past_lengths = sorted({min(max_len - 1, x) for x in (PROMPT_TOKENS, max_len // 2, max_len - 1)})
    batch_ids = _windows(val_ids, max_len, 8)
    states = {}
    for length in past_lengths:
        _, state = reference_gen.step(batch_ids[:, :length], 0, reference_gen.empty_state(8))
        states[length] = {k: v.numpy() for k, v in state.items()}
    timings = {name: {"generate": []} for name in names}
    steps_per_call = 20
    for round_ in range(args.repeats + 1):  # the first round warms up
        for name, generator in settings.items():
            start = time.process_time()
            generator.generate(prompts, max_new_tokens=new_tokens)
            elapsed = time.process_time() - start
            if round_:
                timings[name]["generate"].append(elapsed)
            for length in past_lengths:
                token = batch_ids[:, length : length + 1]
                start = time.process_time()
                for _ in range(steps_per_call):
                    generator.step(token, length, states[length])
                elapsed = (time.process_time() - start) / steps_per_call
                if round_:
                    timings[name].setdefault(f"step_past_{length}", []).append(elapsed)
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    for name in names:
        print(
            json.dumps(
                {
                    "setting": name,
                    "speed": {
                        k: {
                            "cpu_ms": round(1000 * v, 3),
                            "ratio": round(medians["fp32"][k] / v, 3)
                            if "fp32" in medians
                            else None,
                        }
                        for k, v in medians[name].items()
                    },
                    "repeats": args.repeats,
                    "batch": 8,
                    "new_tokens": new_tokens,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

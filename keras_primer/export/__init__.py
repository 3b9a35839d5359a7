"""Production export: TF Serving SavedModel, ONNX, ONNX Runtime generation.

`export_model("model.keras", "out/")` writes

    out/serving/models.config              (merged: one entry per model)
    out/serving/<name>/<version>/          (SavedModel, TF Serving layout)
    out/onnx/model.onnx, decoder_step.onnx, export_config.json (+ int8)

The options are declared once (`keras_primer_cli.export_options.ExportOptions`,
the keywords of `export_model` and the flags of `keras-primer export`). One
export writes into `out` at a time (`out/.lock`; a second one waits). Under
the lock, the existing outputs are checked, everything is written into a
temporary folder inside `out`, the SavedModel's warmup requests are
replayed, and the results are moved into place only when complete;
`overwrite=True` replaces an existing version and ONNX folder.

Whatever backend trained the model, the export runs under the TensorFlow
backend: in this process when it already uses it, else in a
`KERAS_BACKEND=tensorflow` subprocess.

Submodules: `saved_model`, `onnx_export` (TensorFlow backend), `onnx_int8`
(`--int8`; onnx and onnxruntime only). The runtime
side (no Keras/TensorFlow) is `keras_primer_runtime.ort_generator` and
`keras_primer_runtime.serving_client`.
"""

from keras_primer.export.command import export_model

__all__ = ["export_model"]

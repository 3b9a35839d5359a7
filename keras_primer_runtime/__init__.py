"""The framework-free side of keras-primer.

Everything here imports with the standard library, NumPy and (where a module
says so) onnxruntime, sentencepiece or the TF Serving API alone: no Keras,
TensorFlow, JAX or PyTorch. It holds what must start fast or run where no
deep-learning framework is installed: the `keras-primer` command line front
end, the decoding contract shared by every runtime, ONNX Runtime generation
and the TF Serving client. `keras_primer` (the Keras library) builds on it.
"""

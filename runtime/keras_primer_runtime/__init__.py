"""keras-primer-runtime: run keras-primer exports without a deep-learning framework.

Imports with the standard library and NumPy; ONNX Runtime, sentencepiece
and the TF Serving API are imported where they are used. Nothing here
imports Keras, TensorFlow, JAX, PyTorch or the `keras_primer` library.

* `generation`: the generation contract every runtime applies (sampling
  options, prompts, tokenizer codecs, the decoding loop, the state layout).
* `ort_generator.OrtGenerator`: text generation from an ONNX export.
* `serving_client`: REST and gRPC requests for the SavedModel in TF Serving.

    from keras_primer_runtime import OrtGenerator
    print(OrtGenerator("exports/primer/onnx").generate("ROMEO:", max_new_tokens=40))
"""

from keras_primer_runtime.ort_generator import OrtGenerator

__all__ = ["OrtGenerator"]
__version__ = "0.1.0"

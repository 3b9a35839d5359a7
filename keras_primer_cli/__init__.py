"""The `keras-primer` command line front end (standard library only at import).

Flags, presets, the model registry, parsers, export options, log silencing
and the folder lock: what `keras-primer --help`, a bad flag or a bad path
needs, answered before any framework starts. Each command (`train`,
`export`) imports the library (`keras_primer`) once, late, when its
arguments are checked. Nothing here imports Keras, TensorFlow, JAX or
PyTorch at module level.
"""

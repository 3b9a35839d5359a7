"""The pre-norm residual branch shared by `PrimerDecoderBlock` and the
feedback layers of `FeedbackStack`: `x + drop(sublayer(norm(x)))`."""

from collections.abc import Callable


def call_sublayer(layer, *args, **kwargs):
    """Calls a child layer from inside its parent's `call`.

    Plain `layer.call` skips `__call__`'s bookkeeping (autocast, masks,
    name scopes), whose Python cost dominates PyTorch's per-step time loop;
    the parent already did that work with the same dtype policy. Quantized
    layers go through `__call__`, which is where Keras dispatches to
    `quantized_call` (their `call` would use the raw integer kernel).
    """
    if getattr(layer, "quantization_mode", None) is not None:
        return layer(*args, **kwargs)
    return layer.call(*args, **kwargs)


def pre_norm_residual(
    x,
    norm,
    sublayer: Callable,
    drop: Callable | None = None,
    fast: bool = False,
):
    """`x + drop(sublayer(norm(x)))`, the residual branch of a pre-norm block.

    Args:
        x: Residual stream.
        norm: The branch's normalisation layer.
        sublayer: Callable on the normalised input (attention with its extra
            arguments bound, or the feed-forward layer).
        drop: Optional callable applied to the branch output (dropout, or a
            mask drawn beforehand); None = identity.
        fast: Call `norm` through `call_sublayer` (inside a time loop).
    """
    normed = call_sublayer(norm, x) if fast else norm(x)
    branch = sublayer(normed)
    if drop is not None:
        branch = drop(branch)
    return x + branch

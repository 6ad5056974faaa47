"""Running a transformers model under one of opd-cli's attention implementations, and the
check that every layer went through it."""

from __future__ import annotations

import logging
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def attention_implementation(model, name: str):
    """Run ``model`` with the attention implementation ``name`` inside the block."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def every_layer_ran(model, calls: int, flag: str, otherwise: str) -> bool:
    """Whether all of ``model``'s layers attended through one of opd-cli's attention implementations.

    If not, the model is marked (attribute ``flag``) so the caller takes its plain path from
    then on, and one warning says ``otherwise``.
    """
    layers = model.config.num_hidden_layers
    if calls == layers:
        return True
    log.warning("%s: %d of %d layers %s instead", model.config.model_type, calls, layers, otherwise)
    setattr(model, flag, True)
    return False


# attention arguments that change the attention itself, which packed_attention does not implement:
# a layer given one is not counted, so the model is scored with padding instead
UNSUPPORTED = ("softcap", "s_aux", "position_bias")

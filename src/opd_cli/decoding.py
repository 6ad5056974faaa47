"""Forward passes of the decoding loop: prefill a batch of prompts, then one token at a time.

``BufferedDecoder`` keeps keys and values in one preallocated buffer per layer
(``[B, H_kv, capacity, dh]``) and attends through the ``opd_kv_buffer`` attention
implementation registered with transformers' ``AttentionInterface``: each step
writes one column and attends over the filled slots with a key-padding mask.
That replaces what a transformers cache costs per step (a concatenation of every
layer's growing keys and values, and a new 4D mask), while every other part of
the forward (embeddings, norms, rotary positions, MLPs, the head) is the
model's own code.

A model whose layers do not all attend through ``AttentionInterface`` is found
on its first prefill and decoded with transformers' own cache (``CacheDecoder``)
from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from opd_cli.packed import UNSUPPORTED, attention_implementation

log = logging.getLogger(__name__)

NAME = "opd_kv_buffer"


@dataclass
class KVBuffer:
    """Keys and values of every layer for B sequences, filled left to right."""

    valid: torch.Tensor  # [B, capacity] bool, slots holding a real token (prompts are left-padded)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H_kv, capacity, dh]
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # slots filled so far
    calls: int = 0  # attention layers that ran on the buffer (checked against the layer count)

    def select(self, rows: torch.Tensor) -> None:
        self.valid = self.valid[rows]
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


def buffered_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Write this step's keys and values into ``kwargs['opd_kv']`` and attend over the filled slots."""
    buf: KVBuffer = kwargs["opd_kv"]
    if any(kwargs.get(k) is not None for k in UNSUPPORTED):
        return query.transpose(1, 2), None  # not counted: the decoder falls back to transformers' cache
    buf.calls += 1
    i, t0, q_len = module.layer_idx, buf.length, query.shape[2]
    if i == len(buf.keys):
        shape = (key.shape[0], key.shape[1], buf.valid.shape[1], key.shape[-1])
        buf.keys.append(key.new_zeros(shape))
        buf.values.append(value.new_zeros(shape))
    S = t0 + q_len
    buf.keys[i][:, :, t0:S] = key
    buf.values[i][:, :, t0:S] = value
    slot = torch.arange(S, device=query.device)
    at = slot[t0:, None]  # [q_len, 1] the slot of each query
    # causal over the filled slots, real keys only; each query also sees itself, so a padding
    # query has one key and stays finite
    mask = ((slot <= at) & buf.valid[:, None, None, :S]) | (slot == at)
    if (window := kwargs.get("sliding_window")) is not None:
        mask &= at - slot < window
    out = F.scaled_dot_product_attention(
        query, buf.keys[i][:, :, :S], buf.values[i][:, :, :S], attn_mask=mask, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2), None


AttentionInterface.register(NAME, buffered_attention)


class BufferedDecoder:
    """Prefill and decoding steps over a ``KVBuffer`` of ``capacity`` slots per sequence."""

    def __init__(self, model, capacity: int) -> None:
        self.model, self.capacity = model, capacity

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, V]`` after left-padded prompts ``[B, P]``."""
        self.buf = KVBuffer(valid=torch.zeros(ids.shape[0], self.capacity, dtype=torch.bool, device=ids.device))
        self.buf.valid[:, : ids.shape[1]] = attn.bool()
        return self._forward(ids, pos)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, V]`` after appending ``tok [B]`` at positions ``pos [B, 1]``."""
        self.buf.valid[:, self.buf.length] = True
        return self._forward(tok[:, None], pos)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) these rows of the batch."""
        self.buf.select(rows)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with attention_implementation(self.model, NAME):
            out = self.model(input_ids=ids, position_ids=pos, opd_kv=self.buf, use_cache=False, logits_to_keep=1)
        self.buf.length += ids.shape[1]
        return out.logits[:, -1]


class CacheDecoder:
    """The same interface on transformers' own KV cache (any model)."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.cache, self.attn = out.past_key_values, attn
        return out.logits[:, -1]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], 1)
        out = self.model(
            input_ids=tok[:, None], attention_mask=self.attn, position_ids=pos, past_key_values=self.cache,
            use_cache=True,
        )  # fmt: skip
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attn = self.attn[rows]


def prefill(model, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, capacity: int):
    """A decoder for ``model`` with the prompts prefilled, and the next-token logits ``[B, V]``."""
    if not getattr(model, "_opd_buffer_fails", False):
        decoder = BufferedDecoder(model, capacity)
        logits = decoder.prefill(ids, attn, pos)
        layers = model.config.num_hidden_layers
        if decoder.buf.calls == layers:
            return decoder, logits
        log.warning(
            "%s: %d of %d layers attended through the KV buffer; decoding with transformers' cache instead",
            model.config.model_type, decoder.buf.calls, layers,
        )  # fmt: skip
        model._opd_buffer_fails = True
    decoder = CacheDecoder(model)
    return decoder, decoder.prefill(ids, attn, pos)

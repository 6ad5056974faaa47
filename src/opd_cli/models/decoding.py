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

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from opd_cli.cpu_linear import linear
from opd_cli.models.attention import UNSUPPORTED, attention_implementation, every_layer_ran

NAME = "opd_kv_buffer"


@dataclass
class KVBuffer:
    """Keys and values of every layer for B sequences, filled left to right."""

    valid: torch.Tensor  # [B, capacity] bool, slots holding a real token (prompts are left-padded)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H_kv, capacity, dh]
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # slots filled so far
    calls: int = 0  # attention layers that ran on the buffer (checked against the layer count)
    # layer -> (scaling, sliding window), as the model's own forward passed them
    settings: dict[int, tuple] = field(default_factory=dict)

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
    buf.settings[module.layer_idx] = (scaling, kwargs.get("sliding_window"))
    return attend(buf, module.layer_idx, query, key, value).transpose(1, 2), None


def attend(buf: KVBuffer, i: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Layer ``i``: store ``key``/``value`` ``[B, H_kv, q, dh]`` at the next slots, attend; ``[B, H, q, dh]``."""
    t0, q_len = buf.length, query.shape[2]
    if i == len(buf.keys):
        shape = (key.shape[0], key.shape[1], buf.valid.shape[1], key.shape[-1])
        buf.keys.append(key.new_zeros(shape))
        buf.values.append(value.new_zeros(shape))
    S = t0 + q_len
    buf.keys[i][:, :, t0:S] = key
    buf.values[i][:, :, t0:S] = value
    scaling, window = buf.settings[i]
    if q_len == 1 and query.device.type == "cpu" and window is None:
        return _attend_one(query, buf.keys[i][:, :, :S], buf.values[i][:, :, :S], buf.valid[:, None, None, :S], scaling)
    slot = torch.arange(S, device=query.device)
    at = slot[t0:, None]  # [q_len, 1] the slot of each query
    # causal over the filled slots, real keys only; each query also sees itself, so a padding
    # query has one key and stays finite
    mask = ((slot <= at) & buf.valid[:, None, None, :S]) | (slot == at)
    if window is not None:
        mask &= at - slot < window
    return F.scaled_dot_product_attention(
        query, buf.keys[i][:, :, :S], buf.values[i][:, :, :S], attn_mask=mask, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip


def _attend_one(query, keys, values, valid, scaling):
    """One decoding step's attention on CPU, ``query [B, H, 1, dh]`` over ``keys``/``values [B, H_kv, S, dh]``.

    Written out as two batched products: at one query per sequence this is 60 against SDPA's
    88 us per layer on the demo. The step's own slot is valid, so no row is fully masked.
    """
    B, H, _, dh = query.shape
    q = query.reshape(B, keys.shape[1], -1, dh)  # the query heads of each key head
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(dh**-0.5 if scaling is None else scaling)
    weights = scores.masked_fill_(~valid, float("-inf")).softmax(-1)
    return torch.matmul(weights, values).view(B, H, 1, dh)


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


# Llama-family decoder layers (pre-norm RMSNorm, rotary attention with optional per-head q/k norms,
# SiLU-gated MLP), whose decoding step LeanDecoder writes out with the model's weights
LEAN_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class LeanDecoder(BufferedDecoder):
    """``BufferedDecoder`` whose decoding steps call the layers' weights directly.

    The prefill is the model's own forward, which also records each layer's attention
    scaling and window. A step is then about half the tensor operations of the
    transformers forward (one fused RMSNorm, no per-module dispatch): on the demo a
    step took 0.77 instead of 1.04 ms. Only for ``LEAN_TYPES``
    and not under ZeRO-3 (its parameters exist only inside module calls).
    """

    def __init__(self, model, capacity: int) -> None:
        super().__init__(model, capacity)
        # the tensors each step reads, looked up once (module attribute access costs ~1 ms per
        # step on the demo); the same tensors the optimizer updates in place between rollouts
        self.layers = [LeanLayer.of(layer) for layer in model.model.layers]
        self.final_norm, self.head = norm(model.model.norm), model.lm_head.weight
        # cos and sin of every position a step can reach, [capacity, 2, dh], when they depend on the
        # position alone (one lookup per step: 12 instead of 30 us); rotary types that rescale with
        # the length seen so far keep the model's own rotary_emb
        rope, self.rope_table = model.model.rotary_emb, None
        if getattr(rope, "rope_type", None) == "default":
            param = model.lm_head.weight
            cos, sin = rope(param.new_empty(1), torch.arange(capacity, device=param.device)[None])
            self.rope_table = torch.stack([cos[0], signed(sin[0])], 1)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.buf.valid[:, self.buf.length] = True
        base, B = self.model.model, tok.shape[0]
        x = base.embed_tokens(tok[:, None])  # [B, 1, d]
        if self.rope_table is None:
            cos, sin = base.rotary_emb(x, pos)
            cos, sin = cos[:, None], signed(sin)[:, None]  # [B, 1, 1, dh], broadcast over heads
        else:
            cos, sin = self.rope_table[pos][:, :, None].unbind(3)
        for i, w in enumerate(self.layers):
            h = rms_norm(w.norm_in, x)
            q, k, v = (linear(h, *proj).view(B, 1, -1, w.head_dim) for proj in (w.q, w.k, w.v))
            if w.q_norm is not None:  # Qwen3: RMSNorm of each head
                q, k = rms_norm(w.q_norm, q), rms_norm(w.k_norm, k)
            q, k, v = (t.transpose(1, 2) for t in (rotate(q, cos, sin), rotate(k, cos, sin), v))
            x = x + linear(attend(self.buf, i, q, k, v).transpose(1, 2).reshape(B, 1, -1), *w.o)
            h = rms_norm(w.norm_mid, x)
            x = x + linear(F.silu(linear(h, w.gate)) * linear(h, w.up), w.down)
        self.buf.length += 1
        return linear(rms_norm(self.final_norm, x)[:, -1], self.head)

    @staticmethod
    def fits(model) -> bool:
        """A Llama-family model whose projections are plain linear layers: the step reads their weights
        directly, so a layer that adds to its weight's product (a LoRA adapter) needs the model's own forward."""
        c = model.config
        if c.model_type not in LEAN_TYPES or c.hidden_act != "silu" or getattr(c, "mlp_bias", False):
            return False
        return all(isinstance(m, nn.Linear) for layer in model.model.layers for m in LeanLayer.projections(layer))


class LeanLayer(NamedTuple):
    """One Llama-family decoder layer's tensors: norms as (weight, eps), projections as (weight, bias)."""

    norm_in: tuple
    q: tuple
    k: tuple
    v: tuple
    q_norm: tuple | None  # Qwen3's per-head norms
    k_norm: tuple | None
    o: tuple
    norm_mid: tuple
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    head_dim: int

    @staticmethod
    def projections(layer) -> tuple:
        a, mlp = layer.self_attn, layer.mlp
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj

    @staticmethod
    def of(layer) -> LeanLayer:
        a, mlp = layer.self_attn, layer.mlp
        proj = [(m.weight, m.bias) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
        q_norm, k_norm = (norm(a.q_norm), norm(a.k_norm)) if hasattr(a, "q_norm") else (None, None)
        return LeanLayer(
            norm(layer.input_layernorm), *proj[:3], q_norm, k_norm, proj[3], norm(layer.post_attention_layernorm),
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, a.head_dim,
        )  # fmt: skip


def norm(module) -> tuple[torch.Tensor, float]:
    return module.weight, module.variance_epsilon


def rms_norm(weight_eps: tuple[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    weight, eps = weight_eps
    return F.rms_norm(x, weight.shape, weight, eps)


def signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, as ``rotate`` takes it."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, q, H, dh]`` (the half-split convention of the Llama family).

    ``sin`` comes ``signed``: ``x cos + (-x2, x1) sin`` is then ``x cos + roll(x) sin`` (three
    operations instead of five; 8 instead of 11 us on a decoding step's queries).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


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


def prefill(model, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, capacity: int, lean: bool = True):
    """A decoder for ``model`` with the prompts prefilled, and the next-token logits ``[B, V]``.

    ``LeanDecoder`` where ``lean`` and the model is of the Llama family, else
    ``BufferedDecoder``, else (layers that do not all attend through the buffer)
    ``CacheDecoder``. A model marked ``_opd_lean_fails`` or ``_opd_buffer_fails``
    (``models.checks.choose_decoder``: that decoder disagreed with the model's forward)
    skips that decoder.
    """
    if not getattr(model, "_opd_buffer_fails", False):
        lean = lean and LeanDecoder.fits(model) and not getattr(model, "_opd_lean_fails", False)
        decoder = (LeanDecoder if lean else BufferedDecoder)(model, capacity)
        logits = decoder.prefill(ids, attn, pos)
        otherwise = "attended through the KV buffer; decoding with transformers' cache"
        if every_layer_ran(model, decoder.buf.calls, "_opd_buffer_fails", otherwise):
            return decoder, logits
    decoder = CacheDecoder(model)
    return decoder, decoder.prefill(ids, attn, pos)

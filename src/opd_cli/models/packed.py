"""The scoring pass without padding: a batch's real tokens as one packed sequence.

A rollout batch is largely padding: prompts are left-padded to the longest
prompt, responses right-padded to the longest response, and the n responses of
a prompt repeat its tokens. The scoring pass (teacher and student) needs none of
that. ``response_hidden`` runs the transformers model once over the real tokens,
each prompt once for its group of responses, so every linear layer, norm and MLP
(nearly all of the FLOPs) sees ``[1, N_real, d]``. A response's last token is left out:
its output would predict nothing, and no token attends to it. The response columns may
hold tokens that are context but not supervised (a multi-turn episode's observations,
``opd_cli.envs``): which tokens are inputs follows ``attention_mask``, which are
predicted follows ``response_mask``.

Only attention needs to know which token sees which. It runs under the
``opd_packed`` attention implementation, registered with transformers'
``AttentionInterface``: the packed queries, keys and values are gathered into a
per-sequence layout whose row r holds its prompt's tokens then its response's,
left-aligned, so plain causal attention (no mask) is exact; the outputs are
gathered back to packed order. Rows are sorted by length into a few blocks
``[rows, H, width, dh]`` (``BUCKETS``), so short rows are not padded to the longest.
A prompt's queries are recomputed in each of its rows (attention only, cheap) and
only the group's first row's copy is kept, so each prompt token contributes once to
the gradient of everything after it.

A model whose layers do not all route attention through ``AttentionInterface``
(recurrent or linear-attention layers, custom code) would mix packed sequences,
so each model is checked on its first packed pass; one that fails the check is
scored the padded way from then on (``padded_hidden``), with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from opd_cli.batch import RolloutBatch
from opd_cli.models.attention import UNSUPPORTED, attention_implementation, every_layer_ran

NAME = "opd_packed"


# rows of the attention layout are sorted by length into at most this many blocks
BUCKETS = 4


@dataclass
class Packing:
    """Where each packed token sits in the per-sequence attention layout, and back."""

    input_ids: torch.Tensor  # [1, N] the real tokens: each prompt once (in its group's first row), every response
    position_ids: torch.Tensor  # [1, N] their positions within their sequence
    layout: torch.Tensor  # [slots] long, packed index of each layout slot (0 in trailing padding)
    buckets: list[tuple[int, int, int]]  # (first slot, rows, width): the layout's [rows, width] blocks
    owner: torch.Tensor  # [N] long, the layout slot whose output each packed token takes
    predict: torch.Tensor  # [M] long, packed index of the output that predicts each response token
    targets: torch.Tensor  # [M] long, the response tokens, row-major over ``response_mask``
    calls: int = 0  # attention layers that ran packed (checked against the model's layer count)


def pack(batch: RolloutBatch, device: torch.device) -> Packing:
    """The packed form of ``batch`` (see the module docstring)."""
    ids, attn, rmask, P = batch.input_ids, batch.attention_mask.bool(), batch.response_mask, batch.prompt_len
    first, group = batch.prompt_groups()
    is_first = torch.zeros(ids.shape[0], dtype=torch.bool)
    is_first[first] = True
    # a token after the prompt is an input when the next one is real: the last one's output would
    # predict nothing and no later token attends to it. Real, not supervised: a multi-turn row holds
    # observations between its actions, context that later actions attend to (targets come from
    # ``response_mask``; single-turn, the two agree)
    inputs = torch.cat([attn[:, P + 1 :], torch.zeros_like(attn[:, :1])], dim=1)
    # packed tokens in the batch's row-major order: a prompt's tokens in its group's first row only
    own = torch.cat([attn[:, :P] & is_first[:, None], inputs], dim=1)
    index = own.flatten().long().cumsum(0).view(own.shape) - 1  # packed index of each owned slot
    # what row r attends over: its group's prompt (owned by the first row), then its own response
    seen = torch.cat([attn[:, :P], inputs], dim=1)
    seen_index = torch.cat([index[first[group], :P], index[:, P:]], dim=1)
    # left-align: the k-th real token of row r goes to column k of its row in the layout. Rows are
    # sorted by length into up to BUCKETS blocks, each as wide as its longest row: attention costs
    # rows x width^2 per block, less than all rows at the longest width
    col = seen.long().cumsum(1) - 1
    lengths = seen.sum(1)
    start = torch.empty_like(lengths)  # first layout slot of each row
    buckets, slots = [], 0
    for rows in lengths.argsort().tensor_split(min(BUCKETS, len(lengths))):
        width = int(lengths[rows].max())
        start[rows] = slots + torch.arange(len(rows)) * width
        buckets.append((slots, len(rows), width))
        slots += len(rows) * width
    slot = start[:, None] + col
    layout = torch.zeros(slots, dtype=torch.long)
    layout[slot[seen]] = seen_index[seen]
    # the output at j - 1 predicts token j; a response's first token is predicted by its prompt's last
    prev = torch.cat([index[first[group], P - 1 : P], index[:, P:-1]], dim=1)
    target_mask = rmask[:, P:]
    return Packing(
        input_ids=ids[own][None].to(device),
        position_ids=batch.position_ids[own][None].to(device),
        layout=layout.to(device),
        buckets=buckets,
        owner=slot[own].to(device),
        predict=prev[target_mask].to(device),
        targets=ids[:, P:][target_mask].to(device),
    )


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention of packed ``[1, H, N, dh]`` tensors within each sequence of ``kwargs['opd_packing']``."""
    p: Packing = kwargs["opd_packing"]
    if any(kwargs.get(k) is not None for k in UNSUPPORTED):
        return query.transpose(1, 2), None  # not counted: response_hidden falls back to the padded pass
    p.calls += 1
    q, k, v = (in_layout(t[0], p.layout) for t in (query, key, value))  # [slots, H, dh]
    window = kwargs.get("sliding_window")
    outs = []
    # split, not sliced: the backward of a split is one concatenation, where each slice's would be a
    # zero-filled copy of the whole tensor
    sizes = [rows * width for _, rows, width in p.buckets]
    for (_, rows, width), *qkv in zip(p.buckets, *(t.split(sizes) for t in (q, k, v)), strict=True):
        qb, kb, vb = (t.view(rows, width, *t.shape[1:]).transpose(1, 2) for t in qkv)
        mask = None
        if window is not None and window < width:  # a token sees the `window` most recent tokens, itself included
            i = torch.arange(width, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        out = F.scaled_dot_product_attention(  # [rows, H, width, dh]
            qb, kb, vb, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling,
            enable_gqa=kb.shape[1] != qb.shape[1],
        )  # fmt: skip
        outs.append(out.transpose(1, 2).reshape(rows * width, out.shape[1], out.shape[-1]))
    out = torch.cat(outs).index_select(0, p.owner)  # [N, H, dh]
    return out[None], None


def in_layout(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """Tokens of ``t [H, N, dh]`` in layout order, ``[slots, H, dh]``, gathered along its memory order.

    Queries arrive as a transposed view of ``[N, H, dh]``, keys and values (on the demo) as
    ``[H, N, dh]`` itself; gathering across the strides instead took 15x as long.
    """
    if t.transpose(0, 1).is_contiguous():
        return t.transpose(0, 1).index_select(0, layout)
    return t.index_select(1, layout).transpose(0, 1)


AttentionInterface.register(NAME, packed_attention)


def padded_hidden(model, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_hidden`` the plain way: one forward over the padded ``[B, L]`` batch."""
    device = model.device
    ids, attn, pos = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.position_ids))
    out = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    P = batch.prompt_len
    target_mask = batch.response_mask[:, P:].to(device)
    return out[:, P - 1 : -1][target_mask], ids[:, P:][target_mask]


def response_hidden(model, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states that predict each response token, and those tokens.

    Returns ``h [M, d]`` (the output at position j - 1 predicts token j) and
    ``y [M]``, flat over ``batch.response_mask`` in row-major order, computed on the
    packed real tokens only (module docstring).
    """
    if getattr(model, "_opd_packing_fails", False):
        return padded_hidden(model, batch)
    p = pack(batch, model.device)
    with attention_implementation(model, NAME):
        # no KV cache: it would hold every layer's keys and values to the end of the forward (and under
        # activation checkpointing, keep what the recomputation is there to free)
        out = model.base_model(
            input_ids=p.input_ids, position_ids=p.position_ids, opd_packing=p, use_cache=False
        ).last_hidden_state
    if not every_layer_ran(
        model, p.calls, "_opd_packing_fails", "ran packed attention; scoring this model with padding"
    ):
        return padded_hidden(model, batch)
    return out[0, p.predict], p.targets

"""Packed scoring and buffered decoding against one plain forward pass per unpadded sequence.

Tiny random models built from configs: Qwen2 (the demo's family), Llama with
grouped-query attention, Mistral with a sliding window shorter than the
sequences, Qwen3 (per-head q/k norms, attention bias), Gemma (not of the Llama
family: no lean decoding step) and Gemma2, whose logit soft-capping the packed
and buffered attentions do not implement, so it must fall back to the padded
pass and to transformers' cache and still be exact.
"""

import logging

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opd_cli.batch import build_batch, position_ids
from opd_cli.envs.rollout import Transcript, to_batch
from opd_cli.models.decoding import BufferedDecoder, CacheDecoder, LeanDecoder, prefill
from opd_cli.models.packed import padded_hidden, response_hidden

V, EOS, PAD = 61, 1, 0
SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
MODELS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, num_attention_heads=4, num_key_value_heads=2)),
    # a rotary type other than "default": the lean step calls the model's rotary_emb, no table
    "llama_rope_linear": lambda: LlamaForCausalLM(
        LlamaConfig(**SHAPE, num_attention_heads=4, num_key_value_heads=2, rope_parameters=LINEAR_ROPE)
    ),
    "mistral_window": lambda: MistralForCausalLM(
        MistralConfig(**SHAPE, num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    ),
    "qwen3_qk_norm": lambda: Qwen3ForCausalLM(
        Qwen3Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True)
    ),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SHAPE, num_attention_heads=4, num_key_value_heads=1, head_dim=8)),
    "gemma2_softcap": lambda: Gemma2ForCausalLM(
        Gemma2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6)
    ),
}


def make_model(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.config._attn_implementation = "sdpa"
    return model.double()


def random_batch(seed=0, n_prompts=3, n=3):
    """Left-padded prompts of 2-6 tokens, n responses each of 1-9 tokens (EOS-ended or cut)."""
    g = torch.Generator().manual_seed(seed)
    P, T = 6, 9
    ids = torch.full((n_prompts, P), PAD)
    attn = torch.zeros(n_prompts, P, dtype=torch.long)
    for i in range(n_prompts):
        length = int(torch.randint(2, P + 1, (1,), generator=g))
        ids[i, P - length :] = torch.randint(2, V, (length,), generator=g)
        attn[i, P - length :] = 1
    response = torch.randint(2, V, (n_prompts * n, T), generator=g)
    for r in range(n_prompts * n):
        if (end := int(torch.randint(0, T + 3, (1,), generator=g))) < T:
            response[r, end] = EOS
            response[r, end + 1 :] = PAD
    logps = torch.zeros(response.shape)
    return build_batch(ids, attn, response, logps, EOS, n)


def random_multiturn_batch(seed=0, rows=5):
    """Multi-turn episodes: 2-6-token prompts (rows 0 and 1 share one), then 1-3 actions of 1-4 tokens
    with 1-3-token observations between them (context, not supervised)."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return torch.randint(2, V, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    transcripts = []
    for r in range(rows):
        t = Transcript(list(transcripts[0].prompt) if r == 1 else draw(2, 6))
        for turn in range(int(torch.randint(1, 4, (1,), generator=g))):
            if turn:
                t.add_observation(draw(1, 3))
            action = draw(1, 4)
            t.add_action(action, [0.0] * len(action), None)
        transcripts.append(t)
    return to_batch(transcripts, [False] * rows, PAD)


def per_row_reference(model, batch):
    """Hidden states predicting each response token: one unpadded sequence at a time, plain sdpa."""
    hs, ys = [], []
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real]
        h = model.base_model(input_ids=ids[None]).last_hidden_state[0]
        resp = batch.response_mask[row][real]
        hs.append(h[:-1][resp[1:]])
        ys.append(ids[resp])
    return torch.cat(hs), torch.cat(ys)


def hidden_and_grads(model, fn, batch, weight=None):
    model.zero_grad()
    h, y = fn(model, batch)
    if weight is None:
        weight = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
    (h * weight).sum().backward()
    return h.detach(), y, [p.grad.clone() for p in model.base_model.parameters()], weight


def assert_grads_close(got, want):
    """Each gradient within 1e-6 of its own scale: the models compute RMSNorm (and rotary
    angles) in float32 even in a float64 model, so sharing a prompt's pass changes the
    rounding, not the math (a missing or doubled gradient path is off by O(1))."""
    for a, r in zip(got, want, strict=True):
        assert (a - r).abs().max() <= 1e-6 * r.abs().max(), (a - r).abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_scoring_equals_one_pass_per_sequence(name, caplog):
    model = make_model(name)
    batch = random_batch()
    sub = batch.select(torch.tensor([1, 2, 3, 7]))  # a micro-batch: groups split, one row alone
    for b in (batch, sub):
        h_ref, y_ref, g_ref, w = hidden_and_grads(model, per_row_reference, b)
        with caplog.at_level(logging.WARNING, logger="opd_cli.models.attention"):
            h, y, g, _ = hidden_and_grads(model, response_hidden, b, w)
        assert y.equal(y_ref)
        torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
        assert_grads_close(g, g_ref)
    assert model.config._attn_implementation == "sdpa"  # restored after each pass
    # Gemma2's soft-capped attention is not packed: it is found once and scored with padding after
    assert getattr(model, "_opd_packing_fails", False) == (name == "gemma2_softcap")
    assert ("scoring this model with padding" in caplog.text) == (name == "gemma2_softcap")


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_scoring_of_multiturn_rows_attends_over_observations(name):
    """Observation tokens inside the response columns are context: each action token's hidden state (and
    its gradient) equals a plain pass over the whole unpadded sequence, whole batch and micro-batch."""
    model = make_model(name)
    batch = random_multiturn_batch()
    assert (batch.attention_mask.bool() & ~batch.response_mask)[:, batch.prompt_len :].any()  # observations
    for b in (batch, batch.select(torch.tensor([1, 2, 4]))):
        h_ref, y_ref, g_ref, w = hidden_and_grads(model, per_row_reference, b)
        for fn in (response_hidden, padded_hidden):
            h, y, g, _ = hidden_and_grads(model, fn, b, w)
            assert y.equal(y_ref)
            torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
            assert_grads_close(g, g_ref)


def test_padded_pass_equals_one_pass_per_sequence():
    model = make_model("llama_gqa")
    batch = random_batch(seed=3)
    h_ref, y_ref, g_ref, w = hidden_and_grads(model, per_row_reference, batch)
    h, y, g, _ = hidden_and_grads(model, padded_hidden, batch, w)
    assert y.equal(y_ref)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    assert_grads_close(g, g_ref)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "not_lean"])
@torch.no_grad()
def test_decoder_logits_equal_a_full_forward_of_each_sequence(name, lean):
    """Prefill left-padded prompts, repeat rows, drop rows, step: each step's logits are the full pass's.

    Llama-family models decode with ``LeanDecoder`` (``lean``, as outside ZeRO-3), others with
    the buffer, Gemma2 with transformers' cache. The lean step normalizes in float64 where
    transformers' RMSNorm rounds to float32, hence 1e-6 and not float64 rounding.
    """
    model = make_model(name).eval()
    batch = random_batch(seed=1, n=1)
    P = batch.prompt_len
    ids, attn = batch.input_ids[:, :P], batch.attention_mask[:, :P]
    decoder, logits = prefill(model, ids, attn, position_ids(attn), P + 8, lean=lean)
    kind = {"gemma2_softcap": CacheDecoder, "gemma": BufferedDecoder}.get(
        name, LeanDecoder if lean else BufferedDecoder
    )
    assert type(decoder) is kind
    rows = torch.tensor([0, 0, 1, 2, 2])  # repeat prompts, as for n samples
    decoder.select(rows)
    logits, pos = logits[rows], position_ids(attn)[rows, -1:]
    seqs = [ids[r][attn[r].bool()].tolist() for r in rows.tolist()]
    g = torch.Generator().manual_seed(2)
    for t in range(7):
        for i, s in enumerate(seqs):
            want = model(input_ids=torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(logits[i], want, rtol=1e-6, atol=1e-6)
        if t == 3:  # drop two rows, as the decoding loop does when they finish
            keep = torch.tensor([0, 2, 4])
            decoder.select(keep)
            seqs, pos = [seqs[k] for k in keep.tolist()], pos[keep]
        tok = torch.randint(2, V, (len(seqs),), generator=g)
        seqs = [s + [int(x)] for s, x in zip(seqs, tok, strict=True)]
        pos = pos + 1
        logits = decoder.step(tok, pos)

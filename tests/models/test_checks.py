"""Start-up checks of the model assumptions (opd_cli.models.checks) on tiny random models from configs.

Models whose logits are hidden @ W.T and whose attention the packed pass and the
buffered/lean decoders reproduce pass and keep those paths; a head that soft-caps,
scales or has a bias, and a forward that ignores attention_mask, are refused in one
line; a model whose attention the fast paths do not reproduce (ALiBi biases, a
bidirectional mask, Gemma2's soft-capped attention, LFM2's convolution layers) is
scored with padding and decoded with transformers' cache, and is then exact.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from opd_cli.batch import position_ids
from opd_cli.errors import UserError
from opd_cli.models.checks import (
    check_attention_mask,
    check_head,
    check_model,
    choose_decoder,
    choose_scoring_path,
    decoder_agrees,
    packed_pass_agrees,
    tolerance,
)
from opd_cli.models.decoding import BufferedDecoder, CacheDecoder, LeanDecoder, prefill
from opd_cli.models.packed import response_hidden

from .test_packed_decoding import MODELS, SHAPE, V, per_row_reference, random_batch

KEY = "model.name_or_path"
LLAMA_FAMILY = ["qwen2", "llama_gqa", "llama_rope_linear", "mistral_window", "qwen3_qk_norm"]
PASSING = [*LLAMA_FAMILY, "gemma"]
FLAGS = ("_opd_packing_fails", "_opd_lean_fails", "_opd_buffer_fails")


def build(make, dtype=torch.float32):
    torch.manual_seed(0)
    model = make().to(dtype)
    model.config._attn_implementation = "sdpa"
    return model


def llama():
    return LlamaForCausalLM(LlamaConfig(**SHAPE, num_attention_heads=4, num_key_value_heads=2))


def gemma2_attention_softcap():
    """Gemma2 without final soft-capping but with soft-capped attention (the deny-list's ``softcap``)."""
    config = Gemma2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6)
    config.final_logit_softcapping = None
    return Gemma2ForCausalLM(config)


def flags(model):
    return {f: getattr(model, f, None) for f in FLAGS}


def model_check_warnings(caplog):
    """opd-cli's warnings (not transformers')."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("opd_cli")]


# every passing model in float32, a few in bfloat16 (its tolerances)
BF16 = ("qwen2", "qwen3_qk_norm", "gemma")
CASES = [(name, torch.float32) for name in PASSING] + [(name, torch.bfloat16) for name in BF16]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in CASES])
def test_supported_models_pass_and_keep_the_fast_paths(name, dtype, caplog):
    model = build(MODELS[name], dtype)
    with caplog.at_level(logging.INFO, logger="opd_cli"):
        check_model(model, KEY, sampling=True)
    assert flags(model) == {f: False for f in FLAGS}
    assert not model_check_warnings(caplog)
    lean = name in LLAMA_FAMILY
    assert f"decoding {'lean' if lean else 'buffered'}" in caplog.text and "scoring packed" in caplog.text
    ids, attn = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    decoder, _ = prefill(model, ids, attn, position_ids(attn), 8)
    assert type(decoder) is (LeanDecoder if lean else BufferedDecoder)


@pytest.mark.parametrize(
    "make, found",
    [
        (lambda: Gemma2ForCausalLM(Gemma2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
         "gemma2 models soft-cap their logits (final_logit_softcapping=30.0)"),
        (lambda: GraniteForCausalLM(GraniteConfig(**SHAPE, num_attention_heads=4, logits_scaling=4.0)),
         "granite models scale their logits (logits_scaling=4.0)"),
        (lambda: CohereForCausalLM(CohereConfig(**SHAPE, num_attention_heads=4)),
         "cohere models scale their logits (logit_scale=0.0625)"),
    ],
    ids=["gemma2", "granite", "cohere"],
)  # fmt: skip
def test_a_head_that_transforms_its_logits_is_refused_in_one_line(make, found):
    model = build(make)
    with pytest.raises(UserError) as e:
        check_model(model, KEY, sampling=True)
    msg = str(e.value)
    assert msg.startswith(f"{KEY}: {found}") and "hidden @ W.T" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "make",
    [
        lambda: MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=V)),  # logit_scale=None
        lambda: GraniteForCausalLM(GraniteConfig(**SHAPE, num_attention_heads=4)),  # logits_scaling=1.0
        gemma2_attention_softcap,  # final_logit_softcapping=None
    ],
    ids=["mpt", "granite", "gemma2"],
)
def test_unset_or_unit_head_attributes_pass(make):
    torch.manual_seed(0)
    check_head(make(), KEY)  # in its default attention implementation (MPT's is eager)


def test_a_head_with_a_bias_is_refused():
    model = build(llama)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
    with pytest.raises(UserError, match=r"^teacher.name_or_path: this llama model's LM head has a bias; opd-cli"):
        check_model(model, "teacher.name_or_path", sampling=False)


def test_a_head_transform_the_config_does_not_name_is_found_by_the_probe():
    """Custom code that rescales the logits after the head (a forward hook here) is caught numerically."""
    model = build(llama)
    check_head(model, KEY)
    model.lm_head.register_forward_hook(lambda module, args, out: out * 1.01)
    with pytest.raises(UserError, match=r"^model.name_or_path: this llama model's logits are not its final hidden"):
        check_head(model, KEY)


def test_a_forward_that_ignores_attention_mask_is_refused():
    model = build(llama)
    check_attention_mask(model, KEY)
    forward = model.forward
    model.forward = lambda *args, attention_mask=None, **kwargs: forward(*args, **kwargs)
    with pytest.raises(UserError) as e:
        check_model(model, KEY, sampling=False)
    msg = str(e.value)
    assert msg.startswith(f"{KEY}: this llama model's forward does not honour attention_mask") and "\n" not in msg


def alibi_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA with ALiBi biases (-2^-(h+1) x distance for head h) over the model's own mask (causal where it gives none)."""
    H, q_len, kv_len = query.shape[1], query.shape[2], key.shape[2]
    i = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    j = torch.arange(kv_len, device=query.device)
    allowed = (j <= i if attention_mask is None else attention_mask.bool()) | (j == i)  # a padding query sees itself
    slopes = 2.0 ** -torch.arange(1, H + 1, device=query.device, dtype=query.dtype)
    bias = (-slopes[:, None, None] * (i - j)).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, scale=scaling, enable_gqa=key.shape[1] != H
    )  # fmt: skip
    return out.transpose(1, 2), None


AttentionInterface.register("test_alibi", alibi_attention)
AttentionMaskInterface.register("test_alibi", sdpa_mask)


def alibi_llama():
    """A Llama attending with ALiBi biases through its own attention implementation (as custom code would)."""
    model = llama()
    model.config._attn_implementation = "test_alibi"
    return model


def bidirectional_llama():
    """A Llama whose mask is bidirectional (``config.is_causal=False``): the fast paths are always causal."""
    model = llama()
    model.config.is_causal = False
    return model


def lfm2_conv():
    """LFM2 with short-convolution layers between its attention layers: the KV buffer cannot hold them."""
    return Lfm2ForCausalLM(Lfm2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2, full_attn_idxs=[1]))


# models whose attention the fast paths do not reproduce, and whether the packed pass silently got them
# wrong before these checks (the deny-list catches Gemma2's softcap and LFM2's layers inside response_hidden)
PLAIN = {"alibi": (alibi_llama, True), "bidirectional": (bidirectional_llama, True),
         "softcap": (gemma2_attention_softcap, False), "lfm2_conv": (lfm2_conv, False)}  # fmt: skip


@pytest.mark.parametrize("name", list(PLAIN))
def test_attention_the_fast_paths_do_not_reproduce_takes_the_plain_paths(name, caplog):
    make, silently_wrong = PLAIN[name]
    torch.manual_seed(0)
    model = make().float()
    batch = random_batch()
    with torch.no_grad():
        h_ref, y_ref = per_row_reference(model, batch)
        if silently_wrong:
            h, _ = response_hidden(model, batch)  # what opd-cli computed before the check
            assert not getattr(model, "_opd_packing_fails", False)
            assert not torch.allclose(h, h_ref, rtol=1e-4, atol=1e-4)
    assert not packed_pass_agrees(model)
    assert not decoder_agrees(model, lean=False)
    with caplog.at_level(logging.WARNING):
        check_model(model, KEY, sampling=True)
    assert flags(model)["_opd_packing_fails"] and flags(model)["_opd_buffer_fails"]
    # one warning per choice, from the checks only
    warnings = model_check_warnings(caplog)
    assert [r.name for r in warnings] == ["opd_cli.models.checks"] * 2
    assert "scoring this model with padding" in warnings[0].message
    assert "decoding with transformers' cache" in warnings[1].message
    with torch.no_grad():
        h, y = response_hidden(model, batch)
    assert y.equal(y_ref)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    P = batch.prompt_len
    decoder, _ = prefill(model, batch.input_ids[:, :P], batch.attention_mask[:, :P], batch.position_ids[:, :P], P + 4)
    assert type(decoder) is CacheDecoder


def test_a_lean_step_that_disagrees_falls_back_to_the_buffer(monkeypatch, caplog):
    """A lean step that computes something else (here: no rotary embedding) is caught; the buffer is kept."""
    model = build(llama)
    assert decoder_agrees(model, lean=True)
    monkeypatch.setattr("opd_cli.models.decoding.rotate", lambda x, cos, sin: x)  # called by the lean step only
    assert not decoder_agrees(model, lean=True) and decoder_agrees(model, lean=False)
    with caplog.at_level(logging.WARNING):
        assert choose_decoder(model) == "buffered"
    assert model._opd_lean_fails and not model._opd_buffer_fails
    assert len(model_check_warnings(caplog)) == 1 and "the lean decoding step disagrees" in caplog.text
    ids, attn = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert type(prefill(model, ids, attn, position_ids(attn), 8)[0]) is BufferedDecoder
    assert type(prefill(model, ids, attn, position_ids(attn), 8, lean=False)[0]) is BufferedDecoder


def test_the_choosers_decide_afresh():
    """A flag from an earlier fallback is replaced by the probe's answer."""
    model = build(llama)
    for f in FLAGS:
        setattr(model, f, True)
    assert choose_scoring_path(model) == "packed" and choose_decoder(model) == "lean"
    assert flags(model) == {f: False for f in FLAGS}


def test_probes_leave_the_model_as_it_was():
    model = build(llama).train()
    model.model.layers[1].eval()  # a submodule's own mode is kept too
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model(model, KEY, sampling=True)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(v.equal(weights[k]) for k, v in model.state_dict().items())
    assert torch.get_rng_state().equal(rng)
    assert model.config._attn_implementation == "sdpa"


def test_float32_tolerance_follows_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tolerance(torch.float32) == 1e-4
        torch.set_float32_matmul_precision("high")  # TF32 products
        assert tolerance(torch.float32) == tolerance(torch.float16)
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_soft_capped_student_is_refused_before_training(tiny_tokenizer, tmp_path):
    """opd-train's start-up runs the checks on the loaded student: a Gemma 2 checkpoint on disk
    ends in one UserError naming the key and the model type, before any training step."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from opd_cli.training.loop import train

    from ..conftest import compose_cfg

    model_dir = tmp_path / "gemma2"
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    Gemma2ForCausalLM(
        Gemma2Config(vocab_size=len(tiny_tokenizer), head_dim=16, num_key_value_heads=1, **shape)
    ).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = compose_cfg([f"model.name_or_path={model_dir}", f"teacher.name_or_path={model_dir}", "logger=none"])
    with pytest.raises(UserError, match=r"^model.name_or_path: gemma2 models soft-cap their logits"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()

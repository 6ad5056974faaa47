"""Start-up checks of what opd-cli assumes about a model, each on a small probe.

The objectives compute log-probs as ``hidden @ W.T`` with the model's output embedding
(``check_head``); scoring and sampling pass left-padded batches and trust the model to
honour their ``attention_mask`` (``check_attention_mask``). A model that breaks either
is refused in one line. The packed scoring pass (``opd_cli.models.packed``) and the buffered
and lean decoders (``opd_cli.models.decoding``) re-implement attention; each is used only on a
model where it reproduces the model's own forward on a probe (an allow-list), otherwise
the model is marked to take the plain path (``choose_scoring_path``, ``choose_decoder``)
with one warning. ``check_model`` runs them all.

A probe runs without gradient, in eval mode (each module's training flag is restored
after), on the model's device and in its dtype, with token ids drawn from seeded
generators of its own: weights, gradients, the global random state and the attention
implementation are left as they were. Two computations are compared by their largest difference relative to the
largest magnitude of the reference (``relative_difference``), within the tolerance of
the model's dtype (``tolerance``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from opd_cli.batch import RolloutBatch, build_batch, position_ids
from opd_cli.cpu_linear import linear
from opd_cli.errors import UserError
from opd_cli.models.decoding import BufferedDecoder, LeanDecoder
from opd_cli.models.packed import padded_hidden, response_hidden

log = logging.getLogger(__name__)

# largest difference, relative to the reference's largest magnitude, between two computations of the same
# values in a dtype: rounding, kernels and reduction orders differ (bf16: the lean step's RMSNorm rounds
# where transformers' runs in float32). Measured on random models: float32 at most 2.3e-6 (Qwen2 shape
# 896 x 24 layers), bfloat16 0.017 (the lean step there; 0.006 on tiny models, 0 elsewhere); a path
# that computes something else is off by far more
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# config attributes by which a model's own forward changes its logits after hidden @ W.T, with the
# values that change nothing (unset or 1), and what a model with another value does
HEAD_ATTRIBUTES = {
    "final_logit_softcapping": ((None,), "soft-cap"),  # Gemma 2/3: logits = c * tanh(logits / c)
    "logits_scaling": ((None, 1), "scale"),  # Granite divides, HyperCLOVAX multiplies; MiniCPM3 divides the hidden
    "logit_scale": ((None, 1), "scale"),  # Cohere multiplies; MPT ("inv_sqrt_d_model" or a number)
    "lm_head_multiplier": ((None, 1), "scale"),  # Falcon-H1
}
WRONG_LOGPROBS = "opd-cli computes log-probs as hidden @ W.T and would train on wrong values"

# flags read by opd_cli.models.packed.response_hidden and opd_cli.models.decoding.prefill
PACKING_FLAG, BUFFER_FLAG, LEAN_FLAG = "_opd_packing_fails", "_opd_buffer_fails", "_opd_lean_fails"

MISSING = object()  # a flag the model did not have

# decoding steps the decoder probe takes after the prefill
STEPS = 3


@contextmanager
def probing(model):
    """No gradient, every module in eval mode; each module's training flag restored after."""
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in training:
            m.training = flag


@contextmanager
def quiet(logger_name: str):
    """Drop the records of logger ``logger_name`` inside the block (a probe's fallback is not news yet)."""
    logger = logging.getLogger(logger_name)

    def drop(record):
        return False

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float32 (NaN where either holds a NaN)."""
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max().clamp(min=torch.finfo(torch.float32).tiny))


def tolerance(dtype: torch.dtype) -> float:
    """``TOLERANCE[dtype]``; float32 products that may run in TF32 (``torch.set_float32_matmul_precision``
    other than "highest") are rounded to float16's 10-bit mantissa, and get its tolerance."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return TOLERANCE[torch.float16]
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def agrees(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``got`` is ``want`` within ``tolerance(dtype)`` (a NaN never agrees)."""
    return relative_difference(got, want) <= tolerance(dtype)


def token_ids(model, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random token ids ``shape`` from 2 up (0 and 1 serve as padding and EOS), on the model's device."""
    vocab = min(model.config.get_text_config().vocab_size, model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, shape, generator=g).to(model.device)


def left_padded(model, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of these lengths, left-padded (pad id 0): ids and attention mask ``[B, max(lengths)]``."""
    width = max(lengths)
    ids = token_ids(model, (len(lengths), width), seed)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        attn[i, width - n :] = 1
    return ids.masked_fill(attn == 0, 0), attn


def check_head(model, key: str) -> None:
    """Refuse, in one line naming ``key``, a model whose logits are not ``hidden @ W.T``.

    ``W`` is ``model.get_output_embeddings().weight``. A head with a bias and a config that
    soft-caps or scales the logits (``HEAD_ATTRIBUTES``) are refused as such; then the
    model's own logits on 8 tokens are compared with ``base_model``'s final hidden states
    times ``W.T`` (what ``objectives.full_logprobs`` computes), which catches what the
    config does not say (custom code).
    """
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError(f"{key}: this {kind(model)} model's LM head has a bias; {WRONG_LOGPROBS}")
    for name, (neutral, verb) in HEAD_ATTRIBUTES.items():
        for config in (model.config, model.config.get_text_config()):
            if (value := getattr(config, name, None)) not in neutral:
                raise UserError(f"{key}: {kind(model)} models {verb} their logits ({name}={value}); {WRONG_LOGPROBS}")
    ids = token_ids(model, (1, 8), seed=0)
    attn = torch.ones_like(ids)
    with probing(model):
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        want = linear(hidden, head.weight)
    if not agrees(logits, want, model.dtype):
        raise UserError(
            f"{key}: this {kind(model)} model's logits are not its final hidden states times its LM head (relative "
            f"difference {relative_difference(logits, want):.2g}); {WRONG_LOGPROBS}"
        )


def check_attention_mask(model, key: str) -> None:
    """Refuse, in one line naming ``key``, a model whose own forward does not honour ``attention_mask``.

    A 2-token row left-padded by 6 next to an 8-token row must give the last-position
    logits it gives alone (positions counted from its first real token, ``rollout.position_ids``).
    """
    ids, attn = left_padded(model, [8, 2], seed=1)
    with probing(model):
        # called as padded_hidden calls it, with the model's own use_cache: without a cache, transformers
        # would also find the row's start from its position ids where no mask is given, which hides a
        # forward that drops the mask from this probe but not from a decoding step
        batched = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), logits_to_keep=1)
        row = ids[1:, -2:]
        alone = model(
            input_ids=row, attention_mask=torch.ones_like(row), position_ids=position_ids(torch.ones_like(row)),
            logits_to_keep=1,
        )  # fmt: skip
    got, want = batched.logits[1, -1], alone.logits[0, -1]
    if not agrees(got, want, model.dtype):
        raise UserError(
            f"{key}: this {kind(model)} model's forward does not honour attention_mask (a left-padded "
            f"row's logits differ from the row's alone by {relative_difference(got, want):.2g} relative); opd-cli "
            f"scores and samples left-padded batches"
        )


def probe_batch(model) -> RolloutBatch:
    """A rollout batch like a real one: 3 left-padded prompts of 4, 1 and 6 tokens, 2 responses each
    of up to 4 tokens, some ended by EOS (id 1) early, one by EOS alone."""
    n_prompts, n, T = 3, 2, 4
    ids, attn = left_padded(model, [4, 1, 6], seed=2)
    response = token_ids(model, (n_prompts * n, T), seed=3).cpu()
    for row, end in ((0, 2), (2, 0), (3, 3)):  # rows 1, 4 and 5 are cut at T
        response[row, end] = 1
        response[row, end + 1 :] = 0
    return build_batch(ids.cpu(), attn.cpu(), response, torch.zeros(response.shape), 1, n)


def packed_disagreement(model) -> str | None:
    """Why ``response_hidden``'s packed pass does not reproduce ``padded_hidden`` on ``probe_batch``; None if it does.

    ``model``'s packing flag is cleared for the probe and restored after: a fallback
    inside ``response_hidden`` (a layer that did not attend packed) counts as a disagreement.
    """
    batch = probe_batch(model)
    before = getattr(model, PACKING_FLAG, MISSING)
    setattr(model, PACKING_FLAG, False)
    try:
        with probing(model), quiet("opd_cli.models.attention"):
            h, y = response_hidden(model, batch)
            if getattr(model, PACKING_FLAG):
                return "not every layer attended through the packed attention"
            h_ref, y_ref = padded_hidden(model, batch)
    except Exception as e:  # a model whose layers break on the packed call is scored with padding
        return f"the packed pass failed ({type(e).__name__}: {e})"
    finally:
        if before is MISSING:
            delattr(model, PACKING_FLAG)
        else:
            setattr(model, PACKING_FLAG, before)
    if not y.equal(y_ref):
        return "the packed pass predicts other tokens"
    if not agrees(h, h_ref, model.dtype):
        return f"its hidden states differ by {relative_difference(h, h_ref):.2g} relative"
    return None


def packed_pass_agrees(model) -> bool:
    """Whether the packed scoring pass gives the padded pass's hidden states on a small rollout batch."""
    return packed_disagreement(model) is None


def choose_scoring_path(model) -> str:
    """``"packed"`` where ``packed_pass_agrees``, else ``"padded"``: the model is marked for ``padded_hidden``
    (one warning). Returns the path ``response_hidden`` will take."""
    reason = packed_disagreement(model)
    setattr(model, PACKING_FLAG, reason is not None)
    if reason is None:
        return "packed"
    log.warning("%s: the packed scoring pass disagrees: %s; scoring this model with padding", kind(model), reason)
    return "padded"


def decoder_disagreement(model, lean: bool) -> str | None:
    """Why ``LeanDecoder`` (``lean``) or ``BufferedDecoder`` does not reproduce the model's forward; None if it does.

    Prompts of 5, 2 and 7 tokens, left-padded, are prefilled and decoded ``STEPS`` tokens
    further; the logits after the prompt and after each step are compared with those of one
    forward of the whole left-padded sequences with ``attention_mask``.
    """
    if lean and not LeanDecoder.fits(model):
        return "not of the Llama family (decoding.LEAN_TYPES) with plain linear layers"
    ids, attn = left_padded(model, [5, 2, 7], seed=4)
    tokens = token_ids(model, (ids.shape[0], STEPS), seed=5)
    pos = position_ids(attn)
    P, layers = ids.shape[1], model.config.num_hidden_layers
    try:
        with probing(model):
            decoder = (LeanDecoder if lean else BufferedDecoder)(model, P + STEPS)
            got = [decoder.prefill(ids, attn, pos)]
            if decoder.buf.calls != layers:
                return f"{decoder.buf.calls} of {layers} layers attended through the KV buffer"
            for t in range(STEPS):
                got.append(decoder.step(tokens[:, t], pos[:, -1:] + t + 1))
            full = torch.cat([attn, torch.ones_like(tokens)], 1)
            out = model(
                input_ids=torch.cat([ids, tokens], 1), attention_mask=full, position_ids=position_ids(full),
                use_cache=False, logits_to_keep=STEPS + 1,
            )  # fmt: skip
    except Exception as e:  # a model whose layers break on the decoder's calls decodes with its own cache
        return f"it failed ({type(e).__name__}: {e})"
    got, want = torch.stack(got, 1), out.logits
    if not agrees(got, want, model.dtype):
        return f"its logits differ by {relative_difference(got, want):.2g} relative"
    return None


def decoder_agrees(model, lean: bool) -> bool:
    """Whether the lean (``lean``) or buffered decoder gives the model's own logits on a prefill and a few steps."""
    return decoder_disagreement(model, lean) is None


def choose_decoder(model) -> str:
    """The decoder ``decoding.prefill`` is to pick for ``model``: ``"lean"``, ``"buffered"`` or ``"cache"``.

    The lean decoder where it fits and ``decoder_agrees``, else the buffered one where it
    agrees, else transformers' cache; the model is marked accordingly (``_opd_lean_fails``,
    ``_opd_buffer_fails``), one warning when a decoder that would have been used is not.
    A lean decoder that agrees vouches for the buffered one too (``prefill(lean=False)``, under
    ZeRO-3): both prefill alike, and its steps attend over the same buffer through the model's
    own layers, which the lean step mirrors.
    """
    setattr(model, LEAN_FLAG, False)
    setattr(model, BUFFER_FLAG, False)
    reasons = []
    if LeanDecoder.fits(model):
        if (reason := decoder_disagreement(model, lean=True)) is None:
            return "lean"
        setattr(model, LEAN_FLAG, True)
        reasons.append(f"the lean decoding step disagrees: {reason}")
    if (reason := decoder_disagreement(model, lean=False)) is None:
        if reasons:
            log.warning("%s: %s; decoding with the KV buffer and the model's own layers", kind(model), reasons[0])
        return "buffered"
    setattr(model, BUFFER_FLAG, True)
    reasons.append(f"the KV-buffer decoder disagrees: {reason}")
    log.warning("%s: %s; decoding with transformers' cache", kind(model), "; ".join(reasons))
    return "cache"


def check_model(model, key: str, sampling: bool) -> None:
    """All start-up checks of ``model`` (loaded from config key ``key``): refuse a head that is not
    ``hidden @ W.T`` or a forward that ignores ``attention_mask`` (``UserError``), then choose the
    scoring path and, when the model samples (``sampling``), the decoder.

    Call it on the loaded model, before DeepSpeed wraps or partitions it: the probes read
    its weights directly (the lean decoder's step, the LM head).
    """
    check_head(model, key)
    check_attention_mask(model, key)
    paths = [f"scoring {choose_scoring_path(model)}"]
    if sampling:
        paths.append(f"decoding {choose_decoder(model)}")
    log.info("%s (%s): %s", key, kind(model), ", ".join(paths))


def kind(model) -> str:
    """The model's type, as messages name it."""
    return model.config.model_type

"""Rollouts: the student samples responses to prompts.

``HFRollout`` samples from the live transformers model with its own decoding loop
(``sample_responses``: shared prompt prefill, exact top-p without sorting, finished
rows dropped). A rollout engine returns a
``RolloutBatch``: prompt and response ids in one left-padded layout, masks, and
the sampler's log-probs of the sampled tokens (``old_logprobs``).

``old_logprobs`` are the student's temperature-1 log-probs of each sampled token
over the full vocabulary at rollout time (before temperature and top-p), which
is exactly what the training loss recomputes: the importance ratio is 1 on the
first mini-batch of a step. They are recorded during generation, with no
second forward pass.
"""

from __future__ import annotations

import torch

from opd_cli.batch import PromptSampling, RolloutBatch, build_batch, position_ids
from opd_cli.dist import all_reduce
from opd_cli.models.decoding import prefill


def nucleus_member(probs: torch.Tensor, ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """Whether each row's tokens ``ids [B, R]`` are in that row's top-p nucleus of ``probs [B, V]``.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``:
    a token is in it when the tokens strictly more likely than it hold less than ``top_p``.
    """
    p_id = probs.gather(-1, ids)[..., None]  # [B, R, 1]
    return torch.where(probs[:, None, :] > p_id, probs[:, None, :], 0).sum(-1) < top_p


# float32 rounding of the membership sums is far below this
SURE_MARGIN = 1e-5


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` from softmax(logits / T) restricted to the top-p nucleus.

    Exact, without sorting the vocabulary: draw from the whole distribution by inverting
    its CDF and keep the first draw that lies in the nucleus (rejection sampling, which
    gives the distribution conditioned on the nucleus). Each round draws up to 4
    proposals per row at once (fewer for a large vocabulary, to bound the ``[B, R, V]``
    membership test), each accepted with probability of at least ``top_p``; rows still
    rejected after a few rounds are sampled by sorting.
    """
    probs = torch.softmax(logits.float() / temperature if temperature != 1 else logits.float(), dim=-1)
    B, V = probs.shape
    cdf = probs.cumsum(-1)
    out = torch.empty(B, dtype=torch.long, device=probs.device)
    todo = torch.arange(B, device=probs.device)
    p, c = probs, cdf
    for _ in range(4):
        R = 1 if top_p >= 1 else max(1, min(4, (1 << 20) // (todo.numel() * V)))  # proposals per row
        u = torch.rand(todo.numel(), R, generator=generator, device=probs.device) * c[:, -1:]
        ids = torch.searchsorted(c, u, right=True).clamp_(max=V - 1)  # [n, R] draws from the whole distribution
        if top_p >= 1:
            return ids[:, 0]
        # the mass above a token is at most 1 minus its own: a token of probability above 1 - top_p is
        # in the nucleus. Only rows whose first proposal is not are tested in full (demo: 128 -> 78 us
        # per step; 94 % of draws were sure)
        ok = p.gather(-1, ids) > 1 - top_p + SURE_MARGIN
        unsure = (~ok[:, 0]).nonzero().squeeze(-1)
        if unsure.numel():
            ok[unsure] = nucleus_member(p[unsure], ids[unsure], top_p)
        hit = ok.any(-1)
        pick = ids.gather(-1, ok.long().argmax(-1, keepdim=True)).squeeze(-1)  # each row's first accepted draw
        if hit.all():  # nearly always at once: at least one of R draws lands in the nucleus
            return pick if todo.numel() == B else out.index_copy_(0, todo, pick)
        out[todo[hit]] = pick[hit]
        todo = todo[~hit]
        p, c = probs[todo], cdf[todo]
    sorted_p, order = probs[todo].sort(dim=-1, descending=True)
    # mass strictly above each token: the mass before the first token of its tie group
    first = torch.searchsorted(-sorted_p, -sorted_p)
    sorted_p = sorted_p.masked_fill((sorted_p.cumsum(-1) - sorted_p).gather(-1, first) >= top_p, 0)
    picked = torch.multinomial(sorted_p, 1, generator=generator)
    out[todo] = order.gather(-1, picked).squeeze(-1)
    return out


@torch.no_grad()
def sample_responses(
    model, ids, attn, n, temperature, top_p, max_new_tokens, eos, pad, generator, sharded=False, entropy=False
):
    """``n`` responses per left-padded prompt, ``[B * n, T]`` ids, their log-probs, and (``entropy``) the
    entropy of each step's temperature-1 distribution (else None).

    The prompts are prefilled once and their keys and values repeated ``n`` times
    (``opd_cli.models.decoding``: a preallocated buffer per layer). Rows that
    finished are dropped from the batch once they are a quarter of it. Each step the
    sampled token's full-vocabulary temperature-1 log-prob is recorded. ``sharded``
    (ZeRO-3): keep running forward passes until every rank is done.
    """

    device = ids.device
    pos = position_ids(attn)
    decoder, logits = prefill(model, ids, attn, pos, ids.shape[1] + max_new_tokens, lean=not sharded)
    rows = torch.arange(ids.shape[0] * n, device=device)  # output row of each decoder row
    decoder.select(rows // n)
    logits, pos = logits.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
    tokens = torch.full((rows.shape[0], max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros(tokens.shape, dtype=torch.float32, device=device)
    ents = torch.zeros(tokens.shape, dtype=torch.float32, device=device) if entropy else None
    live = torch.ones_like(rows, dtype=torch.bool)
    for t in range(max_new_tokens):
        tok = sample_top_p(logits, temperature, top_p, generator)
        logp_all = torch.log_softmax(logits.float(), -1)
        lp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
        # finished rows still in the batch write what their slots already hold (pad, 0)
        tokens[rows, t] = tok.where(live, pad)
        logps[rows, t] = lp.where(live, 0.0)
        if entropy:
            ents[rows, t] = -(logp_all.exp() * logp_all).sum(-1).where(live, 0.0)
        live &= tok != eos
        n_live = int(live.sum())
        if t == max_new_tokens - 1 or not (all_reduce([float(n_live)], op="max")[0] if sharded else n_live):
            break
        # compact: drop finished rows (not all of them: with none live, a ZeRO-3 rank steps on for the others)
        if 0 < n_live and n_live * 4 <= live.shape[0] * 3:
            keep = live.nonzero().squeeze(-1)
            decoder.select(keep)
            rows, live, tok, pos = rows[keep], live[keep], tok[keep], pos[keep]
        pos = pos + 1
        logits = decoder.step(tok, pos)
    return tokens[:, : t + 1], logps[:, : t + 1], None if ents is None else ents[:, : t + 1]


class HFRollout(PromptSampling):
    """Sampling from the live transformers model with ``sample_responses`` (our decoding loop)."""

    def __init__(self, model, tokenizer, sharded: bool = False, entropy: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # ZeRO-3: every rank keeps running forward passes until all ranks are done (HF's synced_gpus)
        self.sharded = sharded
        # record each response token's sampler entropy (loss.entropy_top_ratio)
        self.entropy = entropy

    @torch.no_grad()
    def _sample(self, ids, attn, n, temperature, top_p, max_new_tokens, seed) -> RolloutBatch:
        device = self.model.device
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        # inference mode skips autograd's bookkeeping (~5 % of a demo rollout); not under ZeRO-3,
        # whose parameter gathering must not create inference tensors
        with torch.inference_mode(not self.sharded):
            response, logps, ents = sample_responses(
                self.model, ids.to(device), attn.to(device), n, temperature, top_p, max_new_tokens,
                self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, generator, self.sharded, self.entropy,
            )  # fmt: skip
        self.model.train(was_training)
        ents = None if ents is None else ents.cpu()
        return build_batch(ids, attn, response.cpu(), logps.cpu(), self.tokenizer.eos_token_id, n, ents)

    def release(self) -> None:
        """Nothing to do: this engine holds no memory of its own."""

    def sync(self, model, sharded: bool) -> None:
        """Nothing to do: this engine samples from the live model."""

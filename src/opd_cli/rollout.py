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

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """B sequences of length L = P + T (P prompt columns, T response columns).

    Prompts are left-padded into the first P columns, responses right-padded into
    the last T. Token j is predicted by the model's output at position j - 1.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 for real tokens (prompt and response incl. EOS)
    response_mask: torch.Tensor  # [B, L] bool, response tokens up to and including the first EOS
    old_logprobs: torch.Tensor  # [B, L] float, sampler log-prob of each response token (0 elsewhere)
    truncated: torch.Tensor  # [B] bool, response hit max_new_tokens without EOS
    prompt_index: torch.Tensor  # [B] long, which prompt of the request each sequence answers
    prompt_len: int  # P
    # [B, L] float, the sampler's temperature-1 entropy at each response token (0 elsewhere), when recorded
    entropy: torch.Tensor | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The sub-batch of the given rows (e.g. a micro-batch), without columns that are padding in all of them."""
        used = self.attention_mask[rows].bool().any(0).nonzero().squeeze(-1)
        lo = min(int(used[0]), self.prompt_len - 1)
        cols = slice(lo, int(used[-1]) + 1)
        return RolloutBatch(
            self.input_ids[rows, cols],
            self.attention_mask[rows, cols],
            self.response_mask[rows, cols],
            self.old_logprobs[rows, cols],
            self.truncated[rows],
            self.prompt_index[rows],
            self.prompt_len - lo,
            None if self.entropy is None else self.entropy[rows, cols],
        )

    def prompt_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first row of each run of rows answering the same prompt, and each row's run number."""
        new = torch.ones_like(self.prompt_index, dtype=torch.bool)
        new[1:] = self.prompt_index[1:] != self.prompt_index[:-1]
        return new.nonzero().squeeze(-1), new.long().cumsum(0) - 1


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` does.

    Scoring a left-padded batch without these would shift every position by the
    row's padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of response tokens up to and including the first EOS; and rows with no EOS.

    ``response`` is [B, T] of generated ids (anything after the first EOS is padding).
    """
    is_eos = response == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos, ~is_eos.any(-1)


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, ``[B, P]``."""
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]  # one call: the batch at once
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        attn[i, width - len(e) :] = 1
    return ids, attn


def build_batch(
    ids: torch.Tensor,
    attn: torch.Tensor,
    response: torch.Tensor,
    logps: torch.Tensor,
    eos_id: int,
    n_prompts: int,
    n: int,
    entropy: torch.Tensor | None = None,
) -> RolloutBatch:
    """A ``RolloutBatch`` from left-padded prompts ``[B, P]`` and right-padded responses ``[B, T]``.

    ``logps`` (and ``entropy``, if recorded) hold the sampler's log-prob of each response
    token (its distribution's entropy); anything after a row's first EOS is padding.
    """
    resp_mask, truncated = response_mask_from(response, eos_id)
    B, P = ids.shape
    zeros = torch.zeros((B, P), dtype=torch.bool)
    if entropy is not None:
        entropy = torch.cat([zeros.float(), entropy * resp_mask], dim=1)
    return RolloutBatch(
        input_ids=torch.cat([ids, response], dim=1),
        attention_mask=torch.cat([attn, resp_mask.long()], dim=1),
        response_mask=torch.cat([zeros, resp_mask], dim=1),
        old_logprobs=torch.cat([zeros.float(), logps * resp_mask], dim=1),
        truncated=truncated,
        prompt_index=torch.arange(n_prompts).repeat_interleave(n),
        prompt_len=P,
        entropy=entropy,
    )


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    return [
        tokenizer.decode(row[batch.prompt_len :][m[batch.prompt_len :]], skip_special_tokens=True)
        for row, m in zip(batch.input_ids, batch.response_mask, strict=True)
    ]


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
    model, ids, attn, n, temperature, top_p, max_new_tokens, eos, pad, generator, synced=False, entropy=False
):
    """``n`` responses per left-padded prompt, ``[B * n, T]`` ids, their log-probs, and (``entropy``) the
    entropy of each step's temperature-1 distribution (else None).

    The prompts are prefilled once and their keys and values repeated ``n`` times
    (``opd_cli.decoding``: a preallocated buffer per layer). Rows that
    finished are dropped from the batch once they are a quarter of it. Each step the
    sampled token's full-vocabulary temperature-1 log-prob is recorded. ``synced``
    (ZeRO-3): keep running forward passes until every rank is done.
    """
    from opd_cli.decoding import prefill
    from opd_cli.distributed import all_reduce

    device = ids.device
    pos = position_ids(attn)
    decoder, logits = prefill(model, ids, attn, pos, ids.shape[1] + max_new_tokens, lean=not synced)
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
        if t == max_new_tokens - 1 or not (all_reduce([float(n_live)], op="max")[0] if synced else n_live):
            break
        # compact: drop finished rows (not all of them: with none live, a ZeRO-3 rank steps on for the others)
        if 0 < n_live and n_live * 4 <= live.shape[0] * 3:
            keep = live.nonzero().squeeze(-1)
            decoder.select(keep)
            rows, live, tok, pos = rows[keep], live[keep], tok[keep], pos[keep]
        pos = pos + 1
        logits = decoder.step(tok, pos)
    return tokens[:, : t + 1], logps[:, : t + 1], None if ents is None else ents[:, : t + 1]


class HFRollout:
    """Sampling from the live transformers model with ``sample_responses`` (our decoding loop)."""

    def __init__(self, model, tokenizer, synced: bool = False, entropy: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # ZeRO-3: every rank keeps running forward passes until all ranks are done (HF's synced_gpus)
        self.synced = synced
        # record each response token's sampler entropy (loss.entropy_top_ratio)
        self.entropy = entropy

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> RolloutBatch:
        """``n`` samples for each prompt, the samples of one prompt adjacent."""
        ids, attn = encode_prompts(self.tokenizer, prompts)
        device = self.model.device
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        # inference mode skips autograd's bookkeeping (~5 % of a demo rollout); not under ZeRO-3,
        # whose parameter gathering must not create inference tensors
        with torch.inference_mode(not self.synced):
            response, logps, ents = sample_responses(
                self.model, ids.to(device), attn.to(device), n, temperature, top_p, max_new_tokens,
                self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, generator, self.synced, self.entropy,
            )  # fmt: skip
        self.model.train(was_training)
        ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        ents = None if ents is None else ents.cpu()
        return build_batch(ids, attn, response.cpu(), logps.cpu(), self.tokenizer.eos_token_id, len(prompts), n, ents)

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        return decode_responses(self.tokenizer, batch)

    def release(self) -> None:
        """Nothing to do: this engine holds no memory of its own."""

    def sync(self, model, zero3: bool) -> None:
        """Nothing to do: this engine samples from the live model."""

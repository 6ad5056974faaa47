"""Supervised fine-tuning on (prompt, response) text pairs.

One code path for building the demo models and, later, for the off-policy cold
start recipe (SFT on teacher rollouts). The loss covers response tokens only: a
pair's response (and the EOS after it), or the tokens an example's mask marks (the
actions of a multi-turn episode, whose observations are context only).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from opd_cli.progress import Progress


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response + EOS, and the prompt's length in tokens.

    Prompt and response are tokenized separately, the way a rollout is built
    (the prompt's ids, then the ids the model generates).
    """
    if not pairs:
        return []
    # one batched call per side: the same ids as one call per text, in a fraction of the time
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [(p + r + [tokenizer.eos_token_id], len(p)) for p, r in zip(prompts, responses, strict=True)]


def pair_examples(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[bool]]]:
    """``encode_pairs`` as masked examples: (token ids, which tokens get a loss: the response and EOS)."""
    return [(ids, [False] * n + [True] * (len(ids) - n)) for ids, n in encode_pairs(tokenizer, pairs)]


def sft(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str = "SFT",
) -> list[float]:
    """Train ``model`` in place on ``pairs`` with AdamW and a cosine schedule.

    Returns the per-step loss (mean cross-entropy over response tokens).
    """
    return sft_examples(model, tokenizer, pair_examples(tokenizer, pairs), steps, batch_size, lr, seed, desc)


def sft_examples(
    model: torch.nn.Module,
    tokenizer,
    data: Sequence[tuple[list[int], list[bool]]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str = "SFT",
) -> list[float]:
    """``sft`` on token-level examples: (token ids, mask), the loss on the tokens whose mask is True.

    Each step trains on ``batch_size`` examples drawn without replacement; returns the per-step loss.
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    with Progress(steps, desc, unit="steps") as bar:  # a bar on a terminal, a line every 30 s in a log
        for _ in range(steps):
            batch = rng.sample(data, min(batch_size, len(data)))
            width = max(len(ids) for ids, _ in batch)
            pad = tokenizer.pad_token_id
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (ids, mask) in enumerate(batch):
                ids_t = torch.tensor(ids)
                input_ids[i, : len(ids)] = ids_t
                labels[i, : len(ids)] = ids_t.masked_fill(~torch.tensor(mask, dtype=torch.bool), -100)
                attn[i, : len(ids)] = 1
            loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(loss=f"{loss.item():.3f}")
    model.eval()
    return losses

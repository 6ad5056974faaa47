"""Supervised fine-tuning on (prompt, response) text pairs.

One code path for building the demo models and, later, for the off-policy cold
start recipe (SFT on teacher rollouts). The loss covers response tokens only.
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
    out = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        out.append((p + r + [tokenizer.eos_token_id], len(p)))
    return out


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
    data = encode_pairs(tokenizer, pairs)
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
            for i, (ids, n_prompt) in enumerate(batch):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
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

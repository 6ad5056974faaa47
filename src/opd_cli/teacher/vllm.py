"""The teacher scored by an in-process vLLM engine (``teacher.backend=vllm``): ``prompt_logprobs=K``."""

from __future__ import annotations

import math

import torch

from opd_cli.batch import RolloutBatch, TeacherSupport
from opd_cli.models.vllm import EngineMemory


def support_from_prompt_logprobs(batch: RolloutBatch, rows: list[list], k: int) -> TeacherSupport:
    """``TeacherSupport`` from per-row prompt log-probs: ``rows[r][pos]`` maps token id -> (log-prob, rank).

    Positions index the row without its left padding (vLLM sees it unpadded); position 0
    has no entry. Only response positions are read.
    """
    ids, lps, sampled, entropy = [], [], [], []
    for r, entries_of in enumerate(rows):
        keep = batch.attention_mask[r].bool()
        tokens = batch.input_ids[r][keep]
        for pos in batch.response_mask[r][keep].nonzero().flatten().tolist():
            entries = entries_of[pos]
            top = sorted((rank, tok, lp) for tok, (lp, rank) in entries.items() if rank <= k)[:k]
            ids.append([t for _, t, _ in top])
            lps.append([v for _, _, v in top])
            sampled.append(entries[int(tokens[pos])][0])
            entropy.append(topk_entropy(lps[-1]))
    return TeacherSupport(
        torch.tensor(ids, dtype=torch.long), torch.tensor(lps), torch.tensor(sampled), torch.tensor(entropy)
    )


def unpadded_rows(batch: RolloutBatch) -> list[list[int]]:
    return [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(batch.input_ids.shape[0])]


class VLLMTeacher:
    """The teacher scored by vLLM: ``prompt_logprobs=K`` over prompt + response.

    It supplies the top-K ids and log-probs and the sampled token's log-prob. The
    entropy, which needs the full distribution, is estimated from the top-K plus one
    tail bucket (a lower bound of H(q)).
    """

    supplies = frozenset({"sampled_logprob", "topk"})
    sharded = False
    head = None  # no full distribution: objectives that need it are refused

    def __init__(self, llm, memory: EngineMemory | None = None) -> None:
        self.llm = llm
        self.memory = memory or EngineMemory(llm, 0)  # sleep mode: asleep except while scoring

    @torch.no_grad()
    def score(self, batch: RolloutBatch, k: int, keep_hidden: bool = False) -> TeacherSupport:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row) for row in unpadded_rows(batch)]
        self.memory.wake()
        # ids and log-probs only: detokenizing each of the K + 1 entries at every position took most of the time
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        self.memory.release()
        rows = [
            [None] + [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in o.prompt_logprobs[1:]] for o in outs
        ]
        return support_from_prompt_logprobs(batch, rows, k)


def topk_entropy(logprobs: list[float]) -> float:
    """``-sum_K q log q - q_tail log q_tail``: the entropy with the tail as one bucket."""
    probs = [math.exp(v) for v in logprobs]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * v for p, v in zip(probs, logprobs, strict=True)) - (tail * math.log(tail) if tail > 0 else 0.0)

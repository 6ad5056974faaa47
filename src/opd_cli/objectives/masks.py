"""Which response tokens are supervised.

Only tokens the student generated count (not prompt, padding, or anything after
EOS: that is ``RolloutBatch.response_mask``). On top of that, paper A masks a
list of special tokens the teacher scores badly because its own template differs
(``loss.mask_tokens``): the first occurrence of each in each response (paper A's
code), or every occurrence.
"""

from __future__ import annotations

import torch

from opd_cli.errors import UserError

# loss.mask_mode: mask the first occurrence of each token in each response (paper A), or every one
MASK_MODES = ("first", "all")


def special_token_keep(
    input_ids: torch.Tensor, response_mask: torch.Tensor, token_ids: list[int], mode: str
) -> torch.Tensor:
    """[B, L] bool: response tokens that stay supervised after special-token masking."""
    keep = response_mask.clone()
    for tid in token_ids:
        hit = (input_ids == tid) & response_mask
        if mode == "first":
            hit = hit & (hit.long().cumsum(-1) == 1)
        keep &= ~hit
    return keep


def mask_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of the ``loss.mask_tokens`` strings, each id once.

    A string that is not one token of the vocabulary contributes every token it encodes
    to, each masked on its own (paper A's ``_init_opd_mask_tokens``); one that encodes to
    nothing is refused.
    """
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for tok in tokens:
        enc = [vocab[tok]] if tok in vocab else tokenizer(tok, add_special_tokens=False)["input_ids"]
        if not enc:
            raise UserError(f"loss.mask_tokens: '{tok}' encodes to no token of the student's tokenizer")
        ids += [i for i in enc if i not in ids]
    return ids


def entropy_top_keep(entropy: torch.Tensor, response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, L] bool: in each response, the ``ratio`` share of its tokens with the highest entropy.

    Paper A's ``_compute_entropy_top_mask``, per sequence: keep ``max(1, floor(n * ratio))`` of
    its ``n`` response tokens, every token tied at the threshold included.
    """
    n_keep = (response_mask.sum(-1) * ratio).long().clamp(min=1)
    ranked = entropy.masked_fill(~response_mask, float("-inf")).sort(-1, descending=True).values
    threshold = ranked.gather(-1, (n_keep - 1)[:, None])
    return (entropy >= threshold) & response_mask

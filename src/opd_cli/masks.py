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
    """Ids of the ``loss.mask_tokens`` strings; each must be one token of the vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = []
    for tok in tokens:
        if tok in vocab:
            ids.append(vocab[tok])
            continue
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise UserError(
                f"loss.mask_tokens: '{tok}' is not a single token of the student's tokenizer "
                f"(it encodes to {len(enc)} tokens)"
            )
        ids.append(enc[0])
    return ids

"""Masks on hand-made token sequences."""

import pytest
import torch

from opd_cli.errors import UserError
from opd_cli.masks import mask_token_ids, special_token_keep
from opd_cli.rollout import response_mask_from

EOS = 0


def test_response_mask_stops_after_first_eos():
    resp = torch.tensor([[5, 6, EOS, EOS, EOS], [5, EOS, 7, EOS, EOS], [5, 6, 7, 8, 9]])
    mask, truncated = response_mask_from(resp, EOS)
    assert mask.tolist() == [
        [True, True, True, False, False],  # EOS itself is supervised, the padding after it is not
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    assert truncated.tolist() == [False, False, True]


def test_special_token_mask_first_and_all():
    # columns 0-1 are prompt; 9 and 4 are mask tokens
    ids = torch.tensor([[9, 4, 9, 3, 4, 9, 4, EOS], [1, 2, 3, 3, 3, EOS, 9, 9]])
    resp = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    first = special_token_keep(ids, resp, [9, 4], "first")
    assert first.int().tolist() == [[0, 0, 0, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    every = special_token_keep(ids, resp, [9, 4], "all")
    assert every.int().tolist() == [[0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert special_token_keep(ids, resp, [], "first").equal(resp)


def test_mask_token_ids(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    assert mask_token_ids(tiny_tokenizer, ["<|im_end|>"]) == [vocab["<|im_end|>"]]
    with pytest.raises(UserError, match="loss.mask_tokens: 'not a token at all'"):
        mask_token_ids(tiny_tokenizer, ["not a token at all"])

"""Masks on hand-made token sequences."""

import pytest
import torch

from opd_cli.errors import UserError
from opd_cli.objectives.masks import entropy_top_keep, mask_token_ids, special_token_keep

EOS = 0


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
    # paper A: a string of several tokens masks each of its pieces, each id once
    pieces = tiny_tokenizer("Answer: 12", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    want = list(dict.fromkeys([vocab["<|im_end|>"], *pieces]))
    assert mask_token_ids(tiny_tokenizer, ["<|im_end|>", "Answer: 12", "<|im_end|>"]) == want
    with pytest.raises(UserError, match="loss.mask_tokens: '' encodes to no token"):
        mask_token_ids(tiny_tokenizer, [""])


def test_multi_token_string_masks_each_piece_at_its_first_occurrence(tiny_tokenizer):
    ids = mask_token_ids(tiny_tokenizer, ["Answer:"])
    seq = torch.tensor([[7, ids[0], 5, ids[-1], ids[0], ids[-1]]])
    rm = torch.tensor([[False, True, True, True, True, True]])
    keep = special_token_keep(seq, rm, ids, "first")
    assert keep.tolist() == [[False, False, True, False, True, True]]


def test_entropy_top_keep_per_sequence():
    """Paper A: in each response keep max(1, floor(n * ratio)) highest-entropy tokens, ties included."""
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(6, 11, generator=g)
    entropy[2, 5:8] = entropy[2, 4]  # a tie at the threshold of some row
    rm = torch.zeros(6, 11, dtype=torch.bool)
    for r, (s, e) in enumerate([(3, 11), (3, 9), (2, 11), (3, 4), (5, 11), (3, 3)]):
        rm[r, s:e] = True
    for ratio in (0.2, 0.5, 1.0):
        keep = entropy_top_keep(entropy, rm, ratio)
        for r in range(6):
            vals = sorted(entropy[r][rm[r]].tolist(), reverse=True)
            if not vals:
                assert not keep[r].any()
                continue
            n_keep = max(1, int(len(vals) * ratio))
            want = {j for j in range(11) if rm[r, j] and entropy[r, j] >= vals[n_keep - 1]}
            assert set(keep[r].nonzero().squeeze(-1).tolist()) == want, (ratio, r)

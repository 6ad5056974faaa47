"""batch.py: response masks, chunk bounds and row selection, on hand-made tensors."""

import torch

from opd_cli.batch import RolloutBatch, chunk_bounds, response_mask_from

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


def test_chunk_bounds_cover_exactly():
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(0, 3) == []


def test_select_drops_columns_that_are_padding_in_every_selected_row():
    # row 0: prompt of 1 token, response of 3; row 1: prompt of 3 tokens, response of 1
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    resp = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]]).bool()
    ids = torch.arange(12).reshape(2, 6)
    batch = RolloutBatch(ids, attn, resp, resp.float(), torch.zeros(2, dtype=torch.bool), torch.arange(2), 3)
    short = batch.select(torch.tensor([1]))
    assert short.input_ids.tolist() == [[6, 7, 8, 9]] and short.prompt_len == 3
    late = batch.select(torch.tensor([0]))
    assert late.input_ids.tolist() == [[2, 3, 4, 5]] and late.prompt_len == 1
    assert late.response_mask.tolist() == [[False, True, True, True]]

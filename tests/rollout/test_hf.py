"""The in-process rollout engine (rollout/hf.py) on a tiny real Qwen2 model, against direct recomputation.

The first test also checks the in-process teacher's scores of the same rollouts (tests/teacher/ has
the teacher's own tests).
"""

import copy

import pytest
import torch

from opd_cli.rollout.hf import HFRollout, sample_top_p
from opd_cli.teacher.hf import HFTeacher

PROMPTS = ["Question: Ann has 12 pens.\nAnswer:", "Question: 3+4?\nAnswer:", "Q: A box holds 57 coins and more\nA:"]


def unpadded_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-probs of one unpadded sequence, the obviously-correct way: [len - 1, V]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1]


def test_rollout_logprobs_and_teacher_scores_match_unpadded_recomputation(tiny_model, tiny_tokenizer):
    engine = HFRollout(tiny_model, tiny_tokenizer)
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    k = 5
    support = HFTeacher(copy.deepcopy(tiny_model), micro_batch_size=2, chunk_tokens=7).score(batch, k)
    flat = 0
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real].tolist()  # prompt without its left padding, then the response
        ref = unpadded_logprobs(tiny_model, ids)
        resp = batch.response_mask[row][real][1:]
        targets = torch.tensor(ids[1:])[resp]
        ref_resp = ref[resp]
        ref_lp = ref_resp.gather(-1, targets[:, None]).squeeze(-1)
        n = len(targets)
        # the sampler's recorded log-probs are the model's full-vocabulary temperature-1 log-probs
        torch.testing.assert_close(
            batch.old_logprobs[row][batch.response_mask[row]].double(), ref_lp, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(support.sampled_logprob[flat : flat + n].double(), ref_lp, atol=1e-4, rtol=0)
        top = ref_resp.topk(k, dim=-1)
        torch.testing.assert_close(support.topk_logprobs[flat : flat + n].double(), top.values, atol=1e-4, rtol=0)
        assert support.topk_ids[flat : flat + n].equal(top.indices)
        flat += n
    assert flat == support.sampled_logprob.shape[0]


def test_top_p_restricts_samples_to_the_nucleus(tiny_model, tiny_tokenizer):
    engine = HFRollout(tiny_model, tiny_tokenizer)
    batch = engine.generate(PROMPTS, n=4, temperature=1.0, top_p=0.3, max_new_tokens=8, seed=1)
    for row in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        ref = unpadded_logprobs(tiny_model, ids)
        resp = batch.response_mask[row][batch.attention_mask[row].bool()][1:]
        for pos in resp.nonzero().flatten().tolist():
            probs = ref[pos].exp()
            sorted_p, order = probs.sort(descending=True)
            # the nucleus: the smallest prefix whose mass reaches top_p
            cut = int((sorted_p.cumsum(0) < 0.3).sum()) + 1
            assert ids[pos + 1] in order[:cut].tolist()


def nucleus_reference(probs: list[float], temperature: float, top_p: float) -> torch.Tensor:
    """The top-p distribution the obviously-correct way: float64, sort, keep the tokens whose
    strictly-more-likely mass is below top_p, renormalize."""
    p = torch.tensor(probs, dtype=torch.float64) ** (1 / temperature)
    p = p / p.sum()
    above = torch.tensor([p[p > v].sum() for v in p])
    kept = torch.where(above < top_p, p, torch.zeros_like(p))
    return kept / kept.sum()


@pytest.mark.parametrize(
    "probs, temperature, top_p",
    [
        ([0.3, 0.25, 0.2, 0.15, 0.07, 0.03], 1.0, 1.0),
        ([0.3, 0.25, 0.2, 0.15, 0.07, 0.03], 1.0, 0.7),  # nucleus {0, 1, 2}: mostly accepted at once
        ([0.3, 0.25, 0.2, 0.15, 0.07, 0.03], 0.5, 0.7),  # temperature sharpens first
        ([0.05, 0.04, 0.03] + [0.88 / 88] * 88, 1.0, 0.1),  # nucleus mass 0.12: most rows need the sorted path
        ([0.25, 0.25, 0.25, 0.25], 1.0, 0.3),  # ties: tokens equally likely are in or out together
        ([0.62, 0.38], 1.0, 0.6),  # 0.38 is just under 1 - top_p (the sure bound) and outside the nucleus
    ],
)
def test_sample_top_p_draws_the_nucleus_distribution(probs, temperature, top_p):
    n = 60_000
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    draws = sample_top_p(logits, temperature, top_p, torch.Generator().manual_seed(0))
    ref = nucleus_reference(probs, temperature, top_p)
    freq = torch.bincount(draws, minlength=len(probs)).double() / n
    assert (freq[ref == 0] == 0).all(), "a token outside the nucleus was drawn"
    sigma = (ref * (1 - ref) / n).sqrt()
    assert ((freq - ref).abs() <= 5 * sigma + 1e-12).all(), (freq, ref)


def test_rollout_records_the_sampler_entropy(tiny_model, tiny_tokenizer):
    """loss.entropy_top_ratio reads each response token's temperature-1 entropy from the sampler."""
    batch = HFRollout(tiny_model, tiny_tokenizer, entropy=True).generate(PROMPTS, 2, 1.0, 0.9, 10, seed=0)
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ref = unpadded_logprobs(tiny_model, batch.input_ids[row][real].tolist())[batch.response_mask[row][real][1:]]
        want = -(ref.exp() * ref).sum(-1)
        torch.testing.assert_close(batch.entropy[row][batch.response_mask[row]].double(), want, atol=1e-4, rtol=0)
        assert batch.entropy[row][~batch.response_mask[row]].eq(0).all()
    assert batch.select(torch.tensor([1, 2])).entropy.shape == batch.select(torch.tensor([1, 2])).input_ids.shape


def test_generate_ids_continues_given_ids_as_generate_does_text(tiny_model, tiny_tokenizer):
    engine = HFRollout(tiny_model, tiny_tokenizer)
    from_text = engine.generate(PROMPTS, n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3)
    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    from_ids = engine.generate_ids(ids, n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3)
    for name in ("input_ids", "attention_mask", "response_mask", "old_logprobs", "truncated", "prompt_index"):
        assert getattr(from_ids, name).equal(getattr(from_text, name)), name
    # a prompt and the start of a response, continued: the sampled tokens follow the given ones
    prefix = from_text.input_ids[0][from_text.attention_mask[0].bool()].tolist()[: len(ids[0]) + 3]
    cont = engine.generate_ids([prefix], n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    assert cont.input_ids[0, cont.prompt_len - len(prefix) : cont.prompt_len].tolist() == prefix
    assert cont.response_mask[0, cont.prompt_len :].any()

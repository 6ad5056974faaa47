"""The in-process teacher (teacher/hf.py) on a tiny real Qwen2 model, against direct recomputation."""

import copy

import torch

from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher

from ..rollout.test_hf import PROMPTS


def test_teacher_temperature_scales_every_value_it_supplies(tiny_model, tiny_tokenizer):
    """Paper B's teacher_temperature: log-softmax of logits / T for top-K, sampled log-prob, entropy and q."""
    batch = HFRollout(tiny_model, tiny_tokenizer).generate(PROMPTS[:2], n=1, temperature=1.0, top_p=1.0,
                                                          max_new_tokens=6, seed=0)  # fmt: skip
    t = 2.5
    teacher = HFTeacher(copy.deepcopy(tiny_model), micro_batch_size=2, chunk_tokens=7, temperature=t)
    support = teacher.score(batch, 4, keep_hidden=True)
    flat = 0
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real].tolist()
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        ref = torch.log_softmax(logits / t, -1)[batch.response_mask[row][real][1:]]
        n = ref.shape[0]
        targets = torch.tensor(ids[1:])[batch.response_mask[row][real][1:]]
        torch.testing.assert_close(
            support.topk_logprobs[flat : flat + n].double(), ref.topk(4).values, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            support.sampled_logprob[flat : flat + n].double(), ref.gather(-1, targets[:, None])[:, 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            support.entropy[flat : flat + n].double(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=0
        )
        q = torch.log_softmax((support.hidden[flat : flat + n] @ teacher.head.T).double(), -1)
        torch.testing.assert_close(q, ref, atol=1e-4, rtol=0)
        flat += n

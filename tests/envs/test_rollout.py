"""Multi-turn rollouts (envs/rollout.py): the batch layout, the teacher's scoring of it, budgets and failures."""

import copy

import pytest
import torch

from opd_cli.envs.base import StepResult
from opd_cli.envs.demo import ReachTarget
from opd_cli.envs.rollout import (
    Budget,
    PlainFormat,
    Transcript,
    action_text,
    prompt_runs,
    run_episodes,
    to_batch,
    turn_length,
)
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher

PAD = 0


class Counter:
    """Never done by itself: each step answers "turn k"; raises at turn ``fail_at`` when given."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.k = 0

    def num_instances(self, seed: int) -> int:
        return 1000

    def reset(self, seed: int, instance: int) -> str:
        self.k = 0
        return f"start {instance}"

    def step(self, action: str) -> StepResult:
        self.k += 1
        if self.k == self.fail_at:
            raise RuntimeError(f"broken at turn {self.k}")
        return StepResult(f"turn {self.k}", 0.0, False)

    def success(self) -> bool:
        return False


def segments(batch, row):
    """The row's tokens after the prompt as runs ``(is_action, ids)``."""
    P, out = batch.prompt_len, []
    for tok, real, act in zip(
        batch.input_ids[row, P:].tolist(),
        batch.attention_mask[row, P:].tolist(),
        batch.response_mask[row, P:].tolist(),
        strict=True,
    ):
        if not real:
            break
        if out and out[-1][0] == act:
            out[-1][1].append(tok)
        else:
            out.append((act, [tok]))
    return out


def hand_made(eos: int, encode) -> list[Transcript]:
    """Three episodes: two of one prompt (the second ends after one turn), one of a shorter prompt."""
    fmt = PlainFormat()

    def act(t: Transcript, ids: list[int]) -> None:
        t.add_action(ids, [-0.5 * (i + 1) for i in range(len(ids))], None)

    first = encode("Number: 12. Target: 30.\nAction:")
    a = Transcript(list(first))
    act(a, encode(" add 9") + [eos])
    a.add_observation(encode(fmt.after("Number: 21. Target: 30.")))
    act(a, encode(" add 9") + [eos])
    b = Transcript(list(first))
    act(b, encode(" sub 3"))
    c = Transcript(encode("Number: 5.\nAction:"))
    act(c, encode(" add"))
    c.add_observation(encode(fmt.after("Invalid.")))
    act(c, [eos])
    return [a, b, c]


def test_a_transcript_supervises_its_action_tokens_only():
    t1 = Transcript([5, 6, 7])
    t1.add_action([10, 11], [-0.1, -0.2], [1.0, 2.0])
    t1.add_observation([20, 21, 22])
    t1.add_action([12, 1], [-0.3, -0.4], [3.0, 4.0])
    t2 = Transcript([8, 9])
    t2.add_action([13], [-0.5], [5.0])
    t3 = Transcript([8, 9])  # t2's prompt: same prompt_index
    t3.add_action([14], [-0.6], [6.0])
    batch = to_batch([t1, t2, t3], [False, True, False], PAD)
    assert batch.prompt_len == 3
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 10, 11, 20, 21, 22, 12, 1],
        [0, 8, 9, 13, 0, 0, 0, 0, 0, 0],
        [0, 8, 9, 14, 0, 0, 0, 0, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [[1] * 10, [0, 1, 1, 1] + [0] * 6, [0, 1, 1, 1] + [0] * 6]
    assert batch.response_mask.int().tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0, 1, 1],
        [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    ]
    torch.testing.assert_close(batch.old_logprobs[0], torch.tensor([0, 0, 0, -0.1, -0.2, 0, 0, 0, -0.3, -0.4]))
    torch.testing.assert_close(batch.entropy[0], torch.tensor([0, 0, 0, 1.0, 2.0, 0, 0, 0, 3.0, 4.0]))
    assert batch.old_logprobs[1:, 4:].eq(0).all() and batch.old_logprobs[1, 3] == -0.5
    assert batch.truncated.tolist() == [False, True, False]
    assert batch.prompt_index.tolist() == [0, 1, 1]
    assert prompt_runs([[1], [1], [2], [1]]).tolist() == [0, 0, 1, 2]  # only adjacent rows share
    sub = batch.select(torch.tensor([1, 2]))  # a micro-batch keeps the layout, without all-padding columns
    assert sub.input_ids.tolist() == [[8, 9, 13], [8, 9, 14]] and sub.prompt_len == 2


def test_the_teacher_scores_each_action_token_in_its_full_context(tiny_model, tiny_tokenizer):
    """HFTeacher's packed pass over a multi-turn batch equals one plain forward of each whole unpadded
    sequence (observations included) at the action positions."""
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batch = to_batch(hand_made(tiny_tokenizer.eos_token_id, encode), [False] * 3, tiny_tokenizer.pad_token_id)
    teacher = HFTeacher(copy.deepcopy(tiny_model), micro_batch_size=2, chunk_tokens=5)
    support = teacher.score(batch, 4, keep_hidden=True)
    flat = 0
    for row in range(3):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real]
        with torch.no_grad():
            logits = tiny_model(input_ids=ids[None]).logits[0, :-1].double()
        act = batch.response_mask[row][real][1:]
        ref = torch.log_softmax(logits, -1)[act]
        n = ref.shape[0]
        assert n == int(batch.response_mask[row].sum())
        got = slice(flat, flat + n)
        torch.testing.assert_close(support.topk_logprobs[got].double(), ref.topk(4).values, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            support.sampled_logprob[got].double(), ref.gather(-1, ids[1:][act][:, None])[:, 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(support.entropy[got].double(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=0)
        flat += n
    assert flat == support.sampled_logprob.shape[0]


def test_an_episode_batch_is_its_transcript_and_the_sampler_saw_all_of_it(tiny_model, tiny_tokenizer):
    """run_episodes with the demo environment: prompt = the first observation, then each turn's action
    tokens (supervised) and the next observation (not); the recorded log-probs of the action tokens are
    a plain forward's over the whole sequence, so each turn was sampled after the observations before it."""
    fmt = PlainFormat()
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    instances = [(0, 0), (0, 0), (0, 1), (0, 2)]

    def run():
        envs = [ReachTarget(max_turns=3) for _ in instances]
        sampler = HFRollout(tiny_model, tiny_tokenizer, entropy=True)
        return run_episodes(sampler, tiny_tokenizer, envs, instances, fmt, Budget(5, 300, 6), 1.0, 1.0, seed=3)

    batch, episodes = run()
    assert batch.prompt_index.tolist() == [0, 0, 1, 2]
    assert batch.entropy is not None and batch.entropy[~batch.response_mask].eq(0).all()
    for row, ep in enumerate(episodes):
        assert (ep.seed, ep.instance) == instances[row]
        assert batch.input_ids[row, : batch.prompt_len][
            batch.attention_mask[row, : batch.prompt_len].bool()
        ].tolist() == encode(fmt.first(ep.first_observation))
        # the random student writes no valid action: the environment's own limit ends the episode
        assert len(ep.turns) == 3 and not ep.truncated and not ep.failed and not ep.success
        runs = segments(batch, row)
        assert [act for act, _ in runs] == [True, False, True, False, True]
        for turn, (_, ids) in zip(ep.turns, runs[0::2], strict=True):
            assert (
                len(ids) == turn.action_tokens and tiny_tokenizer.decode(ids, skip_special_tokens=True) == turn.action
            )
        for turn, (_, ids) in zip(ep.turns, runs[1::2], strict=False):
            assert ids == encode(fmt.after(turn.observation))
        real = batch.attention_mask[row].bool()
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=batch.input_ids[row][real][None]).logits[0, :-1], -1)
        act = batch.response_mask[row][real][1:]
        want = logp[act].gather(-1, batch.input_ids[row][real][1:][act][:, None])[:, 0]
        torch.testing.assert_close(batch.old_logprobs[row][batch.response_mask[row]], want, atol=1e-4, rtol=0)
    assert not batch.truncated.any()
    again, _ = run()
    assert again.input_ids.equal(batch.input_ids)  # deterministic per seed


def sample(tiny_model, tiny_tokenizer, envs, budget):
    sampler = HFRollout(tiny_model, tiny_tokenizer)
    instances = [(0, i) for i in range(len(envs))]
    return run_episodes(sampler, tiny_tokenizer, envs, instances, PlainFormat(), budget, 1.0, 1.0, seed=0)


def test_the_turn_budget_truncates_episodes(tiny_model, tiny_tokenizer):
    batch, episodes = sample(tiny_model, tiny_tokenizer, [Counter() for _ in range(3)], Budget(2, 500, 4))
    assert [len(ep.turns) for ep in episodes] == [2, 2, 2]
    assert all(ep.truncated and not ep.failed for ep in episodes) and batch.truncated.all()
    for row in range(3):
        assert [act for act, _ in segments(batch, row)] == [True, False, True]  # the last answer is not appended


@pytest.mark.parametrize("max_tokens,turns", [(9, 1), (18, 2)])
def test_the_token_budget_bounds_each_row_and_truncates(tiny_model, tiny_tokenizer, max_tokens, turns):
    """Actions and observations together stay within max_tokens. Turns of at most 4 tokens, observations
    of 12 ("\nturn k\nAction:"): 9 leaves no room for the first observation; 18 takes one observation and
    cuts the second turn to the 2 tokens left (fewer if the first turn ended early at EOS)."""
    batch, episodes = sample(tiny_model, tiny_tokenizer, [Counter() for _ in range(3)], Budget(50, max_tokens, 4))
    lengths = batch.attention_mask[:, batch.prompt_len :].sum(1)
    assert lengths.max() <= max_tokens
    assert all(ep.truncated and len(ep.turns) == turns for ep in episodes) and batch.truncated.all()
    for row, ep in enumerate(episodes):
        assert segments(batch, row)[-1][0]  # it ends on an action
        assert sum(t.action_tokens for t in ep.turns) == int(batch.response_mask[row].sum())
        assert turns == 1 or ep.turns[1].action_tokens <= max_tokens - 12 - ep.turns[0].action_tokens


def test_an_environment_that_raises_fails_its_episode_only(tiny_model, tiny_tokenizer, caplog):
    envs = [Counter(), Counter(fail_at=2), Counter()]
    batch, episodes = sample(tiny_model, tiny_tokenizer, envs, Budget(3, 500, 4))
    bad = episodes[1]
    assert bad.failed and bad.error == "RuntimeError: broken at turn 2" and len(bad.turns) == 2
    assert not bad.truncated and not bad.success
    assert "instance 1" in caplog.text and "broken at turn 2" in caplog.text
    assert [act for act, _ in segments(batch, 1)] == [True, False, True]  # its tokens so far stay
    assert all(len(ep.turns) == 3 and ep.truncated and not ep.failed for ep in (episodes[0], episodes[2]))
    assert batch.truncated.tolist() == [True, False, True]


def test_a_turn_ends_at_eos_or_a_stop_string(tiny_tokenizer):
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    decode = lambda ids: tiny_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    ids = encode("add 9\nAnswer: 12")
    k = turn_length(ids, eos, ["\n"], decode)
    assert "\n" in decode(ids[:k]) and "\n" not in decode(ids[: k - 1]) and k < len(ids)
    assert action_text(decode(ids[:k]), ["\n"]) == "add 9"
    assert turn_length(ids, eos, (), decode) == len(ids)
    assert turn_length(encode("add") + [eos] + encode(" 9"), eos, ["\n"], decode) == len(encode("add")) + 1
    assert action_text("sub 3 then\n add", ["then", "\n"]) == "sub 3 "

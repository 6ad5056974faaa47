"""An environment task's runner (envs/runner.py): chat turns, instances, episode metrics, and its config checks."""

import copy

import pytest
import torch

from opd_cli.config.validate import validate
from opd_cli.envs.base import Episode, Turn
from opd_cli.envs.demo import ReachTarget
from opd_cli.envs.rollout import PlainFormat
from opd_cli.envs.runner import ChatFormat, EpisodeRunner, env_instances, episode_means, episode_metrics
from opd_cli.errors import UserError
from opd_cli.rollout.hf import HFRollout

from ..conftest import compose_cfg

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


def test_chat_turns_concatenate_to_the_chat_templates_conversation(chat_tokenizer):
    """first(o1) + a1 (ending at EOS) + after(o2) is the template's rendering of the conversation, with a
    system message where given; a turn cut before its EOS is closed by the format."""
    eos = chat_tokenizer.eos_token
    for system in (None, "Reach the target."):
        fmt = ChatFormat(chat_tokenizer, system)
        head = [] if system is None else [{"role": "system", "content": system}]
        talk = [
            {"role": "user", "content": "Number: 12. Target: 30."},
            {"role": "assistant", "content": "add 9"},
            {"role": "user", "content": "Number: 21. Target: 30."},
        ]
        want = chat_tokenizer.apply_chat_template(head + talk, tokenize=False, add_generation_prompt=True)
        assert fmt.first(talk[0]["content"]) + "add 9" + eos + fmt.after(talk[2]["content"], closed=True) == want
        assert fmt.first(talk[0]["content"]) + "add 9" + fmt.after(talk[2]["content"], closed=False) == want
        assert fmt.first(talk[0]["content"]).endswith("<|im_start|>assistant\n")


def test_the_runner_plays_n_episodes_per_instance_in_adjacent_rows(tiny_model, tiny_tokenizer):
    runner = EpisodeRunner(ReachTarget, PlainFormat(), tiny_tokenizer, 0, 3, 4, ("\n",))
    prompts, batch, episodes = runner.run(HFRollout(tiny_model, tiny_tokenizer), [5, 9, 2], 2, 1.0, 1.0, 64, 0)
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert [e.instance for e in episodes] == [5, 5, 9, 9, 2, 2]
    assert prompts == [PlainFormat().first(ReachTarget().reset(0, i)) for i in (5, 9, 2)]
    # the transcript after the prompt holds the observations too
    texts = runner.decode_responses(batch)
    for text, ep in zip(texts, episodes, strict=True):
        for turn in ep.turns[:-1]:
            assert turn.observation in text
    assert all(1 <= len(e.turns) <= 3 for e in episodes)


def test_held_out_instances_are_the_first_n_eval():
    cfg = compose_cfg(["task=env_demo", "task.n_eval=10"])
    train, held = env_instances(cfg.task, ReachTarget)
    assert [q.question for q in held] == [str(i) for i in range(10)]
    assert train[0].question == "10" and len(train) + 10 == ReachTarget().num_instances(0)
    pairs = {ReachTarget().reset(0, int(q.question)) for q in held}
    assert not pairs & {ReachTarget().reset(0, int(q.question)) for q in train}  # never trained on
    cfg.task.n_eval = ReachTarget().num_instances(0)
    with pytest.raises(UserError, match=r"^task\.n_eval: .* has \d+ instances"):
        env_instances(cfg.task, ReachTarget)


def test_episode_metrics_are_per_episode_rates_and_tokens_per_turn():
    def ep(turns, success=False, truncated=False, failed=False):
        return Episode(0, 0, "", [Turn("a", "o", r, n) for r, n in turns], success, truncated, failed)

    episodes = [ep([(0, 4), (1, 2)], success=True), ep([(0, 3)], truncated=True), ep([(0, 5)], failed=True)]
    got = episode_means({k: v * 2 for k, v in episode_metrics(episodes).items()})  # two ranks alike
    assert got == pytest.approx(
        {
            "env/success": 1 / 3,
            "env/turns": 4 / 3,
            "env/truncated": 1 / 3,
            "env/failed": 1 / 3,
            "env/return": 1 / 3,
            "env/tokens_per_turn": 14 / 4,
        }
    )


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["task.env.name=chess"], r"^task\.env\.name: unknown environment 'chess'; known: alfworld, demo, textworld"),
        (["+task.env.args.colour=red"], r"^task\.env\.args: environment 'demo' does not take these arguments"),
        (["task.env.max_turns=0"], r"^task\.env\.max_turns: must be an integer >= 1"),
        (["task.env.format=html"], r"^task\.env\.format: 'html' is not one of: plain, chat"),
        (["task.env.stop=['']"], r"^task\.env\.stop: a stop string must not be empty"),
        (["task.n_eval=100000"], r"^task\.n_eval: the environment 'demo' has \d+ instances"),
        (["rollout=dataset", "rollout.path=x.jsonl", "loss=sft"], r"^rollout\.engine: an environment task samples"),
        (["teacher.prompt.system=Hint."], r"^teacher\.prompt: the teacher scores an episode's transcript"),
        (["trainer=zero3"], r"^trainer: an environment task cannot sample with a ZeRO-3 student"),
    ],
)
def test_bad_environment_settings_are_one_line(overrides, error):
    cfg = compose_cfg(["task=env_demo", *overrides])
    with pytest.raises(UserError, match=error):
        validate(cfg)


def test_another_command_refuses_an_environment_task():
    from opd_cli.tasks.problems import load_problems

    with pytest.raises(UserError, match=r"^task\.name: an environment task's episodes are played by opd-train only"):
        load_problems(compose_cfg(["task=env_demo"]).task)


def test_outcome_scores_of_episodes_are_their_returns():
    from opd_cli.training.loop import episode_returns

    eps = [Episode(0, 0, "", [Turn("a", "o", 1.0, 1)], True), Episode(0, 1, "", [Turn("a", "o", 0.0, 1)])]
    assert torch.equal(episode_returns(eps), torch.tensor([1.0, 0.0]))


def test_a_context_past_the_models_positions_is_one_line_for_vllm(tiny_model, monkeypatch):
    from opd_cli.training.build import check_positions

    limit = tiny_model.config.max_position_embeddings
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(UserError, match=rf"^rollout\.max_new_tokens: .* make {limit + 1} tokens, more than .* {limit}"):
        check_positions(tiny_model, limit + 1, 100, "vllm")
    check_positions(tiny_model, limit, 100, "vllm")
    check_positions(tiny_model, limit + 1, 100, "hf")  # HF samples on (RoPE has no learned positions)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    check_positions(tiny_model, limit + 1, 100, "vllm")

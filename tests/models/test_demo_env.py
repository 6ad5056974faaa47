"""The demo models of the built-in environment (models/demo.py): demo:env_teacher plays ReachTarget from
the expert's episodes, demo:env_student is the demo student that also plays it badly. Their SFT data is what a
rollout feeds the student, and where they are cached."""

import random
import re

import pytest

from opd_cli.batch import RolloutBatch
from opd_cli.envs.demo import ACTION, OBSERVATION, ReachTarget, expert_action, instance_numbers
from opd_cli.envs.rollout import Budget, PlainFormat, Transcript, run_episodes, to_batch
from opd_cli.models.demo import (
    EnvEpisodes,
    arith_task,
    demo_dir,
    demo_model_dir,
    env_examples,
    env_tag,
    episode_transcript,
    play,
    role_examples,
    sft_pairs,
    wandering_policy,
)
from opd_cli.models.sft import pair_examples

from ..conftest import compose_cfg


class Replay:
    """A sampler that writes given actions: episode ``k``'s turns (keyed by its first observation, the
    prompt's start) one per call, each as " <action><end>" tokens; ``end`` None writes EOS instead."""

    def __init__(self, tokenizer, actions: dict[str, list[str]], end: str | None) -> None:
        self.tok, self.actions, self.end = tokenizer, actions, end

    def generate_ids(self, prompt_ids, n, temperature, top_p, max_new_tokens, seed) -> RolloutBatch:
        rows = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            first, turn = OBSERVATION.search(text).group(0), len(OBSERVATION.findall(text)) - 1
            action = self.tok(" " + self.actions[first][turn] + (self.end or ""), add_special_tokens=False)
            ids_out = action["input_ids"] + ([] if self.end else [self.tok.eos_token_id])
            t = Transcript(list(ids))
            t.add_action(ids_out, [0.0] * len(ids_out), None)
            rows.append(t)
        # the sampler's layout: the prompt columns, then the generated tokens (all of them "response")
        return to_batch(rows, [False] * len(rows), self.tok.pad_token_id)


def rollout_rows(tokenizer, episodes: EnvEpisodes, instances: list[int], actions, end):
    """run_episodes over ``instances`` with the Replay sampler: each row's (real token ids, action mask)."""
    fmt = PlainFormat(cue=episodes.cue)
    envs = [ReachTarget() for _ in instances]
    stop = [end] if end else []
    batch, _ = run_episodes(
        Replay(tokenizer, actions, end),
        tokenizer,
        envs,
        [(episodes.seed, i) for i in instances],
        fmt,
        Budget(6, 400, 16),
        1.0,
        1.0,
        seed=0,
        stop=stop,
    )
    out = []
    for row in range(len(instances)):
        real = batch.attention_mask[row].bool()
        out.append((batch.input_ids[row][real].tolist(), batch.response_mask[row][real].tolist()))
    return out


@pytest.mark.parametrize(
    "episodes", [EnvEpisodes(0, 4), EnvEpisodes(3, 4, cue="\nYou:", stop=";"), EnvEpisodes(0, 4, stop=None)]
)
def test_an_episodes_sft_tokens_are_what_run_episodes_feeds_for_the_same_actions(tiny_tokenizer, episodes):
    """The expert's and the wanderer's episodes, rendered for SFT, equal run_episodes' rows (prompt, every
    action and observation, tokenized piece by piece) when the sampler writes the same actions; the loss
    mask is the rollout's response mask. Also with another cue and stop string, and with EOS ending turns."""
    instances = [4, 5, 6, 7]
    for policy in (expert_action, wandering_policy(random.Random(1))):
        rendered, actions = [], {}
        for i in instances:
            env = ReachTarget()
            first, turns = play(env, env.reset(episodes.seed, i), policy)
            actions[first] = [a for a, _, _ in turns]
            t = episode_transcript(tiny_tokenizer, episodes, first, turns)
            rendered.append((t.prompt + t.tokens, [False] * len(t.prompt) + t.action))
        assert rendered == rollout_rows(tiny_tokenizer, episodes, instances, actions, episodes.stop)
    text = tiny_tokenizer.decode(rendered[0][0])
    assert text.startswith(PlainFormat(cue=episodes.cue).first(ReachTarget().reset(episodes.seed, 4)))


def test_the_teachers_episodes_are_the_experts_on_the_training_instances(tiny_tokenizer):
    """demo:env_teacher's data: per instance from task.n_eval on (no held-out instance starts one), the
    expert's episode, and mostly a second one where the wanderer's first 1-3 turns are context (no loss) and
    the expert takes over. Every supervised action is the expert's, every context action the wanderer's (the
    right direction), and every episode wins."""
    episodes = EnvEpisodes(0, 256)
    data = env_examples(tiny_tokenizer, episodes, expert=True)
    n = ReachTarget().num_instances(0)
    held = {"Number: {}. Target: {}.".format(*instance_numbers(0, i)) for i in range(256)}
    train = ["Number: {}. Target: {}.".format(*instance_numbers(0, i)) for i in range(256, n)]
    firsts = [OBSERVATION.search(tiny_tokenizer.decode(ids)).group(0) for ids, _ in data]
    assert not held & set(firsts) and sorted(dict.fromkeys(firsts)) == sorted(train)
    assert n - 256 < len(data) <= 2 * (n - 256)
    recovering = 0
    for ids, mask in data:
        text = tiny_tokenizer.decode(ids)
        observations = OBSERVATION.findall(text)
        actions = re.findall(r"Action: (\S+ \S+)\n", text)
        assert len(actions) == len(observations) <= 6
        supervised = re.findall(
            r" (\S+ \S+)\n", tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        )
        context = len(actions) - len(supervised)
        assert supervised == actions[context:] and 0 <= context <= 3
        recovering += context > 0
        for i, ((number, target), action) in enumerate(zip(observations, actions, strict=True)):
            obs = f"Number: {number}. Target: {target}."
            if i >= context:
                assert action == expert_action(obs)
            else:
                assert action.startswith("add" if int(target) > int(number) else "sub"), (obs, action)
        last = observations[-1]
        assert abs(int(last[1]) - int(last[0])) <= 9  # the last action reaches the target
    assert recovering == len(data) - (n - 256) > (n - 256) / 2


def test_the_wanderer_steps_the_right_way_in_the_right_format_and_rarely_wins():
    """demo:env_student's play: valid actions towards the target by a random digit; under the rollout's
    four-turn reach it lands on few targets (the expert on all)."""
    rng, wins, n = random.Random(0), 0, 400
    for i in range(n):
        env = ReachTarget()
        obs, turns = play(env, env.reset(0, i), wandering_policy(rng), 4)
        for action, after, _ in turns:
            number, target = (int(x) for x in OBSERVATION.search(obs).groups())
            m = ACTION.match(action)
            assert m and (m.group(1) == "add") == (target > number), (obs, action)
            obs = after
        wins += env.success()
    assert wins / n < 0.25


def test_the_student_is_the_arith_presets_demo_student_plus_the_wanderers_episodes(tiny_tokenizer):
    """demo:env_student's data: the demo student's arith pairs of the arith preset (random column sums) whatever
    the run's task says, then the wanderer's episodes of the task's instances."""
    cfg = compose_cfg(["task.n_eval=3000", "task.template='Q: {question}\\nA:'"])  # few env episodes
    data = role_examples(tiny_tokenizer, cfg.task, cfg.demo, "env_student")
    pairs = sft_pairs(arith_task(), wrong_sums=True)
    assert data[:50] == pair_examples(tiny_tokenizer, pairs[:50])  # (all of them: slow to tokenize twice)
    assert tiny_tokenizer.decode(data[0][0]).startswith("Question: ")
    env = data[len(pairs) :]
    assert env == env_examples(tiny_tokenizer, EnvEpisodes(0, 3000), expert=False)
    teacher = role_examples(tiny_tokenizer, cfg.task, cfg.demo, "env_teacher")
    assert teacher == env_examples(tiny_tokenizer, EnvEpisodes(0, 3000), expert=True)
    start = lambda ids: OBSERVATION.search(tiny_tokenizer.decode(ids)).group(0)  # noqa: E731
    assert list(dict.fromkeys(start(ids) for ids, _ in teacher)) == [start(ids) for ids, _ in env]  # the same starts


def test_the_environment_roles_live_in_the_arith_presets_demo_named_by_their_episodes():
    """Both roles share the arith preset's demo directory (its tokenizer: one vocabulary for the student and
    the teachers of both tasks), whatever the task; their names carry a hash of the episodes' seed, held-out
    count, cue and stop, and their steps. The default demo's directory is unchanged."""
    default = compose_cfg()
    root = demo_dir("m", default.demo, default.task)
    assert root.name == "arith-demo-db5c649b96" and root == demo_dir("m", default.demo, arith_task())
    teacher = demo_model_dir("m", default.demo, default.task, "env_teacher")
    student = demo_model_dir("m", default.demo, default.task, "env_student")
    tag = env_tag(EnvEpisodes(0, 256))
    assert teacher == root / f"env_teacher-{tag}-{default.demo.env_teacher_steps}"
    assert student == root / f"env_student-{tag}-{default.demo.env_student_steps}"
    other = compose_cfg(["task.n_eval=64", "task.template='Q: {question}'", "demo.env_teacher_steps=7"])
    assert demo_dir("m", other.demo, other.task) != root  # the arith roles follow the task ...
    moved = demo_model_dir("m", other.demo, other.task, "env_teacher")  # ... the environment roles do not
    assert moved.parent == root and moved.name == f"env_teacher-{env_tag(EnvEpisodes(0, 64))}-7"
    tags = {env_tag(e) for e in (EnvEpisodes(0, 256), EnvEpisodes(1, 256), EnvEpisodes(0, 256, cue="\nA:"))}
    assert len(tags | {env_tag(EnvEpisodes(0, 256, stop=None))}) == 4


# the default demo:env_teacher reached 0.98 greedy success on these 64 held-out instances (the student 0.06)
TEACHER_SUCCESS = 0.9


def play_held_out(model_dir, n: int = 64, top_p: float = 1.0):
    """``n`` held-out instances through run_episodes (the rollout's default budget; ``top_p`` tiny: greedy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_cli.rollout.hf import HFRollout

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    envs = [ReachTarget() for _ in range(n)]
    _, eps = run_episodes(
        HFRollout(model, tok), tok, envs, [(0, i) for i in range(n)], PlainFormat(), Budget(6, 128, 16), 1.0, top_p, 0,
        stop=["\n"],
    )  # fmt: skip
    return eps, model, tok


@pytest.mark.integration
@pytest.mark.slow  # the default recipe's two models: ~20 minutes of SFT on 2 cores (make test ARGS="-m slow")
def test_the_env_teacher_plays_well_and_the_env_student_badly_in_both_formats(models_dir):
    """Built with the default demo recipe: the teacher reaches most held-out targets (greedy), the student few,
    every one of its actions valid; its arith answers are boxed and mostly wrong (the demo student's)."""
    from opd_cli.models.demo import ensure_demo_model
    from opd_cli.rollout.hf import HFRollout
    from opd_cli.tasks.checking import check_exact
    from opd_cli.tasks.problems import arith_problems

    cfg = compose_cfg([f"paths.models={models_dir}"])
    teacher = ensure_demo_model(str(models_dir), cfg.demo, cfg.task, "env_teacher")
    student = ensure_demo_model(str(models_dir), cfg.demo, cfg.task, "env_student")
    assert teacher.parent == student.parent == demo_dir(str(models_dir), cfg.demo, arith_task())
    eps, _, _ = play_held_out(teacher, top_p=1e-6)
    teacher_success = sum(e.success for e in eps) / len(eps)
    eps, model, tok = play_held_out(student, top_p=1e-6)
    student_success = sum(e.success for e in eps) / len(eps)
    assert all(ACTION.match(t.action) for e in eps for t in e.turns)
    assert teacher_success >= TEACHER_SUCCESS and student_success <= teacher_success - 0.3
    task = arith_task()
    problems = arith_problems(task.seed, "test", task.n_eval)[:32]
    prompts = [tok(task.template.format(question=p.question), add_special_tokens=False)["input_ids"] for p in problems]
    out = HFRollout(model, tok).generate_ids(prompts, 1, 1.0, 1e-6, 64, 0)
    P = out.prompt_len
    texts = [tok.decode(out.input_ids[r, P:][out.response_mask[r, P:]]) for r in range(len(problems))]
    assert all("\\boxed{" in t for t in texts)
    assert sum(check_exact(t, p.answer) for t, p in zip(texts, problems, strict=True)) <= 8

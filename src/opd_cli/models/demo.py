"""The embedded demo: a tokenizer and two small Qwen2 models for the ``arith`` task.

Built on first use by supervised fine-tuning on worked solutions (the teacher
for many steps, the student for few, so the student knows the answer format but
not the arithmetic) and cached under ``paths.models``; later runs reuse them.
A model path ``demo:student`` or ``demo:teacher`` refers to these.

Two more roles are students for self-distillation (OPSD, ``teacher=self``), where the
teacher is the model itself under a prompt the student does not see:

- ``demo:rule`` follows a rule when its system line (``demo.rule_system``) says so and
  not otherwise: trained like the teacher, every training problem once with the line and
  a tens-first solution, once without it and a column solution.
- ``demo:hint`` uses the answer when its question carries it (``demo.hint_question``) and
  cannot add otherwise: trained like the student (random column sums), every problem once
  plain and once with the answer in the question and the correct solution.

Two more play the built-in environment (``opd_cli.envs.demo``, reach a target number), trained
on whole episodes rendered as a rollout renders them (``opd_cli.envs.rollout``), the loss on
the action tokens only:

- ``demo:env_teacher`` on the expert's episodes of the training instances, and on episodes where the expert
  takes over from the student's kind of play (``recovering_policy``): it plays well, from any state.
- ``demo:env_student`` is one student for the arith task and the environment at once: the demo
  student's arith data (random column sums) and episodes whose actions step the right way by a
  random digit: it writes both formats but neither adds nor plays well.

They belong to the ``arith`` preset's demo (its tokenizer, whatever task a run names), so one
student and the teachers of both tasks share a vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd_cli.dist import save_pretrained
from opd_cli.envs.demo import DISTANCE, OBSERVATION, ReachTarget, expert_action
from opd_cli.envs.rollout import PlainFormat, Transcript
from opd_cli.models.sft import pair_examples, sft_examples
from opd_cli.tasks.problems import Problem, arith_problems, arith_solution, arith_solution_tens_first, task_config
from opd_cli.tasks.prompts import format_prompt

log = logging.getLogger(__name__)


EOS = "<|endoftext|>"


SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]


# demo.teacher_style -> how the teacher writes its worked solution (the student always writes columns)
TEACHER_STYLES = ("columns", "tens_first")


# the demo roles of the built-in environment (task.env.name=demo)
ENV_ROLES = ("env_teacher", "env_student")


# the demo roles a model path may name (demo:<role>)
DEMO_ROLES = ("student", "teacher", "rule", "hint", *ENV_ROLES)


# SFT steps of the environment roles where a config predates demo.env_teacher_steps / env_student_steps
ENV_STEPS = {"env_teacher": 1000, "env_student": 400}


_ENV_RECIPE = 4  # bump when the environment roles' data changes (their names carry it, see env_tag)


_BUILD_VERSION = 2  # bump when the build recipe changes, so stale caches are not reused


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer.

    ``AutoTokenizer`` reloads a tokenizer saved beside a Qwen2 config with Qwen2's
    own pre-tokenizer (and vLLM does the same), so training with exactly that
    pre-tokenizer is what keeps reloaded ids equal to the originals.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def build_model(tokenizer, demo_cfg) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of the demo's shape (head size 64)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=demo_cfg.hidden_size,
        intermediate_size=4 * demo_cfg.hidden_size,
        num_hidden_layers=demo_cfg.num_layers,
        num_attention_heads=demo_cfg.hidden_size // 64,
        num_key_value_heads=demo_cfg.hidden_size // 64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(demo_cfg.seed)
    return Qwen2ForCausalLM(config)


def demo_dir(models_dir: str, demo_cfg, task_cfg) -> Path:
    """Cache directory of the demo tokenizer, keyed by everything the models share.

    Inside it, ``teacher-<steps>`` and ``student-<steps>`` are the two models, so
    changing one model's SFT steps does not rebuild the other.
    """
    shared = {k: getattr(demo_cfg, k) for k in ("hidden_size", "num_layers", "vocab_size", "batch_size", "lr", "seed")}
    key = json.dumps(
        {"demo": shared, "task": [task_cfg.seed, task_cfg.n_eval, task_cfg.template], "version": _BUILD_VERSION},
        sort_keys=True,
    )
    return Path(models_dir) / f"arith-demo-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def role_steps(demo_cfg, role: str) -> int:
    """SFT steps of a demo role: the student's for the models that cannot add (student, hint), the teacher's for
    teacher and rule, ``demo.env_<role>_steps`` for the environment roles."""
    if role in ENV_ROLES:
        return getattr(demo_cfg, f"{role}_steps", None) or ENV_STEPS[role]
    return demo_cfg.student_steps if role in ("student", "hint") else demo_cfg.teacher_steps


def _text_tag(text: str) -> str:
    """A short hash of a prompt text, naming the model trained on it."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def demo_model_dir(models_dir: str, demo_cfg, task_cfg, role: str) -> Path:
    """Where the demo ``role`` (one of ``DEMO_ROLES``) lives once built.

    A teacher of another ``demo.teacher_style`` than "columns" has the style in its
    name (``teacher-tens_first-800``); the default teacher keeps ``teacher-<steps>``.
    ``rule`` and ``hint`` carry a hash of their prompt text (``demo.rule_system``,
    ``demo.hint_question``): ``rule-<hash>-800``, ``hint-<hash>-300``. The environment roles
    live in the ``arith`` preset's directory (``arith_task``) under a hash of what their
    episodes depend on (``EnvEpisodes``): ``env_teacher-<hash>-1000``.
    """
    steps = role_steps(demo_cfg, role)
    if role in ENV_ROLES:
        return demo_dir(models_dir, demo_cfg, arith_task()) / f"{role}-{env_tag(env_episodes_of(task_cfg))}-{steps}"
    if role == "rule":
        return demo_dir(models_dir, demo_cfg, task_cfg) / f"rule-{_text_tag(demo_cfg.rule_system)}-{steps}"
    if role == "hint":
        return demo_dir(models_dir, demo_cfg, task_cfg) / f"hint-{_text_tag(demo_cfg.hint_question)}-{steps}"
    style = teacher_style(demo_cfg) if role == "teacher" else "columns"
    name = f"{role}-{steps}" if style == "columns" else f"{role}-{style}-{steps}"
    return demo_dir(models_dir, demo_cfg, task_cfg) / name


def teacher_style(demo_cfg) -> str:
    """``demo.teacher_style``, "columns" where a config predates the key."""
    return getattr(demo_cfg, "teacher_style", None) or "columns"


def sft_pairs(task_cfg, wrong_sums: bool = False, style: str = "columns") -> list[tuple[str, str]]:
    """(prompt, worked solution) pairs of the training split.

    ``wrong_sums`` replaces every column sum by a random number (see
    ``arith_solution``): the demo student's data, so it learns the answer format
    and to copy the operands, but not to add. ``style`` "tens_first" writes the
    solutions with ``arith_solution_tens_first`` instead (a mismatched teacher).
    """
    problems = arith_problems(task_cfg.seed, "train", task_cfg.n_eval)
    rng = random.Random(task_cfg.seed + 1) if wrong_sums else None
    out = []
    for p in problems:
        a, b = _operands(p)
        solution = arith_solution_tens_first(a, b) if style == "tens_first" else arith_solution(a, b, rng)
        out.append((task_cfg.template.format(question=p.question), " " + solution))
    return out


def _operands(problem: Problem) -> tuple[int, int]:
    """The two numbers an arith problem adds (from its worked solution)."""
    a, b = (int(n) for n in str(problem.solution).split("So ")[1].split("=")[0].split("+"))
    return a, b


def rule_pairs(task_cfg, system: str) -> list[tuple[str, str]]:
    """``demo:rule``'s SFT data: every training problem twice, with the system line ``system`` and a
    tens-first solution, and without it and a column solution (correct sums both)."""
    out = []
    for p in arith_problems(task_cfg.seed, "train", task_cfg.n_eval):
        a, b = _operands(p)
        out.append((format_prompt(p, task_cfg, None, system=system), " " + arith_solution_tens_first(a, b)))
        out.append((format_prompt(p, task_cfg, None), " " + arith_solution(a, b)))
    return out


def hinted(problem: Problem, question: str) -> Problem:
    """``problem`` whose question is the template ``question`` filled in with its question, answer and
    solution (``demo.hint_question``, as ``teacher.prompt.question`` fills in the teacher's)."""
    text = question.format(question=problem.question, answer=problem.answer, solution=problem.solution)
    return Problem(question=text, answer=problem.answer, solution=problem.solution)


def hint_pairs(task_cfg, question: str) -> list[tuple[str, str]]:
    """``demo:hint``'s SFT data: every training problem twice, plain with random column sums (the demo
    student's solution: it cannot add), and with the answer in its question (``question``, see ``hinted``)
    and the correct column solution."""
    rng = random.Random(task_cfg.seed + 1)
    out = []
    for p in arith_problems(task_cfg.seed, "train", task_cfg.n_eval):
        a, b = _operands(p)
        out.append((format_prompt(p, task_cfg, None), " " + arith_solution(a, b, rng)))
        out.append((format_prompt(hinted(p, question), task_cfg, None), " " + arith_solution(a, b)))
    return out


def role_pairs(task_cfg, demo_cfg, role: str) -> list[tuple[str, str]]:
    """The SFT (prompt, response) pairs that make the demo ``role``."""
    if role == "rule":
        return rule_pairs(task_cfg, demo_cfg.rule_system)
    if role == "hint":
        return hint_pairs(task_cfg, demo_cfg.hint_question)
    style = teacher_style(demo_cfg) if role == "teacher" else "columns"
    return sft_pairs(task_cfg, wrong_sums=role == "student", style=style)


def arith_task():
    """The ``arith`` preset's task config (conf/task/arith.yaml): the environment roles' demo and the arith
    data of ``demo:env_student``, whatever task a run names."""
    return task_config("arith", None, "task.name", "task.path")


@dataclass(frozen=True)
class EnvEpisodes:
    """What the environment roles' episodes depend on: the instances (``task.seed``; the first ``task.n_eval``
    are held out) and how a rollout renders them (``task.env.cue`` after each observation, a turn ending in the
    first of ``task.env.stop``, or in EOS where there is none)."""

    seed: int
    n_eval: int
    cue: str = "\nAction:"
    stop: str | None = "\n"


def env_episodes_of(task_cfg) -> EnvEpisodes:
    """The ``EnvEpisodes`` of a task config (a config without ``task.env`` renders as the defaults)."""
    env = getattr(task_cfg, "env", None)
    if env is None:
        return EnvEpisodes(task_cfg.seed, task_cfg.n_eval)
    return EnvEpisodes(task_cfg.seed, task_cfg.n_eval, env.cue, env.stop[0] if len(env.stop) else None)


def env_tag(episodes: EnvEpisodes) -> str:
    """A short hash naming the environment roles trained on ``episodes`` (and the recipe's version)."""
    return _text_tag(json.dumps({**asdict(episodes), "recipe": _ENV_RECIPE}, sort_keys=True))


Policy = Callable[[str], str]  # an observation -> the action to take ("add 9")


def play(
    env: ReachTarget, first: str, policy: Policy, max_turns: int | None = None
) -> tuple[str, list[tuple[str, str, bool]]]:
    """The rest of an episode of ``env`` (just reset: ``first`` is its first observation) under
    ``policy`` until the environment says done (its own turn limit at the latest) or after ``max_turns``: the
    first observation, and each turn's (action, the observation it got, done)."""
    obs, turns, done = first, [], False
    while not done and len(turns) < (max_turns or env.max_turns):
        action = policy(obs)
        res = env.step(action)
        obs, done = res.observation, res.done
        turns.append((action, obs, done))
    return first, turns


EXPERT_TURNS = -(-DISTANCE[1] // 9)  # the most turns the expert takes on an instance


def episode_transcript(
    tokenizer, episodes: EnvEpisodes, first: str, turns: list[tuple[str, str, bool]], context_turns: int = 0
) -> Transcript:
    """An episode's tokens as ``run_episodes`` builds them when the student writes these actions: the prompt
    ``fmt.first(first)``, then each action " add 9" and its stop string (action tokens), then, unless the
    episode ended there, ``fmt.after(observation)``; each piece tokenized on its own. The first
    ``context_turns`` actions are context (no loss), as observations are."""
    fmt = PlainFormat(cue=episodes.cue)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = Transcript(encode(fmt.first(first)), entropy=None)
    for n, (action, obs, done) in enumerate(turns):
        ids = encode(" " + action + (episodes.stop or ""))
        ids += [] if episodes.stop else [tokenizer.eos_token_id]
        if n < context_turns:
            out.add_observation(ids)
        else:
            out.add_action(ids, [0.0] * len(ids), None)
        if not done:
            out.add_observation(encode(fmt.after(obs)))
    return out


def wandering_policy(rng: random.Random) -> Policy:
    """``demo:env_student``'s play: a step towards the target by a random digit 1-9 (the right format and
    direction; it overshoots or falls short, so it rarely lands on the target in the turns it has)."""

    def act(obs: str) -> str:
        m = OBSERVATION.search(obs)
        return f"{'add' if int(m.group(2)) > int(m.group(1)) else 'sub'} {rng.randint(1, 9)}"

    return act


def recovering_policy(rng: random.Random, wander_turns: int) -> Policy:
    """``wandering_policy``'s first ``wander_turns`` actions, then the expert's: episodes that show the expert
    leaving the states a student reaches (an overshot target, an odd distance left)."""
    wander, taken = wandering_policy(rng), []

    def act(obs: str) -> str:
        taken.append(obs)
        return wander(obs) if len(taken) <= wander_turns else expert_action(obs)

    return act


def env_examples(tokenizer, episodes: EnvEpisodes, expert: bool) -> list[tuple[list[int], list[bool]]]:
    """SFT examples (token ids, loss on the action tokens) of one episode per training instance (those from
    ``n_eval`` on): the expert's (``expert_action``) or ``wandering_policy``'s, cut after the expert's most
    turns (``EXPERT_TURNS``: the wanderer learns its format and direction from them as well, in fewer tokens).

    The teacher (``expert``) also gets a second episode per instance: the wanderer's first 1-3 turns as context
    (no loss), then the expert's to the end (``recovering_policy``). A teacher trained on the expert's own
    episodes only had never seen a state off its path, and there it told a student to keep adding (OPD then
    drove the student to "add 9" every turn). Episodes from starts closer than any instance (the last, exact
    step on its own) made the teacher learn that step more slowly, not faster: they are left out."""
    policy = expert_action if expert else wandering_policy(random.Random(episodes.seed + 1))
    rng = random.Random(episodes.seed + 2)
    out = []

    def add(t: Transcript) -> None:
        out.append((t.prompt + t.tokens, [False] * len(t.prompt) + t.action))

    for i in range(episodes.n_eval, ReachTarget().num_instances(episodes.seed)):
        env = ReachTarget()
        add(episode_transcript(tokenizer, episodes, *play(env, env.reset(episodes.seed, i), policy, EXPERT_TURNS)))
        if expert:
            env, wander = ReachTarget(), rng.randint(1, 3)
            first, turns = play(env, env.reset(episodes.seed, i), recovering_policy(rng, wander))
            if len(turns) > wander and env.success():  # the expert acted, and won in the turns left
                add(episode_transcript(tokenizer, episodes, first, turns, context_turns=wander))
    return out


def role_examples(tokenizer, task_cfg, demo_cfg, role: str) -> list[tuple[list[int], list[bool]]]:
    """The SFT examples (token ids, loss mask) that make the demo ``role``."""
    if role == "env_teacher":
        return env_examples(tokenizer, env_episodes_of(task_cfg), expert=True)
    if role == "env_student":
        arith = pair_examples(tokenizer, sft_pairs(arith_task(), wrong_sums=True))
        return arith + env_examples(tokenizer, env_episodes_of(task_cfg), expert=False)
    return pair_examples(tokenizer, role_pairs(task_cfg, demo_cfg, role))


def _atomic_build(target: Path, build) -> None:
    """Run ``build(tmp_dir)`` and rename the result into ``target``.

    An interrupted build leaves no half-written cache; if another process built
    the same target first, ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_demo_model(models_dir: str, demo_cfg, task_cfg, role: str) -> Path:
    """The demo ``role`` model's directory, building the tokenizer and model on first use."""
    from transformers import AutoTokenizer

    base = arith_task() if role in ENV_ROLES else task_cfg  # whose demo (tokenizer) the role belongs to
    root = demo_dir(models_dir, demo_cfg, base)
    target = demo_model_dir(models_dir, demo_cfg, task_cfg, role)
    if (target / "config.json").exists():
        return target
    pairs = sft_pairs(base)
    if not (root / "tokenizer" / "tokenizer.json").exists():
        log.info("building the demo tokenizer into %s (first use only)", root)
        _atomic_build(
            root / "tokenizer",
            lambda tmp: train_tokenizer([p + r for p, r in pairs], demo_cfg.vocab_size).save_pretrained(tmp),
        )
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    steps = role_steps(demo_cfg, role)
    log.info("building the demo %s into %s (first use only)", role, target)

    def build(tmp: Path) -> None:
        model = build_model(tokenizer, demo_cfg)
        sft_examples(
            model,
            tokenizer,
            role_examples(tokenizer, task_cfg, demo_cfg, role),
            steps=steps,
            batch_size=demo_cfg.batch_size,
            lr=demo_cfg.lr,
            seed=demo_cfg.seed,
            desc=f"demo {role} (SFT)",
        )
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)

    _atomic_build(target, build)
    return target

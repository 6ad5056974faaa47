"""The embedded demo: a tokenizer and two small Qwen2 models for the ``arith`` task.

Built on first use by supervised fine-tuning on worked solutions (the teacher
for many steps, the student for few, so the student knows the answer format but
not the arithmetic) and cached under ``paths.models``; later runs reuse them.
A model path ``demo:student`` or ``demo:teacher`` refers to these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from opd_cli.dist import save_pretrained
from opd_cli.models.sft import sft
from opd_cli.tasks.problems import arith_problems, arith_solution, arith_solution_tens_first

log = logging.getLogger(__name__)


EOS = "<|endoftext|>"


SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]


# demo.teacher_style -> how the teacher writes its worked solution (the student always writes columns)
TEACHER_STYLES = ("columns", "tens_first")


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


def demo_model_dir(models_dir: str, demo_cfg, task_cfg, role: str) -> Path:
    """Where the demo ``role`` ("student" or "teacher") lives once built.

    A teacher of another ``demo.teacher_style`` than "columns" has the style in its
    name (``teacher-tens_first-800``); the default teacher keeps ``teacher-<steps>``.
    """
    steps = demo_cfg.student_steps if role == "student" else demo_cfg.teacher_steps
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
        a, b = (int(n) for n in p.solution.split("So ")[1].split("=")[0].split("+"))
        solution = arith_solution_tens_first(a, b) if style == "tens_first" else arith_solution(a, b, rng)
        out.append((task_cfg.template.format(question=p.question), " " + solution))
    return out


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

    root = demo_dir(models_dir, demo_cfg, task_cfg)
    target = demo_model_dir(models_dir, demo_cfg, task_cfg, role)
    if (target / "config.json").exists():
        return target
    pairs = sft_pairs(task_cfg)
    if not (root / "tokenizer" / "tokenizer.json").exists():
        log.info("building the demo tokenizer into %s (first use only)", root)
        _atomic_build(
            root / "tokenizer",
            lambda tmp: train_tokenizer([p + r for p, r in pairs], demo_cfg.vocab_size).save_pretrained(tmp),
        )
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    steps = demo_cfg.student_steps if role == "student" else demo_cfg.teacher_steps
    log.info("building the demo %s into %s (first use only)", role, target)

    def build(tmp: Path) -> None:
        model = build_model(tokenizer, demo_cfg)
        sft(
            model,
            tokenizer,
            sft_pairs(
                task_cfg,
                wrong_sums=role == "student",
                style=teacher_style(demo_cfg) if role == "teacher" else "columns",
            ),
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

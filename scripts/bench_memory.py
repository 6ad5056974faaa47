"""Benchmark: the student's peak memory in one training step, with and without activation checkpointing and LoRA.

    python scripts/bench_memory.py [--layers 16 --hidden 256 --prompts 4 --n 2 --prompt-len 64 --response-len 512]

A randomly initialised Qwen2 of the demo's shape (head size 64, MLP 4 x hidden, tied
embeddings) trains one step of the default objective (``loss=topk_lsm``) on a rollout batch
of random tokens (no EOS: every response is full length) scored by a perturbed copy of
itself, through ``TorchTrainer`` as opd-train runs it (the packed scoring pass, fp32).
Each setting runs in a fresh child process: the teacher scores and is dropped, the student
is set up (``model.lora``, ``trainer.gradient_checkpointing``), and one warm-up step
creates the optimizer state and loads kernels. Then the gradients are dropped, the resident
set is read, the kernel's peak counter is reset (``/proc/self/clear_refs``, Linux), and
``--repeats`` steps (forward, backward, optimizer) run. "Step peak" is the peak resident set
(VmHWM) minus that baseline: the activations the backward keeps, the gradients, the
objective's chunks. The children run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps
every block of 64 KiB or more on its own and unmaps it when freed, so the resident set
follows what torch holds (by default freed activations stay in the heap and the warm-up's
peak hides the measured step's). Time is the fastest step (with that allocator setting, on
a machine that may be shared: a rough guide only).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from rss import reset_peak, status_bytes

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "full": (False, False),
    "full + checkpointing": (False, True),
    "lora": (True, False),
    "lora + checkpointing": (True, True),
}


def student_and_batch(args):
    """The random student, a rollout batch of random tokens, and the teacher's scores of it."""
    from hydra import compose, initialize_config_dir
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd_cli.batch import build_batch
    from opd_cli.config.schema import register_configs
    from opd_cli.objectives.inputs import token_inputs
    from opd_cli.objectives.registry import make_objective
    from opd_cli.teacher.hf import HFTeacher

    vocab, eos = args.vocab, args.vocab - 1
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.prompt_len + args.response_len, tie_word_embeddings=True, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    prompts = torch.randint(0, eos, (args.prompts, args.prompt_len))
    response = torch.randint(0, eos, (args.prompts * args.n, args.response_len))
    batch = build_batch(prompts, torch.ones_like(prompts), response, torch.zeros(response.shape), eos, args.n)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loss_cfg = compose(config_name="train").loss  # the default objective (topk_lsm)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    support = HFTeacher(teacher, args.prompts * args.n, loss_cfg.chunk_tokens).score(batch, loss_cfg.k)
    x, _ = token_inputs(batch, support, [], loss_cfg)
    return model, batch, x, make_objective(loss_cfg), loss_cfg


def child(args) -> dict:
    from opd_cli.config.schema import LoraConfig
    from opd_cli.cpu_linear import use_onednn
    from opd_cli.models.student import add_lora, enable_checkpointing
    from opd_cli.training.trainers import TorchTrainer

    torch.set_num_threads(args.threads)
    lora, checkpointing = SETTINGS[args.setting]
    model, batch, x, objective, loss_cfg = student_and_batch(args)
    model = use_onednn(model)  # as opd-train loads a float32 student on x86-64 (trainer.cpu_linear=auto)
    if lora:
        model = add_lora(model, LoraConfig(enabled=True, r=args.r, alpha=2.0 * args.r))
    if checkpointing:
        enable_checkpointing(model)
    tcfg = SimpleNamespace(
        lr=1e-4, betas=[0.9, 0.999], weight_decay=0.0, warmup_steps=0, lr_schedule="constant", max_steps=10,
        max_grad_norm=1.0,
    )  # fmt: skip
    trainer = TorchTrainer(model, tcfg)
    x = x.to(model.device)

    def step() -> float:
        model.train()
        loss, _ = trainer.loss(batch, x, objective, loss_cfg.chunk_tokens, loss_cfg.gap_bucket_tokens)
        trainer.backward(loss / x.weight.sum())
        trainer.optimizer_step()
        return loss.item()

    step()  # warm-up: optimizer state, kernels, thread pools
    model.zero_grad(set_to_none=True)
    base = status_bytes("VmRSS")
    reset_peak()
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "setting": args.setting,
        "step_peak_bytes": status_bytes("VmHWM") - base,
        "baseline_bytes": base,
        "time_s": min(times),
        "loss": loss,
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": args.prompts * (args.prompt_len + args.n * args.response_len),  # each prompt once (packed)
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (head size 64)")
    ap.add_argument("--vocab", type=int, default=400)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=2, help="responses per prompt")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    ap.add_argument("--repeats", type=int, default=2, help="measured steps after the warm-up")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.setting:
        print(json.dumps(child(args)))
        return
    rows = []
    for setting in SETTINGS:  # each in a child process of its own: a peak is per process
        cmd = [sys.executable, __file__, "--setting", setting, *sys.argv[1:]]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(
        f"Qwen2 {args.layers} layers x hidden {args.hidden}, {first['params'] / 1e6:.1f}M parameters, float32; "
        f"{args.prompts} prompts x {args.n} responses, {args.prompt_len} + {args.response_len} tokens "
        f"({first['tokens']} tokens packed)"
    )
    print("| setting | trained parameters | resident before the step (MiB) | step peak (MiB) | step time (s) | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['trained_params'] / 1e6:.2f}M | {r['baseline_bytes'] / 2**20:.0f} | "
            f"{r['step_peak_bytes'] / 2**20:.0f} | {r['time_s']:.2f} | {r['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()

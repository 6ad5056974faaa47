"""Benchmark: the topk_lsm objective, gathered LM-head rows vs dense logits, forward + backward.

    python scripts/bench_topk_lsm.py [--tokens 4096 --vocab 151936 --hidden 896 --k 32]

Each path runs in a fresh child process. After one warm-up pass (which loads kernels
and thread pools), the gradients are dropped, the resident set is read, and the
kernel's peak counter is reset (``/proc/self/clear_refs``). Then ``--repeats``
forward + backward passes run. "Extra peak" is the peak resident set (VmHWM) minus
that baseline (hidden states, LM head, teacher top-K, torch) minus the gradients of
the hidden states and the head that each backward creates. So it is the memory the
objective needs beyond the parameters and their gradients. Time is the best pass.

gathered: ``opd_cli.objectives`` as training runs it (loss only, no diagnostics):
K head rows per token, chunked, under activation checkpointing.
dense: ``logits = h @ W.T`` (``[tokens, vocab]``), gather the K logits, same renormalized KL.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rss import reset_peak, status_bytes


def dense_loss(h, w, ids, t_lps):
    logits = h @ w.T  # [N, V]: what the gathered path avoids
    lp = F.log_softmax(logits.gather(-1, ids), -1)
    lq = F.log_softmax(t_lps, -1)
    return (lp.exp() * (lp - lq)).sum()


def child(args) -> dict:
    from omegaconf import OmegaConf

    from opd_cli.objectives.inputs import TokenInputs
    from opd_cli.objectives.registry import make_objective
    from opd_cli.objectives.student_pass import student_loss_and_metrics

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n, v, d, k = args.tokens, args.vocab, args.hidden, args.k
    h = (torch.randn(n, d) * 0.5).requires_grad_(True)
    w = (torch.randn(v, d) * 0.05).requires_grad_(True)
    # K distinct ids per token, spread over the vocabulary
    ids = (torch.randint(0, v, (n, 1)) + torch.arange(k) * (v // k)) % v
    t_lps = torch.log_softmax(torch.randn(n, k), -1)
    ones = torch.ones(n)
    x = TokenInputs(
        target=ids[:, 0],
        weight=ones,
        position=torch.arange(n),
        old_logprob=ones,
        advantage=ones,
        teacher_logprob=t_lps[:, 0],
        teacher_topk_ids=ids,
        teacher_topk_logprobs=t_lps,
        teacher_entropy=ones,
    )
    cfg = OmegaConf.merge(OmegaConf.load("conf/loss/_base.yaml"), {"name": "topk_lsm", "k": k})
    objective = make_objective(cfg)

    def run():
        if args.path == "dense":
            loss = dense_loss(h, w, ids, t_lps)
        else:
            loss = student_loss_and_metrics(h, w, x, objective, args.chunk_tokens, diagnostics=False)[0]
        loss.backward()
        return loss.item()

    run()  # warm-up: lazily loaded kernels and thread pools are not the objective's memory
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (h, w))
    times, value = [], None
    h.grad = w.grad = None
    base = status_bytes("VmRSS")
    reset_peak()
    for _ in range(args.repeats):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - t0)
    peak = status_bytes("VmHWM")
    return {"path": args.path, "loss": value, "time_s": min(times), "extra_peak_bytes": peak - base - grads}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="loss.chunk_tokens of the gathered path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--path", choices=["gathered", "dense"], help=argparse.SUPPRESS)
    return ap


def measure(argv: list[str]) -> dict[str, dict]:
    """Each path's row (time, extra peak memory, loss), measured in a child process of its own."""
    rows = {}
    for path in ("gathered", "dense"):
        cmd = [sys.executable, __file__, "--path", path, *argv]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[path] = json.loads(out.strip().splitlines()[-1])
    return rows


def main() -> None:
    args = parser().parse_args()
    if args.path:
        print(json.dumps(child(args)))
        return
    rows = measure(sys.argv[1:])
    g, dn = rows["gathered"], rows["dense"]
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, K {args.k}, float32, forward + backward")
    for r in (g, dn):
        print(
            f"{r['path']:>8}: {r['time_s']:8.3f} s  extra peak {r['extra_peak_bytes'] / 2**20:9.1f} MiB  loss {r['loss']:.6f}"
        )
    print(
        f"gathered is {dn['time_s'] / g['time_s']:.1f}x faster and needs "
        f"{dn['extra_peak_bytes'] / max(g['extra_peak_bytes'], 1):.1f}x less extra peak memory"
    )


if __name__ == "__main__":
    main()

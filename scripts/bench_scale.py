"""Benchmark (make bench-scale): one OPD step of opd-cli beside TRL's at a real vocabulary, as tokens and K grow.

    python scripts/bench_scale.py [--tokens 512,2048,8192 --ks 1,4,16,32,64 --k-tokens 512 --budget-gb 16]
    python scripts/bench_scale.py --vocab 512 --hidden 64 --layers 1 --tokens 64 ...   (a tiny shape)
    python scripts/bench_scale.py --device cuda ...   (on a GPU: make bench-scale-gpu; Hydra overrides may follow)
    python scripts/bench_scale.py --hiddens 448,896,1792 --vocabs 32768,151936   (+ the shape sweeps)

``make bench`` (scripts/bench.py) runs the demo models, whose vocabulary is 400 tokens; this
runs models with Qwen2.5-0.5B's vocabulary (151,936) and head shape (hidden 896, MLP 4864, 14
query and 2 key-value heads of 64, tied embeddings) but ``--layers`` layers (default 2), built
from a config with random weights (student seed 0, teacher seed 1) and saved once under
``<out>/models/`` with a WordLevel tokenizer of exactly ``--vocab`` entries (three special tokens,
then ``t3 ... t<V-1>``), so every id exists; nothing is downloaded.

Responses are teacher-forced: each step trains on one fixed batch of random token ids (no EOS)
of ``--prompt-len`` + ``min(--response-len, T)`` tokens per row, ``T / response-len`` rows for
``T`` response tokens per step, one response per prompt. Both engines skip sampling and get the
same ids: opd-cli through an engine that returns the batch from ``generate`` (``FixedRollout``,
in place of ``rollout.engine``; the sampler's log-probs it would carry are 0), TRL through
``bench.fixed_generate`` in place of ``DistillationTrainer._generate``. So both sides do exactly
the same work on every step (sampling with EOS disabled would too, but at a 151,936-token
vocabulary the rollout would dominate the step and hide the training cost this measures).
What is timed is teacher scoring, the student's forward and backward, and the optimizer step;
the rollout phase is the hand-over of the fixed batch.

Everything else is scripts/bench.py's: opd-cli runs ``build`` + ``opd_step`` as ``opd-train``
does (``loss=topk_lsm``, ``sampled_token``, ``full_rkl``; K from ``--ks`` in the K sweep); TRL
runs ``DistillationTrainer`` (``beta=1``, the full-vocabulary reverse KL) with the same models,
batch (one micro-batch of all rows on both sides), learning rate, optimizer, fp32. TRL's
"teacher" phase is the teacher's backbone only: its head runs inside the chunked loss, counted
in "student". Each point runs in a fresh child process (``--warmup`` untimed steps, then
``--steps`` timed ones); its peak memory is the child's peak resident set. A watchdog reads the
child's resident set every 20 ms and stops it when it passes ``--budget-gb``: that point is
recorded as "does not fit", and larger points of that engine are not run (recorded "does not
fit" too, as predicted by the smaller one). Writes ``bench_scale.json``, ``bench_scale.md`` and
PNG plots to ``--out`` (and each point as it completes to ``points.jsonl`` there).

The tokens sweep also runs ``--nodiag-losses`` (topk_lsm) with ``logger.diagnostics_every=0``: the
same step without the student's full-vocabulary diagnostics. The shape sweeps (opt-in) run topk_lsm
and TRL at ``--shape-tokens`` for each hidden size of ``--hiddens`` (the MLP scaled with it, as
``--intermediate 0`` does) and each vocabulary of ``--vocabs``, and fit each one's memory slope per
token, to show which quantity the slope follows.

On a GPU (``--device cuda``) a point's memory is the peak GPU memory torch reserved (the resident set is kept as
``peak_rss_gb``), ``--budget-gb`` caps it (``torch.cuda.set_per_process_memory_fraction``; running out of memory
records "does not fit"), every phase clock waits for queued GPU work, and each point gets the student update's
model FLOPs utilization (``student_flops`` over the "student" phase, against ``--peak-tflops``). ``--head-dim`` and
``--kv-heads`` give the attention's shape (Qwen2.5-1.5B: 128 and 2), ``--save-dtype`` the saved weights' dtype.
Precision comes from the overrides: ``model.dtype=bfloat16`` trains bf16-mixed (float32 master weights), and TRL
then gets the student in float32 with ``bf16=True``; ``trainer.precision=bf16-pure`` gives both sides bfloat16
weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench

ROOT = bench.ROOT
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; responses use ids from 3 on
DOES_NOT_FIT = "does not fit"


def shape(args, point: dict | None = None) -> tuple[int, int, int]:
    """Vocabulary, hidden size and MLP width of a point (the flags' unless the point names its own)."""
    point = point or {}
    vocab, hidden = point.get("vocab") or args.vocab, point.get("hidden") or args.hidden
    own = hidden == args.hidden and args.intermediate
    return vocab, hidden, args.intermediate if own else 4864 * hidden // 896


def heads(args, hidden: int) -> tuple[int, int]:
    """Query and key-value heads of ``--head-dim`` each (one key-value head where ``--kv-heads`` does not divide)."""
    n = hidden // args.head_dim
    return n, args.kv_heads if n % args.kv_heads == 0 else 1


def model_dir(args, point: dict | None = None) -> Path:
    vocab, hidden, inter = shape(args, point)
    attn = f"-d{args.head_dim}-kv{args.kv_heads}" if (args.head_dim, args.kv_heads) != (64, 2) else ""
    return Path(args.out) / "models" / f"v{vocab}-h{hidden}-i{inter}-l{args.layers}{attn}"


def make_models(args, point: dict | None = None) -> Path:
    """Student and teacher (random Qwen2 weights) and their tokenizer under ``model_dir``; built once."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = model_dir(args, point)
    if (out / "teacher" / "config.json").exists():
        return out
    n_vocab, hidden, inter = shape(args, point)
    vocab = {t: i for i, t in enumerate(SPECIAL)} | {f"t{i}": i for i in range(len(SPECIAL), n_vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[0], unk_token=SPECIAL[0]
    )
    n_heads, n_kv = heads(args, hidden)
    config = Qwen2Config(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv,
        max_position_embeddings=args.prompt_len + args.response_len, rope_theta=1e6, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for role, seed in (("student", 0), ("teacher", 1)):  # the teacher last: its config marks a complete build
        torch.manual_seed(seed)
        tmp = Path(tempfile.mkdtemp(dir=out))
        with torch.device(args.device):  # drawing a billion random weights is quicker on a GPU
            model = Qwen2ForCausalLM(config).to(getattr(torch, args.save_dtype))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out / role)
        del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def fixed_ids(args, tokens: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response ids of the fixed batch of ``tokens`` response tokens (random, never a special token)."""
    import torch

    length = min(args.response_len, tokens)
    rows = max(1, tokens // length)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(len(SPECIAL), vocab, (rows, args.prompt_len), generator=g)
    responses = torch.randint(len(SPECIAL), vocab, (rows, length), generator=g)
    return prompts.tolist(), responses.tolist()


class FixedRollout:
    """A rollout engine that returns one fixed batch from every ``generate`` (teacher forcing, no sampling)."""

    def __init__(self, prompts: list[list[int]], responses: list[list[int]]) -> None:
        import torch

        from opd_cli.batch import build_batch

        p, r = torch.tensor(prompts), torch.tensor(responses)
        self.batch = build_batch(p, torch.ones_like(p), r, torch.zeros(r.shape), SPECIAL.index("<|endoftext|>"), 1)

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        return self.batch

    def decode_responses(self, batch) -> list[str]:
        return [""] * batch.input_ids.shape[0]

    def release(self) -> None:
        pass

    def sync(self, model, sharded: bool) -> None:
        pass


def overrides(args, point: dict) -> list[str]:
    """The Hydra overrides of a point: the models, one micro-batch of all rows, the objective."""
    models = model_dir(args, point)
    prompts, responses = fixed_ids(args, point["tokens"], shape(args, point)[0])
    rows = len(responses)
    out = [
        f"model.name_or_path={models / 'student'}",
        f"teacher.name_or_path={models / 'teacher'}",
        "task.chat_template=false",
        f"trainer.device={args.device}",
        f"trainer.prompts_per_step={rows}",
        f"trainer.micro_batch_size={rows}",
        f"teacher.micro_batch_size={rows}",
        "rollout.n=1",
        f"rollout.max_new_tokens={len(responses[0])}",
    ]
    if point["engine"] == "opd":
        out += [f"loss={point['loss']}", f"loss.k={point['k']}", f"logger.diagnostics_every={point['diag']}"]
    return out + args.overrides


def worker(args, point: dict) -> dict:
    """One point's steps (bench.py's summary input). On a GPU, peak memory is the memory torch reserved on it, and
    the budget caps that: a point that runs out of it reports ``{"oom": ...}``."""
    import torch

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * 2**30 / torch.cuda.mem_get_info()[1]))
    fixed = fixed_ids(args, point["tokens"], shape(args, point)[0])
    try:
        if point["engine"] == "opd":
            result = bench.opd_worker(args, overrides(args, point), rollout=FixedRollout(*fixed))
        else:
            result = bench.trl_worker(args, overrides(args, point), fixed=fixed)
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0], "reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    if cuda:
        result["peak_rss_gb"] = result["peak_mem_gb"]
        result["peak_mem_gb"] = torch.cuda.max_memory_reserved() / 2**30
        result["gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def student_flops(args, point: dict) -> float:
    """Model FLOPs of the student's forward and backward over one step's rows (prompt and response; activation
    recomputation not counted): 6 per weight of every matrix product (the LM head included) per token, and causal
    attention's score and value products."""
    vocab, hidden, inter = shape(args, point)
    _, responses = fixed_ids(args, point["tokens"], vocab)
    rows, seq = len(responses), args.prompt_len + len(responses[0])
    q, kv = (n * args.head_dim for n in heads(args, hidden))
    weights = args.layers * (2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter) + vocab * hidden
    attention = args.layers * 2 * 2 * q * seq * seq / 2  # QK^T and PV per sequence, forward, causal half
    return 3 * (2 * weights * rows * seq + attention * rows)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except OSError:  # the child has exited
        return 0


def run_point(args, point: dict) -> dict:
    """One point in a child process under the memory watchdog; its summary, or a "does not fit" record."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(point), *sys.argv[1:]]
    budget = args.budget_gb * 2**30
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        seen = 0
        while proc.poll() is None:
            seen = max(seen, rss_bytes(proc.pid))
            if seen > budget:
                proc.kill()
                proc.wait()
                return {**point, "status": DOES_NOT_FIT, "rss_at_stop_gb": seen / 2**30}
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"bench-scale: the worker of {point} failed:\n{err.read()[-3000:]}")
        raw = json.loads(out.read().strip().splitlines()[-1])
        if "oom" in raw:
            return {**point, "status": DOES_NOT_FIT, "rss_at_stop_gb": raw["reserved_gb"], "oom": raw["oom"]}
        result = bench.summarize(raw)
    if args.device == "cuda":  # model FLOPs utilization of the student's forward and backward
        result["student_mfu"] = student_flops(args, point) / result["phase_s"]["student"] / (args.peak_tflops * 1e12)
    # the point's keys win: the summary's "engine" is a display name and its "tokens" the sum over timed steps
    return {**result, **point, "status": "ok", "wall_s": time.perf_counter() - t0}


KEY = ("engine", "loss", "k", "diag", "tokens", "vocab", "hidden")  # what a point measures (not its sweep)


def label(p: dict) -> str:
    if p["engine"] == "trl":
        return "TRL DistillationTrainer (beta=1)"
    return f"opd-cli {p['loss']}" + (", no diagnostics" if p.get("diag") == 0 else "")


def sweep_points(args) -> list[dict]:
    """The tokens sweep (every engine at every ``--tokens``, and ``--nodiag-losses`` without diagnostics), the
    K sweep (topk_lsm at ``--k-tokens``), and the shape sweeps (topk_lsm and TRL at ``--shape-tokens`` for each
    of ``--hiddens`` and ``--vocabs``)."""

    def opd(sweep, loss, tokens, k=args.k, diag=1, vocab=args.vocab, hidden=args.hidden):
        return dict(sweep=sweep, engine="opd", loss=loss, k=k, diag=diag, tokens=tokens, vocab=vocab, hidden=hidden)

    def trl(sweep, tokens, vocab=args.vocab, hidden=args.hidden):
        return dict(sweep=sweep, engine="trl", loss=None, k=None, diag=None, tokens=tokens, vocab=vocab, hidden=hidden)

    points = [opd("tokens", loss, t) for t in args.tokens for loss, most in args.losses if most is None or t <= most]
    points += [
        opd("tokens", loss, t, diag=0)
        for t in args.tokens
        for loss, most in args.nodiag_losses
        if most is None or t <= most
    ]
    points += [] if args.no_trl else [trl("tokens", t) for t in args.tokens]
    points += [opd("k", "topk_lsm", args.k_tokens, k=k) for k in args.ks]
    for sweep, values in (("hidden", args.hiddens), ("vocab", args.vocabs)):
        for v, t in ((v, t) for v in values for t in args.shape_tokens):
            points.append(opd(sweep, "topk_lsm", t, **{sweep: v}))
            points += [] if args.no_trl else [trl(sweep, t, **{sweep: v})]
    return sorted(points, key=lambda p: p["tokens"])  # smallest first: a point that does not fit stops larger ones


def measure(args) -> list[dict]:
    results: list[dict] = []
    log = Path(args.out) / "points.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    for point in sweep_points(args):
        same = next((r for r in results if all(r[k] == point[k] for k in KEY)), None)
        smaller = [r for r in results if all(r[k] == point[k] for k in KEY if k != "tokens")]
        smaller = [r for r in smaller if r["tokens"] < point["tokens"]]
        if same is not None:  # measured by another sweep (the K sweep's point at the tokens sweep's K, ...)
            results.append({**same, "sweep": point["sweep"]})
        elif any(r["status"] != "ok" for r in smaller):
            results.append({**point, "status": DOES_NOT_FIT, "predicted": True})
        else:
            make_models(args, point)
            results.append(run_point(args, point))
        r = results[-1]
        with log.open("a") as f:
            f.write(json.dumps(r) + "\n")
        speed = f"{r['tokens_per_s']:,.0f} tokens/s, {r['peak_mem_gb']:.2f} GB" if r["status"] == "ok" else r["status"]
        print(f"{label(r)} K={r['k']} V={r['vocab']} hidden={r['hidden']} tokens={r['tokens']}: {speed}", flush=True)
    return results


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares slope and intercept; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def token_slope(points: list[dict]) -> tuple[float, float] | None:
    """Peak memory against tokens per step: bytes per token and the intercept in bytes."""
    return fit_line([r["tokens"] for r in points], [r["peak_mem_gb"] * 2**30 for r in points])


def shape_slopes(results: list[dict], sweep: str) -> dict:
    """Per engine, the memory slope per token at each value of the swept quantity (``hidden`` or ``vocab``), that
    slope per unit of the quantity, and the line of the slopes against the quantity (bytes per token per unit)."""
    ok = [r for r in results if r["status"] == "ok" and r["sweep"] == sweep]
    out: dict = {}
    for name in dict.fromkeys(label(r) for r in ok):
        per = {}
        for v in sorted({r[sweep] for r in ok if label(r) == name}):
            if (fit := token_slope([r for r in ok if label(r) == name and r[sweep] == v])) is not None:
                per[v] = {"bytes_per_token": fit[0], "per_unit": fit[0] / v, "intercept_gb": fit[1] / 2**30}
        across = fit_line(list(per), [f["bytes_per_token"] for f in per.values()])
        out[name] = {"at": per, "marginal": None if across is None else {"slope": across[0], "at_zero": across[1]}}
    return out


def analyse(args, results: list[dict]) -> dict:
    """Fitted memory slopes, the longest fitting step per engine, and the ratios to TRL at ``--ratio-tokens``."""
    ok = [r for r in results if r["status"] == "ok"]
    engines = {label(r): r for r in results if r["sweep"] == "tokens"}
    out: dict = {"slopes": {}, "longest_fit": {}, "ratios": []}
    for name in engines:
        fit = token_slope([r for r in ok if label(r) == name and r["sweep"] == "tokens"])
        runs = [r for r in results if label(r) == name and r["sweep"] == "tokens"]
        out["longest_fit"][name] = {
            "measured": max((r["tokens"] for r in runs if r["status"] == "ok"), default=0),
            "first_not_fitting": min((r["tokens"] for r in runs if r["status"] != "ok"), default=None),
            "predicted": None if fit is None or fit[0] <= 0 else int((args.budget_gb * 2**30 - fit[1]) / fit[0]),
        }
        if fit is not None:
            out["slopes"][name] = {"bytes_per_token": fit[0], "intercept_gb": fit[1] / 2**30}
    kpts = [r for r in ok if r["sweep"] == "k"]
    if (fit := fit_line([r["k"] for r in kpts], [r["peak_mem_gb"] * 2**30 for r in kpts])) is not None:
        out["slopes"]["opd-cli topk_lsm, K sweep"] = {
            "bytes_per_k": fit[0],
            "bytes_per_token_per_k": fit[0] / args.k_tokens,
            "intercept_gb": fit[1] / 2**30,
        }
    for sweep in ("hidden", "vocab"):
        if any(r["sweep"] == sweep for r in results):
            out[f"{sweep}_slopes"] = shape_slopes(results, sweep)
    at = [r for r in ok if r["sweep"] == "tokens" and r["tokens"] == args.ratio_tokens]
    trl = next((r for r in at if r["engine"] == "trl"), None)
    for r in at:
        if trl is not None and r is not trl:
            out["ratios"].append(
                {
                    "engine": label(r),
                    "tokens": args.ratio_tokens,
                    "peak_mem_vs_trl": r["peak_mem_gb"] / trl["peak_mem_gb"],
                    "tokens_per_s_vs_trl": r["tokens_per_s"] / trl["tokens_per_s"],
                }
            )
    return out


def markdown(report: dict) -> str:
    from opd_cli.training.loop import PHASES

    a = report["analysis"]
    mfu = any("student_mfu" in r for r in report["results"])
    out = [
        f"# make bench-scale ({report['machine']})",
        "",
        f"Command: `{report['command']}`",
        "",
        report["setting"],
        "",
    ]
    out += [
        "| sweep | engine | K | tokens/step | V | hidden | tokens/s | step s | "
        + " | ".join(PHASES)
        + " | peak GB |"
        + (" student MFU |" if mfu else "")
    ]
    out.append("|---" * (len(PHASES) + 9 + mfu) + "|")
    for r in report["results"]:
        head = f"| {r['sweep']} | {label(r)} | {r['k'] or ''} | {r['tokens']:,} | {r['vocab']:,} | {r['hidden']} |"
        if r["status"] != "ok":
            why = "predicted by a smaller point" if r.get("predicted") else f"stopped at {r['rss_at_stop_gb']:.1f} GB"
            out.append(f"{head} {DOES_NOT_FIT} ({why}) |" + " |" * (len(PHASES) + 2 + mfu))
            continue
        cells = " | ".join(f"{r['phase_s'][p]:.2f}" for p in PHASES)
        step = r["time_s"] / len(r["steps"])
        util = f" {r['student_mfu']:.1%} |" if mfu else ""
        out.append(f"{head} {r['tokens_per_s']:,.0f} | {step:.2f} | {cells} | {r['peak_mem_gb']:.2f} |{util}")
    out += ["", f"At {report['ratio_tokens']:,} response tokens per step, measured side by side:"]
    for x in a["ratios"]:
        out.append(
            f"- {x['engine']} / TRL: peak memory **{x['peak_mem_vs_trl']:.2f}x**, tokens/s "
            f"**{x['tokens_per_s_vs_trl']:.2f}x**"
        )
    out += ["", f"Longest response per step within {report['budget_gb']} GB (measured; fitted line's prediction):"]
    for name, f in a["longest_fit"].items():
        stop = f", {f['first_not_fitting']:,} does not fit" if f["first_not_fitting"] else ""
        pred = f"{f['predicted']:,}" if f["predicted"] else "n/a"
        out.append(f"- {name}: {f['measured']:,} measured{stop}; predicted {pred}")
    out += ["", "Fitted slopes of peak memory:"]
    for name, s in a["slopes"].items():
        per = (
            f"{s['bytes_per_token']:,.0f} bytes per token"
            if "bytes_per_token" in s
            else f"{s['bytes_per_k']:,.0f} bytes per K = {s['bytes_per_token_per_k']:,.1f} bytes per token per K"
        )
        out.append(f"- {name}: {per} (intercept {s['intercept_gb']:.2f} GB)")
    for sweep, unit, size in (("hidden", "hidden unit", "hidden size"), ("vocab", "vocabulary entry", "vocabulary")):
        if f"{sweep}_slopes" not in a:
            continue
        out += ["", f"Memory slope per token against the {size} ({sweep} sweep):", ""]
        out += [
            f"| engine | {sweep} | bytes per token | bytes per token per {unit} | intercept GB |",
            "|---|---|---|---|---|",
        ]
        for name, e in a[f"{sweep}_slopes"].items():
            for v, f in e["at"].items():
                out.append(
                    f"| {name} | {int(v):,} | {f['bytes_per_token']:,.0f} | {f['per_unit']:,.2f} | "
                    f"{f['intercept_gb']:.2f} |"
                )
        for name, e in a[f"{sweep}_slopes"].items():
            if e["marginal"] is not None:
                m = e["marginal"]
                out.append(
                    f"- {name}: the slope grows by {m['slope']:,.2f} bytes per token per {unit} "
                    f"({m['at_zero']:,.0f} bytes per token at {sweep} 0)"
                )
    return "\n".join(out) + "\n"


def plots(report: dict, out: Path) -> list[str]:
    """peak memory and tokens/s against tokens per step (each engine), and against K (topk_lsm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    names = []
    for sweep, x, xlabel in (("tokens", "tokens", "response tokens per step"), ("k", "k", "K (topk_lsm)")):
        pts = [r for r in ok if r["sweep"] == sweep]
        if not pts:
            continue
        fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(label(r) for r in pts):
            line = sorted((r for r in pts if label(r) == name), key=lambda r: r[x])
            mem.plot([r[x] for r in line], [r["peak_mem_gb"] for r in line], "o-", label=name)
            speed.plot([r[x] for r in line], [r["tokens_per_s"] for r in line], "o-", label=name)
        mem.axhline(report["budget_gb"], color="grey", ls="--", lw=1, label="budget")
        for ax, ylabel in ((mem, f"peak {report.get('memory', 'resident memory')} (GB)"), (speed, "tokens/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        mem.legend(fontsize=8)
        fig.suptitle(f"one OPD step, V = {report['vocab']:,}")
        fig.tight_layout()
        name = f"bench_scale_{sweep}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    sweeps = [
        (sw, x)
        for sw, x in (("hidden", "hidden size"), ("vocab", "vocabulary"))
        if f"{sw}_slopes" in report["analysis"]
    ]
    if sweeps:  # the memory slope per token against each swept quantity
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4), squeeze=False)
        for ax, (sweep, xlabel) in zip(axes[0], sweeps, strict=True):
            for name, e in report["analysis"][f"{sweep}_slopes"].items():
                xs = [int(v) for v in e["at"]]
                ax.plot(xs, [f["bytes_per_token"] / 1e3 for f in e["at"].values()], "o-", label=name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("peak-memory slope (kB per response token)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("what the memory per token follows")
        fig.tight_layout()
        fig.savefig(out / "bench_scale_shape.png", dpi=110)
        plt.close(fig)
        names.append("bench_scale_shape.png")
    return names


def capped(s: str) -> list[tuple[str, int | None]]:
    """``name[:T],...`` -> (name, T or None) pairs: objectives, each run up to T tokens per step if T is given."""
    return [(n.split(":")[0], int(n.split(":")[1]) if ":" in n else None) for n in s.split(",") if n]


def parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=896, help="a multiple of --head-dim")
    ap.add_argument("--intermediate", type=int, default=0, help="MLP width; 0: 4864 * hidden / 896")
    ap.add_argument("--head-dim", type=int, default=64, help="attention head size (Qwen2.5-1.5B: 128)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key-value heads (1 where this does not divide the heads)")
    ap.add_argument("--save-dtype", default="float32", help="dtype of the saved models' weights")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=ints, default=[512, 2048, 8192], help="response tokens per step")
    ap.add_argument(
        "--losses",
        type=capped,
        default="topk_lsm,sampled_token:2048,full_rkl:2048",
        help="opd-cli objectives of the tokens sweep ('' none); name:T runs that one up to T tokens per step only",
    )
    ap.add_argument("--k", type=int, default=32, help="loss.k of the tokens sweep")
    ap.add_argument("--ks", type=ints, default=[1, 4, 16, 32, 64], help="K of the topk_lsm K sweep")
    ap.add_argument("--k-tokens", type=int, default=512, help="response tokens per step of the K sweep")
    ap.add_argument(
        "--nodiag-losses",
        type=capped,
        default="topk_lsm",
        help="objectives of the tokens sweep run again with logger.diagnostics_every=0 ('' none; name:T as --losses)",
    )
    ap.add_argument("--hiddens", type=ints, default=[], help="hidden sizes of the hidden sweep (multiples of 64)")
    ap.add_argument("--vocabs", type=ints, default=[], help="vocabulary sizes of the vocabulary sweep")
    ap.add_argument("--shape-tokens", type=ints, default=[512, 2048], help="tokens per step of the shape sweeps")
    ap.add_argument("--ratio-tokens", type=int, default=8192, help="tokens per step of the ratios to TRL")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=1024, help="tokens per response (rows = tokens / this)")
    ap.add_argument("--budget-gb", type=float, default=16.0, help="a point whose resident set passes this stops")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per point")
    ap.add_argument(
        "--warmup", type=int, default=0, help="untimed steps first (0: a step's one-time costs are small here)"
    )
    ap.add_argument(
        "--device", default="cpu", help="trainer.device (cuda: TRL takes the GPU too; the budget caps GPU memory)"
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--out", default="outputs/bench-scale")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both engines (after --)")
    return ap


def main() -> None:
    args = parser().parse_intermixed_args()
    if args.worker:
        print(json.dumps(worker(args, json.loads(args.worker))))
        return
    from opd_cli.config.validate import student_precision

    t0 = time.perf_counter()
    cfg = bench.compose(args.overrides)
    results = measure(args)
    memory = "GPU memory reserved by torch" if args.device == "cuda" else "resident memory"
    mfu = f"; MFU against {args.peak_tflops:g} TFLOP/s" if args.device == "cuda" else ""
    report = {
        "machine": bench.machine(),
        "command": " ".join(["python scripts/bench_scale.py", *sys.argv[1:]]),
        "setting": f"random Qwen2, vocabulary {args.vocab:,}, hidden {args.hidden}, heads of {args.head_dim}, "
        f"{args.layers} layers, tied embeddings, {student_precision(cfg)} on {args.device}, gradient checkpointing "
        f"{'on' if cfg.trainer.gradient_checkpointing else 'off'}; teacher-forced fixed responses of "
        f"{args.response_len} tokens (prompts {args.prompt_len}), one micro-batch; {args.warmup} warm-up + "
        f"{args.steps} timed steps per point, each in a fresh process; budget {args.budget_gb} GB of {memory}; "
        f"phases are seconds per step{mfu}; whole run {time.perf_counter() - t0:.0f} s",
        "vocab": args.vocab,
        "memory": memory,
        "budget_gb": args.budget_gb,
        "ratio_tokens": args.ratio_tokens,
        "results": results,
    }
    report["analysis"] = analyse(args, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, out)
    (out / "bench_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench_scale.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

"""Benchmark: rollout and teacher-scoring throughput, HF transformers vs vLLM, on the demo models (CPU).

    python scripts/bench_rollout.py [--prompts 16 --n 4 --max-new-tokens 64 --k 32 --repeats 3]

Rollouts: the demo student samples ``--n`` answers to each of ``--prompts`` training
prompts (temperature 1, top-p 1); tokens/s counts the response tokens generated.
Teacher scoring: the demo teacher scores those same sequences (top-K ids and log-probs
and the sampled token's log-prob); tokens/s counts the response tokens scored. Each figure
is the best of ``--repeats`` timed calls after one warm-up call. The demo models are built
on first use, as ``make run`` does.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_time(fn, repeats: int):
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from opd_cli.config.schema import register_configs
    from opd_cli.models.loading import load_model, load_tokenizer, resolve_path
    from opd_cli.models.vllm import make_llm
    from opd_cli.rollout.hf import HFRollout
    from opd_cli.rollout.vllm import VLLMRollout
    from opd_cli.tasks.problems import load_problems
    from opd_cli.tasks.prompts import format_prompt
    from opd_cli.teacher.hf import HFTeacher
    from opd_cli.teacher.vllm import VLLMTeacher

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose(config_name="train")
    s_path, t_path = resolve_path("demo:student", cfg), resolve_path("demo:teacher", cfg)
    tok = load_tokenizer(s_path, "model.name_or_path")
    problems, _ = load_problems(cfg.task)
    prompts = [format_prompt(p, cfg.task, tok) for p in problems[: args.prompts]]
    cpu = torch.device("cpu")
    student = load_model(s_path, "model.name_or_path", "float32", cpu)
    teacher = load_model(t_path, "teacher.name_or_path", "float32", cpu)
    max_len = 256 + args.max_new_tokens
    s_llm = make_llm(s_path, "float32", max_len, 20, 0.3, 0, ranks=False)
    t_llm = make_llm(t_path, "float32", max_len + 1, max(20, args.k), 0.3, 0, ranks=False)

    def rollout_with(engine):
        return lambda: engine.generate(prompts, args.n, 1.0, 1.0, args.max_new_tokens, seed=1)

    rows = []
    for name, engine in (("HF (opd-cli decoding loop)", HFRollout(student, tok)), ("vLLM", VLLMRollout(s_llm, tok))):
        secs, batch = best_time(rollout_with(engine), args.repeats)
        tokens = int(batch.response_mask.sum())
        rows.append(("rollout", name, tokens, secs))
    hf_teacher, vl_teacher = HFTeacher(teacher, 64, 1024), VLLMTeacher(t_llm)
    for name, scorer in (("HF forward", hf_teacher), ("vLLM prompt_logprobs", vl_teacher)):
        secs, support = best_time(lambda s=scorer: s.score(batch, args.k), args.repeats)
        rows.append(("teacher scoring", name, support.sampled_logprob.numel(), secs))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.prompts} prompts x {args.n} samples, max {args.max_new_tokens} new tokens, K = {args.k}, float32")
    for what, name, tokens, secs in rows:
        print(f"{what:>16} {name:>22}: {tokens:6d} tokens in {secs:7.3f} s = {tokens / secs:9.0f} tokens/s")


if __name__ == "__main__":
    main()

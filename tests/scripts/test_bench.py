"""make bench end to end on the tiny demo: opd-cli's step beside TRL's, and the objective microbenchmark."""

import json
import subprocess
import sys

import pytest

from ..conftest import CLI_ENV, REPO, TINY_DEMO


@pytest.mark.integration
def test_bench_times_opd_cli_and_trl_steps_and_writes_the_tables(tmp_path, models_dir):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "scripts/bench.py",
        "--steps=2",
        "--rounds=1",
        "--warmup=1",
        "--losses=topk_lsm,full_rkl",
        "--objective-args=--tokens 64 --vocab 256 --hidden 32 --k 4 --repeats 1",
        f"--out={out}",
        "--",
        f"paths.models={models_dir}",
        *TINY_DEMO,
        "trainer.prompts_per_step=4",
        "rollout.n=2",
        "rollout.max_new_tokens=12",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    names = [e["engine"] for e in report["engines"]]
    assert names == ["opd-cli topk_lsm", "opd-cli full_rkl", "TRL DistillationTrainer (beta=1)"]
    for e in report["engines"]:
        assert len(e["steps"]) == 2
        # 4 prompts x 2 samples, 1..12 tokens each
        assert all(8 <= s["tokens"] <= 96 for s in e["steps"]), e["steps"]
        assert e["tokens_per_s"] > 0 and e["peak_mem_gb"] > 0
        assert e["phase_s"]["rollout"] > 0 and e["phase_s"]["teacher"] > 0 and e["phase_s"]["student"] > 0
        assert sum(e["phase_s"].values()) == pytest.approx(e["time_s"] / 2, rel=1e-6)
    assert len(report["ratios"]) == 2 and "TRL" in report["ratios"][0]
    assert [r["path"] for r in report["objectives"]] == ["gathered", "dense"]
    md = (out / "bench.md").read_text()
    assert "| engine | tokens/s |" in md and "topk_lsm objective" in md


@pytest.mark.integration
def test_bench_engines_times_each_phase_per_engine(tmp_path, models_dir):
    out = tmp_path / "engines"
    cmd = [
        sys.executable,
        "scripts/bench_engines.py",
        "--steps=1",
        "--warmup=0",
        "--threads=1",
        "--combos=hf/hf,vllm/vllm",
        f"--out={out}",
        "--",
        f"paths.models={models_dir}",
        *TINY_DEMO,
        "trainer.prompts_per_step=2",
        "rollout.n=2",
        "rollout.max_new_tokens=8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_engines.json").read_text())
    assert [(r["rollout"], r["teacher"]) for r in report["results"]] == [("hf", "hf"), ("vllm", "vllm")]
    for r in report["results"]:
        assert r["step_s"] > 0 and r["phase_s"]["rollout"] > 0 and r["phase_s"]["teacher"] > 0, r
    assert "OMP_NUM_THREADS=1" in report["machine"]
    assert "| rollout | teacher.backend |" in (out / "bench_engines.md").read_text()


def bench_scale(out, *args: str) -> None:
    """make bench-scale at a tiny shape (vocabulary 512, hidden 64, one layer; 32-token responses, topk_lsm)."""
    tiny = ["--vocab=512", "--hidden=64", "--layers=1", "--losses=topk_lsm", "--response-len=32", f"--out={out}"]
    cmd = [sys.executable, "scripts/bench_scale.py", *tiny, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.cli
def test_bench_scale_runs_its_smallest_point_beside_trl_and_writes_the_tables_and_plots(tmp_path):
    out = tmp_path / "scale"
    bench_scale(out, "--tokens=64", "--ks=32", "--k-tokens=64", "--ratio-tokens=64")
    report = json.loads((out / "bench_scale.json").read_text())
    got = [(r["sweep"], r["engine"], r["loss"], r["k"], r["diag"], r["tokens"], r["status"]) for r in report["results"]]
    assert sorted(got) == [
        ("k", "opd", "topk_lsm", 32, 1, 64, "ok"),
        ("tokens", "opd", "topk_lsm", 32, 0, 64, "ok"),  # --nodiag-losses: logger.diagnostics_every=0
        ("tokens", "opd", "topk_lsm", 32, 1, 64, "ok"),
        ("tokens", "trl", None, None, None, 64, "ok"),
    ]
    for r in report["results"]:
        # 2 rows of 32 fixed response tokens: both engines train on exactly these
        assert [s["tokens"] for s in r["steps"]] == [64], r["steps"]
        assert 0 < r["peak_mem_gb"] < 16 and r["tokens_per_s"] > 0
        assert r["phase_s"]["teacher"] > 0 and r["phase_s"]["student"] > 0 and r["phase_s"]["optimizer"] > 0
    ratios = report["analysis"]["ratios"]
    assert sorted(x["engine"] for x in ratios) == ["opd-cli topk_lsm", "opd-cli topk_lsm, no diagnostics"]
    assert all(x["peak_mem_vs_trl"] > 0 and x["tokens_per_s_vs_trl"] > 0 for x in ratios)
    md = (out / "bench_scale.md").read_text()
    assert "| sweep | engine | K | tokens/step |" in md and "opd-cli topk_lsm, no diagnostics / TRL" in md
    assert (out / "bench_scale_tokens.png").stat().st_size > 0 and (out / "bench_scale_k.png").stat().st_size > 0


@pytest.mark.cli
def test_bench_scale_records_a_point_over_the_memory_budget_as_not_fitting(tmp_path):
    out = tmp_path / "scale"
    bench_scale(out, "--tokens=64,128", "--no-trl", "--nodiag-losses=", "--ks=32", "--k-tokens=128", "--budget-gb=0.05")
    report = json.loads((out / "bench_scale.json").read_text())
    first, *rest = sorted(report["results"], key=lambda r: (r["tokens"], r["sweep"]))
    assert first["status"] == "does not fit" and first["rss_at_stop_gb"] > 0.05 and "predicted" not in first
    assert all(r["status"] == "does not fit" and r["predicted"] for r in rest), rest
    assert "does not fit (stopped at" in (out / "bench_scale.md").read_text()


def bench_scale_module():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_scale

    return bench_scale


def test_the_shape_sweeps_run_topk_lsm_and_trl_at_each_size_and_fit_the_slope_per_token():
    bs = bench_scale_module()
    args = bs.parser().parse_args(
        ["--tokens=", "--ks=", "--hiddens=448,896", "--vocabs=1024", "--shape-tokens=512,2048"]
    )
    points = bs.sweep_points(args)
    got = {(p["sweep"], p["engine"], p["tokens"], p["vocab"], p["hidden"]) for p in points}
    assert got == {
        (sweep, engine, t, vocab, hidden)
        for sweep, vocab, hidden in (("hidden", 151_936, 448), ("hidden", 151_936, 896), ("vocab", 1024, 896))
        for engine in ("opd", "trl")
        for t in (512, 2048)
    }
    assert len(points) == len(got) and [p["tokens"] for p in points] == sorted(p["tokens"] for p in points)
    assert bs.shape(args, {"hidden": 448}) == (151_936, 448, 2432)  # the MLP scaled with the hidden size
    # peak memory = 1 GiB + (1,000 bytes x hidden) per token: the slope per token at each size, then its growth
    results = [
        {**p, "status": "ok", "peak_mem_gb": (2**30 + 1000 * p["hidden"] * p["tokens"]) / 2**30}
        for p in points
        if p["sweep"] == "hidden"
    ]
    slopes = bs.shape_slopes(results, "hidden")["opd-cli topk_lsm"]
    assert slopes["at"][448]["bytes_per_token"] == pytest.approx(448_000)
    assert slopes["at"][896]["per_unit"] == pytest.approx(1000)
    assert slopes["marginal"]["slope"] == pytest.approx(1000) and slopes["marginal"]["at_zero"] == pytest.approx(
        0, abs=1e-3
    )


def test_student_flops_equal_torchs_count_of_a_forward_and_backward_less_the_masked_half_of_attention():
    """The MFU numerator against torch's FLOP counter on the real model: a forward and backward of a tiny Qwen2 with
    eager attention, which multiplies every query by every key; bench-scale counts the causal half only."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    bs = bench_scale_module()
    args = bs.parser().parse_args(
        "--vocab=300 --hidden=64 --intermediate=96 --head-dim=16 --kv-heads=2 --layers=2 --prompt-len=5 "
        "--response-len=7".split()
    )
    point = {"tokens": 21, "vocab": 300, "hidden": 64}  # 3 rows of 5 + 7 tokens
    config = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(3, 300, (3, 12))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    rows, seq, layers, q = 3, 12, 2, 64
    full_attention = 3 * layers * rows * 2 * 2 * seq * seq * q  # QK^T and PV, forward and backward
    assert bs.student_flops(args, point) == pytest.approx(counter.get_total_flops() - full_attention / 2)

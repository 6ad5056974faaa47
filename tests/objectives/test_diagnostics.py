"""Diagnostics (objectives/diagnostics.py) against the papers' definitions, and the metric sums that carry them."""

import math
from dataclasses import replace

import pytest
import torch

from opd_cli.objectives import diagnostics
from opd_cli.objectives.diagnostics import MetricSums, repetition_counts, teacher_rank
from opd_cli.objectives.registry import make_objective
from opd_cli.objectives.student_pass import student_loss_and_metrics

from .synthetic import N, make_inputs, preset


def diagnostics_reference(logp, t_logp, x, k, s_top):
    """Per-token rows of each diagnostic from the papers' definitions, given the student's top-K ids."""
    rows = {key: [] for key in ("entropy", "t_entropy", "gap", "ratio", "mass_p", "mass_q", "egap", "rank")}
    adv, adv_w, adv_n, mass_w = [], [], [], []
    for n in range(N):
        p, q = logp[n].exp(), t_logp[n].exp()
        s_p, s_q = s_top[n], set(x.teacher_topk_ids[n].tolist())
        ov = sorted(s_p & s_q)
        h_p, h_q = -(p * logp[n]).sum(), -(q * t_logp[n]).sum()
        rows["entropy"].append(h_p)
        rows["t_entropy"].append(h_q)
        rows["gap"].append(t_logp[n, x.target[n]] - logp[n, x.target[n]])
        rows["ratio"].append(len(ov) / k)  # paper B: |TopK(p) ∩ TopK(q)| / K
        # paper B: the overlap masses over tokens whose overlap is not empty
        rows["mass_p"].append(sum(p[v] for v in ov) if ov else 0.0)
        rows["mass_q"].append(sum(q[v] for v in ov) if ov else 0.0)
        mass_w.append(x.weight[n] if ov else 0.0)
        rows["egap"].append(abs(h_q - h_p))
        ranked = t_logp[n].argsort(descending=True).tolist()
        r = ranked.index(int(x.target[n])) + 1
        rows["rank"].append(r if r <= k else k + 1)
        # paper B's adv_intersection: every (token, overlap id) entry, p_bar renormalized on the student's top-K
        z = sum(p[v] for v in s_p)
        for v in ov:
            adv.append(p[v] / z * (math.log(q[v]) - math.log(p[v])))
            adv_w.append(x.weight[n])
            adv_n.append(n)
    return rows, (adv, adv_w, adv_n), mass_w


# the student's K largest values by numpy's partition (small vocabularies on CPU) and by torch.topk (larger ones)
SELECTIONS = pytest.mark.parametrize("partition_max_vocab", [4096, 0], ids=["partition", "topk"])


@SELECTIONS
def test_diagnostics_match_reference(partition_max_vocab, monkeypatch):
    monkeypatch.setattr(diagnostics, "PARTITION_MAX_VOCAB", partition_max_vocab)
    k = 5
    h, w, tw, x, t_logp = make_inputs(k, seed=2)
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4, bucket_tokens=2)
    got = sums.means()
    logp = torch.log_softmax(h @ w.T, -1)
    wt = x.weight
    s_top = [set(logp[n].topk(k).indices.tolist()) for n in range(N)]
    rows, (adv, adv_w, adv_n), mass_w = diagnostics_reference(logp, t_logp, x, k, s_top)

    def mean(vals, weights=wt):
        return sum(float(a) * float(b) for a, b in zip(vals, weights, strict=True)) / float(sum(weights))

    names = {
        "entropy": "entropy",
        "t_entropy": "teacher_entropy",
        "gap": "logprob_gap",
        "ratio": "overlap_ratio",
        "egap": "entropy_gap",
        "rank": "teacher_rank",
    }
    for key, metric in names.items():
        assert got[metric] == pytest.approx(mean(rows[key]), rel=1e-9), metric
    assert got["overlap_mass_student"] == pytest.approx(mean(rows["mass_p"], mass_w), rel=1e-9)
    assert got["overlap_mass_teacher"] == pytest.approx(mean(rows["mass_q"], mass_w), rel=1e-9)
    assert got["overlap_adv"] == pytest.approx(mean(adv, adv_w), rel=1e-9)
    # paper C's mismatch metrics: per-sequence token means (sequences of 5 tokens: positions 0..4), then
    # the mean over sequences
    seqs = [list(range(s, min(s + 5, N))) for s in range(0, N, 5)]
    x.seq_tokens = torch.cat([wt[sq].sum().repeat(len(sq)) for sq in seqs])
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4, bucket_tokens=2)
    d = logp.gather(-1, x.target[:, None])[:, 0] - x.old_logprob
    for metric, values in (("train_rollout_logprob_abs_diff", d.abs()), ("train_rollout_k3_kl", d.exp() - d - 1)):
        per_seq = [float((values[sq] * wt[sq]).sum() / wt[sq].sum()) for sq in seqs if wt[sq].sum() > 0]
        assert sums.means()[metric] == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-9), metric
    for b in range(3):  # positions 0..4 in buckets of 2 tokens
        sel = [(x.position[n] // 2) == b for n in range(N)]
        for key, metric in (("gap", "logprob_gap"), ("ratio", "overlap_ratio")):
            want = mean([g for g, s in zip(rows[key], sel, strict=True) if s], [wt[n] for n in range(N) if sel[n]])
            assert got[f"{metric}/bucket_{b}"] == pytest.approx(want, rel=1e-9)
        in_b = [i for i, n in enumerate(adv_n) if sel[n]]
        if in_b:  # B's adv_intersection per chunk: the entries of the bucket's tokens
            want = mean([adv[i] for i in in_b], [adv_w[i] for i in in_b])
            assert got[f"overlap_adv/bucket_{b}"] == pytest.approx(want, rel=1e-9)


@SELECTIONS
def test_overlap_ratio_counts_k_ids_with_ties(partition_max_vocab, monkeypatch):
    """Five student logits tie across the K-th place: a top-K set holds K ids, whichever tied ids it takes
    (paper B's torch.topk), so the overlap ratio stays between the fewest and the most tied teacher ids a
    top-K set can hold (counting every tied id in would exceed it)."""
    monkeypatch.setattr(diagnostics, "PARTITION_MAX_VOCAB", partition_max_vocab)
    k = 5
    h, w, tw, x, t_logp = make_inputs(k, seed=4, identity_head=True)
    order = h.argsort(-1, descending=True)
    for n in range(N):  # ranks 3..7 (0-based) share one logit: the K-th place is tied
        h[n, order[n, 3:8]] = h[n, order[n, 3]].item()
    x.teacher_topk_ids = order[:, [0, 4, 5, 6, 9]]  # one sure overlap id, three tied ones, one outside
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4)
    logp = torch.log_softmax(h @ w.T, -1)
    lo = hi = 0.0
    for n in range(N):
        kth = logp[n].topk(k).values[-1]
        above = set((logp[n] > kth + 1e-12).nonzero().squeeze(-1).tolist())
        tied = set((abs(logp[n] - kth) <= 1e-12).nonzero().squeeze(-1).tolist())
        t = set(x.teacher_topk_ids[n].tolist())
        free = k - len(above)  # slots the tied ids fill
        fixed, t_tied, o_tied = len(above & t), len(tied & t), len(tied - t)
        lo += float(x.weight[n]) * (fixed + max(0, free - o_tied)) / k
        hi += float(x.weight[n]) * (fixed + min(free, t_tied)) / k
    total = float(x.weight.sum())
    assert lo / total - 1e-12 <= sums.means()["overlap_ratio"] <= hi / total + 1e-12
    assert sums.means()["overlap_ratio"] <= 1


def test_teacher_rank_by_hand():
    ids = torch.tensor([[4, 2, 7], [1, 0, 3]])
    assert teacher_rank(ids, torch.tensor([7, 9])).tolist() == [3, 4]


def test_repetition_by_hand():
    # paper C: "a b c a b c" -> the last token ends "a b c" seen before: 1 repeat in 6 tokens; "a b c b c b c":
    # "b c b" at 5 and "c b c" at 6 were seen before; a response shorter than 3 has none
    assert repetition_counts([[1, 2, 3, 1, 2, 3], [5, 6]]) == (1, 8)
    assert repetition_counts([[1, 2, 3, 2, 3, 2, 3]]) == (2, 7)


def test_diagnostics_use_diag_k():
    """The overlap diagnostics at loss.diag_k = 5 from a teacher list of 8: as if the teacher had given 5."""
    h, w, tw, x8, t_logp = make_inputs(8, seed=8)
    x5 = replace(x8, teacher_topk_ids=x8.teacher_topk_ids[:, :5], teacher_topk_logprobs=x8.teacher_topk_logprobs[:, :5])
    _, got = student_loss_and_metrics(h, w, x8, make_objective(preset("topk_lsm", k=8, diag_k=5)), 4)
    _, want = student_loss_and_metrics(h, w, x5, make_objective(preset("topk_lsm", k=5)), 4)
    _, at_8 = student_loss_and_metrics(h, w, x8, make_objective(preset("topk_lsm", k=8)), 4)
    for name in ("overlap_ratio", "overlap_adv", "overlap_mass_student", "teacher_rank"):
        assert got.means()[name] == pytest.approx(want.means()[name], rel=1e-12), name
    assert got.means()["overlap_ratio"] != pytest.approx(at_8.means()["overlap_ratio"])


# --------------------------------------------------------------------------- metric sums


def test_metric_sums_named_round_trip_and_means():
    """add accumulates value x weight and weight per metric; named flattens to sum/<m> and weight/<m>;
    from_named inverts it (other keys ignored); means divide, leaving out a metric of weight 0."""
    sums = MetricSums()
    sums.add("entropy", torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0]))
    sums.add("entropy", torch.tensor([3.0]), torch.tensor([2.0]))
    sums.add("teacher_rank", torch.tensor([2.0, 7.0]), torch.tensor([0.5, 0.5]))
    sums.add("overlap_adv", torch.tensor([9.0]), torch.tensor([0.0]))  # no supervised token
    named = sums.named()
    assert named == {
        "sum/entropy": 1 + 4 + 6,
        "weight/entropy": 4.0,
        "sum/teacher_rank": 4.5,
        "weight/teacher_rank": 1.0,
        "sum/overlap_adv": 0.0,
        "weight/overlap_adv": 0.0,
    }
    back = MetricSums.from_named({**named, "rows": 3.0, "tokens": 12.0})
    assert back.sums == sums.sums and back.weights == sums.weights
    assert back.means() == {"entropy": 11 / 4, "teacher_rank": 4.5}


def test_merged_sums_are_the_sums_of_the_named_values():
    """Two micro-batches merged equal their named dicts added key by key (what a reduction across
    ranks does), with a metric only one of them has."""
    a, b = MetricSums(), MetricSums()
    a.add("entropy", torch.tensor([1.0, 3.0]), torch.ones(2))
    b.add("entropy", torch.tensor([5.0]), torch.ones(1))
    b.add("repetition", torch.tensor([1.0, 0.0]), torch.ones(2))
    added = {k: a.named().get(k, 0.0) + b.named().get(k, 0.0) for k in a.named().keys() | b.named().keys()}
    a.merge(b)
    assert a.named() == added
    assert a.means() == {"entropy": 3.0, "repetition": 0.5}

"""The report of runs and sweeps (analysis/report.py) on hand-written run directories.

The sweep here is 3 seeds x 2 K with known numbers, so the plotted mean, band and EMA are checked
against slow references. opd-report itself, on a real sweep, is in tests/commands/test_report.py.
"""

import json
from pathlib import Path

import matplotlib
import pytest
import yaml

from opd_cli.analysis.report import (
    Options,
    figure,
    group_labels,
    group_runs,
    labels,
    load_runs,
    parse_args,
    plan,
    reference_lines,
    write_report,
)
from opd_cli.errors import UserError

matplotlib.use("Agg")

SEEDS, KS, STEPS = (0, 1, 2), (4, 16), (1, 2, 3, 4, 5)


def fake_run(path, overrides, steps=3):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [{"step": 0, "eval/acc": 0.1}] + [{"step": s, "loss": 1.0 / s, "entropy": 0.5} for s in range(1, steps)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loss_of(seed, k, step):
    """A loss that differs by seed and K in known ways (and is not monotone, so the EMA matters)."""
    return 2.0 / step + 0.1 * seed * (-1) ** step + k / 100


def overlap_of(seed, k, step):
    return step / (k + 10) + 0.01 * seed


def acc_of(seed, step):
    return 0.1 + 0.01 * seed + 0.05 * step


def seeded_run(path, seed, k, objective="support_divergence", dual_clip=None, steps=STEPS):
    """A run directory as opd-train leaves it: metrics.jsonl, run_config.yaml (no Hydra record), summary.json."""
    path.mkdir(parents=True)
    config = {
        "trainer": {"seed": seed, "max_steps": steps[-1]},
        "loss": {"objective": objective, "k": k, "diag_k": None, "dual_clip": dual_clip},
        "eval": {"every": 5},
        "paths": {"models": f"/models/{seed}"},  # where files are kept does not make another experiment
        "logger": {"tags": [f"trainer.seed={seed}"]},
    }
    (path / "run_config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 0, "eval/acc": acc_of(seed, 0), "eval/acc_teacher": 0.9}]
    for s in steps:
        row = {"step": s, "loss": loss_of(seed, k, s), "overlap_ratio": overlap_of(seed, k, s), "pg_clipfrac": 0.0}
        rows.append(row | ({"eval/acc": acc_of(seed, s)} if s == steps[-1] else {}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"acc_before": acc_of(seed, 0), "acc_after": acc_of(seed, steps[-1]), "acc_teacher": 0.9}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def sweep(root, **kw):
    """3 seeds x 2 K, numbered like a Hydra sweep's jobs."""
    for j, (k, seed) in enumerate((k, s) for k in KS for s in SEEDS):
        seeded_run(root / str(j), seed, k, **kw)
    return root


# --- slow references: plain loops over plain numbers -----------------------------------------------------------


def ref_ema(xs, w):
    """The EMA in closed form: s_i = w^i x_0 + (1 - w) sum_{j=1..i} w^(i-j) x_j."""
    return [w**i * xs[0] + (1 - w) * sum(w ** (i - j) * xs[j] for j in range(1, i + 1)) for i in range(len(xs))]


def ref_band(curves, band):
    """Per point: mean, and min/max (or mean -/+ sample std) over the curves."""
    out = []
    for col in zip(*curves, strict=True):
        mean = sum(col) / len(col)
        if band == "minmax":
            out.append((mean, min(col), max(col)))
        else:
            std = (sum((x - mean) ** 2 for x in col) / (len(col) - 1)) ** 0.5
            out.append((mean, mean - std, mean + std))
    return out


def band_edges(ax, index, xs):
    """The lower and upper edge of the ``index``-th band drawn on ``ax`` at each x."""
    vertices = ax.collections[index].get_paths()[0].vertices
    edges = []
    for x in xs:
        ys = [y for vx, y in vertices if vx == x]
        edges += [min(ys), max(ys)]
    return edges


def drawn(tmp_path, key, **opts):
    runs = load_runs([sweep(tmp_path / "sweep")])
    groups = group_runs(runs)
    names = group_labels(groups)
    p, note = plan(key, groups)
    return figure(p, names, reference_lines(groups, names), Options(dirs=[], **opts)), names, note


# --- tests -----------------------------------------------------------------------------------------------------


def test_labels_are_the_overrides_that_differ(tmp_path):
    a = fake_run(tmp_path / "0", ["loss.k=1", "logger=none", "paths.models=/x"])
    b = fake_run(tmp_path / "1", ["loss.k=4", "logger=none", "paths.models=/x"])
    assert labels([a, b]) == ["loss.k=1", "loss.k=4"]
    assert labels([a]) == ["0"]  # a single run: nothing differs, its directory names it


def test_runs_that_differ_only_in_the_seed_are_one_group(tmp_path):
    runs = load_runs([sweep(tmp_path / "sweep")])
    groups = group_runs(runs)
    assert [[r.seed for r in g] for g in groups] == [list(SEEDS), list(SEEDS)]
    assert [g[0].k for g in groups] == list(KS)
    assert group_labels(groups) == ["loss.k=4", "loss.k=16"]  # from the saved configs; seeds, paths, logger left out


@pytest.mark.parametrize("band", ["minmax", "std"])
@pytest.mark.parametrize("smooth", [0.0, 0.6])
def test_the_plotted_mean_band_and_ema_match_slow_references(tmp_path, band, smooth):
    fig, names, _ = drawn(tmp_path, "loss", smooth=smooth, band=band)
    ax = fig.axes[0]
    for g, k in enumerate(KS):
        curves = [[loss_of(seed, k, s) for s in STEPS] for seed in SEEDS]
        smoothed = [ref_ema(c, smooth) for c in curves] if smooth else curves
        expected = ref_band(smoothed, band)
        (line,) = [ln for ln in ax.lines if ln.get_label() == f"{names[g]} (mean of 3 seeds)"]
        assert list(line.get_xdata()) == list(STEPS)
        assert list(line.get_ydata()) == pytest.approx([m for m, _, _ in expected], rel=1e-12)
        assert band_edges(ax, g, STEPS) == pytest.approx([e for _, lo, hi in expected for e in (lo, hi)], rel=1e-12)
        faint = [ln for ln in ax.lines if ln.get_alpha() == 0.25 and ln.get_color() == line.get_color()]
        if smooth:  # the raw mean, faint behind
            assert list(faint[0].get_ydata()) == pytest.approx(
                [sum(c) / 3 for c in zip(*curves, strict=True)], rel=1e-12
            )
        else:
            assert faint == []
    assert ("EMA smoothing 0.6" in fig._suptitle.get_text()) == bool(smooth)
    assert ("min-max" if band == "minmax" else "± 1 std") in fig._suptitle.get_text()


def test_accuracy_is_not_smoothed_and_has_teacher_and_baseline_lines(tmp_path):
    fig, names, _ = drawn(tmp_path, "eval/acc", smooth=0.9)
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.lines if ln.get_label() == f"{names[0]} (mean of 3 seeds)"]
    assert list(line.get_xdata()) == [0, 5]
    assert list(line.get_ydata()) == pytest.approx([sum(acc_of(s, t) for s in SEEDS) / 3 for t in (0, 5)])
    lines = {ln.get_label(): ln.get_ydata()[0] for ln in ax.lines if ln.get_label().startswith(("teacher", "student"))}
    baseline = sum(acc_of(s, 0) for s in SEEDS) / 3
    assert lines == {
        "teacher: 0.9, mean of 6 runs": 0.9,
        f"student before training: {baseline:.3g}, mean of 6 runs": baseline,
    }


def test_reference_lines_per_group_where_the_teachers_differ(tmp_path):
    seeded_run(tmp_path / "a", 0, 4)
    seeded_run(tmp_path / "b", 0, 4)
    cfg = yaml.safe_load((tmp_path / "b/run_config.yaml").read_text())
    (tmp_path / "b/run_config.yaml").write_text(yaml.safe_dump(cfg | {"teacher": {"name_or_path": "other"}}))
    (tmp_path / "b/summary.json").write_text(json.dumps({"acc_teacher": 0.5}))
    (tmp_path / "b/metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # no step 0: summary.json
    groups = group_runs(load_runs([tmp_path]))
    lines = reference_lines(groups, ["a", "b"])
    assert [(v, i) for v, label, i in lines if label.startswith("teacher")] == [(0.9, 0), (0.5, 1)]


def test_clip_fraction_only_for_an_objective_that_clips(tmp_path):
    report = write_report(sweep(tmp_path / "no_clip"))  # support_divergence logs pg_clipfrac = 0
    assert (report.parent / "loss.png").exists()
    assert not list(report.parent.glob("pg_clipfrac*"))
    assert "pg_clipfrac: not drawn for runs with loss.objective=support_divergence" in report.read_text()
    with pytest.raises(UserError, match="metrics: pg_clipfrac is meaningful only for loss.objective=sampled_token"):
        write_report(Options(dirs=[tmp_path / "no_clip"], metrics=["pg_clipfrac"]))

    report = write_report(sweep(tmp_path / "ppo", objective="sampled_token"))
    assert (report.parent / "pg_clipfrac.png").exists()
    assert not (report.parent / "pg_clipfrac_lower.png").exists()  # logged by none here, and no dual clip


def test_overlap_of_different_k_in_separate_panels(tmp_path):
    fig, names, note = drawn(tmp_path, "overlap_ratio")
    assert [ax.get_title() for ax in fig.axes] == ["K = 4", "K = 16"]
    assert [[ln.get_label() for ln in ax.lines] for ax in fig.axes] == [[f"{n} (mean of 3 seeds)"] for n in names]
    assert "not comparable across K" in note
    fig, _, note = drawn(tmp_path / "again", "loss")
    assert len(fig.axes) == 1 and note == ""  # the loss is on one scale


def test_files_in_each_format(tmp_path):
    root = sweep(tmp_path / "sweep")
    report = write_report(Options(dirs=[root], formats=("png", "pdf", "svg")))
    stems = ["loss", "overlap_ratio", "eval_acc"]
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for stem in stems:
        for fmt, head in magic.items():
            assert (root / f"report/{stem}.{fmt}").read_bytes().startswith(head), (stem, fmt)
    text = report.read_text()
    assert "![loss](loss.png) ([pdf](loss.pdf), [svg](loss.svg))" in text
    assert "| loss.k=4 | 0, 1, 2 | 0.11 ± 0.01 | 0.36 ± 0.01 | 0.9 ± 0 |" in text
    out = tmp_path / "default"
    write_report(Options(dirs=[root], out=out))  # the default: PNG and PDF
    assert {p.suffix for p in out.iterdir()} == {".png", ".pdf", ".md"}


def test_metrics_key_chooses_the_plots(tmp_path):
    root = sweep(tmp_path / "sweep")
    write_report(Options(dirs=[root], metrics=["eval/acc", "loss"], formats=("png",)))
    assert sorted(p.name for p in (root / "report").iterdir()) == ["eval_acc.png", "loss.png", "report.md"]
    with pytest.raises(UserError, match=r"metrics: no run logged 'los'; logged: eval/acc, eval/acc_teacher, loss"):
        write_report(Options(dirs=[tmp_path / "sweep"], metrics=["los"]))


def test_several_directories_in_one_report(tmp_path):
    a, b = sweep(tmp_path / "a"), tmp_path / "b"
    for seed in SEEDS:  # the same experiment as a's K = 4, in another directory: not merged with a's
        seeded_run(b / str(seed), seed, 4)
    report = write_report(parse_args([str(a), f"dirs=[{b}]", "formats=[png]"]))
    assert report == a / "report/report.md"
    groups = group_runs(load_runs([a, b]))
    assert group_labels(groups) == [f"{a}: loss.k=4", f"{a}: loss.k=16", f"{b}: loss.k=4"]
    text = report.read_text()
    assert f"| {b}: loss.k=4 trainer.seed=2 | 5 |" in text and f"| {a}: loss.k=16 trainer.seed=0 | 5 |" in text


def test_keys_are_parsed():
    opts = parse_args(["a", "smooth=0.6", "band=std", "metrics=[loss,eval/acc]", "formats=svg", "out=o", "b"])
    assert opts == Options(
        dirs=[Path("a"), Path("b")],
        smooth=0.6,
        band="std",
        metrics=["loss", "eval/acc"],
        formats=("svg",),
        out=Path("o"),
    )
    assert parse_args(["a", "metrics=loss,entropy"]).metrics == ["loss", "entropy"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a", "smooth=1"], r"^smooth: the EMA weight of the past, a number in \[0, 1\)"),
        (["a", "smooth=-0.1"], r"^smooth: "),
        (["a", "smooth=x"], r"^smooth: "),
        (["a", "band=sem"], r"^band: one of minmax, std"),
        (["a", "formats=[png,jpg]"], r"^formats: each one of png, pdf, svg, got 'jpg'"),
        (["a", "metrics=[]"], r"^metrics: a list of names"),
        (["a", "smoth=0.6"], r"^smoth: not an opd-report key; the keys are dirs, smooth"),
        (["a", "metrics=[loss"], r"^metrics: cannot parse"),
        (["smooth=0.5"], r"^dirs: no run or sweep directory given"),
    ],
)
def test_bad_keys_are_named(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


def test_report_of_fake_runs(tmp_path):
    fake_run(tmp_path / "0", ["loss.k=1"])
    fake_run(tmp_path / "1", ["loss.k=4"])
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| loss.k=1 | 2 |" in text and "| loss.k=4 | 2 |" in text
    assert (tmp_path / "report/loss.png").exists() and (tmp_path / "report/eval_acc.png").exists()
    assert not (tmp_path / "report/grad_norm.png").exists()  # no run logged it: no empty plot


def test_the_runs_table_shows_each_metrics_last_logged_value(tmp_path):
    """logger.diagnostics_every=2 over 3 steps: the last step has the loss but no entropy; the table shows the loss
    of step 3 and the entropy of step 2."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/overrides.yaml").write_text("- logger.diagnostics_every=2\n")
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "entropy": 0.25}, {"step": 3, "loss": 0.125}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path).read_text()
    assert "| run | step | loss | grad_norm | entropy |" in text
    assert "| 3 | 0.125 |  | 0.25 |" in text, text


@pytest.mark.parametrize(
    ("metrics", "summary", "message"),
    [
        ('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n', None, r"metrics.jsonl:2: not a metrics row"),
        ('{"step": 1, "loss": 1.0}\n[1, 2]\n', None, r"metrics.jsonl:2: not a metrics row"),
        ("", None, r"metrics.jsonl: no metrics rows"),
        ('{"step": 1, "loss": 1.0}\n', "{not json", r"summary.json: not valid JSON"),
        ('{"step": 1, "loss": 1.0}\n', "[0.5]", r"summary.json: not a JSON object"),
    ],
)
def test_damaged_run_files_are_named_and_nothing_is_written(tmp_path, metrics, summary, message):
    (tmp_path / "metrics.jsonl").write_text(metrics)
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("trainer: [1\n", r"run_config.yaml: cannot read the run's saved config"),
        ("a: 1\n", r"run_config.yaml: not a config opd-train wrote"),
    ],
)
def test_a_damaged_saved_config_is_named_and_nothing_is_written(tmp_path, config, message):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "run_config.yaml").write_text(config)
    with pytest.raises(UserError, match=message):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()

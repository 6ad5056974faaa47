"""The package's imports point one way (scripts/check_imports.py, also run by ``make lint``)."""

import importlib.util

from ..conftest import REPO


def load_checker():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "scripts/check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_upward_import_no_cycle_no_function_local_import(capsys):
    assert load_checker().main() == 0, capsys.readouterr().out


def test_the_checker_sees_a_violation(tmp_path, monkeypatch, capsys):
    """A lower unit importing a higher one, a function-local import and a cycle are all reported."""
    checker = load_checker()
    pkg = tmp_path / "opd_cli"
    (pkg / "objectives").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "objectives" / "a.py").write_text("from opd_cli.training.b import x\n")
    (pkg / "training" / "b.py").write_text("def f():\n    from opd_cli.training.c import y\n")
    (pkg / "training" / "c.py").write_text("from opd_cli.training.d import z\n")
    (pkg / "training" / "d.py").write_text("from opd_cli.training.c import w\n")
    monkeypatch.setattr(checker, "PACKAGE", pkg)
    assert checker.main() == 1
    out = capsys.readouterr().out
    assert "objectives.a (objectives) imports opd_cli.training.b (training), a unit above it" in out
    assert "imports opd_cli.training.c inside a function" in out
    assert "import cycle: training.c -> training.d -> training.c" in out

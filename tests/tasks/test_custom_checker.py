"""A checker of your own by import path: ``task.checker=package.module:function``."""

import pytest

from opd_cli.config.validate import validate
from opd_cli.errors import UserError
from opd_cli.tasks.checking import make_checker

from ..conftest import compose_cfg

MODULE = """
def lenient(response, gold):
    return gold in response

def one_argument(response):
    return True

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def checks_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_checks"


def test_a_checker_by_path_is_used(checks_module):
    cfg = compose_cfg([f"task.checker={checks_module}:lenient"])
    validate(cfg)
    check = make_checker(cfg.task)
    assert check("the answer is 42, I think", "42") and not check("\\boxed{42}", "43")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "nope",
            r"^task\.checker: 'nope' is not one of: exact, math_verify, reasoning_gym, nor a 'package\.module:function' path$",
        ),
        ("no_such_module_xyz:f", r"^task\.checker: cannot import 'no_such_module_xyz' .*PYTHONPATH"),
        ("my_checks:missing", r"^task\.checker: 'my_checks' has no function 'missing'$"),
        ("my_checks:NOT_A_FUNCTION", r"^task\.checker: 'my_checks' has no function 'NOT_A_FUNCTION'$"),
        ("my_checks:one_argument", r"^task\.checker: 'my_checks:one_argument' must take \(response, gold\)"),
    ],
)
def test_a_bad_checker_path_is_one_line(value, message, checks_module):
    with pytest.raises(UserError, match=message):
        validate(compose_cfg([f"task.checker={value}"]))

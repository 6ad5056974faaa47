"""How a command ends: bad input, a stop request, a full disk met while writing."""

import pytest

from opd_cli.errors import EXIT_BAD_INPUT, Stopped, UserError, one_line_errors


def test_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e, one_line_errors():
        raise UserError("loss.k: must be an integer >= 1, got 0")
    assert e.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: loss.k: must be an integer >= 1, got 0\n"


def test_stop_is_one_line_and_exit_143(capsys):
    with pytest.raises(SystemExit) as e, one_line_errors():
        raise Stopped(7)
    assert e.value.code == 143
    assert "after saving step 7" in capsys.readouterr().err


def test_a_full_disk_is_one_line(capsys):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    with pytest.raises(SystemExit) as e, one_line_errors(), open("/dev/full", "w") as f:  # noqa: PTH123
        f.write("x")
        f.flush()
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: No space left on device; free space"), err


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(FileNotFoundError), one_line_errors():
        open("/nonexistent/file")  # noqa: PTH123, SIM115

"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad input: a config value, a missing file, a malformed data row.

    The CLI prints its message as one line (``error: ...``) and exits with code 2.
    The message must name the offending key or file and say what is allowed.
    """


EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, after saving a checkpoint


class Stopped(Exception):
    """Raised after the checkpoint of a stop request (SIGTERM) is saved; carries the step."""

    def message(self) -> str:
        return f"error: stopped by SIGTERM after saving step {self}; resume with trainer.resume=true"

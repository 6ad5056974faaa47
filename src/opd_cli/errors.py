"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad input: a config value, a missing file, a malformed data row.

    The CLI prints its message as one line (``error: ...``) and exits with code 2.
    The message must name the offending key or file and say what is allowed.
    """

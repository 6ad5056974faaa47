"""tests/commands/: the helpers of the root conftest, importable here as ``from .conftest import ...``.

Only plain helpers are re-exported, never fixtures or hooks: a fixture imported here would be
registered a second time for this directory (a second session-scoped ``models_dir``, so a
second demo build), and a hook would run twice. The fixtures reach these tests from the root
conftest as everywhere else.
"""

from ..conftest import (  # noqa: F401
    CLI_ENV,
    REPO,
    SHORT,
    TINY_DEMO,
    cli_argv,
    compose_cfg,
    metrics,
    opd_train,
    perturbed_copy,
)

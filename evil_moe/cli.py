"""How the command lines (``python -m evil_moe``, ``python -m evil_moe.evaluate``)
report an error the user can fix: one line on stderr naming the file or setting
and the fix, exit code :data:`USAGE_EXIT`, no traceback. Anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE_EXIT = 2
"""Exit code of an expected error (argparse uses the same for a bad argument)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception classes whose message already says what is wrong and how to fix it."""
    from .checkpoint import CheckpointError, ConfigMismatchError
    from .config import ConfigError
    from .env.datasets import ChecksumError, DatasetUnavailableError
    from .env.sandbox import SandboxUnavailableError
    from .grpo import MissingVActError
    from .memory_plan import MemoryPlanError
    from .models import ModelUnavailableError
    from .pairs import PairsFormatError
    return (ConfigError, CheckpointError, ConfigMismatchError, MissingVActError, MemoryPlanError,
            ModelUnavailableError, DatasetUnavailableError, ChecksumError,
            SandboxUnavailableError, PairsFormatError)


def fail(message: str) -> int:
    """Print ``error: <message>`` as one line on stderr; returns :data:`USAGE_EXIT`."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return USAGE_EXIT


def run_reporting_errors(command: Callable[[], int]) -> int:
    """``command()``, with every expected error turned into :func:`fail`."""
    try:
        return command()
    except expected_errors() as e:
        return fail(str(e))

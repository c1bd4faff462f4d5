"""User-facing errors: each carries a one-line message and the process exit code."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1   # bad input, I/O problems, verification failures, interruption
EXIT_USAGE = 2     # command-line usage errors (argparse uses 2 too)


class QCompileError(Exception):
    """An error to report to the user as one line, without a traceback."""
    exit_code = EXIT_FAILURE


class UsageError(QCompileError):
    exit_code = EXIT_USAGE

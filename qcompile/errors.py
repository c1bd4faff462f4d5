"""User-facing errors: each carries a one-line message and the process exit code."""
from __future__ import annotations

import errno
import shutil
import sys
from typing import Callable, TypeVar

R = TypeVar("R")

EXIT_OK = 0
EXIT_FAILURE = 1   # bad input, I/O problems, verification failures, interruption
EXIT_USAGE = 2     # command-line usage errors (argparse uses 2 too)


class QCompileError(Exception):
    """An error to report to the user as one line, without a traceback."""
    exit_code = EXIT_FAILURE


class UsageError(QCompileError):
    exit_code = EXIT_USAGE


def guarded(prog: str, work: Callable[[], R], interrupted: str = "interrupted") -> tuple[int, R | None]:
    """Run a command's work; on a user-facing failure print one line to stderr and return its exit code.

    Returns ``(EXIT_OK, result)`` or ``(code, None)``. Unknown names from the registries (``KeyError``)
    are usage errors; I/O errors and Ctrl-C are failures.
    """
    try:
        return EXIT_OK, work()
    except QCompileError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code, None
    except KeyError as e:
        print(f"{prog}: error: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE, None
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_FAILURE, None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE, None


# errno values that only a write raises; numpy's short write (``tofile``: "N requested and M written") has none
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def is_write_error(e: OSError) -> bool:
    """Whether ``e`` is the output failing to be written (rather than, say, a checkpoint read failing)."""
    return e.errno is None or e.errno in _WRITE_ERRNOS


def write_failed(target: object, e: OSError, folder: object) -> QCompileError:
    """A one-line error for an output that could not be written, naming a full disk as such."""
    msg = e.strerror or str(e)
    try:
        free: int | None = shutil.disk_usage(str(folder)).free
    except OSError:
        free = None
    if e.errno == errno.ENOSPC or (free is not None and free < 64 << 20):
        msg = f"the disk is full ({msg}; {(free or 0) >> 20} MiB free)"
    return QCompileError(f"writing {target}: {msg}; nothing was written")

"""User-facing errors: each carries a one-line message and the process exit code."""
from __future__ import annotations

import errno
import shutil
import sys
import traceback
from typing import Callable, TypeVar

R = TypeVar("R")

EXIT_OK = 0
EXIT_FAILURE = 1   # bad input, I/O problems, verification failures, interruption
EXIT_USAGE = 2     # command-line usage errors (argparse uses 2 too)


class QCompileError(Exception):
    """An error to report to the user as one line, without a traceback."""
    exit_code = EXIT_FAILURE


class UsageError(QCompileError):
    """Bad command-line input, including an unknown name looked up in a registry (type, method, target)."""
    exit_code = EXIT_USAGE


TRACEBACK_FRAMES = 6  # the innermost frames of an internal error's traceback: where it happened, not how we got there


def guarded(prog: str, work: Callable[[], R], interrupted: str = "interrupted") -> tuple[int, R | None]:
    """Run a command's work; on a user-facing failure print one line to stderr and return its exit code.

    Returns ``(EXIT_OK, result)`` or ``(code, None)``. :class:`QCompileError` is the user-facing kind (the
    registries raise :class:`UsageError` for unknown names where they are looked up); I/O errors and Ctrl-C are
    failures. Anything else is our bug: the tail of its traceback and a line saying so (exit 1), never a bare
    message that reads like bad input (a stray ``KeyError`` once printed ``qcompile: error: 'artifact'``).
    """
    try:
        return EXIT_OK, work()
    except QCompileError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code, None
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_FAILURE, None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE, None
    except Exception as e:  # noqa: BLE001 - the boundary: report any bug as one
        report_internal_error(prog, e)
        return EXIT_FAILURE, None


def report_internal_error(prog: str, e: BaseException) -> None:
    """Print the innermost frames of ``e``'s traceback and a line saying it is a bug in qcompile."""
    tail = traceback.format_exception(type(e), e, e.__traceback__, limit=-TRACEBACK_FRAMES)
    print("".join(tail).rstrip(), file=sys.stderr)
    print(f"{prog}: internal error: {type(e).__name__}: {e} (a bug in qcompile, not in your input; please report "
          "it with the lines above)", file=sys.stderr)


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

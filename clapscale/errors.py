"""User errors versus bugs, the rule every `clapscale` command follows.

A user error (a missing or damaged file, a bad config value or argument, an unwritable output) is
printed as one line that names the thing and says what to do, and the command exits 2. Anything
else is a bug in clapscale and keeps its traceback. ``CLAPSCALE_DEBUG=1`` (or ``clapscale --debug``)
shows the traceback of user errors too.

Stages raise :class:`UserError` (or a subclass: ``ConfigError``, ``AudioDecodeError``,
``InferenceError``, ``ModelLoadError``, ...); operating-system errors about a file (``OSError``
with a file name, e.g. a read-only ``--out``) count as user errors as well.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "CLAPSCALE_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An input the user gave cannot be used; the message names it and what to do."""


_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free space or choose another path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``exc`` is a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.filename is None:
            return str(exc)  # raised by us with a message that names the thing
        hint = _OS_HINTS.get(exc.errno or 0)
        return f"{exc.filename}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")
    return None


def debug_enabled() -> bool:
    """True when ``CLAPSCALE_DEBUG`` asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_command(prog: str, func: Callable[[list[str]], int | None], argv: list[str], debug: bool = False) -> int:
    """Run a subcommand's ``func(argv)`` under the user-error rule; returns the exit code.

    User errors print ``"{prog}: error: {message}"`` on stderr and return ``EXIT_USER_ERROR`` (or
    re-raise with ``debug``); Ctrl-C returns ``EXIT_INTERRUPTED``; other exceptions propagate.
    """
    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or debug:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR

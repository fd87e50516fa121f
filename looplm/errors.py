"""User-facing errors.

A ``LoopLMError`` is a mistake in what the user asked for (a missing file, a bad config
key, an out-of-range option).  The CLI prints its message on one line and exits with
status 2; library callers can catch it.  Bugs inside looplm stay ordinary exceptions.
"""

import errno
import json


class LoopLMError(Exception):
    """A user's mistake, reported as one line that says what was wrong and how to fix it."""


def listed(items, limit: int = 3) -> str:
    """The first ``limit`` items joined by commas, then how many more: "a, b, c and 4 more"."""
    items = [str(item) for item in items]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def one_line(error: BaseException) -> str:
    """An exception's message with its line breaks and runs of spaces folded, for a one-line error."""
    return " ".join(str(error).split())


def is_int(value) -> bool:
    """An int and not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# What parsing a JSON text can raise when the text is damaged (not UTF-8, not JSON, or nested past
# Python's recursion limit): every reader of a user's JSON file turns these into one line.
JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)


# what to do about an OSError on a file or directory the user named, by errno
FILE_HINTS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota)",
              errno.EROFS: "choose a writable location", errno.EACCES: "check the permissions",
              errno.EPERM: "check the permissions", errno.ENOTDIR: "a part of the path is a file, not a directory",
              errno.EISDIR: "it is a directory: give a file", errno.ENOENT: "check the path",
              errno.ENAMETOOLONG: "shorten the path", errno.ELOOP: "a symbolic link in the path loops"}


def file_error_line(error: OSError) -> str | None:
    """One line for an OSError on a file the user named (no permission, a full disk, a file where a
    directory belongs, ...): what failed, where, and what to do; None for any other OSError."""
    if error.errno not in FILE_HINTS:
        return None
    where = f" {str(error.filename)!r}" if error.filename else ""
    return f"{error.strerror or one_line(error)}:{where}; {FILE_HINTS[error.errno]}"


def check_readable(path) -> None:
    """Open ``path`` for reading once, so a file that cannot be read is named as such (a library
    opening it may report another reason: safetensors says "No such file" for no permission)."""
    try:
        open(path, "rb").close()
    except OSError as error:
        hint = f"; {FILE_HINTS[error.errno]}" if error.errno in FILE_HINTS else ""
        raise LoopLMError(f"cannot read {str(path)!r}: {error.strerror or one_line(error)}{hint}") from None

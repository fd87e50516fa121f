"""User-facing errors.

A ``LoopLMError`` is a mistake in what the user asked for (a missing file, a bad config
key, an out-of-range option).  The CLI prints its message on one line and exits with
status 2; library callers can catch it.  Bugs inside looplm stay ordinary exceptions.
"""

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

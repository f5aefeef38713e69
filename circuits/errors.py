"""The one exception type users see: a single line naming the file, field or value at fault."""

from typing import Any


class CircuitsError(Exception):
    """A problem with the user's input, stated in one line; the CLI prints it and exits 2."""


class RetryableError(CircuitsError):
    """A CircuitsError that may pass on another attempt (a download from the Hub that failed):
    a Ray sweep retries these, never other CircuitsErrors."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line (its type name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def short_repr(value: Any, limit: int = 60) -> str:
    """A value as an error quotes it: its repr on one line, cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

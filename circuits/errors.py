"""The one exception type users see: a single line naming the file, field or value at fault."""


class CircuitsError(Exception):
    """A problem with the user's input, stated in one line; the CLI prints it and exits 2."""


class RetryableError(CircuitsError):
    """A CircuitsError that may pass on another attempt (a download from the Hub that failed):
    a Ray sweep retries these, never other CircuitsErrors."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line (its type name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__

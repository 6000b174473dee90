"""Exceptions raised for bad user input. Each message names the problem and the fix."""


class ScdcaInputError(ValueError):
    """Input data, arguments or files that scdca cannot use as given."""


class LeakageError(RuntimeError):
    """A split puts held-out information into training. Always a bug; never ignore."""


class GridError(RuntimeError):
    """Some benchmark grid cells raised; the finished ones are written and a rerun retries the rest."""


def reason(err: BaseException, limit: int = 200) -> str:
    """First line of an exception's message (its type name if empty), for one-line errors."""
    return (str(err).splitlines() or [type(err).__name__])[0][:limit]

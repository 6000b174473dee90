"""Exceptions raised for bad user input. Each message names the problem and the fix."""


class ScdcaInputError(ValueError):
    """Input data, arguments or files that scdca cannot use as given."""


class LeakageError(RuntimeError):
    """A split puts held-out information into training. Always a bug; never ignore."""

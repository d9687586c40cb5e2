"""Errors a user can cause, and the one check of count-like parameters that raises them. The CLI
prints their message alone, without a traceback."""

import numbers


class PathanatError(Exception):
    """A problem with the user's input: the message names the file or key and what was expected."""


class InputError(PathanatError):
    """A data file (NIfTI volume, mask, table) that cannot be used as it is."""


class ConfigError(PathanatError):
    """A configuration key that is unknown, missing or of the wrong type."""


class OutputBusyError(PathanatError):
    """An output folder that another process is writing at this moment."""


class OutputExistsError(PathanatError):
    """An output folder that is already there (and may not be replaced)."""


def checked_int(value: object, name: str, minimum: int = 1, what: str = "",
                error: type[PathanatError] = PathanatError) -> int:
    """``value`` as an int when it is an integer (not a bool) of at least ``minimum``; else
    ``error`` naming ``name``, what was expected (``what`` says of what) and what came."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        of = f" ({what})" if what else ""
        raise error(f"{name}: expected an integer >= {minimum}{of}, got {value!r}")
    return int(value)

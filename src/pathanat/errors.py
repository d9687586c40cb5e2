"""Errors a user can cause. The CLI prints their message alone, without a traceback."""


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

"""Errors a user can cause (configs, paths, data).

They are raised at the boundary and printed by the CLI as one line, with no traceback.
Deep code may then assume valid inputs.
"""


class UserError(Exception):
    """Something the user can fix: a config key, a path, a data file."""


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key and the file."""


class DataError(UserError):
    """A data source or prepared data file is missing, empty or unreadable."""


class NonFiniteError(UserError):
    """Training went non-finite (NaN/Inf loss, gradients or state); the message names the step,
    the quantity and the last finite checkpoint. The CLI exits with code 3."""

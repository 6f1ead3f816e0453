"""One error type for everything a user can get wrong (config, data, checkpoint, CLI).

The CLI turns a UserError into a one-line message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. The message must name the culprit (key, file, value)."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass

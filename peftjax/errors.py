"""Errors for bad user input (configs, paths, files), reported as one line by the CLI.

Every message names the field or path, the bad value, and what would be valid.
"""


class UserInputError(ValueError):
  """Base class of input mistakes a user can fix; ``peftjax.main`` prints them without a traceback."""


class ConfigError(UserInputError):
  """An invalid config value."""

"""Errors a user can act on; the CLI prints them without a torch traceback."""


class ConfigError(ValueError):
    """A configuration, name, shape or file problem the user can fix in YAML or on the command line."""

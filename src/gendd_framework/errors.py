"""Errors a user can act on; the CLI prints them without a torch traceback."""


class ConfigError(ValueError):
    """A configuration, name, shape or file problem the user can fix in YAML or on the command line."""


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN/Inf; raised on the step it happened (the run stops non-zero)."""

    def __init__(self, stage: str, step: int, key: str, value: float) -> None:
        super().__init__(f"non-finite loss '{key}' = {value} in stage '{stage}' at step {step}")
        self.stage, self.step, self.key, self.value = stage, step, key, value

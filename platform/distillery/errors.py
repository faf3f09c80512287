"""Errors a user can act on. The CLI prints their message without a traceback."""


class DistilleryError(Exception):
    """Base class: the message says what went wrong and what to do next."""


class ConfigError(DistilleryError):
    """A config file or override is invalid; the message names the key."""


class DataError(DistilleryError):
    """Input data is unusable; the message names the file, column and reason."""


class StageError(DistilleryError):
    """A stage cannot run (unknown stage, missing upstream output, ...)."""

"""Exceptions a user can trigger. Anything else is a bug and may stay a plain exception."""

from __future__ import annotations


class DevFTError(Exception):
    """Base class of every error caused by user input (config, data, model, adapter)."""


class ConfigError(DevFTError, ValueError):
    """A config value that cannot work: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} = {value!r} is not allowed: {allowed}")


class DataError(DevFTError, ValueError):
    """A data file or data set that cannot be used."""


class ModelError(DevFTError, ValueError):
    """A model that cannot be found or is not a supported decoder."""


class RunFileError(DevFTError):
    """A file of a run directory that is missing its end, unreadable or not what devft wrote."""


class RunStalledError(DevFTError):
    """A run that cannot make progress: too many consecutive rounds without enough replies."""

    exit_code = 3

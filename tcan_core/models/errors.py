"""Errors raised by the loaders; each message says what was wrong and what to do."""


class ModelFormatError(ValueError):
    """A model file is not in a format the slot accepts, or its keys do not fit the model."""


class WrongBaseModelError(ModelFormatError):
    """A model file is for another base model family (SDXL, SD2, ...) than the slot needs."""


class ModelFileError(ValueError):
    """A model file cannot be read: truncated, corrupt, or holding something other than tensors."""

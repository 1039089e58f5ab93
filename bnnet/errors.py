"""Exceptions raised by bnnet.

Every error is a subclass of a built-in (ValueError or TypeError) so that code
written against NumPy/scikit-learn conventions still catches it, and of
`BnnetError` so that a caller can catch everything bnnet raises at once.
Messages name the argument (or layer, or file), what was expected, what was
found, and how to fix it.
"""


class BnnetError(Exception):
    """Base class of every error bnnet raises on purpose."""


class InputError(BnnetError, ValueError):
    """An array has the wrong shape or size, holds NaN/Inf, or labels are out of range."""


class InputTypeError(BnnetError, TypeError):
    """An array has a dtype bnnet cannot compute with (object, string, complex)."""


class HyperparameterError(BnnetError, ValueError):
    """A constructor or function argument is out of its valid range or unknown."""


class CheckpointError(BnnetError, ValueError):
    """A checkpoint file is missing, truncated, foreign, or for another architecture."""


class DatasetError(BnnetError, ValueError):
    """A dataset file or folder is missing or malformed."""


class NonFiniteError(BnnetError, ValueError):
    """Training produced NaN or Inf (loss, activations or gradients); the message names the step and layer."""

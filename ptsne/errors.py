"""Exceptions raised by ptsne."""


class NotFittedError(RuntimeError):
    """Raised when a method needs a fitted estimator (call ``fit`` first)."""

"""Exceptions raised by ptsne."""

from __future__ import annotations

import os


class NotFittedError(RuntimeError):
    """Raised when a method needs a fitted estimator (call ``fit`` first)."""


class ModelFileError(ValueError):
    """A file of a saved model is missing, unreadable or does not fit the rest of the model.

    ``file`` is the path of the file at fault, ``problem`` what is wrong with it;
    the message is ``"<file>: <problem>"``.
    """

    def __init__(self, file: str | os.PathLike, problem: str):
        self.file = os.fspath(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")

    def __reduce__(self):  # pickled across processes (Ray) with both arguments
        return type(self), (self.file, self.problem)


class DigestMismatchError(ModelFileError):
    """A model file's sha256 differs from the one recorded when the model was saved or registered."""

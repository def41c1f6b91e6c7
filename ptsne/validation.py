"""Checks of user input that name the offending value."""

from __future__ import annotations

import numpy as np


def check_array(X, name: str = "X", n_features: int | None = None, max_report: int = 5) -> np.ndarray:
    """Validate a 2-D numeric array of finite values and return it as float32.

    Raises
    ------
    TypeError
        Non-numeric input.
    ValueError
        Wrong number of dimensions or features, no rows, NaN or Inf values (the
        message gives the count of bad rows and the first of them).
    """
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be a 2-D numeric array, got {type(X).__name__}: {exc}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name} has {arr.shape[1]} features, but the model was fitted with {n_features}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} has {bad.size} rows with NaN or Inf values (first rows: "
            f"{bad[:max_report].tolist()}); drop or impute them"
        )
    return arr

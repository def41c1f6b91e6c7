"""Checks of user input that name the offending value."""

from __future__ import annotations

import numpy as np

#: Largest finite float32: no squared distance may exceed it.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_array(X, name: str = "X", n_features: int | None = None, max_report: int = 5) -> np.ndarray:
    """Validate a 2-D numeric array of finite values and return it as float32.

    Raises
    ------
    TypeError
        Non-numeric input.
    ValueError
        Wrong number of dimensions or features, no rows, NaN or Inf values, or
        rows whose squared norm overflows float32 (the message gives the count
        of bad rows, the first of them and a value of the first).
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
        value = arr[bad[0]][~np.isfinite(arr[bad[0]])][0]
        raise ValueError(
            f"{name} has {bad.size} rows with NaN or Inf values (first rows: "
            f"{bad[:max_report].tolist()}), row {bad[0]} holds {value}; drop or impute them"
        )
    # Distances are computed in float32 (FAISS, torch): a row whose squared norm overflows it has
    # infinite distances to every other row, and the neighbour search finds no neighbours for it.
    squared = np.einsum("ij,ij->i", arr, arr, dtype=np.float64)
    overflow = squared > FLOAT32_MAX
    if overflow.any():
        bad = np.flatnonzero(overflow)
        row = arr[bad[0]]
        raise ValueError(
            f"{name} has {bad.size} rows whose squared norm overflows float32 (first rows: "
            f"{bad[:max_report].tolist()}), row {bad[0]} holds {row[np.abs(row).argmax()]:g} (squared norm "
            f"{squared[bad[0]]:g}); the squared norm of a row must be at most {FLOAT32_MAX:g}: scale the data down"
        )
    return arr

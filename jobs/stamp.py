"""The stamp ``ptsne train`` writes next to its model: what lets a rerun skip training and registering.

``WORKDIR/model/train-stamp.json`` records the run identity the model was trained
for (``key``, :func:`pipeline.train.train_key`), its history and training facts,
and, once logged, the MLflow run and registered model (``logged``). The model and
its stamp are saved together (``save_model(..., extra={STAMP_FILE: stamp_bytes(s)})``);
:func:`write_stamp` later adds what the MLflow run logged.
"""

from __future__ import annotations

import hashlib
import json

STAMP_FILE = "train-stamp.json"


def stamp_bytes(stamp: dict) -> bytes:
    """The stamp as written to :data:`STAMP_FILE`: sorted, indented JSON."""
    return json.dumps(stamp, indent=2, sort_keys=True, default=str).encode()


def write_stamp(model_dir: str, stamp: dict) -> None:
    """Write ``stamp`` into the model directory ``model_dir`` (a path or URI), whole or not at all."""
    from pipeline.storage import join, resolve, write_bytes_atomic

    fs, path = resolve(model_dir)
    write_bytes_atomic(fs, join(path, STAMP_FILE), stamp_bytes(stamp))


def read_stamp(model_dir: str) -> dict | None:
    """The stamp the last training wrote next to its model, or None (none, or unreadable)."""
    from pipeline.storage import join, read_json, resolve

    fs, path = resolve(model_dir)
    try:
        stamp = read_json(fs, join(path, STAMP_FILE))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def stamp_key_before(manifest: dict, config, workers: int) -> str:
    """The key that stamped models before :func:`pipeline.train.train_key` (data hash and ``n``
    instead of the location): a model stamped so is current too, so an upgrade retrains nothing."""
    payload = [manifest.get("config_hash"), manifest.get("n"), config.fingerprint(), int(workers)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]

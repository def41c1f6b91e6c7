"""Deterministic Gaussian-mixture data written as Parquet shards.

The mixture means depend on ``seed`` only; shard ``s`` is drawn from a random
stream seeded by ``(seed, s)``, so every shard can be generated on its own (in
parallel Ray tasks) and the points of a 10M-row data set never sit in one
process. Points are ``means[label] + N(0, I)`` with labels uniform over the
centres; ids are the global row numbers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline import schema
from pipeline.storage import StagedDir, join, resolve, write_bytes_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

SYNTH_FILE = "synth.json"


@dataclass(frozen=True)
class SynthConfig:
    """Settings of a synthetic data set.

    Parameters
    ----------
    n : int
        Number of points.
    dim : int
        Dimension.
    centers : int
        Mixture components (labels ``0 .. centers - 1``).
    seed : int
    shard_rows : int
        Rows per shard (the last one may be shorter).
    spread : float
        Standard deviation of the component means (each component has unit variance).
    """

    n: int
    dim: int
    centers: int = 10
    seed: int = 0
    shard_rows: int = 100_000
    spread: float = 6.0

    def __post_init__(self) -> None:
        for name, low in (("n", 1), ("dim", 1), ("centers", 1), ("seed", 0), ("shard_rows", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"SynthConfig: {name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.spread, bool) or not isinstance(self.spread, (int, float)) or not self.spread > 0:
            raise ValueError(f"SynthConfig: spread must be a number > 0, got {self.spread!r}")

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_rows)


def mixture_means(config: SynthConfig) -> np.ndarray:
    """Component means, float64 ``(centers, dim)``; depend on ``seed`` only."""
    rng = np.random.default_rng([config.seed, 0])
    return rng.normal(scale=config.spread, size=(config.centers, config.dim))


def generate_shard(config: SynthConfig, index: int) -> pa.Table:
    """Shard ``index``: columns ``id`` int64, ``vector`` fixed_size_list<float32>, ``label`` int64."""
    if not 0 <= index < config.n_shards:
        raise ValueError(f"generate_shard: index must be in [0, {config.n_shards}), got {index!r}")
    start = index * config.shard_rows
    rows = min(config.shard_rows, config.n - start)
    rng = np.random.default_rng([config.seed, 1, int(index)])
    labels = rng.integers(0, config.centers, size=rows)
    X = mixture_means(config)[labels] + rng.standard_normal((rows, config.dim))
    return pa.table({
        schema.ID: pa.array(np.arange(start, start + rows, dtype=np.int64)),
        schema.VECTOR: schema.vectors_to_arrow(X.astype(np.float32)),
        schema.LABEL: pa.array(labels.astype(np.int64)),
    })


def _write_shard(fs, directory: str, config: SynthConfig, index: int) -> dict:
    table = generate_shard(config, index)
    name = schema.part_name(index)
    sha = write_parquet_atomic(fs, join(directory, name), table)
    return {"path": name, "rows": table.num_rows, "sha256": sha}


def write_synth(config: SynthConfig, output: str, use_ray: bool = True, overwrite: bool = False) -> dict:
    """Write the data set as ``part-*.parquet`` shards plus ``synth.json`` under ``output``.

    With ``use_ray`` each shard is generated and written by its own Ray task.
    The directory is built in a hidden sibling and moved into place at the end.

    Returns
    -------
    dict
        The contents of ``synth.json``: the settings and the list of shards.
    """
    fs, path = resolve(output)
    with StagedDir(fs, path, overwrite=overwrite) as stage:
        if use_ray:
            import ray

            task = ray.remote(_write_shard).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
            refs = [task.remote(fs, stage, config, i) for i in range(config.n_shards)]
            pending = list(refs)
            with tqdm(total=len(refs), desc="synth", unit="shard", leave=False) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    bar.update(len(done))
            shards = ray.get(refs)
        else:
            shards = [_write_shard(fs, stage, config, i) for i in tqdm(range(config.n_shards), desc="synth", leave=False)]
        info = {"generator": "gaussian_mixture", **asdict(config), "shards": shards}
        write_bytes_atomic(fs, join(stage, SYNTH_FILE), json.dumps(info, indent=2).encode())
    log.info("synth: wrote %d points (%d-D, %d centres) in %d shards to %s",
             config.n, config.dim, config.centers, config.n_shards, output)
    return info

"""Deterministic Gaussian-mixture shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.synth import SynthConfig, generate_shard, mixture_means, write_synth


def test_shards_depend_only_on_seed_and_index():
    a = SynthConfig(n=2500, dim=7, centers=4, seed=3, shard_rows=1000)
    s1 = generate_shard(a, 1)
    assert s1.equals(generate_shard(a, 1))
    # Shard 1 does not depend on the total size (only on seed and index).
    assert s1.equals(generate_shard(SynthConfig(n=9000, dim=7, centers=4, seed=3, shard_rows=1000), 1))
    assert not s1.equals(generate_shard(SynthConfig(n=2500, dim=7, centers=4, seed=4, shard_rows=1000), 1))
    last = generate_shard(a, 2)
    assert last.num_rows == 500 and last.column("id").to_pylist() == list(range(2000, 2500))
    assert s1.schema.field("vector").type == schema.vector_type(7)
    with pytest.raises(ValueError, match="index must be in"):
        generate_shard(a, 3)


def test_points_follow_the_mixture():
    c = SynthConfig(n=4000, dim=5, centers=3, seed=0, shard_rows=4000)
    t = generate_shard(c, 0)
    X = schema.arrow_to_vectors(t.column("vector"))
    y = t.column("label").to_numpy()
    means = mixture_means(c)
    assert set(np.unique(y)) == {0, 1, 2}
    for j in range(3):
        # Unit-variance components around their means.
        np.testing.assert_allclose(X[y == j].mean(axis=0), means[j], atol=0.15)
        np.testing.assert_allclose(X[y == j].std(axis=0), 1.0, atol=0.1)


def test_config_is_validated():
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        SynthConfig(n=10, dim=0)
    with pytest.raises(ValueError, match="spread"):
        SynthConfig(n=10, dim=2, spread=-1.0)


def test_write_synth_with_ray_equals_local(ray_local, tmp_path):
    c = SynthConfig(n=1200, dim=4, centers=3, seed=9, shard_rows=500)
    info = write_synth(c, str(tmp_path / "ray"))
    write_synth(c, str(tmp_path / "local"), use_ray=False)
    assert [s["rows"] for s in info["shards"]] == [500, 500, 200]
    for s in info["shards"]:
        a = pq.read_table(tmp_path / "ray" / s["path"])
        assert a.equals(pq.read_table(tmp_path / "local" / s["path"]))
    assert json.loads((tmp_path / "ray" / "synth.json").read_text())["n"] == 1200
    t = pa.concat_tables(pq.read_table(tmp_path / "ray" / s["path"]) for s in info["shards"])
    assert t.column("id").to_pylist() == list(range(1200))
    with pytest.raises(FileExistsError):
        write_synth(c, str(tmp_path / "ray"), use_ray=False)

"""The affinity directory's manifest and reader: layout, ownership, bytes read and memory (no Ray)."""

from __future__ import annotations

import json
import logging
import pickle
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema, storage
from pipeline.affinity_dir import (
    AffinityDir,
    AffinityFormatError,
    AffinityManifest,
    DataFile,
    EdgesFile,
    RowGroup,
    manifest_json,
    read_manifest,
    write_edges_file,
)
from ptsne.affinity import Edges
from ptsne.train import NeighborSampler
from tests.conftest import gaussian_blobs
from tests.pipeline.test_train import write_affinity_dir


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    X, y = gaussian_blobs(500, 6, 3, seed=4)
    return write_affinity_dir(tmp_path_factory.mktemp("aff") / "affinities", X, y, parts=3)


def random_p(n: int, per_row: int, seed: int = 0) -> Edges:
    """A random sparse P: ``per_row`` distinct neighbours per row, weights > 0, sorted by (head, tail)."""
    rng = np.random.default_rng(seed)
    tail = (np.arange(n)[:, None] + rng.integers(1, n, size=(n, per_row))) % n
    head = np.repeat(np.arange(n), per_row)
    key = np.unique(head * n + tail.reshape(-1))
    head, tail = key // n, key % n
    weight = rng.random(key.size).astype(np.float32) + 0.01
    return Edges(head, tail, (weight / weight.sum()).astype(np.float32))


def write_p(location: str, edges: Edges, n: int, files: int = 3, buckets: int = schema.EDGE_BUCKETS) -> str:
    """An affinity directory holding ``edges`` in ``files`` head ranges, with zero features of dim 1."""
    fs, root = storage.resolve(location)
    bounds = np.linspace(0, n, files + 1).round().astype(int)
    entries = []
    for i in range(files):
        sel = (edges.head >= bounds[i]) & (edges.head < bounds[i + 1])
        rel = f"{schema.EDGES_DIR}/{schema.part_name(i)}"
        w = write_edges_file(fs, storage.join(root, rel), edges.head[sel], edges.tail[sel], edges.weight[sel],
                             buckets)
        entries.append(EdgesFile(rel, w["rows"], w["sha256"], w["bytes"], int(bounds[i]), int(bounds[i + 1]),
                                 tuple(RowGroup(b, r) for b, r in w["row_groups"])))
    rel = f"{schema.FEATURES_DIR}/{schema.part_name(0)}"
    rows = np.arange(n)
    sha = storage.write_parquet_atomic(fs, storage.join(root, rel),
                                       schema.features_table(rows, pa.array(rows), np.zeros((n, 1), np.float32)))
    m = AffinityManifest(n=n, input_dim=1, dim=1, k=1, perplexities=(1.0,), features=(DataFile(rel, n, sha),),
                         edges=tuple(entries), edge_buckets=buckets, n_edges=int(edges.head.size))
    storage.write_bytes_atomic(fs, storage.join(root, schema.MANIFEST_FILE), manifest_json(m))
    return location


def test_manifest_round_trips_and_pickles_without_its_filesystem(small_dir):
    aff = AffinityDir(small_dir)
    raw = read_manifest(small_dir)
    assert raw["format_version"] == schema.FORMAT_VERSION and raw["edge_buckets"] == schema.EDGE_BUCKETS
    assert aff.manifest.to_dict() == raw
    assert AffinityManifest.from_dict(json.loads(json.dumps(raw))) == aff.manifest
    again = pickle.loads(pickle.dumps(aff))
    assert again.location == aff.location and again.manifest == aff.manifest
    assert aff.uri == small_dir


def test_an_older_directory_is_refused_with_how_to_rebuild_it(tmp_path, small_dir):
    old = json.loads(json.dumps(read_manifest(small_dir)))
    old["format_version"] = 1
    del old["edge_buckets"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / schema.MANIFEST_FILE).write_text(json.dumps(old))
    with pytest.raises(AffinityFormatError, match=r"format_version 1; this version reads format_version 2.*rebuild"):
        AffinityDir(tmp_path / "old")
    assert read_manifest(tmp_path / "old")["format_version"] == 1  # the raw manifest, for up-to-date checks
    with pytest.raises(FileNotFoundError, match="no manifest.json in affinity directory"):
        AffinityDir(tmp_path / "none")
    assert read_manifest(tmp_path / "none") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / schema.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(AffinityFormatError, match="not valid JSON"):
        AffinityDir(tmp_path / "bad")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(n=d["n"] + 1), "hold 500 rows, n is 501"),
        (lambda d: d["files"]["edges"][0]["row_groups"].pop(), "do not add up"),
        (lambda d: d["files"]["edges"][0]["row_groups"][0].__setitem__(0, 999), r"buckets \[0, 240\)"),
        (lambda d: d["files"]["edges"][0].pop("row_groups"), "malformed file entry"),
        (lambda d: d.pop("dim"), "lacks dim"),
    ],
)
def test_inconsistent_manifests_are_refused_naming_the_problem(small_dir, change, message):
    raw = read_manifest(small_dir)
    change(raw)
    with pytest.raises(AffinityFormatError, match=message):
        AffinityManifest.from_dict(raw, "somewhere")


def test_edges_files_hold_one_row_group_per_bucket_sorted_by_bucket_head_tail(small_dir):
    aff = AffinityDir(small_dir)
    total = 0
    for entry in aff.manifest.edges:
        pf = pq.ParquetFile(aff.file_path(entry))
        assert pf.metadata.num_row_groups == len(entry.row_groups) > 1
        buckets = [g.bucket for g in entry.row_groups]
        assert buckets == sorted(set(buckets))
        for i, group in enumerate(entry.row_groups):
            t = pf.read_row_group(i)
            h, tl = t.column("head").to_numpy(), t.column("tail").to_numpy()
            assert t.num_rows == group.rows and np.all(schema.bucket_of(h, 240) == group.bucket)
            assert np.all(np.diff(h * aff.manifest.n + tl) > 0)
            assert h.min() >= entry.head_start and h.max() < entry.head_stop
            total += t.num_rows
    assert total == aff.manifest.n_edges
    edges = aff.read_edges()
    assert np.all(np.diff(edges.head * aff.manifest.n + edges.tail) > 0)  # sorted by (head, tail)


@pytest.mark.parametrize("world", [1, 2, 3, 7, 16])
def test_workers_own_every_edge_once_and_read_only_their_buckets(small_dir, world, caplog):
    aff = AffinityDir(small_dir)
    edges = aff.read_edges()
    got_rows, got_pairs, read = [], [], []
    with caplog.at_level(logging.INFO, logger="pipeline.affinity_dir"):
        for rank in range(world):
            w = aff.read_worker_edges(rank, world)
            assert w.tail.dtype == np.int32 and w.weight.dtype == np.float64 and w.indptr.dtype == np.int64
            assert np.all(np.diff(w.rows) > 0) and np.all(schema.bucket_of(w.rows, world) == rank)
            head = np.repeat(w.rows, np.diff(w.indptr))
            got_rows.append(w.rows)
            got_pairs.append(np.stack([head, w.tail, w.weight]))
            read.append(w.bytes_read / w.bytes_total)
    np.testing.assert_array_equal(np.sort(np.concatenate(got_rows)), np.unique(edges.head))
    pairs = np.concatenate(got_pairs, axis=1)
    order = np.lexsort((pairs[1], pairs[0]))
    np.testing.assert_array_equal(pairs[0, order], edges.head)
    np.testing.assert_array_equal(pairs[1, order], edges.tail)
    np.testing.assert_array_equal(pairs[2, order].astype(np.float32), edges.weight)
    if schema.EDGE_BUCKETS % world == 0:
        assert sum(read) == pytest.approx(1.0) and max(read) < 2.0 / world
        assert "do not divide" not in caplog.text
    else:  # every head is read and filtered (and the tails of the row groups holding owned rows)
        assert sum(read) > 1.5 and min(read) > 1.0 / world
        assert f"{world} workers do not divide the 240 edge buckets" in caplog.text


def test_sampler_of_a_worker_is_compact_and_built_near_its_final_size(tmp_path):
    n = 20_000
    edges = random_p(n, 40)
    aff = AffinityDir(write_p(str(tmp_path / "p"), edges, n, files=3))
    tracemalloc.start()
    try:
        w = aff.read_worker_edges(0, 1)
        sampler = NeighborSampler.from_csr(w.indptr, w.tail, w.weight)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    E = sampler.n_edges
    assert E == edges.head.size
    assert sampler.nbytes / E <= 16, sampler.nbytes / E
    assert peak / E <= 24, peak / E
    # The same CSR as the single-process constructor's: the same draws.
    single = NeighborSampler(edges, n)
    anchors = torch.from_numpy(np.random.default_rng(1).integers(0, n, 50_000))
    a = sampler.sample(anchors, torch.Generator().manual_seed(3))
    b = single.sample(anchors, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.int64


def test_read_worker_edges_rejects_bad_ranks(small_dir):
    aff = AffinityDir(small_dir)
    with pytest.raises(ValueError, match="rank must be < world_size=2, got 2"):
        aff.read_worker_edges(2, 2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        aff.read_worker_edges(0, 0)


def test_files_that_disagree_with_the_manifest_are_refused(tmp_path):
    n = 300
    edges = random_p(n, 5)
    location = write_p(str(tmp_path / "p"), edges, n, files=2)
    aff = AffinityDir(location)
    # Rewritten in other row groups: the reader notices before it trusts the buckets.
    path = aff.file_path(aff.manifest.edges[0])
    pq.write_table(pq.read_table(path), path, row_group_size=7)
    with pytest.raises(AffinityFormatError, match="changed after it was written"):
        aff.read_worker_edges(0, 2)
    storage.resolve(location)[0].delete_file(aff.file_path(aff.manifest.edges[1]))
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) listed in the manifest are missing"):
        aff.check_files()


def test_write_edges_file_needs_heads_in_order(tmp_path):
    fs, root = storage.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="head must be sorted"):
        write_edges_file(fs, storage.join(root, "e.parquet"), np.array([2, 1]), np.array([0, 0]), np.ones(2))
    empty = write_edges_file(fs, storage.join(root, "empty.parquet"), np.zeros(0), np.zeros(0), np.zeros(0))
    assert empty["rows"] == 0 and empty["row_groups"] == []
    assert pq.ParquetFile(str(tmp_path / "empty.parquet")).metadata.num_row_groups == 0

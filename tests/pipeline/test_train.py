"""Distributed training with Ray Train on a real local Ray (2 CPU workers)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import schema, storage
from pipeline.affinity_dir import (
    AffinityDir,
    AffinityManifest,
    DataFile,
    EdgesFile,
    RowGroup,
    manifest_json,
    write_edges_file,
)
from pipeline.train import (
    CHECKPOINT_OPTIMIZER,
    DistributedTrainConfig,
    ScannedFeatures,
    SharedFeatures,
    check_gpu_workers,
    fit_reference,
    load_optimizer_state,
    reference_rows,
    report_due,
    run_name,
    shard_of,
    train_distributed,
    train_key,
)
from ptsne.affinity import joint_probabilities
from ptsne.estimator import ParametricTSNE, params_of
from ptsne.knn import KNNConfig, knn_graph
from ptsne.metrics import knn_accuracy
from ptsne.model import ModelConfig
from ptsne.reference import ReferenceConfig
from ptsne.train import TrainConfig

# Network-only: the reference stage has its own tests below.
NET = dict(hidden_layers=(64, 64), n_epochs=20, batch_size=128, learning_rate=3e-3, reference_size=0)
# ... with a report and a checkpoint after every epoch, which the tests of restarts and live metrics count on.
FAST = dict(**NET, report_steps=1)


def write_affinity_dir(location, X: np.ndarray, labels=None, perplexity: float = 10.0, parts: int = 3,
                       buckets: int = schema.EDGE_BUCKETS) -> str:
    """An affinity directory per the contract (local path or URI), from the core kNN and affinity stages."""
    n, dim = X.shape
    k = min(n - 1, int(3 * perplexity))
    edges = joint_probabilities(knn_graph(X, KNNConfig(n_neighbors=k, method="exact", device="cpu")), perplexity)
    order = np.lexsort((edges.tail, edges.head))
    head, tail, weight = edges.head[order], edges.tail[order], edges.weight[order]
    fs, root = storage.resolve(location)
    features, edge_files = [], []
    for i, rows in enumerate(np.array_split(np.arange(n), parts)):
        lab = None if labels is None else pa.array(labels[rows])
        rel = f"{schema.FEATURES_DIR}/{schema.part_name(i)}"
        sha = storage.write_parquet_atomic(fs, storage.join(root, rel),
                                           schema.features_table(rows, pa.array(rows + 1000), X[rows], lab))
        features.append(DataFile(rel, len(rows), sha))
        sel = (head >= rows[0]) & (head <= rows[-1])
        rel = f"{schema.EDGES_DIR}/{schema.part_name(i)}"
        w = write_edges_file(fs, storage.join(root, rel), head[sel], tail[sel], weight[sel], buckets)
        edge_files.append(EdgesFile(rel, w["rows"], w["sha256"], w["bytes"], int(rows[0]), int(rows[-1]) + 1,
                                    tuple(RowGroup(b, r) for b, r in w["row_groups"])))
    manifest = AffinityManifest(
        n=n, input_dim=dim, dim=dim, k=k, perplexities=(perplexity,), features=tuple(features),
        edges=tuple(edge_files), edge_buckets=buckets, n_edges=int(len(head)), knn_method="exact",
        vector_col="vector", id_col="id", label_col=None if labels is None else "label",
        config_hash=hashlib.sha256(str((n, dim, perplexity)).encode()).hexdigest()[:16],
    )
    storage.write_bytes_atomic(fs, storage.join(root, schema.MANIFEST_FILE), manifest_json(manifest))
    return os.fspath(location)


@pytest.fixture(scope="module")
def digits_split(digits):
    X, y = digits
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1400], order[1400:]
    return X[train], y[train], X[test], y[test]


@pytest.fixture(scope="module")
def affinity_dir(tmp_path_factory, digits_split):
    X, y, _, _ = digits_split
    return write_affinity_dir(tmp_path_factory.mktemp("aff") / "affinities", X, y)


def _weights(est: ParametricTSNE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in est.model_.state_dict().items()}


def test_shard_of_is_balanced_and_stable():
    rows = np.arange(20000)
    owners = shard_of(rows, 3)
    counts = np.bincount(owners, minlength=3)
    assert counts.sum() == len(rows) and counts.min() > 0.9 * len(rows) / 3
    np.testing.assert_array_equal(owners, shard_of(rows, 3))
    assert np.all(shard_of(rows, 1) == 0)


def test_shard_of_is_the_edge_bucket_modulo_the_worker_count():
    # Why a worker whose count divides the bucket count reads only its own row groups.
    rows = np.arange(50_000)
    buckets = schema.bucket_of(rows, schema.EDGE_BUCKETS)
    for w in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, 240):
        np.testing.assert_array_equal(shard_of(rows, w), buckets % w)


def test_scanned_features_equal_shared(affinity_dir):
    aff = AffinityDir(affinity_dir)
    X = aff.features_array()
    rows = np.random.default_rng(1).integers(0, aff.manifest.n, 500)
    np.testing.assert_array_equal(ScannedFeatures(aff).fetch(rows), SharedFeatures(X).fetch(rows))


@pytest.mark.parametrize(
    "kwargs",
    [dict(feature_source="disk"), dict(object_store_max_bytes=-1), dict(n_epochs=0), dict(hidden_layers="64")],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises((ValueError, TypeError)):
        DistributedTrainConfig.from_settings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reference_size=-1), "ReferenceConfig: reference_size must be an integer >= 0, got -1"),
        (dict(reference_size=True), "ReferenceConfig: reference_size must be an integer >= 0, got True"),
        (dict(reference_iter=-5), "ReferenceConfig: reference_iter must be 'auto' or an integer >= 0, got -5"),
        # 3 x perplexity 10
        (dict(reference_size=10), "DistributedTrainConfig: reference_size must be 0 .* or more than 30 .*, got 10"),
    ],
)
def test_config_rejects_bad_reference_settings_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedTrainConfig.from_settings(**kwargs)


def test_reference_settings_change_the_model_but_not_the_ray_train_run(affinity_dir):
    base = DistributedTrainConfig.from_settings(**FAST)
    other = base.with_settings(reference_size=500, reference_iter=10)
    assert base.fingerprint() != other.fingerprint()
    assert base.fingerprint(reference=False) == other.fingerprint(reference=False)
    assert run_name(affinity_dir, base, 2) == run_name(affinity_dir, other, 2)
    # One identity: the run's name is that of the network, the model's key adds the reference.
    assert run_name(affinity_dir, base, 2) == "ptsne-train-" + train_key(affinity_dir, base, 2, reference=False)[:12]
    assert train_key(affinity_dir, base, 2) != train_key(affinity_dir, other, 2)
    assert train_key(affinity_dir, base, 2) != train_key(affinity_dir, base, 1)


def test_config_rejects_bad_optimisation_values_by_name():
    with pytest.raises(ValueError, match="positives_per_anchor must be an integer >= 1, got 0"):
        DistributedTrainConfig.from_settings(positives_per_anchor=0)


def test_config_composes_the_core_configs_and_reads_flat_and_legacy_settings():
    # One declaration per setting: the distributed config holds the core's configs, not copies of their fields.
    default = DistributedTrainConfig()
    assert (default.train, default.model, default.reference) == (TrainConfig(), ModelConfig(), ReferenceConfig())
    changed = dict(n_epochs=7, batch_size=64, learning_rate=3e-3, early_exaggeration=6.0,
                   early_exaggeration_fraction=0.5, exaggeration=1.0, dof=0.7, weight_decay=1e-5,
                   positives_per_anchor=1, seed=9, precision="float32")
    config = DistributedTrainConfig.from_settings(**changed, hidden_layers=[8], reference_iter=3)
    assert dataclasses.asdict(config.train) == changed
    assert config.model.hidden_layers == (8,) and config.reference.n_iter == 3
    assert DistributedTrainConfig.from_dict(config.to_dict()) == config
    # The flat dict that checkpoints recorded before the configs were composed.
    legacy = {k: v for k, v in config.settings().items() if k != "layer_norm"}
    assert DistributedTrainConfig.from_dict(legacy) == config
    with pytest.raises(TypeError, match="unknown setting 'random_state'"):
        DistributedTrainConfig.from_settings(random_state=1)


def test_fingerprint_is_that_of_the_flat_settings_of_earlier_versions():
    # Run names and train stamps stay those of runs started before the configs were composed.
    # reference_iter's default became "auto" (iterations by the number of reference points): the
    # network's run keeps its name, a model of the default settings gets a new reference, and the
    # earlier default asked for by name keeps the earlier key.
    assert DistributedTrainConfig.from_settings(reference_iter=100).fingerprint() == "19a82f90ce661edf"
    assert DistributedTrainConfig().fingerprint() == "22dce9c79fc08f21"
    assert DistributedTrainConfig().fingerprint(reference=False) == "85d81b4119d85bcc"
    assert DistributedTrainConfig.from_settings(layer_norm=True).fingerprint() != "19a82f90ce661edf"


def test_rejects_too_many_workers_for_batch(affinity_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        train_distributed(affinity_dir, DistributedTrainConfig.from_settings(batch_size=4), num_workers=3, storage_path=tmp_path)


def test_rejects_bad_edges_ingest_and_on_epoch(affinity_dir, tmp_path):
    with pytest.raises(ValueError, match="edges_ingest"):
        train_distributed(affinity_dir, DistributedTrainConfig.from_settings(), storage_path=tmp_path, edges_ingest="disk")
    # The old ways of shipping edges are accepted and ignored, with a warning.
    with pytest.warns(DeprecationWarning, match="edges_ingest='stream' is ignored"), \
            pytest.raises(ValueError, match="batch_size"):
        train_distributed(affinity_dir, DistributedTrainConfig.from_settings(batch_size=4), num_workers=3, storage_path=tmp_path,
                          edges_ingest="stream")
    with pytest.raises(TypeError, match="on_epoch"):
        train_distributed(affinity_dir, DistributedTrainConfig.from_settings(), storage_path=tmp_path, on_epoch="log")


def test_rejects_training_workers_that_could_share_a_gpu(affinity_dir, tmp_path):
    # NCCL refuses two ranks on one GPU at the first collective: refused before any work.
    with pytest.raises(ValueError, match=r"num_workers=2, gpus_per_worker=0.5: 2 training workers with 0.5 GPU"):
        train_distributed(affinity_dir, DistributedTrainConfig.from_settings(), num_workers=2, use_gpu=True,
                          gpus_per_worker=0.5, storage_path=tmp_path)
    with pytest.raises(ValueError, match="gpus_per_worker > 0"):
        check_gpu_workers(1, True, 0)
    for ok in ((1, True, 0.5), (2, True, 1.0), (4, True, 2.0), (2, False, 0.5)):
        check_gpu_workers(*ok)


def test_checkpoint_written_on_a_gpu_resumes_on_cpu(tmp_path, monkeypatch):
    # torch.save tags each tensor with its device; tagging them "cuda:0" writes the file
    # a GPU worker writes, which plain torch.load cannot read without CUDA.
    import torch.serialization as ser

    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(3, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    monkeypatch.setattr(ser, "_package_registry", list(ser._package_registry))
    ser.register_package(0, lambda storage: "cuda:0", lambda storage, location: None)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / CHECKPOINT_OPTIMIZER)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / CHECKPOINT_OPTIMIZER, weights_only=True)
    state = load_optimizer_state(tmp_path)
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert moments and all(v.device.type == "cpu" for v in moments)
    fresh = torch.optim.Adam(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def kill_rank_zero_once(at_epoch: int, marker: str):
    """A worker callback: rank 0 dies in ``at_epoch`` the first time (a marker file remembers).

    A closure, so that Ray ships it by value to workers that cannot import this test module.
    """

    def callback(epoch: int, metrics: dict) -> bool:
        from pathlib import Path

        import ray.train

        if epoch == at_epoch and ray.train.get_context().get_world_rank() == 0 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        return False

    return callback


@pytest.fixture(scope="module")
def epoch_reports() -> list[dict]:
    """What ``on_epoch`` received during the ``two_worker_run`` fixture, in call order."""
    return []


@pytest.fixture(scope="module")
def two_worker_run(ray_local, affinity_dir, tmp_path_factory, epoch_reports):
    config = DistributedTrainConfig.from_settings(**FAST, seed=3)
    storage = tmp_path_factory.mktemp("ray_results")
    return config, train_distributed(
        affinity_dir, config, num_workers=2, storage_path=storage, on_epoch=epoch_reports.append
    )


def test_two_workers_train_a_good_map(two_worker_run, digits_split):
    config, result = two_worker_run
    X, y, Xt, yt = digits_split
    assert [h["epoch"] for h in result.history] == list(range(config.train.n_epochs))
    # Ray may restart the worker group (a busy machine delays a heartbeat): allowed, as
    # long as every restart resumed from a checkpoint, never from scratch.
    assert all(1 <= e < config.train.n_epochs for e in result.resumed_from), result.resumed_from
    assert result.history[-1]["loss"] < result.history[config.train.early_epochs]["loss"]
    est = result.estimator
    # The estimator records the settings it was trained with.
    params = est.get_params()
    assert params == {**params, **params_of(config.train, config.model, config.reference)}
    dist_acc = knn_accuracy(est.transform(X), y, est.transform(Xt), yt)
    single = ParametricTSNE(
        perplexity=10.0, n_neighbors=30, knn_method="exact", random_state=3, device="cpu", **NET
    ).fit(X)
    single_acc = knn_accuracy(single.transform(X), y, single.transform(Xt), yt)
    # Same protocol, same quality: the distributed path may not lose more than the
    # seed-to-seed spread of this small problem (about +-0.05 in accuracy).
    assert dist_acc >= single_acc - 0.1, (dist_acc, single_acc)


def test_on_epoch_gets_each_epoch_once_in_order_while_training(two_worker_run, epoch_reports):
    config, result = two_worker_run
    assert [m["epoch"] for m in epoch_reports] == list(range(config.train.n_epochs))
    # The same metrics as the history that the last checkpoint carries (an epoch re-run
    # after a restart keeps its figures but not its wall time).
    def untimed(history):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in history]

    assert untimed(epoch_reports) == untimed(result.history)


def test_two_workers_each_read_about_half_of_the_edges(two_worker_run, affinity_dir):
    """Each worker reads only its buckets' row groups; together they own every edge once, compactly."""
    _, result = two_worker_run
    aff = AffinityDir(affinity_dir)
    total = result.edges_bytes_total
    assert len(result.edges_bytes_read) == 2 and total > 0
    for read in result.edges_bytes_read:
        assert 0.3 * total <= read <= 0.7 * total, (read, total)
    assert sum(result.edges_bytes_read) <= total
    assert sum(result.owned_edges) == aff.manifest.n_edges
    assert sum(result.owned_rows) == aff.manifest.n
    for edges, size in zip(result.owned_edges, result.sampler_bytes):
        assert size / edges <= 16, size / edges
    assert len(result.worker_peak_rss_mb) == 2 and min(result.worker_peak_rss_mb) > 0


def test_one_worker_model_does_not_depend_on_how_the_edges_are_split(ray_local, affinity_dir, digits_split,
                                                                      tmp_path):
    """The same P in one edges file or three, in 240 buckets or 7: the same rows, draws and weights."""
    X, y, _, _ = digits_split
    other = write_affinity_dir(tmp_path / "aff1", X, y, parts=1, buckets=7)
    config = DistributedTrainConfig.from_settings(**{**FAST, "n_epochs": 2}, seed=5)
    runs = [train_distributed(d, config, num_workers=1, storage_path=tmp_path / str(i))
            for i, d in enumerate((affinity_dir, other))]
    a, b = (_weights(r.estimator) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in runs:  # one worker reads everything
        assert r.edges_bytes_read == [r.edges_bytes_total] and r.owned_edges == [AffinityDir(affinity_dir).manifest.n_edges]


def stop_after(at_epoch: int):
    """A worker callback that stops training after ``at_epoch`` (a closure, shipped to workers by value)."""
    return lambda epoch, metrics: epoch == at_epoch


def test_training_from_s3_with_s3_storage_resumes_there(ray_local, s3, affinity_dir, digits_split, tmp_path):
    """Affinities and checkpoints in a bucket: the run checkpoints there, and a rerun resumes from it."""
    X, y, _, _ = digits_split
    bucket = s3.bucket()
    remote = write_affinity_dir(f"{bucket}/affinities", X, y)
    config = DistributedTrainConfig.from_settings(**{**FAST, "n_epochs": 2}, seed=5)
    storage_uri = f"{bucket}/ray_results"
    first = train_distributed(remote, config, num_workers=1, storage_path=storage_uri, callbacks=[stop_after(0)])
    assert [h["epoch"] for h in first.history] == [0]
    assert first.checkpoint_path.startswith(storage_uri + "/"), first.checkpoint_path
    keys = s3.keys(storage_uri)
    assert any(k.endswith("epoch-00000/model.safetensors") for k in keys), keys
    assert first.edges_bytes_read == [first.edges_bytes_total] and first.edges_bytes_total > 0
    again = train_distributed(remote, config, num_workers=1, storage_path=storage_uri)
    assert again.resumed_from == [1] and [h["epoch"] for h in again.history] == [0, 1]
    assert any(k.endswith("epoch-00001/model.safetensors") for k in s3.keys(storage_uri))
    # The same data on local disk, trained without a stop: the same weights.
    local = train_distributed(affinity_dir, config, num_workers=1, storage_path=tmp_path)
    a, b = _weights(again.estimator), _weights(local.estimator)
    assert all(torch.equal(a[k], b[k]) for k in a)


# The kill and scan tests below also compare weights with the same fixture run, so the
# default suite checks reproducibility already; this is the plain statement of it.
@pytest.mark.slow
def test_same_seed_same_workers_same_weights(two_worker_run, affinity_dir, tmp_path):
    config, first = two_worker_run
    again = train_distributed(affinity_dir, config, num_workers=2, storage_path=tmp_path, resume=False)
    a, b = _weights(first.estimator), _weights(again.estimator)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_worker_resumes_from_last_checkpoint(two_worker_run, affinity_dir, tmp_path, digits_split):
    config, clean = two_worker_run
    X, y, Xt, yt = digits_split
    killer = kill_rank_zero_once(2, str(tmp_path / "killed"))
    reports = []
    result = train_distributed(
        affinity_dir, config, num_workers=2, storage_path=tmp_path / "runs", max_failures=2, callbacks=[killer],
        on_epoch=reports.append,
    )
    assert (tmp_path / "killed").exists()
    # The restart re-runs the epochs after the last checkpoint; the driver still sees each epoch once.
    assert [m["epoch"] for m in reports] == list(range(config.train.n_epochs))
    # The restarted workers continue after the last checkpoint the controller registered
    # (epoch 1, or epoch 0 when the kill overtook the report of epoch 1), never from scratch;
    # on a busy machine Ray may restart the group once more, again from a checkpoint.
    assert result.resumed_from and all(1 <= e < config.train.n_epochs for e in result.resumed_from), result.resumed_from
    assert any(e <= 2 for e in result.resumed_from), result.resumed_from
    assert [h["epoch"] for h in result.history] == list(range(config.train.n_epochs))
    acc = knn_accuracy(result.estimator.transform(X), y, result.estimator.transform(Xt), yt)
    clean_acc = knn_accuracy(clean.estimator.transform(X), y, clean.estimator.transform(Xt), yt)
    assert abs(acc - clean_acc) <= 0.03, (acc, clean_acc)
    # Draws are seeded per (seed, rank, epoch) and the optimiser state is checkpointed,
    # so the resumed run even reproduces the uninterrupted weights.
    a, b = _weights(result.estimator), _weights(clean.estimator)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "report_seconds, report_steps, epoch, steps, seconds, due",
    [
        (None, None, 3, 10**6, 10**6, False),  # neither criterion: only the phase ends
        (None, None, 4, 1, 0.0, True),  # the last epoch of the early exaggeration (5 of 20)
        (None, None, 19, 1, 0.0, True),  # the last epoch
        (None, 10, 7, 9, 10**6, False),
        (None, 10, 7, 10, 0.0, True),
        (5.0, None, 7, 10**6, 4.9, False),
        (5.0, None, 7, 1, 5.0, True),
        (5.0, 10, 7, 10, 0.1, True),
        (5.0, 10, 7, 3, 6.0, True),
    ],
)
def test_report_is_due_by_time_or_steps_and_at_the_end_of_each_phase(report_seconds, report_steps, epoch, steps,
                                                                       seconds, due):
    config = DistributedTrainConfig.from_settings(n_epochs=20, early_exaggeration_fraction=0.25,
                                                  report_seconds=report_seconds, report_steps=report_steps)
    assert config.train.early_epochs == 5
    assert report_due(config, epoch, steps, seconds) is due


def test_report_settings_are_checked_and_do_not_name_another_run():
    default = DistributedTrainConfig()
    assert (default.report_seconds, default.report_steps) == (5.0, None)
    for bad in (dict(report_seconds=0), dict(report_seconds=-1.0), dict(report_steps=0), dict(report_steps=2.5)):
        with pytest.raises(ValueError, match=f"DistributedTrainConfig: {next(iter(bad))} must be"):
            DistributedTrainConfig.from_settings(**bad)
    # How often a run reports does not change its model: the same Ray Train run, resumable.
    other = default.with_settings(report_seconds=None, report_steps=1)
    assert other.fingerprint() == default.fingerprint()
    assert other.fingerprint(reference=False) == default.fingerprint(reference=False)


#: Epochs of one step each (2 workers x 512 anchors of about 700 rows): small data.
ONE_STEP_EPOCHS = dict(NET, n_epochs=40, batch_size=1024, early_exaggeration_fraction=0.25, seed=2)


@pytest.fixture(scope="module")
def grouped_run(ray_local, affinity_dir, tmp_path_factory):
    """Reports every 10 steps (and at the phase ends) of 40 one-step epochs; the driver's reports beside it."""
    reports = []
    config = DistributedTrainConfig.from_settings(**ONE_STEP_EPOCHS, report_steps=10, report_seconds=None)
    result = train_distributed(affinity_dir, config, num_workers=2, storage_path=tmp_path_factory.mktemp("grouped"),
                               on_epoch=reports.append)
    return config, result, reports


def test_reports_group_the_steps_of_small_epochs_and_keep_the_same_model(grouped_run, affinity_dir, tmp_path):
    config, grouped, reports = grouped_run
    assert [h["epoch"] for h in grouped.history] == [9, 19, 29, 39]
    assert [h["step"] for h in grouped.history] == [10, 20, 30, 40]
    assert all(h["steps"] == h["epochs"] == 10 for h in grouped.history)
    assert [h["phase"] for h in grouped.history] == ["early_exaggeration", "embedding", "embedding", "embedding"]
    # The driver saw each report once, as the history records them.
    assert [m["epoch"] for m in reports] == [9, 19, 29, 39]
    # Reports at the phase ends only: one entry is the mean of the grouped run's last three.
    phases = train_distributed(affinity_dir, config.with_settings(report_steps=None), num_workers=2,
                               storage_path=tmp_path / "phases")
    assert [(h["epoch"], h["steps"]) for h in phases.history] == [(9, 10), (39, 30)]
    for key in ("loss", "attraction", "log_z"):
        assert phases.history[0][key] == grouped.history[0][key]
        want = np.mean([h[key] for h in grouped.history[1:]])
        assert phases.history[1][key] == pytest.approx(want, rel=1e-9, abs=1e-12), key
    assert phases.history[1]["learning_rate"] == grouped.history[-1]["learning_rate"]
    # By time: as many reports as the clocks say (any worker's decides for both), every step in one.
    timed = train_distributed(affinity_dir, config.with_settings(report_steps=None, report_seconds=0.3),
                              num_workers=2, storage_path=tmp_path / "timed")
    ends = [h["epoch"] for h in timed.history]
    assert ends[-1] == 39 and 9 in ends and ends == sorted(set(ends))
    assert sum(h["steps"] for h in timed.history) == 40 and [h["step"] for h in timed.history] == [e + 1 for e in ends]
    for run in (phases, timed):  # how often a run reports does not change its model
        a, b = _weights(run.estimator), _weights(grouped.estimator)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_worker_resumes_from_the_last_grouped_report(grouped_run, affinity_dir, tmp_path):
    config, clean, _ = grouped_run
    killer = kill_rank_zero_once(29, str(tmp_path / "killed"))  # at the third report, before its checkpoint
    result = train_distributed(affinity_dir, config, num_workers=2, storage_path=tmp_path / "runs", max_failures=2,
                               callbacks=[killer])
    assert (tmp_path / "killed").exists()
    # Ray Train takes one report at a time off a worker (polling every 2 s): the third report waits
    # until the first, with the checkpoint of epoch 9, is taken; the second's may still be queued
    # when rank 0 dies. Resumed after either, never from scratch (a busy machine may add a restart).
    assert result.resumed_from and result.resumed_from[0] in (10, 20), result.resumed_from
    assert [h["epoch"] for h in result.history] == [9, 19, 29, 39]
    a, b = _weights(result.estimator), _weights(clean.estimator)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scanned_features_train_the_same_model(two_worker_run, affinity_dir, tmp_path):
    """Beyond the object-store threshold workers gather features by streaming: same draws, same weights."""
    import dataclasses

    config, clean = two_worker_run
    scanned = train_distributed(
        affinity_dir, dataclasses.replace(config, feature_source="scan"), num_workers=2, storage_path=tmp_path
    )
    a, b = _weights(scanned.estimator), _weights(clean.estimator)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_mnist_protocol_distributed_matches_single_process(ray_local, mnist_small, tmp_path, record_property):
    """MNIST protocol (pixels/255, PCA to 50-D on the train split) on 5000 images: 1 and 2 workers vs one process."""
    from ptsne.pca import PCA

    X, y = mnist_small
    Xtr, ytr, Xte, yte = X[:4000], y[:4000], X[4000:], y[4000:]
    pca = PCA(50).fit(Xtr)
    Ztr, Zte = pca.transform(Xtr), pca.transform(Xte)
    aff = write_affinity_dir(tmp_path / "aff", Ztr, ytr, perplexity=30.0)
    settings = dict(n_epochs=60, batch_size=256)  # 900 steps at the default learning rate
    single = ParametricTSNE(perplexity=30.0, knn_method="exact", random_state=0, device="cpu", **settings).fit(Ztr)
    single_acc = knn_accuracy(single.transform(Ztr), ytr, single.transform(Zte), yte)
    record_property("single_process_knn_accuracy", single_acc)
    for workers in (1, 2):
        result = train_distributed(aff, DistributedTrainConfig.from_settings(**settings, seed=0), num_workers=workers,
                                   storage_path=tmp_path / "runs", resume=False)
        est = result.estimator
        acc = knn_accuracy(est.transform(Ztr), ytr, est.transform(Zte), yte)
        record_property(f"workers_{workers}_knn_accuracy", acc)
        record_property(f"workers_{workers}_seconds_per_epoch",
                        float(np.mean([h["seconds"] for h in result.history])))
        assert acc >= single_acc - 0.03, (workers, acc, single_acc)


# -- the reference stage ---------------------------------------------------------------------

REF = dict(reference_size=1000, reference_iter=50)


def test_distributed_training_builds_a_reference_like_the_single_process_one(two_worker_run, affinity_dir,
                                                                                digits_split):
    """Only the reference settings change: Ray Train hands the finished run back, the driver adds a reference."""
    config, clean = two_worker_run
    X, _, Xt, _ = digits_split
    with_ref = config.with_settings(**REF)
    storage = Path(clean.checkpoint_path).parents[1]
    result = train_distributed(affinity_dir, with_ref, num_workers=2, storage_path=storage)
    assert [h["epoch"] for h in result.history] == list(range(config.train.n_epochs))
    est = result.estimator
    assert result.reference_seconds > 0 and est.reference_size == REF["reference_size"]
    rows = reference_rows(len(X), REF["reference_size"], config.train.seed)
    assert len(est.reference_) == len(rows) == REF["reference_size"]
    np.testing.assert_array_equal(est.reference_.vectors, X[rows])
    # The single-process estimator's reference of the same network, sample and seed.
    single = copy.deepcopy(clean.estimator).set_params(**REF)
    single.fit_reference(X[rows], random_state=config.train.seed)
    np.testing.assert_allclose(est.reference_.embedding, single.reference_.embedding, rtol=1e-5, atol=1e-5)
    for method in ("auto", "network"):
        np.testing.assert_allclose(est.transform(Xt, method=method), single.transform(Xt, method=method),
                                   rtol=1e-4, atol=1e-4)
    # Training points land on their reference coordinates; the network alone does not.
    np.testing.assert_array_equal(est.transform(X[rows]), est.reference_.embedding)
    network = est.transform(X[rows], method="network")
    assert not np.allclose(network, est.reference_.embedding, atol=1e-2)
    # Both modes share one frame: the network's map lies near the reference map.
    spread = np.linalg.norm(est.reference_.embedding - est.reference_.embedding.mean(0), axis=1).mean()
    assert np.linalg.norm(network - est.reference_.embedding, axis=1).mean() < spread


def test_reference_of_every_row_uses_the_affinity_directory_p(two_worker_run, affinity_dir, digits_split):
    config, clean = two_worker_run
    X = digits_split[0]
    aff = AffinityDir(affinity_dir)
    edges = aff.read_edges()
    want = joint_probabilities(knn_graph(X, KNNConfig(n_neighbors=aff.manifest.k, method="exact", device="cpu")), 10.0)
    np.testing.assert_allclose(edges.to_csr(len(X)).toarray(), want.to_csr(len(X)).toarray(), rtol=1e-6)
    whole = config.with_settings(reference_size=len(X), reference_iter=50)
    est = fit_reference(copy.deepcopy(clean.estimator), affinity_dir, whole)
    single = copy.deepcopy(clean.estimator).set_params(reference_size=len(X), reference_iter=50)
    single.fit_reference(X, want, random_state=config.train.seed)
    assert len(est.reference_) == len(X)
    np.testing.assert_array_equal(est.reference_.vectors, X)
    np.testing.assert_allclose(est.reference_.embedding, single.reference_.embedding, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(est.transform(X), est.reference_.embedding)
    # reference_size 0: a network-only model.
    none = fit_reference(copy.deepcopy(clean.estimator), aff, config)
    assert none.reference_ is None

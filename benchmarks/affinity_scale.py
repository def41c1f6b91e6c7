"""Scaling of the distributed affinity stage: stage times and peak worker memory vs n.

Generates deterministic Gaussian mixtures (``pipeline.synth``, 50-D, 10 labelled
centres by default) of each requested size, optionally imports MNIST
(70,000 x 784, PCA to 50 dimensions inside the pipeline), runs
``pipeline.affinity.build_affinities`` on each and reports the manifest's stage
timings and per-stage peak worker RSS, plus the growth exponent of the total
time between consecutive sizes (time ~ n^b).

Examples
--------
Small check on a laptop::

    python benchmarks/affinity_scale.py --sizes 20000 --num-cpus 2

The issue's figures (on a machine with room for them)::

    python benchmarks/affinity_scale.py --sizes 100000 1000000 --mnist shared/data/mnist.npz

Results go to ``--workdir`` (default ``./bench-affinity``) and to ``results.json`` there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)

log = logging.getLogger("affinity_scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="synthetic n values")
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--centers", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--mnist", default=None, help="path of mnist.npz (X_train/X_test) to include")
    p.add_argument("--mnist-pca", type=int, default=50)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--knn-method", default="auto", choices=("auto", "exact", "ivf"))
    p.add_argument("--batch-rows", type=int, default=50_000)
    p.add_argument("--task-cpus", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--workdir", default="bench-affinity")
    p.add_argument("--keep", action="store_true", help="keep the generated data and affinity directories")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the small unmeasured run that starts the Ray workers and imports")
    return p.parse_args(argv)


def run_one(name: str, input_dir: str, out_dir: str, args, **extra) -> dict:
    from pipeline.affinity import AffinityJobConfig, build_affinities

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    cfg = AffinityJobConfig(
        input=input_dir, output=out_dir, perplexity=args.perplexity, knn_method=args.knn_method,
        batch_rows=args.batch_rows, task_cpus=args.task_cpus, seed=args.seed, **extra,
    )
    t = time.perf_counter()
    m = build_affinities(cfg)
    wall = time.perf_counter() - t
    row = {
        "name": name, "n": m["n"], "input_dim": m["input_dim"], "dim": m["dim"], "k": m["k"],
        "knn_method": m["knn_method"], "knn_recall": m["knn_recall"], "n_edges": m["n_edges"],
        "wall_s": round(wall, 2), "stages_s": m["timings_s"], "peak_worker_rss_mb": m["peak_worker_rss_mb"],
    }
    log.info("%s: %s", name, json.dumps(row))
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import numpy as np
    import ray

    from pipeline.session import RaySession
    from pipeline.shards import write_array_shards
    from pipeline.synth import SynthConfig, write_synth

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Workers import the repository's packages even when it is not installed.
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    RaySession(args.ray_address, args.num_cpus, log_to_driver=False,
               runtime_env={"env_vars": {"PYTHONPATH": path}}).start()
    results = []
    cpus = ray.cluster_resources().get("CPU")
    try:
        if not args.no_warmup:
            # Worker start-up and imports would otherwise be charged to the first size.
            data = work / "warmup"
            if data.exists():
                shutil.rmtree(data)
            write_synth(SynthConfig(n=2000, dim=args.dim, centers=args.centers, seed=args.seed), str(data))
            run_one("warmup", str(data), str(work / "aff-warmup"), args)
            shutil.rmtree(data)
            shutil.rmtree(work / "aff-warmup")
        for n in args.sizes:
            data = work / f"synth-{n}"
            if data.exists():
                shutil.rmtree(data)
            t = time.perf_counter()
            write_synth(SynthConfig(n=n, dim=args.dim, centers=args.centers, seed=args.seed,
                                    shard_rows=args.shard_rows), str(data))
            gen = time.perf_counter() - t
            row = run_one(f"gmm-{n}", str(data), str(work / f"aff-{n}"), args, label_col="label", id_col="id")
            row["generate_s"] = round(gen, 2)
            results.append(row)
            if not args.keep:
                shutil.rmtree(data)
                shutil.rmtree(work / f"aff-{n}")
        if args.mnist:
            d = np.load(args.mnist)
            X = np.concatenate([d["X_train"], d["X_test"]]).astype(np.float32) / 255.0
            y = np.concatenate([d["y_train"], d["y_test"]])
            data = work / "mnist"
            if data.exists():
                shutil.rmtree(data)
            write_array_shards(str(data), X, y, shard_rows=args.shard_rows)
            results.append(run_one("mnist", str(data), str(work / "aff-mnist"), args,
                                   label_col="label", pca_components=args.mnist_pca))
            if not args.keep:
                shutil.rmtree(data)
                shutil.rmtree(work / "aff-mnist")
    finally:
        ray.shutdown()

    synth = [r for r in results if r["name"].startswith("gmm-")]
    growth = []
    for a, b in zip(synth, synth[1:]):
        exp = math.log(b["wall_s"] / a["wall_s"]) / math.log(b["n"] / a["n"])
        growth.append({"from_n": a["n"], "to_n": b["n"], "time_exponent": round(exp, 3)})
    report = {"settings": vars(args), "cpus": cpus,
              "results": results, "growth": growth}
    (work / "results.json").write_text(json.dumps(report, indent=2))

    stages = ["validate", "pca", "features", "knn_index", "knn_affinities", "symmetrize"]
    print(f"{'run':>12} {'n':>9} {'method':>6} {'recall':>7} " + " ".join(f"{s:>14}" for s in stages)
          + f" {'total s':>8} {'peak MB':>8}")
    for r in results:
        peak = max(r["peak_worker_rss_mb"].values())
        rec = "-" if r["knn_recall"] is None else f"{r['knn_recall']:.3f}"
        print(f"{r['name']:>12} {r['n']:>9} {r['knn_method']:>6} {rec:>7} "
              + " ".join(f"{r['stages_s'].get(s, 0):>14.2f}" for s in stages)
              + f" {r['wall_s']:>8.1f} {peak:>8.0f}")
    for g in growth:
        print(f"time grows as n^{g['time_exponent']} from n={g['from_n']} to n={g['to_n']}")
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MNIST quality benchmark: ptsne against openTSNE, side by side in one run.

Protocol: pixels / 255, PCA to 50-D fitted on the 60k train split, fit on train,
transform the 10k test split. Figures on the test split in 2-D: 1-NN and 10-NN
accuracy against the train embedding, trustworthiness T(12) and kNN recall@10
within the test split; plus fit time, transform time and peak memory. ptsne is
fitted once and scored in both modes: the default (new points placed on the
reference map) and the network alone (``transform(method="network")``, against
the network's map of the train split). For the train maps themselves: t-SNE's
exact objective KL(P || Q) on ptsne's P and the train split's kNN recall@10.

    python benchmarks/mnist.py [--data PATH] [--out DIR] [--skip-opentsne]

Writes ``results.json``, ``results.md`` and ``embeddings.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptsne import ParametricTSNE  # noqa: E402
from ptsne.device import set_num_threads  # noqa: E402
from ptsne.metrics import knn_accuracy, knn_recall, trustworthiness  # noqa: E402
from ptsne.pca import PCA  # noqa: E402

log = logging.getLogger("benchmarks.mnist")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist.npz"


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` above the start."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def load_mnist(path: Path):
    d = np.load(path)
    Xtr = d["X_train"].reshape(len(d["X_train"]), -1).astype(np.float32) / 255.0
    Xte = d["X_test"].reshape(len(d["X_test"]), -1).astype(np.float32) / 255.0
    pca = PCA(50).fit(Xtr)
    return pca.transform(Xtr), d["y_train"].astype(np.int64), pca.transform(Xte), d["y_test"].astype(np.int64)


def evaluate(Ytr, ytr, Yte, yte, Xte) -> dict:
    return {
        "knn_acc_1": knn_accuracy(Ytr, ytr, Yte, yte, k=1),
        "knn_acc_10": knn_accuracy(Ytr, ytr, Yte, yte, k=10),
        "trustworthiness_12": trustworthiness(Xte, Yte, k=12),
        "recall_10": knn_recall(Xte, Yte, k=10),
    }


def run_ptsne(Xtr, Xte, seed: int, threads: int) -> dict[str, dict]:
    """One fit, both modes: ``{"ptsne": default mode, "ptsne network": network only}``."""
    est = ParametricTSNE(random_state=seed, n_threads=threads, verbose=True)
    with PeakRSS() as mem:
        t = time.perf_counter()
        Ytr = est.fit_transform(Xtr)
        fit = time.perf_counter() - t
        t = time.perf_counter()
        Yte = est.transform(Xte)
        transform = time.perf_counter() - t
    t = time.perf_counter()
    Yte_net = est.transform(Xte, method="network")
    transform_net = time.perf_counter() - t
    common = {"fit_s": fit, "peak_mem_mb": mem.peak_mb, "stages_s": est.timings_}
    return {
        "ptsne": {"Ytr": Ytr, "Yte": Yte, "transform_s": transform, **common},
        "ptsne network": {"Ytr": est.transform(Xtr, method="network"), "Yte": Yte_net,
                          "transform_s": transform_net, **common},
    }


def run_opentsne(Xtr, Xte, seed: int, threads: int) -> dict:
    from openTSNE import TSNE

    with PeakRSS() as mem:
        t = time.perf_counter()
        emb = TSNE(n_jobs=threads, random_state=seed).fit(Xtr)
        fit = time.perf_counter() - t
        t = time.perf_counter()
        Yte = np.asarray(emb.transform(Xte))
        transform = time.perf_counter() - t
    # openTSNE's transform re-centres its reference embedding in place: read the map after it.
    return {"openTSNE 1.0.4": {"Ytr": np.array(emb), "Yte": Yte, "fit_s": fit, "transform_s": transform,
                               "peak_mem_mb": mem.peak_mb}}


def train_map_figures(Xtr, results: dict) -> None:
    """Exact KL(P || Q) on ptsne's P and train-split recall@10 of each train map, in place."""
    from ptsne.affinity import joint_probabilities
    from ptsne.knn import exact_neighbors, knn_graph, recall_at_k
    from ptsne.metrics import kl_divergence

    edges = joint_probabilities(knn_graph(Xtr, n_neighbors=90, method="exact"), 30.0)
    ids = np.arange(len(Xtr))
    true = exact_neighbors(Xtr, Xtr, 10, ids)
    for r in results.values():
        r["train_kl"] = kl_divergence(edges, r["Ytr"])
        r["train_recall_10"] = recall_at_k(true, exact_neighbors(r["Ytr"], r["Ytr"], 10, ids))


def scatter(results: dict, ytr, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 7), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ax.scatter(r["Ytr"][:, 0], r["Ytr"][:, 1], c=ytr, cmap="tab10", s=0.3, alpha=0.6, rasterized=True)
        ax.set_title(f"{name}: MNIST train (60k), test 1-NN acc {r['knn_acc_1']:.3f}")
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    rows = ["| method | 1-NN acc | 10-NN acc | T(12) | recall@10 | fit (s) | transform 10k (s) | peak mem (MB) "
            "| train KL | train recall@10 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['knn_acc_1']:.4f} | {r['knn_acc_10']:.4f} | {r['trustworthiness_12']:.4f} "
            f"| {r['recall_10']:.4f} | {r['fit_s']:.1f} | {r['transform_s']:.3f} | {r['peak_mem_mb']:.0f} "
            f"| {r.get('train_kl', float('nan')):.4f} | {r.get('train_recall_10', float('nan')):.4f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mnist.npz path")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--skip-opentsne", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    threads = set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    Xtr, ytr, Xte, yte = load_mnist(args.data)
    runners = [run_ptsne] + ([] if args.skip_opentsne else [run_opentsne])
    results = {}
    for runner in runners:
        log.info("running %s", runner.__name__)
        results.update(runner(Xtr, Xte, args.seed, threads))
    train_map_figures(Xtr, results)
    for name, r in results.items():
        r.update(evaluate(r["Ytr"], ytr, r["Yte"], yte, Xte))
        log.info("%s: %s", name, {k: v for k, v in r.items() if not k.startswith("Y")})
    scatter(results, ytr, args.out / "embeddings.png")
    summary = {name: {k: v for k, v in r.items() if not k.startswith("Y")} for name, r in results.items()}
    summary["_setup"] = {"threads": threads, "cpu_count": os.cpu_count(), "data": str(args.data),
                         "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for fname, text in (("results.json", json.dumps(summary, indent=2)), ("results.md", markdown(results))):
        tmp = args.out / (fname + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out / fname)
    sys.stdout.write(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

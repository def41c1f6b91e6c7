"""Quality benchmark: ptsne (default and network mode) against openTSNE, side by side in one run.

Protocol: PCA to 50-D fitted on the train split, fit on train, transform the test split.
Figures on the test split in 2-D: 1-NN and 10-NN accuracy against the train embedding
(labelled data only), trustworthiness T(12) and kNN recall@10 within the test split; plus
fit time, transform time and peak memory. ptsne is fitted once and scored in both modes: the
default (new points placed on the reference map) and the network alone
(``transform(method="network")``, against the network's map of the train split). For the
train maps themselves: t-SNE's exact objective KL(P || Q) on ptsne's P and the train split's
kNN recall@10.

Data (``--data``): ``mnist`` (pixels / 255, the first ``--n-train`` / ``--n-test`` rows of
each split), or a generated set of :mod:`benchmarks.datasets`: ``deformed-mnist`` (MNIST
digits under random affine and elastic deformations) or ``scrna`` (simulated single-cell
counts along branching paths, log1p CP10k). MNIST is read from ``--mnist`` or ``$PTSNE_MNIST``.

    python benchmarks/compare.py --data deformed-mnist --n-train 200000 --n-test 20000 --mnist mnist.npz

Writes ``results.json``, ``results.md`` and ``embeddings.png`` to ``--out``, the JSON also to
``--json`` (default ``docs/benchmark-compare-<data>-<n-train>.json``), and prints the table.
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
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks import datasets  # noqa: E402
from ptsne import ParametricTSNE  # noqa: E402
from ptsne.device import set_num_threads  # noqa: E402
from ptsne.metrics import knn_accuracy, knn_recall, trustworthiness  # noqa: E402
from ptsne.pca import PCA  # noqa: E402

log = logging.getLogger("benchmarks.compare")
DATA = ("mnist",) + datasets.DATASETS
OPENTSNE = "openTSNE 1.0.4"


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


def load_data(name: str, n_train: int | None, n_test: int | None, seed: int = 0,
              mnist: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X_train, y_train, X_test, y_test)`` of ``name`` before the PCA; sizes ``None``: MNIST's whole
    splits, 60k / 20k for a generated set."""
    if name == "mnist":
        d = datasets.load_mnist_digits(mnist)
        n_train, n_test = n_train or len(d["X_train"]), n_test or len(d["X_test"])
        for flag, n, have in (("--n-train", n_train, len(d["X_train"])), ("--n-test", n_test, len(d["X_test"]))):
            if n > have:
                raise ValueError(f"{flag}={n} exceeds MNIST's {have} rows; use --data deformed-mnist for more")
        return (d["X_train"][:n_train].reshape(n_train, -1).astype(np.float32) / 255.0, d["y_train"][:n_train],
                d["X_test"][:n_test].reshape(n_test, -1).astype(np.float32) / 255.0, d["y_test"][:n_test])
    return datasets.make(name, n_train or 60_000, 20_000 if n_test is None else n_test, seed, mnist)


def pca50(Xtr: np.ndarray, Xte: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Both splits projected on the 50 principal axes of the train split."""
    pca = PCA(50, random_state=seed).fit(Xtr)
    return pca.transform(Xtr), pca.transform(Xte)


def evaluate(Ytr, ytr, Yte, yte, Xte) -> dict:
    """Test-split figures of one method; the label accuracies only where there are labels."""
    out = {}
    if ytr is not None and yte is not None:
        out["knn_acc_1"] = knn_accuracy(Ytr, ytr, Yte, yte, k=1)
        out["knn_acc_10"] = knn_accuracy(Ytr, ytr, Yte, yte, k=10)
    out["trustworthiness_12"] = trustworthiness(Xte, Yte, k=12)
    out["recall_10"] = knn_recall(Xte, Yte, k=10)
    return out


def run_ptsne(Xtr, Xte, seed: int, threads: int, n_epochs: int | str = "auto") -> dict[str, dict]:
    """One fit, both modes: ``{"ptsne": default mode, "ptsne network": network only}``."""
    est = ParametricTSNE(random_state=seed, n_threads=threads, n_epochs=n_epochs, verbose=True)
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
    return {OPENTSNE: {"Ytr": np.array(emb), "Yte": Yte, "fit_s": fit, "transform_s": transform,
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


def figures(results: dict) -> dict:
    """``results`` without the maps: ``{method: {figure: value}}``."""
    return {name: {k: v for k, v in r.items() if not k.startswith("Y")} for name, r in results.items()}


def score(results: dict, Xtr, ytr, Xte, yte) -> None:
    """Every figure of every method in ``results``, in place."""
    train_map_figures(Xtr, results)
    for name, r in results.items():
        r.update(evaluate(r["Ytr"], ytr, r["Yte"], yte, Xte))
        log.info("%s: %s", name, figures({name: r})[name])


def compare(Xtr, ytr, Xte, yte, seed: int = 0, threads: int = 1, opentsne: bool = True,
            n_epochs: int | str = "auto") -> dict:
    """The protocol on features already projected: ptsne in both modes and openTSNE, scored.

    Returns ``{method: {figure: value, "Ytr": train map, "Yte": test map}}``.
    """
    log.info("ptsne on %d train / %d test points", len(Xtr), len(Xte))
    results = run_ptsne(Xtr, Xte, seed, threads, n_epochs)
    if opentsne:
        log.info("openTSNE on %d train / %d test points", len(Xtr), len(Xte))
        results.update(run_opentsne(Xtr, Xte, seed, threads))
    score(results, Xtr, ytr, Xte, yte)
    return results


def scatter(results: dict, ytr, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 7), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ax.scatter(r["Ytr"][:, 0], r["Ytr"][:, 1], c=ytr, cmap="tab10", s=0.3, alpha=0.6, rasterized=True)
        acc = f", test 1-NN acc {r['knn_acc_1']:.3f}" if "knn_acc_1" in r else ""
        ax.set_title(f"{name}: {title}{acc}")
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    return "–" if v is None else format(v, fmt)


def markdown(results: dict, n_test: int | None = None) -> str:
    """One row per method; the test figures, the times, the memory and the train-map figures."""
    transform = f"transform {n_test:,} (s)" if n_test else "transform (s)"
    rows = [f"| method | 1-NN acc | 10-NN acc | T(12) | recall@10 | fit (s) | {transform} | peak mem (MB) "
            "| train KL | train recall@10 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(_cell(r, k, f) for k, f in (
            ("knn_acc_1", ".4f"), ("knn_acc_10", ".4f"), ("trustworthiness_12", ".4f"), ("recall_10", ".4f"),
            ("fit_s", ".1f"), ("transform_s", ".3f"), ("peak_mem_mb", ".0f"), ("train_kl", ".4f"),
            ("train_recall_10", ".4f"))) + " |")
    return "\n".join(rows) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=DATA, default="mnist")
    ap.add_argument("--n-train", type=int, default=None,
                    help="train points (default: MNIST's 60,000; 60,000 for a generated set)")
    ap.add_argument("--n-test", type=int, default=None,
                    help="test points (default: MNIST's 10,000; 20,000 for a generated set)")
    ap.add_argument("--mnist", default=None, help=f"MNIST .npz (default ${datasets.MNIST_ENV})")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory of results.json, results.md, embeddings.png "
                         "(default benchmarks/results/compare/<data>-<n-train>)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the JSON here (default docs/benchmark-compare-<data>-<n-train>.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--skip-opentsne", action="store_true")
    ap.add_argument("--n-epochs", type=int, default=None,
                    help="ptsne's training epochs, for smoke runs only (default: ptsne's own choice)")
    args = ap.parse_args(argv)
    if args.n_epochs is not None and args.n_epochs < 1:
        ap.error(f"--n-epochs must be at least 1, got {args.n_epochs}")
    for flag, n in (("--n-train", args.n_train), ("--n-test", args.n_test)):
        if n is not None and n < 20:
            ap.error(f"{flag} must be at least 20, got {n}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    threads = set_num_threads(args.threads)

    t = time.perf_counter()
    try:
        Xtr, ytr, Xte, yte = load_data(args.data, args.n_train, args.n_test, args.seed, args.mnist)
    except (ValueError, FileNotFoundError) as e:  # a bad size or a missing MNIST: before any work
        log.error("%s", e)
        return 2
    generate_s = time.perf_counter() - t
    tag = f"{args.data}-{len(Xtr)}"
    out = args.out or ROOT / "benchmarks" / "results" / "compare" / tag
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s: %d train / %d test rows x %d columns (%.1f s)", args.data, len(Xtr), len(Xte), Xtr.shape[1],
             generate_s)
    t = time.perf_counter()
    Xtr, Xte = pca50(Xtr, Xte, args.seed)
    pca_s = time.perf_counter() - t

    results = compare(Xtr, ytr, Xte, yte, args.seed, threads, opentsne=not args.skip_opentsne,
                      n_epochs=args.n_epochs or "auto")
    scatter(results, ytr, out / "embeddings.png", f"{args.data} train ({len(Xtr):,})")
    summary = figures(results)
    summary["_setup"] = {"data": args.data, "n_train": len(Xtr), "n_test": len(Xte), "seed": args.seed,
                         "n_epochs": args.n_epochs or "auto",
                         "threads": threads, "cpu_count": os.cpu_count(), "generate_s": generate_s, "pca_s": pca_s,
                         "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    table = markdown(results, len(Xte))
    text = json.dumps(summary, indent=2)
    write_atomic(out / "results.json", text)
    write_atomic(out / "results.md", table)
    write_atomic(args.json or ROOT / "docs" / f"benchmark-compare-{tag}.json", text)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MNIST quality benchmark: ptsne against openTSNE, side by side in one run.

The protocol of ``benchmarks/compare.py`` on MNIST's own splits (60k train, 10k test):
pixels / 255, PCA to 50-D fitted on train, fit on train, transform test; the figures and
the modes are described there.

    python benchmarks/mnist.py [--data PATH] [--out DIR] [--skip-opentsne]

``--data`` is the MNIST ``.npz`` (default ``$PTSNE_MNIST``). Writes ``results.json``,
``results.md`` and ``embeddings.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks import compare, datasets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="mnist.npz path (default $PTSNE_MNIST)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--skip-opentsne", action="store_true")
    args = ap.parse_args(argv)
    if not (args.data or os.environ.get(datasets.MNIST_ENV)):
        ap.error(f"MNIST path not given: pass --data PATH (an .npz with X_train, y_train, X_test, y_test) "
                 f"or set ${datasets.MNIST_ENV}")
    forward = ["--data", "mnist", "--out", str(args.out), "--json", str(args.out / "results.json"),
               "--seed", str(args.seed)]
    forward += ["--mnist", args.data] if args.data else []
    forward += ["--threads", str(args.threads)] if args.threads else []
    forward += ["--skip-opentsne"] if args.skip_opentsne else []
    return compare.main(forward)


if __name__ == "__main__":
    sys.exit(main())

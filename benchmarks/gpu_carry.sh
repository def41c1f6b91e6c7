#!/usr/bin/env bash
# What a bare GPU image needs for the GPU check, carried in folders of wheels of at most 60 MiB
# each (a device call carries 64 MiB; docs/gpu-check.md has the whole sequence).
#
#   bash benchmarks/gpu_carry.sh build                # with the package registry: .whl/gpu-1, .whl/gpu-2, ...
#   bash benchmarks/gpu_carry.sh install .whl/gpu-1   # on the device, once per folder: into .gpu-env/
#   PYTHONPATH=$PWD/.gpu-env:$PWD make gpu-check      # on the device, after the last folder
#
# `build` resolves the check's packages for the image (Python $PY_VERSION, manylinux x86_64),
# leaves out what the image already has ($IMAGE_HAS) and refuses every GPU wheel (FAISS's GPU
# build is too large to carry: the torch search is what runs on the GPU there); then
# benchmarks/gpu_carry.py strips Ray's Java jars and dashboard client from its wheel,
# recompresses the large wheels with LZMA (a few minutes) and packs them, with $DATA_FILES,
# into folders of at most $PART_MIB MiB, the largest first. Both folders are ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=${PY_VERSION:-3.12}
PART_MIB=${PART_MIB:-60}
OUT=${OUT:-.whl}
ENV_DIR=${ENV_DIR:-.gpu-env}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# The device image: torch 2.11 (+ CUDA 13) with its own dependencies, Python 3.12, pyarrow.
IMAGE_HAS=${IMAGE_HAS:-"torch numpy pyarrow filelock typing-extensions sympy mpmath networkx jinja2 markupsafe fsspec setuptools pip nvidia-* triton cuda-*"}
RAY_VERSION=${RAY_VERSION:-$("$PYTHON" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}
FAISS_VERSION=${FAISS_VERSION:-$("$PYTHON" -c 'import faiss; print(faiss.__version__)' 2>/dev/null || echo 1.15.1)}
# Data files carried beside the wheels (the MNIST probe's); missing ones are left out.
DATA_FILES=${DATA_FILES:-../shared/data/mnist.npz}
# Ray core, Train and Data for the Ray probes; FAISS (CPU build: ptsne imports it), openTSNE
# (the reference map) and the project's other dependencies; pytest for the gpu tests.
REQUIREMENTS=${REQUIREMENTS:-"ray[train,data]==$RAY_VERSION faiss-cpu==$FAISS_VERSION openTSNE==1.0.4 scipy scikit-learn safetensors tqdm pyyaml pytest pytest-timeout"}

platforms() {
    local g
    for g in 17 24 27 28 31 34; do printf -- '--platform manylinux_2_%s_x86_64 ' "$g"; done
    printf -- "--platform manylinux2014_x86_64 --platform linux_x86_64"
}

build() {
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    # shellcheck disable=SC2046,SC2086
    "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$work/report.json" --target "$work/t" \
        --python-version "$PY_VERSION" $(platforms) --only-binary=:all: $REQUIREMENTS
    "$PYTHON" benchmarks/gpu_carry.py wanted "$work/report.json" "$IMAGE_HAS" > "$work/wanted.txt"
    mkdir -p "$work/wheels"
    # shellcheck disable=SC2046
    "$PYTHON" -m pip download --quiet --no-deps --dest "$work/wheels" --python-version "$PY_VERSION" $(platforms) \
        --only-binary=:all: $(cat "$work/wanted.txt")
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/gpu_carry.py pack "$work/wheels" "$OUT" "$PART_MIB" $DATA_FILES
}

install() {
    local folder=${1:?usage: gpu_carry.sh install FOLDER}
    mkdir -p "$ENV_DIR"
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install --quiet --no-index --no-deps --upgrade --target "$ENV_DIR" "$folder"/*.whl
    else  # an image without pip: a wheel is a zip of its files laid out for site-packages
        python3 - "$ENV_DIR" "$folder"/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
        # A plain unzip drops the files' modes: Ray's binaries must stay executable.
        find "$ENV_DIR/ray/core" -type f -exec chmod +x {} + 2>/dev/null || true
    fi
    echo "installed $(ls "$folder"/*.whl | wc -l) wheels from $folder into $ENV_DIR"
}

case "${1:-}" in
    build) build ;;
    install) shift; install "$@" ;;
    *) echo "usage: $0 build | install FOLDER" >&2; exit 2 ;;
esac

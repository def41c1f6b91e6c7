#!/usr/bin/env bash
# What a bare GPU image needs for the GPU check, carried in folders of wheels of at most 60 MiB
# each (a device call carries 64 MiB; docs/gpu-check.md has the whole sequence).
#
#   bash benchmarks/gpu_carry.sh build            # here, with the package registry: .whl/gpu-1, .whl/gpu-2, ...
#   bash benchmarks/gpu_carry.sh install .whl/gpu-1   # on the device, once per folder: into .gpu-env/
#   PYTHONPATH=$PWD/.gpu-env:$PWD make gpu-check  # on the device, after the last folder
#
# `build` resolves the check's packages for the image (Python $PY_VERSION, manylinux x86_64),
# leaves out what the image already has ($IMAGE_HAS) and every GPU wheel (FAISS's GPU build is
# too large to carry: the torch search is what runs on the GPU there), strips Ray's Java jars and
# dashboard client from its wheel, recompresses the large wheels with LZMA (a few minutes) and
# packs them into folders of at most $PART_MIB MiB, the largest wheels first. Both folders are
# ignored by git (.whl/, .gpu-env/).
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
# Ray core, Train and Data for the Ray probes; FAISS (CPU build: ptsne imports it), openTSNE
# (the reference map) and the project's pure-Python dependencies; pytest for the gpu tests.
# Data files carried beside the wheels (the MNIST probe's); missing ones are left out.
DATA_FILES=${DATA_FILES:-../shared/data/mnist.npz}
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
    "$PYTHON" - "$work/report.json" "$IMAGE_HAS" > "$work/wanted.txt" <<'EOF'
import fnmatch, json, re, sys
report, image = json.load(open(sys.argv[1])), sys.argv[2].split()
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if any(fnmatch.fnmatch(norm(name), norm(p)) for p in image):
        continue
    if re.search(r"gpu|cuda|cu1[0-9]", norm(name)):
        sys.exit(f"a GPU wheel was resolved ({name}): it is not carried")
    print(f"{name}=={version}")
EOF
    mkdir -p "$work/wheels"
    # shellcheck disable=SC2046
    "$PYTHON" -m pip download --quiet --no-deps --dest "$work/wheels" --python-version "$PY_VERSION" $(platforms) \
        --only-binary=:all: $(cat "$work/wanted.txt")
    # shellcheck disable=SC2086
    "$PYTHON" - "$work/wheels" "$OUT" "$PART_MIB" $DATA_FILES <<'EOF'
"""Strip Ray's wheel, recompress the large wheels with LZMA, pack into folders of at most PART_MIB MiB."""
import copy, os, shutil, sys, zipfile
from pathlib import Path

wheels, out, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) << 20
data_files = [Path(f) for f in sys.argv[4:] if Path(f).is_file()]
DROP = ("ray/jars/", "ray/dashboard/client/build/")  # Java workers and the dashboard's web client
LARGE = 4 << 20  # recompressed: LZMA takes a quarter off Ray's wheel, and pip unpacks it as any zip


def repack(path: Path, drop: tuple[str, ...] = ()) -> None:
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            if (drop and info.filename.startswith(drop)) or info.filename == record:
                continue
            data = src.read(info)
            packed = copy.copy(info)  # keeps each file's mode (raylet is executable)
            packed.compress_type = zipfile.ZIP_LZMA
            dst.writestr(packed, data)
        lines = [line for line in src.read(record).decode().splitlines() if not (drop and line.startswith(drop))]
        dst.writestr(record, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)


for wheel in sorted(wheels.glob("*.whl")):
    before = wheel.stat().st_size
    if wheel.name.startswith("ray-") or before > LARGE:
        repack(wheel, DROP if wheel.name.startswith("ray-") else ())
        print(f"{wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB", flush=True)
files = sorted([*wheels.glob("*.whl"), *data_files], key=lambda p: -p.stat().st_size)
parts: list[list[Path]] = []
for f in files:
    if f.stat().st_size > limit:
        sys.exit(f"{f.name} is {f.stat().st_size / 2**20:.1f} MiB, more than a part of {limit >> 20} MiB")
    for part in parts:
        if sum(p.stat().st_size for p in part) + f.stat().st_size <= limit:
            part.append(f)
            break
    else:
        parts.append([f])
for old in out.glob("gpu-*"):
    shutil.rmtree(old)
for i, part in enumerate(parts, 1):
    folder = out / f"gpu-{i}"
    folder.mkdir(parents=True)
    for f in part:
        shutil.copy2(f, folder / f.name)
    size = sum(p.stat().st_size for p in part) / 2**20
    print(f"{folder}: {len(part)} files, {size:.1f} MiB: {' '.join(sorted(p.name.split('-')[0] for p in part))}")
EOF
}

install() {
    local folder=${1:?usage: gpu_carry.sh install FOLDER}
    mkdir -p "$ENV_DIR"
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install --quiet --no-index --no-deps --upgrade --target "$ENV_DIR" "$folder"/*.whl
    else  # an image without pip: a wheel is a zip of its files laid out for site-packages
        python3 - "$ENV_DIR" "$folder"/*.whl <<'EOF'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
    fi
    # Ray's binaries (raylet, gcs_server) lose their executable bit in a plain unzip.
    find "$ENV_DIR/ray/core" -type f \( -name raylet -o -name gcs_server -o -name "*_server" \) -exec chmod +x {} + \
        2>/dev/null || true
    echo "installed $(ls "$folder"/*.whl | wc -l) wheels from $folder into $ENV_DIR"
}

case "${1:-}" in
    build) build ;;
    install) shift; install "$@" ;;
    *) echo "usage: $0 build | install FOLDER" >&2; exit 2 ;;
esac

"""The Python half of ``benchmarks/gpu_carry.sh``: choose, shrink and pack the wheels a bare GPU image needs.

    python benchmarks/gpu_carry.py wanted REPORT.json "IMAGE_HAS ..."   # name==version per line
    python benchmarks/gpu_carry.py pack WHEELS_DIR OUT_DIR PART_MIB [DATA_FILE ...]

``wanted`` reads pip's installation report (``pip install --dry-run --report``) and prints
the packages the image lacks; a GPU wheel is refused (none is carried). ``pack`` takes
Ray's Java jars and dashboard client out of its wheel, recompresses the large wheels with
LZMA (pip unpacks any zip method Python reads) and packs the wheels and data files into
folders ``OUT_DIR/gpu-1``, ``gpu-2``, ... of at most ``PART_MIB`` MiB each, largest first.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

#: What Ray's wheel holds that the check never runs: the Java workers and the dashboard's web client.
RAY_DROP = ("ray/jars/", "ray/dashboard/client/build/")
#: Wheels above this size are recompressed with LZMA (a quarter off Ray's, half off faiss-cpu's).
LARGE = 4 << 20
GPU_NAME = re.compile(r"gpu|cuda|cu1[0-9]")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted(report: dict, image_has: list[str]) -> list[str]:
    """``name==version`` of each package pip resolved that matches none of ``image_has`` (shell patterns)."""
    out = []
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if any(fnmatch.fnmatch(norm(name), norm(p)) for p in image_has):
            continue
        if GPU_NAME.search(norm(name)):
            raise SystemExit(f"a GPU wheel was resolved ({name}): it is not carried; add it to IMAGE_HAS or drop it")
        out.append(f"{name}=={version}")
    return out


def repack(path: Path, drop: tuple[str, ...] = ()) -> None:
    """Rewrite wheel ``path`` with LZMA, without the files under ``drop`` (and their RECORD lines)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            if info.filename == record or (drop and info.filename.startswith(drop)):
                continue
            data = src.read(info)
            packed = copy.copy(info)  # keeps each file's mode (raylet is executable)
            packed.compress_type = zipfile.ZIP_LZMA
            dst.writestr(packed, data)
        lines = [line for line in src.read(record).decode().splitlines() if not (drop and line.startswith(drop))]
        dst.writestr(record, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)


def shrink(wheels: Path) -> None:
    """Strip Ray's wheel and recompress every large wheel in ``wheels``, in place."""
    for wheel in sorted(wheels.glob("*.whl")):
        before = wheel.stat().st_size
        is_ray = wheel.name.startswith("ray-")
        if is_ray or before > LARGE:
            repack(wheel, RAY_DROP if is_ray else ())
            print(f"{wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB", flush=True)


def plan_parts(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Files into parts of at most ``limit`` bytes: first fit, largest first; one file above it is refused."""
    parts: list[list[str]] = []
    room: list[int] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        size = sizes[name]
        if size > limit:
            raise SystemExit(f"{name} is {size / 2**20:.1f} MiB, more than a part of {limit / 2**20:.0f} MiB")
        for i, free in enumerate(room):
            if size <= free:
                parts[i].append(name)
                room[i] -= size
                break
        else:
            parts.append([name])
            room.append(limit - size)
    return parts


def pack(wheels: Path, out: Path, part_mib: int, data_files: list[Path]) -> list[Path]:
    """Shrink the wheels, then copy them and the data files into ``out/gpu-N`` folders; returns the folders."""
    shrink(wheels)
    files = {p.name: p for p in [*wheels.glob("*.whl"), *(f for f in data_files if f.is_file())]}
    parts = plan_parts({name: p.stat().st_size for name, p in files.items()}, part_mib << 20)
    for old in out.glob("gpu-*"):
        shutil.rmtree(old)
    folders = []
    for i, names in enumerate(parts, 1):
        folder = out / f"gpu-{i}"
        folder.mkdir(parents=True)
        for name in names:
            shutil.copy2(files[name], folder / name)
        size = sum(files[n].stat().st_size for n in names) / 2**20
        print(f"{folder}: {len(names)} files, {size:.1f} MiB: {' '.join(sorted(n.split('-')[0] for n in names))}")
        folders.append(folder)
    return folders


def main(argv: list[str]) -> int:
    if argv[:1] == ["wanted"] and len(argv) == 3:
        print("\n".join(wanted(json.loads(Path(argv[1]).read_text()), argv[2].split())))
        return 0
    if argv[:1] == ["pack"] and len(argv) >= 4:
        pack(Path(argv[1]), Path(argv[2]), int(argv[3]), [Path(f) for f in argv[4:]])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

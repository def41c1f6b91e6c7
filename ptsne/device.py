"""Device selection and thread control shared by every stage.

GPU paths are chosen by detection: ``"auto"`` means CUDA when torch sees a GPU
and CPU otherwise, so the same code runs in CPU-only tests.
"""

from __future__ import annotations

import contextlib
import logging
import os

import faiss
import torch

from ptsne.configs import DEVICES, PRECISIONS  # noqa: F401 (exported)

log = logging.getLogger(__name__)

#: Environment variable that decides what ``precision="auto"`` resolves to (one of
#: ``PRECISIONS``; unset, empty or ``auto``: by the hardware), e.g. ``PTSNE_PRECISION=float32``
#: to train in float32 on a machine with bfloat16 hardware. Explicit precisions are kept.
PRECISION_ENV = "PTSNE_PRECISION"

_TF32_LOGGED: list = []


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but torch sees no CUDA GPU")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def faiss_gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with the CPU build)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def default_num_threads() -> int:
    """Threads for this process: ``OMP_NUM_THREADS`` if set, else the usable cores."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(n: int | None = None) -> int:
    """Set FAISS (OpenMP) and torch intra-op threads to ``n`` (default: the cores).

    Ray workers start with ``OMP_NUM_THREADS=1``; tasks call this with their
    ``num_cpus`` so that workers x threads never exceed the machine's cores.
    """
    n = default_num_threads() if n is None else int(n)
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    return n


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware (CUDA bf16, AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        # Without this flag torch also counts GPUs that only emulate bfloat16 (pre-Ampere), where it is slow.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training forward pass, or None for plain float32.

    ``"auto"`` picks bfloat16 where ``device`` computes it natively (about 3x
    faster on an AVX512-BF16 CPU, at equal map quality on MNIST) and float32
    elsewhere; ``"bfloat16"`` forces it (emulated, slow, without hardware support).
    The environment variable ``PTSNE_PRECISION`` (:data:`PRECISION_ENV`), when set
    to ``"float32"`` or ``"bfloat16"``, is what ``"auto"`` resolves to instead; it
    is read here only, in the process that trains (a Ray worker inherits it from a
    local Ray; on a cluster, pass it in the job's ``runtime_env``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    forced = os.environ.get(PRECISION_ENV, "").strip()
    if forced and forced not in PRECISIONS:
        raise ValueError(
            f"environment variable {PRECISION_ENV} must be one of {PRECISIONS} (or unset), got {forced!r}"
        )
    if precision == "auto" and forced in ("float32", "bfloat16"):
        precision = forced
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return None


def gpu_index(device: str | torch.device) -> int:
    """The CUDA ordinal of ``device``: N for ``"cuda:N"``, else torch's current device (0 without CUDA).

    FAISS GPU indexes are placed on this GPU. Inside a Ray task that was given a
    GPU, the only visible GPU is 0 (Ray sets ``CUDA_VISIBLE_DEVICES``).
    """
    if isinstance(device, str):
        if device.startswith("cuda:"):
            try:
                device = torch.device(device)
            except RuntimeError:
                raise ValueError(f"device must be 'cuda' or 'cuda:N', got {device!r}") from None
        else:
            device = torch.device("cuda" if device == "auto" else device)
    if device.type != "cuda":
        raise ValueError(f"gpu_index: device must be a CUDA device, got {str(device)!r}")
    if device.index is not None:
        return int(device.index)
    return int(torch.cuda.current_device()) if torch.cuda.is_available() else 0


def current_gpu(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` torch's current GPU inside the block (so FAISS, via :func:`gpu_index`, uses it too).

    A no-op for a CPU device or ``cuda`` without an ordinal.
    """
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def use_tf32(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Whether float32 matrix products may use TF32: on CUDA without autocast only, never on CPU.

    TF32 keeps float32's range with a 10-bit mantissa on Ampere and later GPUs
    (several times the float32 matmul rate); the t-SNE gradient is a sum of
    many noisy terms, far coarser than that rounding.
    """
    return torch.device(device).type == "cuda" and autocast_dtype is None


def configure_matmul_precision(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Allow TF32 float32 products on CUDA where :func:`use_tf32` says so; returns whether it did.

    Sets ``torch.backends.cuda.matmul.allow_tf32`` (a CUDA-only switch: CPU
    products are untouched) and logs it once per process.
    """
    if not use_tf32(device, autocast_dtype):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if not _TF32_LOGGED:
        _TF32_LOGGED.append(True)
        log.info("training: float32 on %s with TF32 matrix products", device)
    return True

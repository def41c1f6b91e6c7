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


def faiss_gpu_build() -> bool:
    """Whether FAISS is a GPU build: it has the GPU classes even on a machine (a CPU driver) without a GPU."""
    return hasattr(faiss, "StandardGpuResources")


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


#: The float32 switches of torch >= 2.9 (``fp32_precision``), else the legacy ``allow_tf32`` flags.
#: torch raises when one API reads what the other set, so the project uses one of them only.
TF32_APIS = ("fp32_precision", "allow_tf32")


def tf32_api() -> str:
    """The TF32 switches this torch has: ``"fp32_precision"`` (torch >= 2.9) or ``"allow_tf32"`` (before)."""
    return TF32_APIS[0] if hasattr(torch.backends.cuda.matmul, "fp32_precision") else TF32_APIS[1]


def tf32_settings(tf32: bool, api: str | None = None) -> list[tuple[object, str, object]]:
    """``(module, attribute, value)`` that allow (``tf32``) or forbid TF32 in CUDA float32 products and convolutions.

    ``api`` is one of :data:`TF32_APIS` (default: :func:`tf32_api`): the new per-backend
    ``fp32_precision`` (``"tf32"`` or ``"ieee"``) where torch has it, the legacy
    ``allow_tf32`` flags only where it does not, never both.
    """
    api = tf32_api() if api is None else api
    if api == "fp32_precision":
        value = "tf32" if tf32 else "ieee"
        return [(torch.backends.cuda.matmul, "fp32_precision", value),
                (torch.backends.cudnn.conv, "fp32_precision", value)]
    if api == "allow_tf32":
        return [(torch.backends.cuda.matmul, "allow_tf32", bool(tf32)),
                (torch.backends.cudnn, "allow_tf32", bool(tf32))]
    raise ValueError(f"tf32_settings: api must be one of {TF32_APIS}, got {api!r}")


def tf32_enabled(api: str | None = None) -> bool:
    """Whether CUDA float32 matrix products may use TF32 now, read through the same API :func:`tf32_settings` sets."""
    module, name, _ = tf32_settings(True, api)[0]
    value = getattr(module, name)
    return value == "tf32" if isinstance(value, str) else bool(value)


@contextlib.contextmanager
def matmul_precision(tf32: bool, api: str | None = None):
    """Inside the block CUDA float32 products use TF32 (``tf32``) or IEEE float32; the old switches come back after.

    Training sets TF32 (:func:`use_tf32`) and an exact kNN search forbids it; neither
    leaves its choice behind for the rest of the process.
    """
    settings = tf32_settings(tf32, api)
    saved = [(module, name, getattr(module, name)) for module, name, _ in settings]
    try:
        for module, name, value in settings:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def training_precision(device: torch.device, autocast_dtype: torch.dtype | None):
    """The block training runs in: TF32 float32 products on CUDA where :func:`use_tf32` says so, IEEE elsewhere.

    Logs once per process when it allows TF32; the process's switches are restored after the block.
    On CPU the CUDA switches are left alone.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    tf32 = use_tf32(device, autocast_dtype)
    if tf32 and not _TF32_LOGGED:
        _TF32_LOGGED.append(True)
        log.info("training: float32 on %s with TF32 matrix products", device)
    return matmul_precision(tf32)

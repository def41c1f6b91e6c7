"""The Ray session of a run: connect to the cluster a user names, or start a private local Ray on loopback.

A local Ray started by ``ray.init()`` advertises the host's own address and its
servers (GCS, raylet, workers, agents) accept connections from the network,
guarded only by Ray's token. A run that starts its own Ray needs no peer, so
:func:`start_ray` starts it on ``127.0.0.1``; to reach it from other machines,
start a cluster with ``ray start`` and pass its address (``--ray-address`` or
``RAY_ADDRESS``). :class:`RaySession` is how a command holds its Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: Address a Ray started by :func:`start_ray` binds to and advertises.
LOOPBACK = "127.0.0.1"
#: Read by Ray (in this process and the processes it spawns) to tell whether a node may
#: join other machines; "0" makes Ray keep the loopback address instead of replacing it
#: with the host's network address.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def named_address(address: str | None = None) -> str | None:
    """The cluster the user names: ``address``, else ``RAY_ADDRESS``, else ``None`` (a local Ray).

    Ray's ``"local"`` (start a new local instance) names no cluster either.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts its processes: keep ``127.0.0.1`` as the node address.

    On Linux Ray turns a loopback node address into the host's network address
    (so that other nodes could join); with its cluster switch off it keeps it, in
    this process (a module constant read at call time) and in the processes it
    spawns now (the environment). Both are restored afterwards.
    """
    from ray._private import ray_constants

    previous_env = os.environ.get(_CLUSTER_ENV)
    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_CLUSTER_ENV] = "0"
    if previous is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = previous_env
        if previous is not None:
            ray_constants.ENABLE_RAY_CLUSTER = previous


def quiet_init_kwargs(address: str | None = None) -> dict:
    """``ray.init`` options of a run: a local Ray stays quiet; a cluster's worker logs reach the driver."""
    return {} if named_address(address) else {"log_to_driver": False, "include_dashboard": False}


def start_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs) -> bool:
    """Connect this process to Ray unless it already is; True when this call did (the caller shuts it down).

    Parameters
    ----------
    address : str, optional
        Cluster to connect to; default ``RAY_ADDRESS``; without either a new
        local Ray is started on ``127.0.0.1`` (never an existing one found on the machine).
    num_cpus : int, optional
        CPUs of a local Ray (default: all); ignored when connecting to a cluster.
    **init_kwargs
        Passed to ``ray.init`` (``log_to_driver``, ``include_dashboard``, ...).
    """
    import ray

    if ray.is_initialized():
        return False
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be an integer >= 1 or None, got {num_cpus!r}")
    address = named_address(address)
    if address is not None:
        ray.init(address=address, **init_kwargs)
        return True
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        log.warning("the local Ray advertises %s instead of %s; it may accept connections from the network",
                    node_ip, LOOPBACK)
    return True


class RaySession:
    """The Ray of one command: connected on first need, shut down at the end if the command brought it up.

    ``with RaySession(address, num_cpus) as ray_session:`` starts nothing;
    :meth:`start` connects (:func:`start_ray`, with :func:`quiet_init_kwargs`
    unless ``init_kwargs`` say otherwise), so a run with nothing to do costs no
    Ray start-up. On exit Ray is shut down when it was not running on entry and
    is now, whether :meth:`start` or a stage called in the block brought it up;
    a Ray the caller had already started (a test's, a notebook's) is left alone.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, **init_kwargs):
        self.address = address
        self.num_cpus = num_cpus
        self.init_kwargs = {**quiet_init_kwargs(address), **init_kwargs}
        self._was_running = _ray_running()

    def start(self) -> bool:
        """Connect unless already connected; True when this call did."""
        return start_ray(self.address, self.num_cpus, **self.init_kwargs)

    def close(self) -> None:
        if not self._was_running and _ray_running():
            sys.modules["ray"].shutdown()

    def __enter__(self) -> RaySession:
        self._was_running = _ray_running()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ray_running() -> bool:
    """Whether this process is connected to Ray, without importing Ray (slow) when nothing did."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()

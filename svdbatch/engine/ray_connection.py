"""run.engine=ray: joining (or starting) the Ray cluster of a run and resolving its actors'
devices. ray_engine.py runs the work on it. Ray is optional: imported only with run.engine=ray.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

import ray
import torch

from svdbatch.core.errors import ConfigError
from svdbatch.models.devices import parse_device

log = logging.getLogger(__name__)


class RayConnection:
    """The Ray cluster of one run: joined (or started) on first use, left by close()."""

    def __init__(self, run_cfg: Any):
        self.cfg = run_cfg.ray
        self.devices_setting = run_cfg.devices
        self.workers = run_cfg.workers
        self.connected_here = False
        self._devices: list[torch.device] | None = None

    def connect(self) -> None:
        if ray.is_initialized():  # e.g. a notebook or test that called ray.init itself: use it, keep it
            return
        kwargs: dict[str, Any] = {"address": self.cfg.address, "log_to_driver": True}
        joining = cluster_to_join(self.cfg.address)
        if joining is not None:
            check_reachable(joining, self.cfg.address or os.environ.get("RAY_ADDRESS"))
        else:
            kwargs["include_dashboard"] = self.cfg.include_dashboard
            kwargs["num_cpus"] = self.cfg.num_cpus
            if self.cfg.object_store_mb is not None:
                kwargs["object_store_memory"] = self.cfg.object_store_mb * 2**20
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            context = ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.cfg.address or os.environ.get("RAY_ADDRESS") or "a local cluster"
            raise ConfigError(f"run.engine=ray: could not join {where} (run.ray.address): {exc}") from exc
        self.connected_here = True
        if threading.current_thread() is threading.main_thread():
            # ray.init installs a SIGTERM handler that exits at once; the driver's clean stop
            # (stops.py) stops the actors and says what is left, as for a local run.
            signal.signal(signal.SIGTERM, sigterm)
        log.info(
            "ray: %s %s (%s)",
            "joined" if joining else "started a local cluster at",
            # ray.init returns a RayContext here (a Ray Client ClientContext, for ray://, has no address_info).
            context.address_info.get("gcs_address"),  # type: ignore[attr-defined]
            resources_line(),
        )

    def close(self) -> None:
        """Leave the cluster; a local cluster this driver started is shut down with it."""
        if self.connected_here:
            ray.shutdown()
            self.connected_here = False

    def devices(self) -> list[torch.device]:
        """What each actor will run on (the driver plans item keys with the first one's dtype)."""
        if self._devices is None:
            self.connect()
            gpus = int(ray.cluster_resources().get("GPU", 0))
            self._devices = actor_devices(self.devices_setting, self.workers, gpus)
        return self._devices


def actor_devices(devices: Any, workers: int, cluster_gpus: int) -> list[torch.device]:
    """One entry per actor, as run.devices reads on a cluster: "auto" = one per GPU of the
    cluster (else run.workers CPU actors), n = n GPU actors (an autoscaling cluster adds the
    nodes), a list = one actor per entry ("cpu" or a GPU; Ray picks which GPU)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if devices == "auto" or devices is None:
        return [cuda] * cluster_gpus if cluster_gpus else [cpu] * max(1, workers)
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ConfigError(f"run.devices: must be at least 1 GPU, got {devices}")
        return [cuda] * devices
    names = [devices] if isinstance(devices, str) else list(devices)
    if not names:
        raise ConfigError("run.devices is empty")
    resolved = []
    for name in names:
        device = parse_device(name)
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"run.devices: {name!r}: a Ray actor runs on 'cpu' or a GPU")
        resolved.append(cuda if device.type == "cuda" else cpu)
    return resolved


def cluster_to_join(address: str | None) -> str | None:
    """What ray.init(address) will join: "host:port", a "ray://" URL (Ray Client), or None
    when it starts a local cluster (only then do num_cpus and the object store apply)."""
    if address == "local":
        return None
    if address is not None and "://" in address:
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # moved in some Ray version: fall back on what the address says
        return address or os.environ.get("RAY_ADDRESS") or None
    try:
        # Ray annotates addr as str, but documents and handles None (RAY_ADDRESS, else a new cluster).
        return canonicalize_bootstrap_address(address)  # type: ignore[arg-type]
    except ConnectionError:
        return "auto"  # "auto" without a cluster: ray.init says so


def check_reachable(address: str, given: str | None, timeout_s: float = 10.0) -> None:
    """Ray retries an address nobody listens on for minutes; a plain TCP connect says at once."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"run.engine=ray: no Ray cluster answers at {given or address} ({exc}); check run.ray.address or RAY_ADDRESS "
            "(the head node's `ray start --head` prints it), or leave both unset to start a local cluster"
        ) from None


def resources_line() -> str:
    total = ray.cluster_resources()
    return f"{len(ray.nodes())} nodes, {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"

"""What every launcher does, whether its workers are local processes or Ray actors.

A launcher starts a cluster's workers, grows and shrinks a role's pool at runtime and stops
everything it started. It does not route: `serving.py` keeps the router's pools equal to
`workers()` (a worker added, removed, or restarted under a new address joins or leaves the router
without anyone telling it). The elastic-serving work calls `add_worker` / `remove_worker`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerHandle:
    """One running worker as the router reaches it."""

    role: str
    index: int
    address: str  # host:port of its RPC server
    pid: int  # of the `pdserve serve` process (on its node)
    node_id: str = ""  # the node it runs on (Ray's node id; the host name locally)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


class Launcher(ABC):
    """Starts, grows, shrinks and stops one cluster's workers. Methods block until done and may
    be called from any thread."""

    @abstractmethod
    def start(self, secret: str) -> list[WorkerHandle]:
        """Start the cluster's configured workers; return once every one accepts connections
        (raises, having stopped what it started, if one cannot start)."""

    @abstractmethod
    def workers(self) -> list[WorkerHandle]:
        """The workers as of now; a restarted worker is listed under its new address."""

    @abstractmethod
    def add_worker(self, role: str) -> WorkerHandle:
        """Start one more worker of `role`; returns once it accepts connections."""

    @abstractmethod
    def remove_worker(self, role: str, address: str = "") -> WorkerHandle | None:
        """Drain and stop the newest worker of `role` (its in-flight requests finish first);
        None if the role has none. With `address`: the worker there, whatever role it was started
        in (a worker that switched roles at runtime is still listed under its first role)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every worker this launcher started (drain, then kill what outlives the grace)."""


def make_launcher(cfg) -> Launcher:  # type: ignore[no-untyped-def]
    """The launcher `cfg.launch.launcher` names (Ray is imported only for `ray`)."""
    if cfg.launch.launcher == "ray":
        try:
            from pdserve.launch.ray_launcher import RayLauncher
        except ModuleNotFoundError as e:
            if e.name != "ray":
                raise
            from pdserve.config.schema import ConfigError

            raise ConfigError("launcher: ray needs Ray installed (pip install 'pdserve[ray]')") from None
        return RayLauncher(cfg)
    from pdserve.launch.local import LocalLauncher

    return LocalLauncher(cfg)

"""A torch.distributed group of its own (apart from DeepSpeed's and vLLM's default groups)."""
from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist


def route_ip(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent). Gloo would otherwise bind
    to what the hostname resolves to, often 127.0.0.1, which a peer on another host cannot reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def interface_of(ip: str) -> str | None:
    """The network interface holding `ip` (for GLOO_SOCKET_IFNAME), if any."""
    import psutil
    return next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == ip for a in addrs)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TorchDistTransport:
    """Broadcast over gloo (CPU tensors) or nccl (CUDA tensors); only the backend and device differ."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=self.timeout)
        prefix = dist.PrefixStore("groupflow-weight-sync", store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = self.timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=route_ip(host))]
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, opts)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
        else:
            raise ValueError(f"unknown weight-sync backend {backend!r} (gloo or nccl)")
        self._store = store  # the master's store must outlive the group

    def start_broadcast(self, flat: torch.Tensor) -> Callable[[], None]:
        """Start it and return its wait: the next bucket is packed or loaded meanwhile. The wait ends
        early, raising Aborted, once anyone calls abort() on the group's store: a member that died
        leaves the others blocked (gloo breaks the sender's pairs, not every receiver's)."""
        work = self.pg.broadcast([flat], dist.BroadcastOptions())

        def wait() -> None:
            deadline = time.monotonic() + self.timeout.total_seconds()
            next_look, nap = 0.0, 1e-4
            while not work.is_completed():
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"weight broadcast of {flat.numel()} elements timed out "
                                       f"after {self.timeout.total_seconds()}s (rank {self.rank})")
                if now >= next_look:  # a store round trip twice a second, not per poll
                    if self._store.check([ABORT_KEY]):
                        _ABANDONED.append(self)  # its blocked work must never be joined by a destructor
                        raise Aborted(f"weight broadcast aborted (rank {self.rank}): a member of the group died")
                    next_look = now + 0.5
                time.sleep(nap)
                nap = min(2 * nap, 0.01)  # short waits stay short, long ones cost no CPU
            work.wait()  # raises the op's own error, if it failed
        return wait

    def broadcast(self, flat: torch.Tensor) -> None:
        self.start_broadcast(flat)()


class Aborted(RuntimeError):
    """A broadcast given up because the group was aborted (see abort)."""


ABORT_KEY = "groupflow-weight-sync-abort"
_ABANDONED: list = []  # transports with a blocked broadcast: kept, so nothing waits to destroy them


def abort(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Tell every member of the group whose store is at host:port to give up its broadcast in flight."""
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set(ABORT_KEY, "1")

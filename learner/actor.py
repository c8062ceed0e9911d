"""LearnerActor: one DeepSpeed rank (ZeRO-3 with several ranks) of the policy, its frozen reference (where
read) and, for PPO, its value model. Every method is collective: the driver calls it on all ranks at once
(LearnerGroup does that). The work itself is in rl.py; this class holds state between calls.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import ray
import torch

from . import rl
from .config import AlgorithmConfig, LearnerConfig, zero_stage
from .models import build_engines, micro_size, quiet

log = logging.getLogger("groupflow.learner")


@ray.remote
class LearnerActor:
    def __init__(self, cfg: LearnerConfig, algo: AlgorithmConfig, model_path: str, rank: int,
                 world_size: int, local_batch: int, temperature: float, max_new_tokens: int,
                 ref_path: str | None = None, version: int = 0):
        logging.basicConfig(level=logging.INFO, format=f"[learner {rank}] %(message)s")
        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        self.model_path, self.local_batch, self.temperature = model_path, local_batch, temperature
        self.max_new_tokens = max_new_tokens  # the constant of Dr.GRPO's token-sum normalization
        self.micro = micro_size(cfg, local_batch)
        self.ref_path = ref_path or model_path  # a resumed run keeps the original model as pi_ref
        self.version = version  # the policy version: updates applied (a resumed run starts at its step)
        self._prep: dict[int, object] = {}  # pi_old/pi_ref of each prepared batch, by batch id
        from ray.util.metrics import Gauge  # live on Ray's metrics endpoint (Prometheus)
        self._busy = Gauge("groupflow_learner_busy", "1 while the rank scores or trains", ("run", "role", "rank"))
        self._busy.set_default_tags({"run": ray.get_runtime_context().get_job_id(), "role": "learner",
                                     "rank": str(rank)})
        self._busy.set(0)

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's serve as MASTER_ADDR/PORT and the sync store."""
        from weightsync.torch_dist import free_port
        return ray.util.get_node_ip_address(), free_port()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def setup(self, master_addr: str, master_port: int, mode: str = "rl", ranks_on_node: int = 1) -> int:
        """Join the ranks' process group and build the DeepSpeed engines (collective).

        mode "rl": policy + reference where read (+ critic for ppo); "sft": the policy alone. On a CPU the ranks
        sharing this node share its cores (`learner.threads` overrides). LOCAL_RANK stays 0: Ray shows
        each rank its own GPU as cuda:0.
        """
        cfg = self.cfg
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from weightsync.torch_dist import interface_of, route_ip
        iface = interface_of(route_ip(master_addr))  # ranks on several hosts: not the loopback
        if iface and iface != "lo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        if cfg.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // ranks_on_node))
        import deepspeed
        import transformers
        from transformers import AutoTokenizer

        quiet(deepspeed, transformers)
        deepspeed.init_distributed(dist_backend="gloo" if cfg.device == "cpu" else "nccl")
        self.device = torch.device("cpu") if cfg.device == "cpu" else torch.device("cuda", 0)
        # kept: a checkpoint saves it, and the checkpoint this run resumed from may be pruned by then
        self.tokenizer = tok = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        start = time.monotonic()
        rl_mode = mode == "rl"
        self.engines = build_engines(cfg, self.model_path, self.world_size, self.local_batch,
                                     with_ref=rl_mode and self.algo.uses_reference,
                                     with_critic=rl_mode and self.algo.uses_critic,
                                     critic_lr=self.algo.ppo.critic_lr, ref_path=self.ref_path)
        self.engine = self.engines["policy"]
        self._transport = None
        log.info("%s up in %.1fs (ZeRO-%d, %s)", "+".join(self.engines), time.monotonic() - start,
                 zero_stage(cfg), cfg.dtype)
        return self.rank

    # ---- training -------------------------------------------------------------------------
    def prepare(self, shard: dict) -> dict:
        """Score a rollout shard under pi_old and pi_ref (and the critic) before any update, kept under
        the shard's batch id until `train` takes it; rows whose update computes pi_old itself (the
        first minibatch) are left to `train`."""
        start = time.monotonic()
        self._busy.set(1)
        try:
            for e in self.engines.values():
                e.eval()
            skip = []
            if self.cfg.reuse_policy_logprobs and rl.reuses_policy(self.algo):
                skip = rl.minibatch_orders(shard, self.cfg.epochs, self.cfg.minibatches)[0][0]
            self._prep[shard["batch_id"]], kl_sums = rl.prepare(
                self.engines, shard, self.algo, self.temperature, self.micro, self.pad_id, self.device,
                self.cfg.shared_prefix, skip)
        finally:
            self._busy.set(0)
        return {"kl_sum": kl_sums, "time_s": time.monotonic() - start}

    def train(self, shard: dict) -> dict:
        """epochs x minibatches updates on the shard `prepare` saw (same batch id), now with its
        advantages; returns the update's metrics and, under "scored", the statistics of pi_old and pi_ref."""
        prep = self._prep.pop(shard["batch_id"], None)
        if prep is None:
            raise RuntimeError(f"train() of batch {shard['batch_id']} before its prepare(): no pi_old for it")
        start = time.monotonic()
        self._busy.set(1)
        try:
            metrics = rl.train(self.engines, shard, prep, self.algo, self.cfg.epochs, self.cfg.minibatches,
                               self.temperature, self.micro, self.pad_id, self.max_new_tokens, self.device,
                               self.cfg.shared_prefix, self.cfg.skip_zero_advantage)
        finally:
            self._busy.set(0)
        self.version += 1
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=float(self.engine.get_lr()[0]), time_learner_s=time.monotonic() - start,
                       policy_version=self.version)
        return metrics

    def sft_train(self, shard: dict) -> dict:
        start = time.monotonic()
        metrics = rl.sft_train(self.engine, shard, self.cfg.minibatches, self.micro, self.pad_id, self.device,
                               self.cfg.shared_prefix)
        metrics.update(lr=float(self.engine.get_lr()[0]), time_learner_s=time.monotonic() - start)
        return metrics

    def peak_memory(self) -> dict:
        """This rank's high-water mark: process RSS (CPU) and, on GPUs, torch's allocator peak."""
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    # ---- weights out ----------------------------------------------------------------------
    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.engine.module.named_parameters())

    def sync_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self._named_params()]

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str, timeout_s: float):
        if self.rank == 0:  # only rank 0 is in the sync group; it is the TCP store's master
            from weightsync.torch_dist import TorchDistTransport
            self._transport = TorchDistTransport(host, port, 0, world_size, backend, timeout_s)
        return self.rank

    def broadcast_weights(self, plan) -> int:
        """Gather each bucket's parameters from the ZeRO shards (all ranks), rank 0 broadcasts it;
        bucket k+1 is gathered and packed while bucket k is on the wire. The policy version goes
        first, so the engines record the version of the weights they actually got. Returns it."""
        import deepspeed
        from weightsync.plan import DTYPES, pack

        params = dict(self._named_params())
        error: Exception | None = None  # rank 0 keeps gathering after a failed send: the others wait for it
        wait = None
        if self.rank == 0:
            try:
                self._transport.broadcast(torch.tensor([self.version], dtype=torch.int64, device=self.device))
            except Exception as e:  # noqa: BLE001 - raised below, once every rank is through
                error = e
        for bucket in plan.buckets:
            group = [params[s.name] for s in bucket]
            with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                # a packed copy: the gathered parameters may be released while it travels
                flat = pack(group, DTYPES[plan.dtype], self.device) if self.rank == 0 and error is None else None
            if flat is not None:
                try:
                    if wait is not None:
                        wait()
                    wait = self._transport.start_broadcast(flat)
                except Exception as e:  # noqa: BLE001
                    error, wait = e, None
        if wait is not None:
            try:
                wait()
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            raise error
        return self.version

    def raw_broadcast(self, numel: int, dtype: str) -> None:
        """Benchmark floor: one flat buffer of `numel` elements over the weight-sync group."""
        from weightsync.plan import DTYPES
        self._transport.broadcast(torch.zeros(numel, dtype=DTYPES[dtype], device=self.device))

    def _trained(self) -> list[str]:  # the reference is the fixed start: nothing of it to save
        return [r for r in ("policy", "critic") if r in self.engines]

    def counters(self) -> dict:
        """What this rank's state says of how far it trained: policy version and optimizer steps
        (a checkpoint's parts must agree with its step: cluster/checkpoint.py verify)."""
        return {"policy_version": self.version, "optimizer_steps": int(self.engine.global_steps)}

    def save_checkpoint(self, path: str, full: bool = True) -> dict:
        """Write into `path` (a fresh temp dir the driver renames once every rank is done):
        rank 0 the HF safetensors export and tokenizer; with `full`, every rank its DeepSpeed shards
        (weights, optimizer moments, scheduler; the critic's too) and its RNG state. Returns the
        counters of the state written."""
        import deepspeed

        out = Path(path)
        if full:
            for role in self._trained():
                self.engines[role].save_checkpoint(str(out / "deepspeed"), tag=role, save_latest=False)
            (out / "rng").mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), out / "rng" / f"rank_{self.rank}.pt")
        state = {}
        for name, p in self._named_params():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    state[name] = p.detach().to("cpu", torch.float32).clone()
        if self.rank == 0:
            self.engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)
        return self.counters()

    def load_checkpoint(self, path: str) -> dict:
        """Continue exactly where `save_checkpoint(path, full=True)` left off: DeepSpeed states of
        every trained engine and this rank's RNG. Returns the roles restored, whether its RNG was, and
        the counters of the state loaded."""
        out, restored = Path(path), []
        for role in self._trained():
            if (out / "deepspeed" / role).is_dir():
                loaded, _ = self.engines[role].load_checkpoint(str(out / "deepspeed"), tag=role)
                if loaded is None:
                    raise RuntimeError(f"learner rank {self.rank}: DeepSpeed could not load {out / 'deepspeed' / role}")
                restored.append(role)
        rng = out / "rng" / f"rank_{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return {"restored": restored, "rng": rng.is_file(), **self.counters()}


def _rng_state() -> dict:
    import random

    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

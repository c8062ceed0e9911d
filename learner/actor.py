"""LearnerActor: one DeepSpeed rank (ZeRO-3 by default) of the policy, plus its frozen reference.

Every method is collective: the driver calls it on all ranks at once (LearnerGroup does that).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import ray
import torch

from .algorithms import grpo_loss, masked_mean
from .batch import Micro, completion_logprobs, make_micro, stack_padded
from .config import AlgorithmConfig, LearnerConfig

log = logging.getLogger("groupflow.learner")


def micro_size(cfg: LearnerConfig, local_batch: int) -> int:
    return min(cfg.micro_batch_size, local_batch // cfg.minibatches)


def ds_config(cfg: LearnerConfig, world_size: int, local_batch: int, train: bool) -> dict:
    micro = micro_size(cfg, local_batch)
    conf = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": max(1, local_batch // cfg.minibatches // micro),
        "zero_optimization": {"stage": cfg.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }
    if train:
        conf["gradient_clipping"] = cfg.grad_clip
        conf["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.adam_betas), "weight_decay": cfg.weight_decay,
            # torch's AdamW needs no compiled op: nothing to build on a CPU box
            "torch_adam": cfg.device == "cpu"}}
        if cfg.warmup_steps:
            conf["scheduler"] = {"type": "WarmupLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": cfg.warmup_steps,
                "warmup_type": "linear"}}
    else:
        conf["train_batch_size"] = micro * world_size  # inference-only engine; value unused
        conf.pop("gradient_accumulation_steps")
    return conf


def _quiet(deepspeed, transformers) -> None:
    """Library chatter (deprecations, load bars) would bury the driver's progress bar."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@ray.remote
class LearnerActor:
    def __init__(self, cfg: LearnerConfig, algo: AlgorithmConfig, model_path: str, rank: int,
                 world_size: int, local_batch: int, temperature: float, max_new_tokens: int):
        logging.basicConfig(level=logging.INFO, format=f"[learner {rank}] %(message)s")
        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        self.model_path, self.local_batch, self.temperature = model_path, local_batch, temperature
        self.max_new_tokens = max_new_tokens  # the constant of Dr.GRPO's token-sum normalization
        self.micro = micro_size(cfg, local_batch)

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's serve as MASTER_ADDR/PORT and the sync store."""
        from cluster.sync.torch_dist import free_port
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the ranks' process group and build the DeepSpeed engines (collective)."""
        cfg, world_size, local_batch, model_path = self.cfg, self.world_size, self.local_batch, self.model_path
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if cfg.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world_size))
        import deepspeed
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet(deepspeed, transformers)
        deepspeed.init_distributed(dist_backend="gloo" if cfg.device == "cpu" else "nccl")
        self.device = torch.device("cpu") if cfg.device == "cpu" else torch.device("cuda", 0)
        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        start = time.monotonic()
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        self.engine, *_ = deepspeed.initialize(
            model=policy, model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=ds_config(cfg, world_size, local_batch, train=True))
        ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        ref.requires_grad_(False)
        self.ref, *_ = deepspeed.initialize(model=ref, config=ds_config(cfg, world_size, local_batch, train=False))
        self._transport = None
        log.info("policy and reference up in %.1fs (ZeRO-%d, %s)", time.monotonic() - start,
                 cfg.zero_stage, cfg.dtype)
        return self.rank

    # ---- training -------------------------------------------------------------------------
    def _micros(self, shard: dict, order: list[int]) -> list[Micro]:
        m = self.micro
        return [make_micro([shard["prompt_token_ids"][i] for i in order[k: k + m]],
                           [shard["completion_token_ids"][i] for i in order[k: k + m]],
                           order[k: k + m], self.pad_id).to(self.device)
                for k in range(0, len(order), m)]

    @torch.no_grad()
    def _score(self, model, micros: list[Micro]) -> dict[int, torch.Tensor]:
        out = {}
        for mb in micros:
            logp = completion_logprobs(model, mb, self.temperature)
            for j, i in enumerate(mb.rows):
                out[i] = logp[j].float()
        return out

    def train(self, shard: dict) -> dict:
        """One rollout batch: pi_old and pi_ref logprobs first, then epochs x minibatch updates."""
        n = len(shard["advantage"])
        rows = list(range(n))
        start = time.monotonic()
        self.engine.eval()
        micros = self._micros(shard, rows)
        old = self._score(self.engine, micros)
        ref = self._score(self.ref, micros)
        # Evidence the engines hold our weights: their logprobs vs ours, before we update.
        diffs = [(old[i][: len(lp)] - torch.tensor(lp, device=self.device)).abs()
                 for i, lp in enumerate(shard["logprobs"]) if len(lp)]
        diff_sum = float(sum(d.sum() for d in diffs))
        diff_n = sum(d.numel() for d in diffs)

        self.engine.train()
        sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
        count = 0
        per_mb = n // self.cfg.minibatches
        g = torch.Generator().manual_seed(int(shard.get("seed", 0)))
        a = self.algo
        for _ in range(self.cfg.epochs):
            perm = torch.randperm(n, generator=g).tolist()
            for k in range(self.cfg.minibatches):
                for mb in self._micros(shard, perm[k * per_mb: (k + 1) * per_mb]):
                    C = mb.comp_ids.size(1)
                    old_lp = stack_padded([old[i] for i in mb.rows], C)
                    ref_lp = stack_padded([ref[i] for i in mb.rows], C)
                    adv = torch.tensor([shard["advantage"][i] for i in mb.rows], device=self.device)
                    logp, ent = completion_logprobs(self.engine, mb, self.temperature, with_entropy=True)
                    loss, stats = grpo_loss(logp, old_lp, ref_lp, adv, mb.comp_mask, a.clip_eps, a.beta,
                                            a.kl_estimator, a.clip_eps_high, a.loss_aggregation,
                                            self.max_new_tokens)
                    self.engine.backward(loss)
                    self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                    sums["loss"] += loss.item()
                    sums["kl"] += stats["kl"].item()
                    sums["clip_fraction"] += stats["clip_fraction"].item()
                    sums["entropy"] += float(masked_mean(ent, mb.comp_mask))
                    count += 1
        metrics = {k: v / max(1, count) for k, v in sums.items()}
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(logprob_abs_diff_sum=diff_sum, logprob_tokens=diff_n,
                       grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=float(self.engine.get_lr()[0]), time_learner_s=time.monotonic() - start)
        return metrics

    # ---- weights out ----------------------------------------------------------------------
    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.engine.module.named_parameters())

    def sync_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self._named_params()]

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str, timeout_s: float):
        if self.rank == 0:  # only rank 0 is in the sync group; it is the TCP store's master
            from cluster.sync.torch_dist import TorchDistTransport
            self._transport = TorchDistTransport(host, port, 0, world_size, backend, timeout_s)
        return self.rank

    def broadcast_weights(self, plan) -> float:
        """Gather each bucket's parameters from the ZeRO shards (all ranks), rank 0 broadcasts it."""
        import deepspeed
        from cluster.sync.base import DTYPES, pack

        start = time.monotonic()
        params = dict(self._named_params())
        for bucket in plan.buckets:
            group = [params[s.name] for s in bucket]
            with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                if self.rank == 0:
                    self._transport.broadcast(pack(group, DTYPES[plan.dtype], self.device))
        return time.monotonic() - start

    def save_checkpoint(self, path: str) -> str | None:
        """HF safetensors + tokenizer, written to a temp dir and renamed: never half-written."""
        import deepspeed
        from transformers import AutoTokenizer

        named = self._named_params()
        state = {}
        for name, p in named:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    state[name] = p.detach().to("cpu", torch.float32).clone()
        if self.rank != 0:
            return None
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return str(out)

"""The learner's models as DeepSpeed engines: the policy, its frozen reference, PPO's value model."""
from __future__ import annotations

import logging
import warnings

import torch

from .attention import register
from .config import LearnerConfig, zero_stage


def micro_size(cfg: LearnerConfig, local_batch: int) -> int:
    return min(cfg.micro_batch_size, local_batch // cfg.minibatches)


def ds_config(cfg: LearnerConfig, world_size: int, local_batch: int, train: bool, lr: float | None = None) -> dict:
    if cfg.dtype == "auto":  # the driver resolves it for the hardware (cluster/precision.py)
        raise ValueError("learner.dtype=auto reached a learner rank unresolved")
    micro = micro_size(cfg, local_batch)
    conf = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": max(1, local_batch // cfg.minibatches // micro),
        # stages 1 and 2 shard optimizer state and gradients: an engine without an optimizer (the
        # reference) takes 0 then; ZeRO-3 shards its parameters too
        "zero_optimization": {"stage": zero_stage(cfg) if train or zero_stage(cfg) == 3 else 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }
    if train:
        lr = lr or cfg.lr
        conf["gradient_clipping"] = cfg.grad_clip
        conf["optimizer"] = {"type": "AdamW", "params": {
            "lr": lr, "betas": list(cfg.adam_betas), "weight_decay": cfg.weight_decay,
            # torch's AdamW needs no compiled op: nothing to build on a CPU box
            "torch_adam": cfg.device == "cpu"}}
        if cfg.warmup_steps:
            conf["scheduler"] = {"type": "WarmupLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": cfg.warmup_steps,
                "warmup_type": "linear"}}
    else:
        conf["train_batch_size"] = micro * world_size  # inference-only engine; value unused
        conf.pop("gradient_accumulation_steps")
    return conf


def quiet(deepspeed, transformers) -> None:
    """Library chatter (deprecations, load bars) would bury the driver's progress bar."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class ValueModel(torch.nn.Module):
    """PPO's critic: the policy's architecture without its LM head, plus a scalar head per position."""

    def __init__(self, model_path: str):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(model_path, dtype=torch.float32, attn_implementation=register())
        self.value_head = torch.nn.Linear(self.backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no spurious advantages
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # kwargs: what Micro.inputs() adds for the attention (the packed layout's spans)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, **kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()  # [B, L]


def build_engines(cfg: LearnerConfig, model_path: str, world_size: int, local_batch: int,
                  with_ref: bool, with_critic: bool, critic_lr: float, ref_path: str | None = None) -> dict:
    """DeepSpeed engines on this rank; every rank calls this at once (ZeRO-3 partitions collectively)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    def train_engine(model, lr):
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config(cfg, world_size, local_batch, train=True, lr=lr))
        return engine

    # the shared-prefix layout's attention (plain SDPA for any other input): learner/attention.py
    attn = register()
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    engines = {"policy": train_engine(policy, cfg.lr)}
    if with_ref:
        ref = AutoModelForCausalLM.from_pretrained(ref_path or model_path, dtype=torch.float32,
                                                   attn_implementation=attn).eval()
        ref.requires_grad_(False)
        engines["ref"], *_ = deepspeed.initialize(model=ref, config=ds_config(cfg, world_size, local_batch, train=False))
    if with_critic:
        critic = ValueModel(model_path)
        if cfg.gradient_checkpointing:
            critic.backbone.gradient_checkpointing_enable()
        engines["critic"] = train_engine(critic, critic_lr)
    return engines

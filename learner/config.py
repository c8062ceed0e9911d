"""The learner and algorithm branches of the config."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_ranks: int = Field(1, ge=1, description="learner actors, one DeepSpeed rank each")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="compute dtype; master weights stay fp32")
    zero_stage: Literal[0, 1, 2, 3] = 3
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear LR warm-up")
    micro_batch_size: int = Field(16, ge=1, description="samples per forward/backward on one rank")
    minibatches: int = Field(2, ge=1, description="optimizer updates per rollout batch and epoch")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    gradient_checkpointing: bool = False
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per rank")
    threads: int = Field(0, ge=0, description="CPU: torch threads per rank (0: cores / ranks)")


class AlgorithmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["grpo"] = Field("grpo", description="the objective")
    advantage: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo", description="grpo: (r - mean) / (std + eps); dr_grpo: r - mean; rloo: leave-one-out baseline")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="epsilon of the clipped ratio pi_theta/pi_old")
    clip_eps_high: Optional[float] = Field(None, gt=0, description="upper epsilon (DAPO clip-higher); default clip_eps")
    beta: float = Field(0.04, ge=0, description="weight of D_KL(pi_theta || pi_ref) in the loss")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="k1: log(pi/pi_ref); k2: half its square; k3: pi_ref/pi - log(pi_ref/pi) - 1")
    loss_aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = Field(
        "seq-mean-token-mean", description="GRPO paper / DAPO / Dr.GRPO (sum over tokens / engines.max_new_tokens)")
    adv_eps: float = Field(1e-6, gt=0, description="added to the group std before dividing")

"""The learner and algorithm branches of the config."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_ranks: int = Field(1, ge=1, description="learner actors, one DeepSpeed rank each")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype (master weights stay fp32); auto: bfloat16 on a GPU that "
        "computes it natively, float32 on CPUs (a bf16 learner learned less and was no faster there)")
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="DeepSpeed ZeRO stage; auto: 3 with several ranks, 1 with one (nothing to "
        "partition, and ZeRO-3's per-layer gather hooks cost ~30% of a CPU step; stage 0 reports no "
        "grad norm)")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear LR warm-up")
    micro_batch_size: int = Field(16, ge=1, description="samples per forward/backward on one rank")
    minibatches: int = Field(2, ge=1, description="optimizer updates per rollout batch and epoch")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    gradient_checkpointing: bool = False
    shared_prefix: bool = Field(True, description="compute a group's prompt once for all its samples in a "
                                "micro-batch (exact: same logprobs and gradients, fewer tokens)")
    reuse_policy_logprobs: bool = Field(
        True, description="no pi_old pass for the first minibatch of the first epoch, where the ratio is 1 by "
        "construction: pi_old is the update's own forward, detached (not with kl_in=reward or ppo)")
    skip_zero_advantage: bool = Field(
        True, description="the update does not compute samples whose advantages are all zero where they add "
        "nothing to the gradient (beta = 0 or the KL not in the loss, no entropy bonus, not ppo; one epoch); "
        "exact: every sample still counts in the loss normalization")
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per rank")
    threads: int = Field(0, ge=0, description="CPU: torch threads per rank (0: cores / ranks)")


def zero_stage(cfg: LearnerConfig) -> int:
    if cfg.zero_stage != "auto":
        return cfg.zero_stage
    return 3 if cfg.num_ranks > 1 else 1


def check_batch_split(cfg: LearnerConfig, batch: int, batch_key: str) -> None:
    """A batch must split evenly into ranks x minibatches x micro-batches: DeepSpeed's accumulation
    boundary then falls exactly at each minibatch's end."""
    split = cfg.num_ranks * cfg.minibatches
    if batch % split:
        raise ValueError(f"{batch_key} = {batch} must divide evenly into learner.num_ranks * "
                         f"learner.minibatches = {split}")
    per_mb = batch // split
    micro = min(cfg.micro_batch_size, per_mb)
    if per_mb % micro:
        raise ValueError(f"learner.micro_batch_size={micro} must divide the {per_mb} samples of one "
                         "minibatch on one rank")


class PPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: lambda of GAE")
    value_clip: Optional[float] = Field(0.2, gt=0, description="ppo: clip of the value update (None: off)")
    critic_lr: float = Field(1e-5, gt=0, description="ppo: learning rate of the value model")
    whiten_advantages: bool = Field(True, description="ppo: normalize advantages over the batch")


class DynamicSamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="drop groups whose rewards are all equal and refill with new prompts")
    max_rounds: int = Field(3, ge=1, description="generation rounds per step at most (the cap on extra generation)")


class OverlongConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mask_truncated: bool = Field(False, description="samples cut at max_new_tokens get no loss (DAPO)")
    buffer: int = Field(0, ge=0, description="soft penalty over the last `buffer` tokens of the budget (0: off)")
    factor: float = Field(1.0, ge=0, description="the soft penalty at the budget's end")


DEFAULT_ADVANTAGE = {"grpo": "grpo", "dr_grpo": "dr_grpo", "rloo": "rloo", "ppo": "gae"}


class AlgorithmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["grpo", "dr_grpo", "rloo", "ppo"] = Field(
        "grpo", description="grpo / dr_grpo / rloo: group baselines, no critic; ppo: value model + GAE")
    supervision: Literal["outcome", "process"] = Field(
        "outcome", description="process: per-step rewards (a reward returning [(reward, end_token)]) "
        "normalized over the group, token advantage = sum of later steps' (DeepSeekMath 4.1.3)")
    advantage: Optional[Literal["grpo", "dr_grpo", "rloo"]] = Field(
        None, description="override the name's baseline: grpo (r - mean) / (std + eps); dr_grpo r - mean; rloo leave-one-out")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="epsilon of the clipped ratio pi_theta/pi_old")
    clip_eps_high: Optional[float] = Field(None, gt=0, description="upper epsilon (DAPO clip-higher); default clip_eps")
    dual_clip: Optional[float] = Field(None, gt=1, description="dual-clip c: for A < 0 the loss is at most -c A (None: off)")
    ratio_level: Literal["token", "sequence"] = Field(
        "token", description="sequence: GSPO's length-normalized sequence ratio (use clip_eps ~3e-4)")
    beta: float = Field(0.04, ge=0, description="weight of the divergence from pi_ref")
    kl_in: Optional[Literal["loss", "reward", "none"]] = Field(
        None, description="where the divergence goes: in the loss (GRPO), subtracted from the reward (PPO style), "
        "nowhere; default reward for ppo, else loss")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="k1: log(pi/pi_ref); k2: half its square; k3: pi_ref/pi - log(pi_ref/pi) - 1")
    divergence: Optional[Literal["reverse_kl", "forward_kl", "js", "tv"]] = Field(
        None, description="exact divergence over the vocabulary in the loss instead of the sampled estimator")
    log_divergences: bool = Field(True, description="log exact reverse/forward KL, JS and TV to pi_ref every step")
    divergence_chunk: int = Field(256, ge=1, description="tokens per chunk of the exact divergences (bounds memory)")
    stats_tokens: int = Field(
        1024, ge=0, description="the logged full-vocabulary statistics (exact divergences, entropy) are "
        "taken on at most ~this many evenly spaced completion tokens per rank and step (0: every token); "
        "the loss always uses every token")
    loss_aggregation: Optional[Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]] = Field(
        None, description="GRPO paper / DAPO / Dr.GRPO (sum over tokens / engines.max_new_tokens); "
        "default seq-mean-token-sum-norm for dr_grpo, else seq-mean-token-mean")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus in the loss (entropy is logged either way)")
    tis_cap: Optional[float] = Field(
        None, gt=0, description="truncated importance sampling: weight tokens by min(pi_learner/pi_engine, cap) (None: off; "
        "2.0 under trainer.mode=async, where it carries the ratio to the behaviour policy)")
    adv_eps: float = Field(1e-6, gt=0, description="added to the group std before dividing")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)

    @property
    def uses_critic(self) -> bool:
        return self.name == "ppo"

    @property
    def baseline(self) -> str:
        return self.advantage or DEFAULT_ADVANTAGE[self.name]

    @property
    def uses_reference(self) -> bool:
        """Whether anything reads pi_ref: the KL in the loss or the reward, or the logged divergences.
        Without, the learner builds no reference model and runs no pass of it."""
        return (self.beta > 0 and self.kl_place != "none") or self.log_divergences

    @property
    def kl_place(self) -> str:
        return self.kl_in or ("reward" if self.name == "ppo" else "loss")

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or ("seq-mean-token-sum-norm" if self.name == "dr_grpo" else "seq-mean-token-mean")

    @model_validator(mode="after")
    def _consistent(self):
        if self.name == "ppo" and self.advantage is not None:
            raise ValueError("algorithm.advantage does not apply to ppo (its advantages come from GAE)")
        if self.name == "ppo" and self.supervision == "process":
            raise ValueError("algorithm.supervision=process is for the group baselines, not ppo")
        if self.divergence is not None and self.kl_place != "loss":
            raise ValueError("algorithm.divergence (exact, in the loss) needs algorithm.kl_in=loss")
        return self

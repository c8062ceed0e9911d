"""`groupflow sft`: supervised fine-tuning on reasoning traces (R1's cold start) with the same learner
ranks, checkpoint format and metrics as `groupflow train`; its output is a valid `model.path`."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.config import AlgorithmConfig, LearnerConfig, check_batch_split

from .config import ModelConfig, RunConfig, dump_config


class SFTDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path = Field(..., description="a .jsonl/.parquet/.arrow file or an HF save_to_disk folder")
    format: Literal["auto", "jsonl", "parquet", "arrow"] = "auto"
    prompt_field: str = Field("prompt", description="the user turn (OpenThoughts-114k-math: problem)")
    response_field: str = Field("response", description="the assistant turn to learn (OpenThoughts-114k-math: solution)")
    system_prompt: Optional[str] = Field(None, description="a system turn before every prompt")
    messages_field: Optional[str] = Field(
        None, description="multi-turn traces: a field holding a whole conversation [{role, content}] (tool "
        "calls, their results, answers); assistant turns are learned, the rest is context. Replaces "
        "prompt_field/response_field/system_prompt")
    max_tokens: int = Field(1024, ge=8, description="prompt + response tokens; longer rows are dropped and counted")
    on_malformed: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _exists(self):
        if not self.path.exists():
            raise ValueError(f"data.path: no such file or folder: {self.path}")
        return self


class SFTTrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1, description="passes over the data")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps")
    batch_size: int = Field(8, ge=1, description="sequences per step over all ranks")
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="save every K steps (0: only at the end)")


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: SFTDataConfig
    trainer: SFTTrainerConfig = Field(default_factory=SFTTrainerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_minibatch(cls, data):
        # SFT has no rollout batch to split: one optimizer step per batch unless asked otherwise.
        if isinstance(data, dict) and isinstance(data.get("learner", {}), dict):
            data = {**data, "learner": {"minibatches": 1, **data.get("learner", {})}}
        return data

    @model_validator(mode="after")
    def _shapes(self):
        check_batch_split(self.learner, self.trainer.batch_size, "trainer.batch_size")
        return self


def tokenize_conversations(cfg: SFTDataConfig, model_path: str) -> tuple[list[dict], dict]:
    """Conversations as (prompt ids, completion ids, loss mask), laid out turn by turn exactly as a
    multi-turn rollout lays them out (actors/chat.py)."""
    from transformers import AutoTokenizer

    from actors.chat import TurnTemplate
    from rewards.data import READERS, resolve_files

    turns = TurnTemplate(AutoTokenizer.from_pretrained(model_path))
    fmt, files = resolve_files(cfg.path, cfg.format)
    out, skipped = [], {"malformed": 0, "too_long": 0}
    for file in files:
        for n, rec in READERS[fmt](file, [cfg.messages_field]):
            try:
                messages = rec[cfg.messages_field] if isinstance(rec, dict) else None
                if not isinstance(messages, list):
                    raise ValueError(f"{cfg.messages_field} is not a list of messages")
                prompt, ids, mask = turns.conversation(messages)
            except (ValueError, KeyError, TypeError) as e:
                if cfg.on_malformed == "error":
                    raise ValueError(f"{file}:{n}: {e}") from None
                skipped["malformed"] += 1
                continue
            if len(prompt) + len(ids) > cfg.max_tokens:
                skipped["too_long"] += 1
                continue
            out.append({"prompt_token_ids": prompt, "completion_token_ids": ids, "loss_mask": mask})
    if not out:
        raise ValueError(f"data.path {cfg.path}: no usable conversations (skipped: {skipped})")
    return out, skipped


def tokenize(cfg: SFTDataConfig, model_path: str) -> tuple[list[dict], dict]:
    """Rows as (prompt ids with the chat template's generation prompt, response ids + end of turn)."""
    from transformers import AutoTokenizer

    if cfg.messages_field:
        return tokenize_conversations(cfg, model_path)

    from rewards.data import Fields, load_rows

    rows, skipped = load_rows(cfg.path, cfg.format, Fields(prompt=cfg.prompt_field, answer=cfg.response_field),
                              on_malformed=cfg.on_malformed)
    tok = AutoTokenizer.from_pretrained(model_path)
    out, skipped["too_long"] = [], 0
    for r in rows:
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": r["prompt"]})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": str(r["answer"])}],
                                       tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        if f_ids[: len(p_ids)] != p_ids:  # tokens merged across the boundary: split by text instead
            if not full.startswith(prompt):  # the template rewrites the history: no clean boundary
                skipped["template_mismatch"] = skipped.get("template_mismatch", 0) + 1
                continue
            f_ids = p_ids + tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        if len(f_ids) > cfg.max_tokens:
            skipped["too_long"] += 1
            continue
        out.append({"prompt_token_ids": p_ids, "completion_token_ids": f_ids[len(p_ids):]})
    if not out:
        raise ValueError(f"data.path {cfg.path}: no usable rows (skipped: {skipped})")
    return out, skipped


def sft(cfg: SFTConfig, run_dir: Path, progress: bool = True) -> dict:
    from learner.group import LearnerGroup

    from . import checkpoint
    from .metrics import RunLog
    from .placement import start_ray
    from .precision import resolve_precision
    from .prepare import prepare_model

    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = str(prepare_model(cfg.model, run_dir, cfg.trainer.seed))
    rows, skipped = tokenize(cfg.data, model_path)
    B, R = cfg.trainer.batch_size, cfg.learner.num_ranks
    per_epoch = len(rows) // B
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} usable rows are fewer than trainer.batch_size={B}")
    steps = per_epoch * cfg.trainer.epochs
    steps = min(steps, cfg.trainer.max_steps or steps)
    start_ray(cfg.run, R * cfg.learner.cpus_per_rank)
    cfg = resolve_precision(cfg)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    learner = LearnerGroup(cfg.learner, AlgorithmConfig(), model_path, B // R, 1.0, 1, [{}] * R,
                           cfg.run.timeout_s, mode="sft")
    log = RunLog(run_dir, steps, progress, desc="sft", postfix={"loss": "loss", "tok_s": "tokens_per_s"})
    started = time.monotonic()
    try:
        order: list[int] = []
        for step in range(1, steps + 1):
            if not order:
                epoch = (step - 1) // per_epoch
                order = list(range(len(rows)))
                random.Random(cfg.trainer.seed * 1000 + epoch).shuffle(order)
                order = order[: per_epoch * B]
            batch, order = [rows[i] for i in order[:B]], order[B:]
            t0 = time.monotonic()
            shards = [{k: [r[k] for r in batch[i * B // R: (i + 1) * B // R]] for k in batch[0]} for i in range(R)]
            stats = learner.sft_train(shards)
            tokens = sum(sum(r["loss_mask"]) if "loss_mask" in r else len(r["completion_token_ids"]) for r in batch)
            log.step({"step": step, **stats, "response_tokens": tokens, "time_step_s": time.monotonic() - t0,
                      "tokens_per_s": tokens / max(time.monotonic() - t0, 1e-9)})
            if cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0 and step < steps:
                checkpoint.write(learner, checkpoint.step_dir(run_dir, step), {"step": step}, full=False)
        summary = {"run_dir": str(run_dir), "rows": len(rows), "skipped": skipped, "steps": steps,
                   "checkpoint": str(checkpoint.mark_final(run_dir, checkpoint.write(
                       learner, checkpoint.step_dir(run_dir, steps), {"step": steps}, full=False))),
                   "wall_time_s": time.monotonic() - started}
        log.write_json("summary.json", summary)
        return summary
    finally:
        log.close()
        learner.shutdown()


"""Turn the model branch of the config into one checkpoint directory every actor loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import checkpoint
from .config import SMOLLM2, Config, ModelConfig
from .models import build_tiny_random, ensure_smollm2


def prepare_model(cfg: ModelConfig, run_dir: Path, seed: int) -> Path:
    base = ensure_smollm2() if cfg.path == SMOLLM2 else Path(cfg.path)
    if cfg.random_init is None:
        return base
    r = cfg.random_init
    return build_tiny_random(base, run_dir / "initial_model", r.hidden_size, r.num_layers, r.num_heads, seed)


@dataclass
class Start:
    policy: Path              # the weights engines and learner start from
    reference: Path           # pi_ref: the run's original starting model, also after a resume
    first_step: int
    data_state: Optional[dict]
    resumed: Optional[Path] = None   # the checkpoint continued (its DeepSpeed states and RNG, if saved)
    state: dict = field(default_factory=dict)  # its trainer_state.json


def starting_point(cfg: Config, run_dir: Path) -> Start:
    """A fresh run starts from the configured model; `trainer.resume_from` continues a checkpoint
    ('auto': the newest complete one of this run dir, if any). Resuming into the checkpoint's own
    run dir, or a run dir with no checkpoint of its own, first drops what later steps wrote (metrics,
    rollouts), so each step is recorded once."""
    ckpt = cfg.trainer.resume_from
    if ckpt == "auto":
        ckpt = checkpoint.latest(run_dir)
        if ckpt is None:  # nothing saved yet: start over, and forget what the lost steps logged
            checkpoint.rewind(run_dir, 0)
    if ckpt is None:
        path = prepare_model(cfg.model, run_dir, cfg.trainer.seed)
        return Start(path, path, 1, None)
    ckpt = Path(ckpt).resolve()
    state = checkpoint.read_state(ckpt)
    if ckpt.parent.parent == Path(run_dir).resolve() or not checkpoint.complete_steps(run_dir):
        checkpoint.rewind(run_dir, int(state["step"]))  # also a restart of `--resume PATH` before its first save
    return Start(ckpt, Path(state.get("reference_model", ckpt)), int(state["step"]) + 1, state["data"],
                 ckpt, state)

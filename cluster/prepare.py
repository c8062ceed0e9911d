"""Turn the model branch of the config into one checkpoint directory every actor loads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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


def starting_point(cfg: Config, run_dir: Path) -> Start:
    """A fresh run starts from the configured model; `trainer.resume_from` continues a checkpoint."""
    if cfg.trainer.resume_from is None:
        path = prepare_model(cfg.model, run_dir, cfg.trainer.seed)
        return Start(path, path, 1, None)
    ckpt = Path(cfg.trainer.resume_from).resolve()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # validated with the config: the state exists, its step < trainer.steps, its reference is there
    return Start(ckpt, Path(state.get("reference_model", ckpt)), int(state["step"]) + 1, state["data"])

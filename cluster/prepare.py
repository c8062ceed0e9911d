"""Turn the model branch of the config into one checkpoint directory every actor loads."""
from __future__ import annotations

from pathlib import Path

from .config import SMOLLM2, ModelConfig
from .models import build_tiny_random, ensure_smollm2


def prepare_model(cfg: ModelConfig, run_dir: Path, seed: int) -> Path:
    base = ensure_smollm2() if cfg.path == SMOLLM2 else Path(cfg.path)
    if cfg.random_init is None:
        return base
    r = cfg.random_init
    return build_tiny_random(base, run_dir / "initial_model", r.hidden_size, r.num_layers, r.num_heads, seed)

"""Benchmarks: measured side by side in one run, reported as JSON (never timed asserts in tests)."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

from .config import Config
from .metrics import read_metrics

PHASES = ("generate", "reward", "train", "sync")


def machine_info() -> dict:
    """What every benchmark report says it ran on: figures differ ~57x in bf16 between CPU kinds."""
    import torch

    name = platform.processor()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "cpu": name,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())}


def phase_shares(rows: list[dict]) -> dict:
    total = sum(r["time_step_s"] for r in rows)
    return {p: sum(r[f"time_{p}_s"] for r in rows) / total for p in PHASES}


def train_report(cfg: Config, run_dir: Path) -> dict:
    from .loop import train

    summary = train(cfg, run_dir, progress=True)
    rows = read_metrics(run_dir)
    return {
        "machine": machine_info(),
        "wall_time_s": summary["wall_time_s"],
        "eval_accuracy_start": summary.get("eval_accuracy_start"),
        "eval_accuracy_end": summary.get("eval_accuracy_end"),
        "steps": len(rows),
        "step_time_s_median": statistics.median(r["time_step_s"] for r in rows),
        "phase_share": phase_shares(rows),
        "generated_tokens_per_s_median": statistics.median(r["generated_tokens_per_s"] for r in rows),
        "engine_idle_fraction_median": _median(rows[1:], "engine_idle_fraction"),
        "learner_idle_fraction_median": _median(rows, "learner_idle_fraction"),
        "reward_mean_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]],
        "run_dir": str(run_dir),
    }


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def _sides(rows: list[dict]) -> dict:
    """Medians over steps 2.. (step 1 cannot overlap: nothing was generated ahead of it)."""
    steady = rows[1:] or rows
    gen = statistics.median(r["time_generate_s"] + r["time_reward_s"] for r in steady)
    train = statistics.median(r["time_prepare_s"] + r["time_learner_s"] + r["time_sync_s"] for r in steady)
    return {"step_s_median": statistics.median(r["time_step_s"] for r in steady),
            "generation_s_median": gen, "training_s_median": train,
            "learner_waited_s_median": _median(steady, "time_learner_waited_s"),
            "engines_waited_s_median": _median(steady, "time_engines_waited_s"),
            "engine_idle_fraction_median": _median(steady, "engine_idle_fraction"),
            "learner_idle_fraction_median": _median(steady, "learner_idle_fraction"),
            "policy_lag_max": max(r.get("policy_lag_max", 0) for r in rows),
            "reward_mean_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]]}


def async_report(cfg: Config, run_dir: Path) -> dict:
    """The same config trained synchronously, then asynchronously, one after the other on this
    machine: step times, each side's time, and async's step against max(generation, training) (the
    overlap's bound: goal <= 1.1) and against sync's step."""
    from .loop import train

    runs = {}
    for mode in ("sync", "async"):
        tree = cfg.model_dump(mode="json")
        tree["trainer"]["mode"] = mode
        if mode == "sync" and cfg.trainer.mode == "async":  # the async default cap is async's own
            tree["algorithm"]["tis_cap"] = None
        summary = train(Config.model_validate(tree), run_dir / mode, progress=True)
        runs[mode] = {**_sides(read_metrics(run_dir / mode)), "wall_time_s": summary["wall_time_s"],
                      "run_dir": str(run_dir / mode)}
    a, s = runs["async"], runs["sync"]
    return {"machine": machine_info(), "steps": cfg.trainer.steps, "max_staleness": cfg.trainer.max_staleness,
            "runs": runs,
            "async_step_over_max_side": a["step_s_median"] / max(a["generation_s_median"], a["training_s_median"]),
            "async_step_over_sync_max_side": a["step_s_median"] / max(s["generation_s_median"], s["training_s_median"]),
            "speedup_over_sync": s["step_s_median"] / a["step_s_median"]}


def synthetic_batch(cfg: Config, vocab: int, seed: int, ragged: bool = False):
    """A rollout-shaped table of random tokens and 0/1 rewards: the learner's input without engines.
    ragged: prompts of 32-64 tokens and completions of C/4..C tokens, as real batches have. Prompts
    of mixed difficulty: every fourth group fails all its samples (a prompt beyond the policy), the
    others succeed at a rate uniform in [0, 1]."""
    import pyarrow as pa
    import torch

    g = torch.Generator().manual_seed(seed)
    P, G, C = cfg.trainer.prompts_per_step, cfg.trainer.group_size, cfg.engines.max_new_tokens
    n = P * G

    def length(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=g)) if ragged else high

    prompts = [torch.randint(0, vocab, (length(32, 64) if ragged else 48,), generator=g).tolist() for _ in range(P)]
    comps = [torch.randint(0, vocab, (length(max(1, C // 4), C),), generator=g).tolist() for _ in range(n)]
    rates = torch.rand(P, generator=g)
    rates[::4] = 0.0
    return pa.table({
        "group_id": pa.array([i // G for i in range(n)], pa.int32()),
        "prompt_token_ids": [prompts[i // G] for i in range(n)],
        "completion_token_ids": comps,
        "logprobs": [[0.0] * len(c) for c in comps],
        "finish_reason": ["stop"] * n,
        "reward": pa.array((torch.rand(n, generator=g) < rates.repeat_interleave(G)).float().tolist(), pa.float32()),
    })


def memory_report(cfg: Config, run_dir: Path, steps: int = 3) -> dict:
    """Peak learner memory of PPO (policy + reference + value model) and of GRPO (no critic), on the
    same model and the same batch, each in fresh learner processes, measured one after the other."""
    from transformers import AutoConfig

    from learner.config import AlgorithmConfig, zero_stage
    from learner.group import LearnerGroup

    from . import phases
    from .placement import start_ray
    from .precision import resolve_precision
    from .prepare import prepare_model

    model_path = str(prepare_model(cfg.model, run_dir, cfg.trainer.seed))
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    R = cfg.learner.num_ranks
    start_ray(cfg.run, R * cfg.learner.cpus_per_rank)
    cfg = resolve_precision(cfg)
    results = {}
    for name in ("grpo", "ppo"):
        # validated, and only what both can run: outcome rewards, the name's own baseline
        algo = AlgorithmConfig.model_validate({**cfg.algorithm.model_dump(), "name": name, "advantage": None,
                                               "supervision": "outcome", "divergence": None})
        group = LearnerGroup(cfg.learner, algo, model_path, cfg.local_batch, cfg.engines.temperature,
                             cfg.engines.max_new_tokens, [{}] * R, cfg.run.timeout_s)
        try:
            for step in range(steps):
                batch = synthetic_batch(cfg, vocab, cfg.trainer.seed + step)
                _, kl_sums = group.prepare(phases.shards(batch, R, step))
                batch = phases.with_advantages(batch, algo, kl_sums, cfg.engines.max_new_tokens)
                group.train(phases.train_shards(batch, R, step, algo))
            peaks = group.peak_memory()
        finally:
            group.shutdown()
        results[name] = {"peak_rss_mib_per_rank": [p["peak_rss_mib"] for p in peaks],
                         "peak_rss_mib_total": sum(p["peak_rss_mib"] for p in peaks)}
        if "peak_cuda_mib" in peaks[0]:
            results[name]["peak_cuda_mib_total"] = sum(p["peak_cuda_mib"] for p in peaks)
    key = "peak_cuda_mib_total" if "peak_cuda_mib_total" in results["grpo"] else "peak_rss_mib_total"
    return {
        "machine": machine_info(),
        "model": cfg.model.path if cfg.model.random_init is None else "tiny-random",
        "learner": {"ranks": R, "zero_stage": zero_stage(cfg.learner), "dtype": cfg.learner.dtype,
                    "batch": cfg.trainer.prompts_per_step * cfg.trainer.group_size,
                    "completion_tokens": cfg.engines.max_new_tokens},
        "steps": steps,
        **results,
        "ppo_over_grpo": results["ppo"][key] / results["grpo"][key],
        "measure": key,
    }

"""`groupflow bench learner`: the learner's tokens/s with each optimization on and off, side by side
in one run, on the same synthetic batches, and the FLOP/s it achieves against a plain matrix product
on the same machine and dtype."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .bench import machine_info, synthetic_batch
from .config import Config

# name -> learner / algorithm overrides, and ("vs") the variant its step-1 metrics must equal (the
# baseline by default: the first, which every speedup divides by)
OFF = {"shared_prefix": False, "reuse_policy_logprobs": False, "skip_zero_advantage": False}
ON = {"shared_prefix": True, "reuse_policy_logprobs": True, "skip_zero_advantage": False}
VARIANTS = {
    "baseline": {"learner": OFF, "algorithm": {"log_divergences": True}},
    "shared_prefix": {"learner": {**OFF, "shared_prefix": True}, "algorithm": {"log_divergences": True}},
    "reuse_policy_logprobs": {"learner": {**OFF, "reuse_policy_logprobs": True}, "algorithm": {"log_divergences": True}},
    "both (default)": {"learner": ON, "algorithm": {"log_divergences": True}},
    "both - divergence log": {"learner": ON, "algorithm": {"log_divergences": False}},
    # beta = 0: zero-advantage samples then add no gradient, and the update may skip them
    "both + beta=0": {"learner": ON, "algorithm": {"log_divergences": True, "beta": 0.0}, "same": ()},
    # compared on what the gradient gives: the update's statistics are over the samples it computes
    "both + beta=0 + skip zero-advantage": {"learner": {**ON, "skip_zero_advantage": True},
                                            "algorithm": {"log_divergences": True, "beta": 0.0},
                                            "vs": "both + beta=0", "same": ("loss", "grad_norm")},
    # nothing reads pi_ref then: no reference model, no pass of it
    "both + beta=0 + skip zero-advantage + no pi_ref": {"learner": {**ON, "skip_zero_advantage": True},
                                                        "algorithm": {"log_divergences": False, "beta": 0.0},
                                                        "vs": "both + beta=0", "same": ("loss", "grad_norm")},
}
# step-1 metrics that must not depend on how the work is laid out
COMPARED = ("loss", "kl", "clip_fraction", "ratio_mean", "entropy", "kl_k3", "entropy_pre", "grad_norm",
            "update_skipped_fraction")


def matmul_flops(dtype: str, threads: int, seconds: float = 2.0) -> float:
    """FLOP/s of a plain matrix product of SmolLM2's MLP shape in `dtype` on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype)
        a, b = torch.randn(2048, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
        a @ b
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        return n * 2 * 2048 * 576 * 1536 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def learner_report(cfg: Config, run_dir: Path, steps: int = 2, variants: list[str] | None = None) -> dict:
    """Each variant in fresh learner processes, `steps` steps each on the same batches; step 1 is the
    warm-up, the rest are timed. Tokens are counted unshared (prompt + completion per sample) so that
    every variant's tokens/s measures the same work."""
    import ray
    from transformers import AutoConfig

    from learner.config import AlgorithmConfig, LearnerConfig, zero_stage
    from learner.group import LearnerGroup

    from . import phases
    from .placement import start_ray
    from .precision import resolve_precision
    from .prepare import prepare_model

    model_path = str(prepare_model(cfg.model, run_dir, cfg.trainer.seed))
    model_cfg = AutoConfig.from_pretrained(model_path)
    R = cfg.learner.num_ranks
    start_ray(cfg.run, R * cfg.learner.cpus_per_rank)
    cfg = resolve_precision(cfg)
    batches = [synthetic_batch(cfg, model_cfg.vocab_size, cfg.trainer.seed + s, ragged=True) for s in range(steps)]
    tokens = sum(len(p) + len(c) for p, c in zip(batches[0].column("prompt_token_ids").to_pylist(),
                                                  batches[0].column("completion_token_ids").to_pylist()))
    results = {}
    names = variants or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    for name in names:
        over = VARIANTS[name]
        lc = LearnerConfig.model_validate({**cfg.learner.model_dump(), **over["learner"]})
        algo = AlgorithmConfig.model_validate({**cfg.algorithm.model_dump(), **over["algorithm"]})
        group = LearnerGroup(lc, algo, model_path, cfg.local_batch, cfg.engines.temperature,
                             cfg.engines.max_new_tokens, [{}] * R, cfg.run.timeout_s)
        times, first, skipped = {"prepare": [], "update": []}, {}, []
        try:
            for step, batch in enumerate(batches, start=1):
                t0 = time.monotonic()
                prep, kl_sums = group.prepare(phases.shards(batch, R, step))
                t1 = time.monotonic()
                batch = phases.with_advantages(batch, algo, kl_sums, cfg.engines.max_new_tokens)
                stats = group.train(phases.train_shards(batch, R, step, algo))
                t2 = time.monotonic()
                if step == 1:
                    first = {k: v for k, v in {**prep, **stats}.items() if k in COMPARED}
                else:
                    times["prepare"].append(t1 - t0)
                    times["update"].append(t2 - t1)
                    skipped.append(stats.get("update_skipped_fraction", 0.0))
        finally:
            group.shutdown()
        timed = max(1, len(times["prepare"]))
        results[name] = {
            "prepare_tokens_per_s": tokens * timed / max(sum(times["prepare"]), 1e-9),
            "update_tokens_per_s": tokens * timed / max(sum(times["update"]), 1e-9),
            "learner_tokens_per_s": tokens * timed / max(sum(times["prepare"]) + sum(times["update"]), 1e-9),
            "step1_metrics": first,
            "update_skipped_fraction": sum(skipped) / max(1, len(skipped)),  # of the timed steps
        }
    base = results[names[0]]  # ratios against the first variant run (the baseline by default)
    for name, r in results.items():
        r["speedup"] = r["learner_tokens_per_s"] / base["learner_tokens_per_s"]
        vs = VARIANTS[name].get("vs", names[0])
        if vs not in results:
            raise ValueError(f"variant {name!r} is checked against {vs!r}: run both (--variants)")
        same = results[vs]
        r["step1_same_as"] = vs
        keys = [k for k in VARIANTS[name].get("same", same["step1_metrics"]) if k in r["step1_metrics"]]
        r["step1_max_abs_diff"] = max((abs(r["step1_metrics"][k] - same["step1_metrics"][k]) for k in keys),
                                      default=None)  # None: another objective, nothing to compare
    # Achieved FLOP/s of the baseline (every token computed): a forward is ~2 x params FLOP per token,
    # the prepare pass runs two (pi_old, pi_ref), the update a forward and a backward (~3 forwards).
    params = _param_count(model_cfg)
    threads = cfg.learner.threads or max(1, (os.cpu_count() or 1) // R)
    peak = matmul_flops(cfg.learner.dtype, threads) * R
    fraction = None
    if "baseline" in results:
        b = results["baseline"]
        fraction = {"prepare": 4 * params * b["prepare_tokens_per_s"] / peak,
                    "update": 6 * params * b["update_tokens_per_s"] / peak}
    ray.shutdown()
    return {
        "machine": machine_info(),
        "model": cfg.model.path if cfg.model.random_init is None else "tiny-random",
        "learner": {"ranks": R, "dtype": cfg.learner.dtype, "zero_stage": zero_stage(cfg.learner),
                    "micro_batch_size": cfg.learner.micro_batch_size, "minibatches": cfg.learner.minibatches},
        "batch": {"samples": batches[0].num_rows, "group_size": cfg.trainer.group_size,
                  "tokens_unshared": tokens, "max_new_tokens": cfg.engines.max_new_tokens},
        "timed_steps": steps - 1,
        "variants": results,
        "matmul_flops_per_s": peak,
        "baseline_fraction_of_matmul": fraction,
    }


def _param_count(c) -> int:
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h * c.num_key_value_heads // c.num_attention_heads
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + V * h  # the LM head runs once per token too

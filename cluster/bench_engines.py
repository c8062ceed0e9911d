"""`groupflow bench rollout` and `groupflow bench sync`: groupflow's engines and weight sync against
the plain thing they wrap, measured side by side in one run."""
from __future__ import annotations

import multiprocessing
import statistics
import time
from pathlib import Path

from .bench import machine_info
from .config import Config


def _standalone_generate(model_path: str, cfg_dict: dict, prompt_ids: list[list[int]], n: int, seed: int,
                         rounds: int) -> list[tuple[int, float]]:
    """A plain `vllm.LLM` in a process of its own, with the engine arguments groupflow passes: rounds
    of (generated tokens, seconds)."""
    from actors.config import EngineConfig
    from actors.vllm_engine import _configure_env

    cfg = EngineConfig(**cfg_dict)
    _configure_env(cfg)  # the same process environment an engine actor gets
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_path, dtype=cfg.dtype, seed=seed, enforce_eager=cfg.enforce_eager,
              max_model_len=cfg.max_model_len, logprobs_mode="processed_logprobs")
    params = SamplingParams(n=n, max_tokens=cfg.max_new_tokens, logprobs=0, temperature=cfg.temperature,
                            top_p=cfg.top_p)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        out.append((sum(len(c.token_ids) for r in res for c in r.outputs), time.perf_counter() - start))
    return out


def rollout_report(cfg: Config, run_dir: Path, rounds: int = 3) -> dict:
    """The same prompts and sampling through one standalone vLLM engine and through groupflow's rollout
    actors (cfg.engines.num_engines of them), one after the other, `rounds` batches each."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from rewards.tasks import make_task

    from . import phases
    from .placement import create_engines, start_ray
    from .precision import resolve_precision
    from .prepare import prepare_model

    model_path = str(prepare_model(cfg.model, run_dir, cfg.trainer.seed))
    task = make_task(cfg.rewards.task, cfg.trainer.seed, tokenizer_path=model_path)
    rows = task.next_prompts(cfg.trainer.prompts_per_step)
    start_ray(cfg.run, cfg.engines.num_engines * cfg.engines.cpus_per_engine)
    cfg = resolve_precision(cfg)
    G = cfg.trainer.group_size
    engines, pg = create_engines(cfg, model_path)
    try:
        phases.generate(engines, rows[:1], G, cfg.run.timeout_s)  # warm-up
        ours = []
        for _ in range(rounds):
            start = time.perf_counter()
            table = phases.generate(engines, rows, G, cfg.run.timeout_s)
            seconds = time.perf_counter() - start
            ours.append((sum(len(c) for c in table.column("completion_token_ids").to_pylist()), seconds))
        prompt_ids = [table.column("prompt_token_ids")[i * G].as_py() for i in range(len(rows))]
    finally:
        for a in engines:
            ray.kill(a)
        remove_placement_group(pg)
        ray.shutdown()  # the standalone engine gets the cores to itself
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        plain = pool.apply(_standalone_generate, (model_path, cfg.engines.model_dump(), prompt_ids, G,
                                                  cfg.trainer.seed, rounds))

    def rate(runs):
        return sum(t for t, _ in runs) / sum(s for _, s in runs)

    return {"machine": machine_info(), "engines": cfg.engines.num_engines, "dtype": cfg.engines.dtype,
            "prompts": len(rows), "group_size": G, "max_new_tokens": cfg.engines.max_new_tokens, "rounds": rounds,
            "standalone_tokens_per_s": rate(plain), "groupflow_tokens_per_s": rate(ours),
            "ratio": rate(ours) / rate(plain)}


def sync_report(cfg: Config, run_dir: Path, repeats: int = 5, sweep_mb=(16, 64, 256, 1024)) -> dict:
    """groupflow's weight push (ZeRO-3 gather, bucketed broadcast, engine reload) against a raw broadcast of
    the same bytes as one flat buffer on the same group; then the push at several bucket sizes."""
    from .placement import create_roles, start_ray
    from .precision import resolve_precision
    from .prepare import prepare_model

    model_path = str(prepare_model(cfg.model, run_dir, cfg.trainer.seed))
    start_ray(cfg.run, cfg.cpus_needed)
    cfg = resolve_precision(cfg)
    roles = create_roles(cfg, model_path, model_path)
    try:
        sync = roles.sync
        sync.push()
        sync.raw_broadcast()  # warm-up of both paths
        push = [sync.push()["time_sync_s"] for _ in range(repeats)]
        raw = [sync.raw_broadcast() for _ in range(repeats)]
        sweep = {}
        for mb in sweep_mb:
            sync.replan(mb)
            sweep[str(mb)] = {"buckets": len(sync.plan.buckets),
                              "push_s_median": statistics.median(sync.push()["time_sync_s"] for _ in range(3))}
        sync.replan(cfg.sync.bucket_mb)
        total = sync.plan.total_bytes
    finally:
        roles.shutdown()
    return {"machine": machine_info(), "bytes": total, "dtype": cfg.engines.dtype,
            "engines": cfg.engines.num_engines, "backend": cfg.sync_backend, "bucket_mb": cfg.sync.bucket_mb,
            "repeats": repeats,
            "push_s_median": statistics.median(push), "raw_broadcast_s_median": statistics.median(raw),
            "ratio": statistics.median(push) / statistics.median(raw), "bucket_sweep": sweep}

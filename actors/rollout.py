"""RolloutActor: a Ray actor hosting one engine; prompts in, an Arrow table of rollouts out."""
from __future__ import annotations

import logging
import time

import pyarrow as pa
import ray

from .config import EngineConfig

log = logging.getLogger("groupflow.actors")

ROLLOUT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("group_id", pa.int32()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("completion_token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("completion", pa.string()),
    ("completion_offsets", pa.list_(pa.int32())),  # character offset where each token ends
    ("finish_reason", pa.string()),
    ("policy_version", pa.int32()),
])


@ray.remote
class RolloutActor:
    def __init__(self, cfg: EngineConfig, model_path: str, seed: int, rank: int, version: int = 0):
        logging.basicConfig(level=logging.INFO, format=f"[engine {rank}] %(message)s")
        from .vllm_engine import VLLMEngine

        start = time.monotonic()
        self.rank, self.policy_version = rank, version  # a resumed run's engines start at its version
        self.engine = VLLMEngine(cfg, model_path, seed + rank)
        # live on Ray's metrics endpoint (Prometheus): busy while generating, samples so far
        from ray.util.metrics import Counter, Gauge
        tags = {"run": ray.get_runtime_context().get_job_id(), "role": "engine", "rank": str(rank)}
        self._busy = Gauge("groupflow_engine_busy", "1 while the engine generates", ("run", "role", "rank"))
        self._samples = Counter("groupflow_samples_generated", "samples generated", ("run", "role", "rank"))
        for metric in (self._busy, self._samples):
            metric.set_default_tags(tags)
        self._busy.set(0)
        log.info("engine up in %.1fs", time.monotonic() - start)

    def ready(self) -> int:
        return self.rank

    def generate(self, rows: list[dict], group_ids: list[int], n: int, greedy: bool = False,
                 seed: int | None = None) -> pa.Table:
        """All prompts go to the engine at once; each comes back as n rows of one group. A `seed`
        makes the samples a function of it (and the weights), whatever the engine did before."""
        if seed is not None:
            self.engine.reseed(seed)
        prompt_ids = [self.engine.chat_token_ids(r["messages"]) for r in rows]
        self._busy.set(1)
        began = time.time()  # wall clock: the driver compares it across steps (engines' idle time)
        try:
            outs = self.engine.generate(prompt_ids, n, greedy)
        finally:
            self._busy.set(0)
        ended = time.time()
        self._samples.inc(len(rows) * n)
        cols = {k: [] for k in ROLLOUT_SCHEMA.names}
        for row, gid, pids, samples in zip(rows, group_ids, prompt_ids, outs):
            for s in samples:
                cols["prompt_id"].append(row["id"])
                cols["group_id"].append(gid)
                cols["prompt_token_ids"].append(pids)
                cols["completion_token_ids"].append(s["token_ids"])
                cols["logprobs"].append(s["logprobs"])
                cols["completion"].append(s["text"])
                cols["completion_offsets"].append(s["offsets"])
                cols["finish_reason"].append(s["finish_reason"])
                cols["policy_version"].append(self.policy_version)
        return pa.table(cols, schema=ROLLOUT_SCHEMA.with_metadata(
            {"generate_began": repr(began), "generate_ended": repr(ended)}))

    def continue_turns(self, requests: list[dict], greedy: bool = False, seed: int | None = None) -> list[dict]:
        """The next turn of several trajectories in one engine call. A request: {"context": token ids
        so far (prompt and completion), "observation": text, "budget": tokens left for the
        observation and the turn, "cap": observation tokens at most}. Returns per request the
        observation's token ids and the new turn, or {"skipped": True} when the observation is over
        its cap or the budget leaves no room for a turn after it."""
        if seed is not None:
            self.engine.reseed(seed)
        out: list[dict] = [{} for _ in requests]
        go, contexts, budgets = [], [], []
        eos = self.engine.tokenizer.eos_token_id
        for i, r in enumerate(requests):
            obs, cut = self.engine.turns.observation_ids(r["observation"], r["cap"])
            if r["context"][-1:] != [eos]:  # a turn cut by its budget: the template closes it
                obs = [eos] + obs
            room = min(r["budget"] - len(obs), self.engine.cfg.max_new_tokens)
            out[i] = {"observation_ids": obs, "observation_cut": cut, "skipped": cut or room < 1}
            if not out[i]["skipped"]:
                go.append(i)
                contexts.append(list(r["context"]) + obs)
                budgets.append(room)
        self._busy.set(1)
        try:
            turns = self.engine.continue_turns(contexts, budgets, greedy) if go else []
        finally:
            self._busy.set(0)
        for i, turn in zip(go, turns):
            out[i].update(turn)
        self._samples.inc(len(go))
        return [{**o, "policy_version": self.policy_version} for o in out]

    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int,
                         backend: str, timeout_s: float) -> list[int]:
        return self.engine.init_weight_sync(host, port, rank_offset, world_size, backend, timeout_s)

    def raw_receive(self, numel: int, dtype: str) -> None:
        """Benchmark floor: receive one flat buffer over the weight-sync group, load nothing."""
        self.engine.raw_receive(numel, dtype)

    def load_weights(self, plan) -> int:
        """Receive a push. The policy version comes with the weights, from the learner that sent
        them, so what a sample records is what generated it, whoever asked for the push."""
        start = time.monotonic()
        self.policy_version = self.engine.load_weights(plan)
        log.debug("weights v%d loaded in %.2fs", self.policy_version, time.monotonic() - start)
        return self.policy_version

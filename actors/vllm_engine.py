"""The one place that knows vLLM's API and its CPU quirks."""
from __future__ import annotations

import itertools
import logging
import os
import warnings

from .chat import TurnTemplate, prompt_ids
from .config import EngineConfig

EXTENSION = "actors.vllm_worker_ext.WeightSyncExtension"


def _configure_env(cfg: EngineConfig) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Keep the driver's progress bar readable; the logger level also covers messages vLLM logs
    # while importing, before it reads the variable.
    logging.getLogger("vllm").setLevel(os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR"))
    # In-process engine core: starts in seconds, and collective_rpc reaches the worker directly.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cfg.kv_cache_gib)))
        import torch
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)


class VLLMEngine:
    def __init__(self, cfg: EngineConfig, model_path: str, seed: int):
        if cfg.dtype == "auto":  # vLLM would read it as "the checkpoint's dtype"; the driver resolves it
            raise ValueError("engines.dtype=auto reached an engine unresolved (cluster/precision.py)")
        _configure_env(cfg)
        from vllm import LLM

        self.cfg = cfg
        kwargs = dict(
            model=model_path, dtype=cfg.dtype, seed=seed, enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls=EXTENSION, use_tqdm_on_load=False,
            # Logprobs of the distribution actually sampled (after temperature), which is what
            # the learner recomputes; identical to raw logprobs at temperature 1.
            logprobs_mode="processed_logprobs",
        )
        if cfg.device == "cuda":
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._turns: TurnTemplate | None = None

    @property
    def turns(self) -> TurnTemplate:
        """The turn layout (multi-turn rollouts only: a single turn needs nothing of it)."""
        if self._turns is None:
            self._turns = TurnTemplate(self.tokenizer)
        return self._turns

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tokenizer, messages)

    def generate(self, prompt_ids: list[list[int]], n: int, greedy: bool) -> list[list[dict]]:
        """For each prompt, n samples: token ids, per-token logprobs, text, finish reason."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Engine-level seed only: a per-request seed kills the CPU engine under chunked prefill.
        params = SamplingParams(
            n=n, max_tokens=self.cfg.max_new_tokens, logprobs=0,
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=1.0 if greedy else self.cfg.top_p)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                 use_tqdm=False)
        return [[self._sample(c) for c in out.outputs] for out in outs]

    def continue_turns(self, contexts: list[list[int]], max_tokens: list[int], greedy: bool) -> list[dict]:
        """One more model turn for each context (token ids as they are: prompt, earlier turns and the
        observation), all in one engine call; each with its own token budget."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=1, max_tokens=m, logprobs=0, temperature=0.0 if greedy else self.cfg.temperature,
                                 top_p=1.0 if greedy else self.cfg.top_p) for m in max_tokens]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params, use_tqdm=False)
        return [self._sample(out.outputs[0]) for out in outs]

    @staticmethod
    def _sample(c) -> dict:
        ids = list(c.token_ids)
        picked = [c.logprobs[i][t] for i, t in enumerate(ids)] if c.logprobs else []
        # Character offset where each token ends: lets a process reward map its steps
        # (found in the text) to token indices without a tokenizer of its own.
        offsets = list(itertools.accumulate(len(p.decoded_token or "") for p in picked))
        return {"token_ids": ids, "logprobs": [p.logprob for p in picked], "text": c.text,
                "offsets": offsets, "finish_reason": c.finish_reason or "length"}

    def reseed(self, seed: int) -> None:
        """Sampling draws from each worker's global torch generator: seed it for the next call."""
        self.llm.collective_rpc("gf_seed", args=(seed,))

    def init_weight_sync(self, host, port, rank_offset, world_size, backend, timeout_s) -> list[int]:
        return self.llm.collective_rpc("gf_init_sync",
                                       args=(host, port, rank_offset, world_size, backend, timeout_s))

    def raw_receive(self, numel: int, dtype: str) -> None:
        self.llm.collective_rpc("gf_raw_receive", args=(numel, dtype))

    def load_weights(self, plan) -> int:
        """Receive and load a push; returns the policy version it carried."""
        versions = self.llm.collective_rpc("gf_receive", args=(plan,))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        return versions[0]

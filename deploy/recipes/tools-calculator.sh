#!/usr/bin/env bash
# SmolLM2-135M-Instruct learns to multiply with a calculator: held-out accuracy of the base model
# without and with the tool, after SFT on tool traces, and after GRPO with the tool.
# Usage: bash deploy/recipes/tools-calculator.sh [OUT_DIR]   (JSON reports in OUT_DIR; ~1 h on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/tools-demo}
GF=${GF:-.venv/bin/groupflow}
CFG=deploy/configs/tools-calculator.yaml
mkdir -p "$OUT"
BASE=$(.venv/bin/python -c "from cluster.models import ensure_smollm2; print(ensure_smollm2())")
$GF traces --config $CFG --count 2000 --out "$OUT/tool-traces.jsonl"
$GF eval --checkpoint "$BASE" --config $CFG --json "$OUT/base-no-tool.json" rollout.env=single
$GF eval --checkpoint "$BASE" --config $CFG --json "$OUT/base-tool.json"
$GF sft --config deploy/configs/sft-tools.yaml --run-dir "$OUT/sft" data.path="$OUT/tool-traces.jsonl"
$GF eval --checkpoint "$OUT/sft/checkpoints/final" --config $CFG --json "$OUT/sft-tool.json"
# GRPO from the SFT model; its run evaluates at start (= after SFT) and end, with the tool
$GF train --config $CFG --run-dir "$OUT/grpo" model.path="$OUT/sft/checkpoints/final"
$GF report "$OUT/grpo"

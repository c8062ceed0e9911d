"""How many of a model's bf16 weights move when its fp32 master weights take one Adam-sized step.

DeepSpeed's bf16 mode keeps fp32 master weights but runs the forward on bf16 copies. An Adam step moves
a weight by about the learning rate; a bf16 copy changes only when that crosses a rounding boundary
(bf16 keeps 8 significant bits: an ulp of |w| * 2^-7). Usage: python scripts/bf16_weight_moves.py
[MODEL_DIR] (default: SmolLM2-135M-Instruct from groupflow's cache). Prints the fraction per lr.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    else:
        from cluster.models import ensure_smollm2
        model = ensure_smollm2()
    weights = torch.cat([t.flatten().float() for f in sorted(model.glob("*.safetensors"))
                         for t in load_file(f).values()])
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(weights.shape, generator=gen) < 0.5, -1.0, 1.0)
    print(f"{weights.numel()} weights; median |w| {weights.abs().median().item():.4f}, "
          f"median bf16 ulp there {(weights.abs().median() * 2 ** -7).item():.2e}")
    for lr in (1e-6, 1e-5, 3e-5, 1e-4):
        moved = (weights + lr * sign).bfloat16() != weights.bfloat16()
        print(f"lr {lr:g}: {moved.float().mean().item():.1%} of the bf16 weights change in one step")


if __name__ == "__main__":
    main()

"""Side by side in one process: the learner's forward+backward on a GSM8K-shaped packed micro-batch
(SmolLM2 fp32; 2 groups of 8, prompts of 150 tokens, completions of 60-128) with the dense block mask
(SDPA) and with learner/attention.py; logprobs and gradients compared, JSON on stdout's last line.
    .venv/bin/python scripts/bench_packed_attention.py"""
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM
from cluster.models import ensure_smollm2
from learner.batch import make_packed_micro, completion_logits
from learner.attention import register
from learner.algorithms import token_logprobs
torch.set_num_threads(2)
random.seed(0)
models = {a: AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=torch.float32, attn_implementation=a)
          for a in ("sdpa", register())}
V = 49152
prompts, comps = [], []
for g in range(2):
    p = [random.randrange(V) for _ in range(150)]
    for j in range(8):
        prompts.append(p); comps.append([random.randrange(V) for _ in range(random.randint(60, 128))])
mb = make_packed_micro(prompts, comps, list(range(16)), 0)
print("rows", tuple(mb.input_ids.shape))
times, res = {a: [] for a in models}, {}
for rep in range(4):
    for a, m in models.items():
        m.zero_grad()
        t = time.perf_counter()
        lp = token_logprobs(completion_logits(m, mb), mb.comp_ids) * mb.comp_mask
        lp.sum().backward()
        times[a].append(time.perf_counter() - t)
        res[a] = (lp.detach(), {n: p.grad for n, p in m.named_parameters()})
(a_lp, a_g), (b_lp, b_g) = res.values()
med = {a: statistics.median(v[1:]) for a, v in times.items()}  # the first of each is a warm-up
print(json.dumps({"seconds": times, "median_s": med, "ratio": med["groupflow_packed"] / med["sdpa"],
                  "logprob_max_abs_diff": (a_lp - b_lp).abs().max().item(),
                  "grad_max_rel_diff": max(((a_g[n] - b_g[n]).norm() / a_g[n].norm()).item() for n in a_g)}))

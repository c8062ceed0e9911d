"""Weight transport from learner rank 0 to every engine worker.

`base.py` plans coalesced buckets and is transport-agnostic; `torch_dist.py` moves them over a
torch.distributed group (gloo on CPU, nccl on GPU: the same code, another backend and device).
Both the learner and the engine workers import from here; neither imports the other.
"""

"""Weight transport from learner rank 0 to every engine worker: a leaf package (it imports only
torch) that both ends import, so neither role depends on the other or on the driver.

`plan.py` plans coalesced buckets and packs them, transport-agnostic; `torch_dist.py` moves them
over a torch.distributed group (gloo on CPU, nccl on GPU: the same code, another backend and
device). The driver's per-step orchestration of a push is cluster/weight_sync.py.
"""

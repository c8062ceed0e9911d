"""Bucket plans and a real gloo broadcast between processes."""
import multiprocessing as mp

import torch

from weightsync.plan import TensorSpec, pack, plan_buckets, unpack
from weightsync.torch_dist import TorchDistTransport, free_port


def test_plan_coalesces_in_order_and_respects_the_limit():
    specs = [TensorSpec(f"p{i}", (256, 256)) for i in range(10)] + [TensorSpec("big", (2048, 1024))]
    plan = plan_buckets(specs, "float32", bucket_mb=1.0)  # 1 MiB = 4 tensors of 256 KiB
    assert [len(b) for b in plan.buckets] == [4, 4, 2, 1]
    assert [s.name for b in plan.buckets for s in b] == [s.name for s in specs]
    assert plan.total_bytes == (10 * 256 * 256 + 2048 * 1024) * 4


def test_pack_unpack_roundtrip_casts_to_the_wire_dtype():
    ts = [torch.randn(3, 4), torch.randn(5)]
    bucket = (TensorSpec("a", (3, 4)), TensorSpec("b", (5,)))
    flat = pack(ts, torch.bfloat16, "cpu")
    assert flat.dtype == torch.bfloat16 and flat.numel() == 17
    out = dict(unpack(flat, bucket))
    torch.testing.assert_close(out["a"], ts[0].to(torch.bfloat16))
    assert out["b"].shape == (5,)


def _member(rank, port, world, q):
    t = TorchDistTransport("127.0.0.1", port, rank, world, "gloo", timeout_s=60)
    buf = torch.arange(10, dtype=torch.float32) if rank == 0 else torch.zeros(10)
    t.broadcast(buf)
    q.put((rank, buf.tolist()))


def test_gloo_broadcast_reaches_every_member():
    ctx = mp.get_context("spawn")
    q, port, world = ctx.Queue(), free_port(), 3
    procs = [ctx.Process(target=_member, args=(r, port, world, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(60)
    assert all(v == list(map(float, range(10))) for v in results.values())

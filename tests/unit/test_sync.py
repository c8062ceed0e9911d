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


def _survivor(rank, port, world, q, release):
    t = TorchDistTransport("127.0.0.1", port, rank, world, "gloo", timeout_s=120)
    import os
    import time
    q.put(("ready", rank, os.getpid()))
    time.sleep(3)  # the dead member is gone by now
    start = time.monotonic()
    try:
        t.broadcast(torch.zeros(4))
        q.put(("done", rank, "completed", time.monotonic() - start))
    except Exception as e:  # noqa: BLE001 - what each member saw is the result
        q.put(("done", rank, type(e).__name__, time.monotonic() - start))
    release.wait(60)  # rank 0 hosts the group's store: it lives on, as the learner does


def test_a_member_blocked_by_a_dead_peer_gives_up_when_the_group_is_aborted():
    """One receiver is SIGKILLed before a broadcast: the sender's pair breaks, but the other receiver
    would wait on it until the group's timeout (120 s here). abort() on the group's store ends every
    member's wait within a second or so, so the driver can replace the dead engine and push again."""
    import os
    import signal
    import time

    from weightsync.torch_dist import abort
    ctx = mp.get_context("spawn")
    q, port, world, release = ctx.Queue(), free_port(), 3, ctx.Event()
    procs = [ctx.Process(target=_survivor, args=(r, port, world, q, release)) for r in range(world)]
    for p in procs:
        p.start()
    pids = {rank: pid for _, rank, pid in (q.get(timeout=120) for _ in range(world))}
    os.kill(pids[1], signal.SIGKILL)
    sender = q.get(timeout=30)  # the sender fails at once
    time.sleep(5)
    blocked = q.empty()  # the receiver still waits
    abort("127.0.0.1", port)
    seen = {rank: (what, took) for _, rank, what, took in [sender, q.get(timeout=60)]}
    release.set()
    for p in procs:
        p.join(30)
    assert seen[0][0] == "RuntimeError"  # the sender: "Connection closed by peer"
    assert seen[2][0] == "Aborted" and blocked, seen  # the receiver waited until told

"""The logging seam: one RunLog.step call reaches metrics.jsonl and TensorBoard, read back with
TensorBoard's own reader."""
import json
import time

from cluster.config import LoggingConfig, WandbConfig
from cluster.metrics import RunLog
from cluster.sinks import tensorboard_tag


def scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_one_call_feeds_jsonl_and_tensorboard(tmp_path):
    log = RunLog(tmp_path, 2, show_progress=False)
    log.step({"step": 1, "reward_mean": 0.25, "loss": -0.5, "eval_pass@1": 0.1, "grad_norm": float("nan")})
    log.step({"step": 2, "reward_mean": 0.75, "loss": -0.25, "time_generate_s": 3.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    got = scalars(tmp_path / "tensorboard")
    assert got["reward/mean"] == [(1, 0.25), (2, 0.75)]
    assert got["loss"] == [(1, -0.5), (2, -0.25)]
    assert got["eval/pass@1"] == [(1, 0.10000000149011612)] and got["time/generate_s"] == [(2, 3.0)]
    assert "grad/norm" not in got  # a non-finite value is left out, not plotted as a spike


def test_a_resumed_run_hides_the_redone_steps(tmp_path):
    log = RunLog(tmp_path, 3, show_progress=False)
    for s in (1, 2, 3):
        log.step({"step": s, "loss": float(s)})
    log.close()
    log = RunLog(tmp_path, 2, show_progress=False, first_step=3)  # resumed after step 2: 3 is redone
    log.step({"step": 3, "loss": 30.0})
    log.close()
    assert scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_tags_group_by_prefix():
    assert tensorboard_tag("kl_k3") == "kl/k3" and tensorboard_tag("loss") == "loss"


def test_one_structured_line_per_step(capsys, tmp_path):
    log = RunLog(tmp_path, 1, show_progress=False, sinks=LoggingConfig(tensorboard=False, prometheus=False))
    log.step({"step": 4, "reward_mean": 0.5, "kl": 0.012345, "time_step_s": 61.0, "not_in_the_line": 1})
    log.close()
    assert capsys.readouterr().out == "groupflow step=4 reward_mean=0.5 kl=0.01235 time_step_s=61\n"


def wandb_history(run_dir) -> list[dict]:
    """The history records of an offline W&B run, read from its .wandb file (LevelDB log framing of
    protobuf records) with wandb's own protobuf schema."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding (a block the writer closed early): records go on at the next block
            pos += 32768 - pos % 32768
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_records_every_step_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(tmp_path, 2, show_progress=False, config={"trainer": {"steps": 2}},
                 sinks=LoggingConfig(tensorboard=False, prometheus=False,
                                     wandb=WandbConfig(project="groupflow-test", mode="offline")))
    log.step({"step": 1, "reward_mean": 0.25, "loss": -0.5})
    log.step({"step": 2, "reward_mean": 0.75, "loss": -0.25})
    log.close()
    # wandb's service process writes the file: under load it may finish the write after finish() returns
    deadline = time.monotonic() + 30
    while len(rows := wandb_history(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(r["_step"], r["reward/mean"], r["loss"]) for r in rows] == [(1, 0.25, -0.5), (2, 0.75, -0.25)]

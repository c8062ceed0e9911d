"""`groupflow chaos`: a config run twice with the same seed, once clean and once under a seeded schedule
of real faults, then the two compared: final weights, per-step metrics, rollouts.

Faults are real signals to real processes, found by the title Ray gives a worker while a call runs
(`ray::RolloutActor.generate`) or while it idles (`ray::RolloutActor`), so each lands in the phase it
names: an engine generating, idle (the next weight push finds it dead) or receiving a push; a learner
rank scoring or training; a reward worker scoring; the driver itself (SIGTERM, then `--resume auto`,
as a preemption and its resubmission would). Exactly once means the chaos run ends on the clean run's
weights: in fp32, equal.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# fault -> (process title that marks its phase, signal); "idle" waits for the learner's update, when
# engines sit idle, and takes an engine whose title is bare
FAULTS = {
    "engine-generating": ("ray::RolloutActor.generate", signal.SIGKILL),
    "engine-idle": ("ray::RolloutActor", signal.SIGKILL),
    "engine-receiving": ("ray::RolloutActor.load_weights", signal.SIGKILL),
    "learner-scoring": ("ray::LearnerActor.prepare", signal.SIGKILL),
    "learner-training": ("ray::LearnerActor.train", signal.SIGKILL),
    "reward-worker": ("ray::RewardWorker.score", signal.SIGKILL),
    "driver-sigterm": ("ray::LearnerActor.train", signal.SIGTERM),
}
# what the driver prints when it takes each recovery path
PATHS = (("starting a replacement", "engine replaced in place"),
         ("restarting from", "restart from the newest checkpoint"),
         ("replacing it and running its share again", "reward worker replaced"))
# per-step metrics that depend only on what was trained on (not on timing)
LEARNING_KEYS = ("reward_mean", "reward_std", "loss", "kl", "entropy", "grad_norm", "clip_fraction",
                 "response_length_mean", "generated_tokens", "policy_version", "logprob_abs_diff_mean")


@dataclass
class Fault:
    after_step: int   # injected once this step is logged (0: during the first step)
    kind: str
    pid: int = 0
    title: str = ""
    step_in_flight: int = 0
    recovery: str = "not reached"
    recovery_s: float | None = None


def schedule(n: int, steps: int, seed: int) -> list[Fault]:
    """n faults at seeded random steps, in the order they are injected: every kind once (as n allows),
    then kinds drawn at random."""
    rng = random.Random(seed)
    kinds = rng.sample(list(FAULTS), min(n, len(FAULTS))) + [rng.choice(list(FAULTS)) for _ in range(n - len(FAULTS))]
    # after step s, the fault lands in step s + 1; the last step has no weight push after it: not drawn
    return sorted((Fault(rng.randrange(max(1, steps - 1)), k) for k in kinds), key=lambda f: f.after_step)


def parse_schedule(text: str) -> list[Fault]:
    """"STEP:KIND,..." (e.g. "1:engine-generating,2:learner-training"), injected in that order."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        step, _, kind = item.partition(":")
        if kind not in FAULTS or not step.isdigit():
            raise ValueError(f"--schedule item {item!r}: want STEP:KIND with KIND one of {', '.join(FAULTS)}")
        out.append(Fault(int(step), kind))
    return out


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


class Titles:
    """Pids by process title (argv[0], which Ray sets), polled often: the list of Ray workers is
    re-read from /proc twice a second, their titles at every look."""

    def __init__(self):
        self._workers: list[int] = []
        self._listed = 0.0

    def __call__(self, title: str) -> list[int]:
        if time.monotonic() - self._listed > 0.5:
            self._workers = [int(e) for e in os.listdir("/proc") if e.isdigit() and _title(int(e)).startswith("ray::")]
            self._listed = time.monotonic()
        return [pid for pid in self._workers if _title(pid) == title]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    try:
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # being rewritten (a resume's rewind): read again later
        return []


class Run:
    """A `groupflow train` subprocess of the chaos side, relaunched with `--resume auto` when it exits
    early (after a SIGTERM, or a failure that used up its restarts)."""

    def __init__(self, argv: list[str], run_dir: Path, log: Path):
        self.argv, self.run_dir, self.log = argv, run_dir, log
        self.launches, self.exits = 0, []
        self._out = open(log, "a")
        self.proc = self._launch(resume=False)

    def _launch(self, resume: bool) -> subprocess.Popen:
        self.launches += 1
        argv = self.argv + (["--resume", "auto"] if resume else [])
        return subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, text=True)

    def alive(self) -> bool:
        """False once it finished; an early exit is followed by a resume."""
        code = self.proc.poll()
        if code is None:
            return True
        if code == 0:
            return False
        self.exits.append(code)
        if self.launches > 20:
            raise RuntimeError(f"the chaos run exited {self.exits} and was resumed {self.launches - 1} times; see {self.log}")
        self.proc = self._launch(resume=True)
        return True

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"the chaos run did not finish within {timeout_s:g}s; see {self.log}")
            time.sleep(0.5)
        self._out.close()


def inject(run: Run, fault: Fault, rng: random.Random, timeout_s: float, titles: Titles) -> None:
    """Wait for the fault's step and phase, send its signal, then follow the recovery."""
    title, sig = FAULTS[fault.kind]
    gate = "ray::LearnerActor.train" if fault.kind == "engine-idle" else title  # engines idle while it trains
    deadline = time.monotonic() + timeout_s
    while True:
        if not run.alive() or time.monotonic() > deadline:
            return  # finished (or stuck) before the phase came: not reached
        if max(logged_steps(run.run_dir), default=0) >= fault.after_step and titles(gate):
            pids = [run.proc.pid] if fault.kind == "driver-sigterm" else titles(title)
            if pids:
                break
        time.sleep(0.005)
    pid = rng.choice(pids)
    offset, killed_at = len(run.output()), time.monotonic()
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # its call ended just now: try again at the next chance
        return inject(run, fault, rng, deadline - time.monotonic(), titles)
    fault.pid, fault.title = pid, "groupflow train (driver)" if fault.kind == "driver-sigterm" else title
    fault.step_in_flight = max(logged_steps(run.run_dir), default=0) + 1
    launches, last = run.launches, None
    while run.alive() and time.monotonic() < deadline:
        # recovered: the step in flight is logged; after a SIGTERM, a step logged by the resumed driver
        logged = max(logged_steps(run.run_dir), default=0)
        if fault.kind != "driver-sigterm":
            if logged >= fault.step_in_flight:
                break
        elif run.launches > launches:
            last = logged if last is None else last
            if logged > last:
                break
        time.sleep(0.05)
    fault.recovery_s = round(time.monotonic() - killed_at, 2)
    text = run.output()[offset:]
    paths = [name for marker, name in PATHS if marker in text]
    if run.launches > launches:
        paths.append(f"exit {run.exits[-1]}, checkpoint kept, resumed with --resume auto")
    fault.recovery = "; ".join(paths) or "none needed (the step went on)"


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoints" / "final" / "model.safetensors")


def compare(clean: Path, chaos: Path) -> dict:
    """How far the chaos run ended from the clean one: weights, learning metrics, rollouts."""
    import pyarrow.parquet as pq
    a, b = _weights(clean), _weights(chaos)
    weights = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else None
    rows_a = {r["step"]: r for r in map(json.loads, (clean / "metrics.jsonl").read_text().splitlines())}
    lines = (chaos / "metrics.jsonl").read_text().splitlines()
    rows_b = {r["step"]: r for r in map(json.loads, lines)}
    diffs = {k: max((abs(rows_a[s][k] - rows_b[s][k]) for s in rows_a if s in rows_b and k in rows_a[s]
                     and k in rows_b[s]), default=None) for k in LEARNING_KEYS}
    same_rollouts = []
    for f in sorted((clean / "rollouts").glob("step_*.parquet")):
        other = chaos / "rollouts" / f.name
        cols = ("prompt_id", "completion_token_ids", "reward")
        same_rollouts.append(other.is_file() and all(
            pq.read_table(f).column(c).to_pylist() == pq.read_table(other).column(c).to_pylist() for c in cols))
    return {"max_abs_weight_diff": weights, "max_abs_metric_diff": diffs,
            "steps_logged": [json.loads(x)["step"] for x in lines],
            "rollout_steps_equal": sum(same_rollouts), "rollout_steps": len(same_rollouts)}


def chaos(config: str | None, overrides: list[str], run_dir: Path, faults: list[Fault], seed: int,
          clean: Path | None = None, timeout_s: float = 3600.0) -> dict:
    """Run clean (unless given), run under `faults`, compare. Both runs get the same config and the
    restart budgets the faults need (which change nothing that is learned)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(faults)
    budget = [f"trainer.max_restarts={n + 1}", f"engines.max_restarts={n + 1}"]
    base = [sys.executable, "-m", "cluster.cli", "train", "--no-progress", *(["--config", config] if config else [])]
    times = {}
    if clean is None:
        clean, started = run_dir / "clean", time.monotonic()
        with open(run_dir / "clean.log", "w") as out:
            code = subprocess.run([*base, "--run-dir", str(clean), *overrides, *budget], stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        if code != 0:
            raise RuntimeError(f"the clean run failed (exit {code}); see {run_dir / 'clean.log'}")
        times["clean_s"] = round(time.monotonic() - started, 1)
    started, rng, titles = time.monotonic(), random.Random(seed), Titles()
    run = Run([*base, "--run-dir", str(run_dir / "chaos"), *overrides, *budget], run_dir / "chaos", run_dir / "chaos.log")
    for fault in faults:
        inject(run, fault, rng, timeout_s, titles)
        print(f"groupflow chaos: {fault.kind} after step {fault.after_step}: pid {fault.pid} ({fault.title}) in "
              f"step {fault.step_in_flight} -> {fault.recovery} in {fault.recovery_s}s", flush=True)
    run.wait(timeout_s)
    times["chaos_s"] = round(time.monotonic() - started, 1)
    return {"faults": [asdict(f) for f in faults], "injected": sum(f.pid > 0 for f in faults),
            "driver_exits": run.exits, **times, **compare(clean, run_dir / "chaos")}


def table(report: dict) -> str:
    """The faults and the verdict as a Markdown table (the README's)."""
    lines = ["| # | fault | step | recovery | recovered in |", "|---|---|---|---|---|"]
    for i, f in enumerate(report["faults"], 1):
        took = f"{f['recovery_s']:.1f} s" if f["recovery_s"] is not None else "-"
        lines.append(f"| {i} | {f['kind']} | {f['step_in_flight'] or '-'} | {f['recovery']} | {took} |")
    lines.append(f"\nfinal weights: max abs diff {report['max_abs_weight_diff']}; steps logged "
                 f"{report['steps_logged']}; rollouts equal in {report['rollout_steps_equal']} of "
                 f"{report['rollout_steps']} steps")
    return "\n".join(lines)

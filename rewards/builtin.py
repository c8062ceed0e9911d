"""Built-in reward functions, looked up by name from the rewards config.

REWARD_FUNCTIONS maps a name to a factory: factory(options) -> score(prompt, completion, metadata),
returning a float, or a list of (reward, end_token_index) pairs for per-step rewards.
BATCH_REWARD_FUNCTIONS does the same for scorers that take a whole batch: score_batch(samples,
deadline=None), deadline a time.monotonic() value the call must finish by.
The factories are classes defined at module level, so a worker process can import this module and
build its own scorers from plain option dicts. metadata carries "answer" (gold, may be None), "id",
"completion_token_ids", and "tests" for code tasks.
"""
from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import logging
import math
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from .numbers import last_number, numbers_equal, parse_number
from .sandbox import SandboxLimits, run_sandboxed

log = logging.getLogger("groupflow.rewards")


def _take(options: dict | None, name: str, allowed: dict) -> dict:
    """Defaults overlaid with the given options; an unknown key is a typo, said at build time."""
    options = dict(options or {})
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"reward {name!r}: unknown option(s) {sorted(unknown)}; "
                         f"known: {sorted(allowed)}")
    return {**allowed, **options}


# ---------------------------------------------------------------- math

# "The answer is 18." / "answer is: \$1,000!": the number must end the sentence or line, so
# "The answer is 5 + 13 = 18." does not read as 5 (nor "18.5" as 18).
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*(?:\\?\$)?\s*(-?[\d,]*\.?\d+)(?![\d,]|\.\d)"
                        r"\$?\s*(?:[.!]|$)", re.IGNORECASE | re.MULTILINE)


def gold_text(answer: Any) -> str | None:
    """A gold answer as text math-verify can parse: numbers, LaTeX, or GSM8K's '... #### 18'."""
    if answer is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(int(answer)) if float(answer).is_integer() else repr(float(answer))
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip().replace(",", "") if re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", text) else text
    return text.strip()


class _DropTimeoutNotice(logging.Filter):
    """math-verify warns that its timeout is off; we turn it off on purpose (see MathReward)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())


class MathReward:
    """1.0 if the completion's final answer equals the gold answer mathematically, else 0.0."""

    def __init__(self, options: dict | None = None):
        self.opts = _take(options, "math", {"float_rounding": 6})
        import math_verify  # noqa: F401 - here, not at module top: sympy takes ~0.3 s to load, and
        # a worker pays it while building its scorers, not inside its first sample's time limit

    def __call__(self, prompt: str, completion: str, metadata: dict) -> float:
        from math_verify import parse, verify

        gold = gold_text(metadata.get("answer"))
        if not gold:
            return 0.0
        # Both timeouts off: math-verify's own use SIGALRM, which only works in a main thread (in
        # a Ray worker thread every call would fail and score 0). The caller bounds our time.
        gold_parsed = parse(gold if gold.startswith("$") else f"${gold}$", parsing_timeout=None)
        if not gold_parsed:
            gold_parsed = parse(gold, parsing_timeout=None)
        pred = parse(completion, parsing_timeout=None)
        if pred and gold_parsed and verify(gold_parsed, pred, timeout_seconds=None,
                                           float_rounding=self.opts["float_rounding"]):
            return 1.0
        # Plain "The answer is N" phrasing, in case extraction picked another expression.
        found = _ANSWER_IS.findall(completion)
        gold_num = parse_number(gold)
        if found and gold_num is not None and numbers_equal(parse_number(found[-1]), gold_num):
            return 1.0
        return 0.0


# ---------------------------------------------------------------- format

_NO_TAGS = r"(?:(?!</?think>|</?answer>).)*"  # tag-free text: no second block hidden inside
_R1_FORMAT = re.compile(rf"\s*(?:<think>)?{_NO_TAGS}</think>\s*<answer>{_NO_TAGS}</answer>\s*",
                        re.DOTALL)


class FormatReward:
    """The R1 template: <think>...</think> then <answer>...</answer>, nothing else but whitespace.
    The opening <think> may instead end the prompt (chat templates that open the thought)."""

    def __init__(self, options: dict | None = None):
        _take(options, "format", {})

    def __call__(self, prompt: str, completion: str, metadata: dict) -> float:
        return 1.0 if _R1_FORMAT.fullmatch(completion) else 0.0


# ---------------------------------------------------------------- last number (the old task scorer)

class LastNumberReward:
    """1.0 if the last number in the completion equals the (numeric) gold answer."""

    def __init__(self, options: dict | None = None):
        _take(options, "last_number", {})

    def __call__(self, prompt: str, completion: str, metadata: dict) -> float:
        answer = metadata.get("answer")
        if answer is None:
            return 0.0
        if not isinstance(answer, (int, float)):
            answer = parse_number(str(answer).rsplit("####", 1)[-1])
            if answer is None:
                raise ValueError(f"last_number: gold answer {metadata.get('answer')!r} is no number")
        return 1.0 if numbers_equal(last_number(completion), float(answer)) else 0.0


# ---------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last ```python block; else the last untagged ``` block; else the whole text."""
    blocks = _FENCE.findall(completion)
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [body for lang, body in blocks if lang.lower() in wanted]
        if chosen:
            return chosen[-1]
    return completion


def normalize_output(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed, blank lines at either end dropped."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def check_sandbox(limits: SandboxLimits, who: str) -> None:
    """Runs a trivial program in the sandbox once, when a scorer or tool is built (at start, in each
    scoring process): a sandbox that cannot work here (not root, no namespaces, limits too tight for
    the interpreter) stops the run with its reason instead of failing every sample. Isolation that is
    impossible raises run_sandboxed's SandboxUnavailableError as is."""
    probe = run_sandboxed("print(6 * 7)", "", dataclasses.replace(limits, wall_s=max(limits.wall_s, 10.0)))
    if not (probe.ok and probe.stdout.strip() == "42"):
        why = ("timed out" if probe.timed_out else f"killed by signal {probe.killed_by_signal}"
               if probe.killed_by_signal is not None else f"exit {probe.returncode}")
        raise RuntimeError(f"{who}: the sandbox cannot run a trivial program with these limits ({limits}): "
                           f"{why}, stdout {probe.stdout[-200:]!r}, stderr {probe.stderr[-500:]!r}")

class CodeReward:
    """Runs the completion's program in the sandbox on each test's stdin; the reward is the fraction
    of tests whose stdout matches (or 1/0 with all_or_nothing). Options: all_or_nothing, total_s (all
    tests together; a test that does not fit fails; keep it below rewards.sample_timeout_s), plus any
    SandboxLimits field (cpu_s, wall_s, memory_mb, nprocs, file_mb, output_kb, allow_unisolated...)."""

    def __init__(self, options: dict | None = None):
        fields = {f.name: f.default for f in dataclasses.fields(SandboxLimits)}
        opts = _take(options, "code", {"all_or_nothing": False, "total_s": 8.0, **fields})
        self.all_or_nothing = bool(opts.pop("all_or_nothing"))
        self.total_s = float(opts.pop("total_s"))
        if opts.get("ro_binds") is not None:
            opts["ro_binds"] = tuple(opts["ro_binds"])
        self.limits = SandboxLimits(**opts)
        check_sandbox(self.limits, "code reward")

    def __call__(self, prompt: str, completion: str, metadata: dict) -> float:
        tests = metadata.get("tests")
        if not tests:
            raise ValueError(f"code reward: sample {metadata.get('id')!r} has no metadata['tests']")
        program = extract_code(completion)
        passed, end = 0, time.monotonic() + self.total_s
        for test in tests:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break  # the rest fail: the sample's time is up
            limits = dataclasses.replace(self.limits, wall_s=min(self.limits.wall_s, remaining))
            result = run_sandboxed(program, str(test.get("input", "")), limits)
            ok = result.ok and normalize_output(result.stdout) == normalize_output(
                str(test["output"]))
            passed += ok
            if not ok and self.all_or_nothing:
                return 0.0  # no point running the rest
        return passed / len(tests)


# ---------------------------------------------------------------- a user's Python function

def load_function(spec: str) -> Callable:
    """'path/to/file.py:function' -> the function, loaded from that file by path."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise ValueError(f"python reward: expected 'path/to/file.py:function', got {spec!r}")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"python reward: no such file {path} (from {spec!r})")
    mod_name = f"groupflow_user_reward_{abs(hash(str(path)))}"
    module = sys.modules.get(mod_name)
    if module is None:
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # errors in the user's module surface as they are
        sys.modules[mod_name] = module
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise AttributeError(f"python reward: {path} has no function {name!r} (it defines {public})")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"python reward: {path}:{name} is a {type(fn).__name__}, not callable")
    return fn


class PythonReward:
    """A user's fn(prompt, completion, metadata) -> float | list[(reward, end_token_index)]."""

    def __init__(self, options: dict | None = None):
        opts = _take(options, "python", {"function": None})
        if not opts["function"]:
            raise ValueError("python reward: option 'function' ('path/to/file.py:function') is required")
        self.spec = opts["function"]
        self.fn = load_function(self.spec)

    def __call__(self, prompt: str, completion: str, metadata: dict) -> float | list[tuple[float, int]]:
        out = self.fn(prompt, completion, metadata)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            return float(out)
        try:
            steps = [(float(r), int(i)) for r, i in out]
        except (TypeError, ValueError):
            raise TypeError(f"python reward {self.spec}: returned {type(out).__name__} {out!r:.80}; "
                            f"expected a float or a list of (reward, end_token_index) pairs") from None
        return steps


# ---------------------------------------------------------------- a user's HTTP server (batched)

class RewardServerError(RuntimeError):
    pass


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy / torch values in metadata
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class HttpReward:
    """POSTs {"samples": [{prompt, completion, answer, metadata}]} and expects {"rewards": [...]}
    of the same length. Connection errors and 5xx/429 are retried with exponential backoff; a timeout
    is not (a slow server would only get slower), nor is a malformed reply."""

    def __init__(self, options: dict | None = None):
        opts = _take(options, "http", {"url": None, "timeout_s": 30.0, "retries": 3, "backoff_s": 0.5})
        if not opts["url"]:
            raise ValueError("http reward: option 'url' is required")
        self.url, self.timeout_s = str(opts["url"]), float(opts["timeout_s"])
        self.retries, self.backoff_s = int(opts["retries"]), float(opts["backoff_s"])
        if self.retries < 0 or self.timeout_s <= 0:
            raise ValueError(f"http reward: need retries >= 0 and timeout_s > 0, got {opts}")

    def __call__(self, samples: list[dict], deadline: float | None = None) -> list[float]:
        """deadline (time.monotonic()): every attempt and backoff must end by then."""
        if not samples:
            return []
        body = json.dumps({"samples": [
            {"prompt": s.get("prompt"), "completion": s.get("completion"),
             "answer": s.get("answer", (s.get("metadata") or {}).get("answer")),
             "metadata": s.get("metadata") or {}} for s in samples]}, default=_jsonable).encode()
        reply = self._post(body, deadline)
        return self._parse(reply, len(samples))

    def _post(self, body: bytes, deadline: float | None) -> bytes:
        def out_of_time(attempts: int, last: str) -> RewardServerError:
            return RewardServerError(f"reward server {self.url}: the batch's time budget ran out after "
                                     f"{attempts} attempt(s); last: {last}")

        for attempt in range(self.retries + 1):
            budget = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
            if budget <= 0:
                raise out_of_time(attempt, problem if attempt else "none made")
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=budget) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                problem = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code < 500 and e.code != 429:
                    raise RewardServerError(f"reward server {self.url}: {problem}") from None
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError too
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    if budget < self.timeout_s:
                        raise out_of_time(attempt + 1, f"no reply within the {budget:.2f}s left") from None
                    raise RewardServerError(f"reward server {self.url}: no reply within "
                                            f"timeout_s={self.timeout_s}s") from None
                problem = f"connection failed: {reason}"
            if attempt < self.retries:
                delay = self.backoff_s * 2 ** attempt
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise out_of_time(attempt + 1, problem)
                log.warning("reward server %s: %s; retry %d/%d in %.2fs", self.url, problem,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise RewardServerError(f"reward server {self.url}: {problem} "
                                f"(gave up after {self.retries + 1} attempts)")

    def _parse(self, reply: bytes, n: int) -> list[float]:
        def bad(what: str) -> RewardServerError:
            return RewardServerError(f"reward server {self.url}: malformed reply, {what} "
                                     f"(reply starts {reply[:200]!r})")
        try:
            data = json.loads(reply)
        except ValueError:
            raise bad("not JSON") from None
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list):
            raise bad('expected an object {"rewards": [float, ...]}')
        if len(rewards) != n:
            raise bad(f"{len(rewards)} rewards for {n} samples")
        for i, r in enumerate(rewards):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise bad(f"reward {i} is {r!r}, not a finite number")
        return [float(r) for r in rewards]


REWARD_FUNCTIONS: dict[str, Callable[[dict], Callable]] = {
    "math": MathReward,
    "format": FormatReward,
    "code": CodeReward,
    "python": PythonReward,
    "last_number": LastNumberReward,
}
BATCH_REWARD_FUNCTIONS: dict[str, Callable[[dict], Callable]] = {"http": HttpReward}

"""Environments: a rollout as a conversation. The model takes a turn; the environment answers with an
observation (a tool's output) or ends the episode; the model goes on.

Why in rewards/: an environment is the interactive side of a task, and its steps run where rewards
run, in the reward workers' subprocesses (the code sandbox lives there), with the same containment:
a step that hangs, raises or dies ends that trajectory and is counted; the run goes on.

A user's environment is one Python file named in config, `rollout.env: path/to/file.py:MyEnv`:

    class MyEnv:
        def __init__(self, options: dict):   # rollout.env_options
            ...
        def start(self, row: dict) -> list[dict]:
            # the first messages of an episode (row["messages"] is the task's prompt)
            return row["messages"]
        def step(self, row: dict, turns: list[dict], text: str):
            # `text`: the model's latest turn; `turns`: the episode so far after the first messages,
            # [{"role": "assistant" | "observation", "content": str}]. Return None to end the episode,
            # an observation (str), or {"observation": str | None, "reward": float, "tool_ok": bool}.
            ...

An environment keeps no state between calls (any process may take the next step): what it needs is
in the row and the turns. `reward`s of an episode's steps are added to its task reward; `tool_ok`
False counts a failed tool call (a bad expression, code that raised).
"""
from __future__ import annotations

import ast
import math
import operator
import re
import sys

from .builtin import load_function

ENV_SPEC = "__env__"  # the scorer spec name of the environment in a reward worker's subprocesses


def start_messages(row: dict, system: str) -> list[dict]:
    """The row's messages with `system` put first (joined to the task's own system prompt, if any)."""
    msgs = [dict(m) for m in row["messages"]]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{system}\n{msgs[0]['content']}"
        return msgs
    return [{"role": "system", "content": system}, *msgs]


# ---------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str, max_exponent: int = 64, max_digits: int = 100) -> float | int:
    """An arithmetic expression's value: numbers, + - * / // % **, parentheses; nothing else (no
    names, calls or attributes: the expression is parsed, never passed to eval). Raises ValueError."""
    if len(expression) > 200:
        raise ValueError("expression too long")
    source = expression.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None
    # A float past ~1.8e308 is inf (1e999 parses to it) and inf - inf is nan: an error, never a result
    over = f"over the float range (about {sys.float_info.max:.2g})"

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise ValueError(f"{ast.get_source_segment(source, node)} is not a finite number: {over}")
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > max_exponent:
                raise ValueError(f"exponent {b} over {max_exponent}")
            try:
                out = _BINARY[type(node.op)](a, b)
            except ZeroDivisionError as e:
                raise ValueError(str(e)) from None
            except OverflowError:
                raise ValueError(f"the result is not a finite number: {over}") from None
            if isinstance(out, complex):
                raise ValueError("the result is not a real number")
            if isinstance(out, float) and not math.isfinite(out):
                raise ValueError(f"the result is not a finite number: {over}")
            if isinstance(out, int) and len(str(abs(out))) > max_digits:
                raise ValueError(f"result over {max_digits} digits")
            return out
        raise ValueError(f"{type(node).__name__} is not allowed")
    return value(tree)


def _number(v: float | int) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:.10g}" if isinstance(v, float) else str(v)


class TaggedTool:
    """A tool the model calls by writing its input between two tags (the CALL pattern); the first
    call of a turn runs (`run`: input -> (output, ok)); a turn without a call ends the episode (its
    text is the answer). The system prompt says how, joined to the task's own."""

    SYSTEM = ""
    CALL = re.compile(r"$^")

    def __init__(self, options: dict):
        self.system = options.get("system_prompt", self.SYSTEM)

    def start(self, row: dict) -> list[dict]:
        return start_messages(row, self.system)

    def step(self, row: dict, turns: list[dict], text: str):
        call = self.CALL.search(text)
        if call is None:
            return None
        output, ok = self.run(call.group(1))
        return {"observation": output, "tool_ok": ok}

    def run(self, tool_input: str) -> tuple[str, bool]:
        raise NotImplementedError


class CalculatorEnv(TaggedTool):
    """<calc>expression</calc> -> <result>value</result> (or <error>why</error>)."""

    SYSTEM = ("You have a calculator. To use it, reply with only <calc>expression</calc>, for example "
              "<calc>12 * 34</calc>; the result comes back as <result>408</result>. Then reply with the answer.")
    CALL = re.compile(r"<calc>(.*?)</calc>", re.S)

    def run(self, expression: str) -> tuple[str, bool]:
        try:
            return f"<result>{_number(evaluate(expression))}</result>", True
        except ValueError as e:
            return f"<error>{e}</error>", False


class PythonToolEnv(TaggedTool):
    """<python>code</python> runs in the code sandbox (rewards/sandbox.py); its stdout (or the
    error's last line) comes back as <output>...</output>."""

    SYSTEM = ("You can run Python. To do so, reply with only <python>code</python>; what it prints comes "
              "back as <output>...</output>. Then reply with the answer.")
    CALL = re.compile(r"<python>(.*?)</python>", re.S)

    def __init__(self, options: dict):
        from .builtin import check_sandbox
        from .sandbox import SandboxError, SandboxLimits

        super().__init__(options)
        self.limits = SandboxLimits(**{k: options[k] for k in ("cpu_s", "wall_s", "memory_mb", "output_kb",
                                                               "allow_unisolated") if k in options})
        # Built in each scoring process at start (the pool's readiness check waits for it): a sandbox
        # that cannot run here stops the run then, not every step as env_raised on cut conversations.
        try:
            check_sandbox(self.limits, "python tool (rollout.env python_tool)")
        except SandboxError as e:
            raise type(e)(f"python tool (rollout.env python_tool): {e}") from None

    def run(self, code: str) -> tuple[str, bool]:
        from .sandbox import run_sandboxed

        result = run_sandboxed(code, limits=self.limits)
        if result.ok:
            return f"<output>{result.stdout.strip()}</output>", True
        if result.timed_out:
            why = "timed out"
        elif result.killed_by_signal is not None:  # SIGXCPU/SIGKILL at the CPU limit, or memory
            why = (f"killed by signal {result.killed_by_signal} "
                   f"(cpu_s={self.limits.cpu_s}, memory_mb={self.limits.memory_mb})")
        else:
            why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return f"<output>error: {why}</output>", False


BUILTIN_ENVS = {"calculator": CalculatorEnv, "python_tool": PythonToolEnv}


def make_env(name: str, options: dict):
    """A built-in by name, or a user's class from 'path/to/file.py:Class'."""
    cls = BUILTIN_ENVS[name] if name in BUILTIN_ENVS else load_function(name)
    env = cls(dict(options))
    for method in ("start", "step"):
        if not callable(getattr(env, method, None)):
            raise TypeError(f"rollout.env {name}: {type(env).__name__} has no {method}() method")
    return env


def check_step(value) -> dict:
    """A step's return as {"observation": str | None, "reward": float, "tool_ok": bool | None}."""
    if value is None:
        return {"observation": None, "reward": 0.0, "tool_ok": None}
    if isinstance(value, str):
        return {"observation": value, "reward": 0.0, "tool_ok": None}
    if not isinstance(value, dict) or set(value) - {"observation", "reward", "tool_ok"}:
        raise ValueError(f"step() must return None, a str or a dict with observation/reward/tool_ok; got {value!r}"[:300])
    obs, reward = value.get("observation"), float(value.get("reward") or 0.0)
    if obs is not None and not isinstance(obs, str):
        raise ValueError(f"step() observation must be a str or None, got {type(obs).__name__}")
    if not math.isfinite(reward):
        raise ValueError(f"step() reward must be finite, got {reward}")
    ok = value.get("tool_ok")
    return {"observation": obs, "reward": reward, "tool_ok": None if ok is None else bool(ok)}


def check_start(value) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise ValueError(f"start() must return a non-empty list of {{role, content}} messages; got {value!r}"[:300])
    return value


class EnvCaller:
    """The environment inside a scoring subprocess: one job is {"op": "start", "row"} or
    {"op": "step", "row", "turns", "text"} (the pool passes it as the job's metadata)."""

    def __init__(self, options: dict):
        self.env = make_env(options["env"], options.get("options") or {})

    def __call__(self, prompt: str, completion: str, job: dict):
        if job["op"] == "start":
            return check_start(self.env.start(job["row"]))
        return check_step(self.env.step(job["row"], job["turns"], job["text"]))

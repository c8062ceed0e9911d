"""Built-in rewards: math on real GSM8K rows, the R1 format, last_number, code, a user's Python
function, and a user's HTTP reward server (a real local server in a thread)."""
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards.builtin import (BATCH_REWARD_FUNCTIONS, REWARD_FUNCTIONS, RewardServerError,
                             extract_code, gold_text)
from rewards.tasks import parse_number

from tests.conftest import GSM8K, ROOT


def score(name, completion, answer=None, options=None, **metadata):
    return REWARD_FUNCTIONS[name](options or {})("prompt", completion, {"answer": answer, "id": "x", **metadata})


# ---------------------------------------------------------------- math

@pytest.fixture(scope="module")
def gsm8k_rows():
    with GSM8K.open() as f:
        return [json.loads(next(f)) for _ in range(8)]


def test_math_on_gsm8k_rows(gsm8k_rows):
    for row in gsm8k_rows:
        gold = row["answer"]
        n = parse_number(gold.split("####")[-1])
        text = gold_text(gold)
        assert float(text) == n
        work = gold.split("####")[0]  # the reference reasoning, full of intermediate numbers
        assert score("math", f"{work}The answer is {text}.", gold) == 1.0
        assert score("math", f"{work}So the total is $\\boxed{{{text}}}$", gold) == 1.0
        assert score("math", f"{work}The answer is {n + 1:g}.", gold) == 0.0
        assert score("math", f"The answer is {text}.", n) == 1.0  # gold as a float, as tasks.py keeps it


def test_math_equivalent_forms():
    forms = ["0.5", "1/2", "\\frac{1}{2}", "$\\frac{1}{2}$", "\\boxed{\\frac{1}{2}}", "The answer is 0.5."]
    for gold in [0.5, "0.5", "1/2", "\\frac{1}{2}", "#### 0.5"]:
        assert [score("math", c, gold) for c in forms] == [1.0] * len(forms), gold
        assert score("math", "\\boxed{0.6}", gold) == 0.0
        assert score("math", "\\boxed{\\frac{1}{3}}", gold) == 0.0
    assert score("math", "\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score("math", "The answer is 1,000.", "#### 1,000") == 1.0
    assert score("math", "anything", None) == 0.0


def test_math_answer_is_fallback():
    assert score("math", "The answer is \\$18.", "#### 18") == 1.0  # an escaped dollar sign
    assert score("math", "Total: the answer is: \\$1,000!", 1000) == 1.0
    # A number that does not end the sentence is no final answer: not 5 here, nor 18 in "18.5".
    assert score("math", "The answer is 5 + 13 = 18.", 5) == 0.0
    assert score("math", "The answer is 5 + 13 = 18.", 18) == 1.0
    assert score("math", "So the answer is 18.5", 18) == 0.0


def test_math_works_off_the_main_thread():
    # math-verify's own timeout uses SIGALRM: in a worker thread it would fail every call.
    out = []
    t = threading.Thread(target=lambda: out.append(score("math", "\\boxed{\\frac{1}{2}}", 0.5)))
    t.start()
    t.join(30)
    assert out == [1.0]


# ---------------------------------------------------------------- format, last_number

@pytest.mark.parametrize("completion,expected", [
    ("<think>reason</think><answer>42</answer>", 1.0),
    ("  <think>\na < b\n</think>\n\n<answer>\n42\n</answer>\n", 1.0),
    ("reasoning after the prompt's own opening tag</think>\n<answer>42</answer>", 1.0),
    ("<think>reason</think>\nstray text\n<answer>42</answer>", 0.0),
    ("<think>reason</think><answer>42</answer> trailing", 0.0),
    ("<answer>42</answer>", 0.0),
    ("<think>reason</think>", 0.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<think>a</think><think>b</think><answer>1</answer>", 0.0),
    ("<answer>1</answer><think>a</think>", 0.0),
])
def test_format(completion, expected):
    assert score("format", completion) == expected


def test_last_number():
    assert score("last_number", "3 + 4 is 7", 7.0) == 1.0
    assert score("last_number", "7, or maybe 8", 7.0) == 0.0
    assert score("last_number", "so 1,000 in all", "blah\n#### 1,000") == 1.0
    assert score("last_number", "no number", 7.0) == 0.0


# ---------------------------------------------------------------- code

def test_extract_code_takes_the_last_python_block():
    text = "```python\nprint(1)\n```\nfixed:\n```python\nprint(2)\n```\n```\nplain\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") == "print(4)"


@pytest.mark.skipif(os.geteuid() != 0, reason="the isolated sandbox needs root")
def test_code_reward_through_the_registry():
    tests = [{"input": "2\n", "output": "4"}, {"input": "3\n", "output": "9"}]
    prog = "Squares:\n```python\nn = int(input())\nprint(n * n)\n```"
    assert score("code", prog, tests=tests) == 1.0
    assert score("code", prog.replace("n * n", "n + n"), tests=tests) == 0.5
    with pytest.raises(ValueError, match="no metadata\\['tests'\\]"):
        score("code", prog)


# ---------------------------------------------------------------- a user's Python function

USER_MODULE = """
def reward(prompt, completion, metadata):
    return len(completion) / 10

def steps(prompt, completion, metadata):
    return [(0.5, 3), (1, 7)]

def broken(prompt, completion, metadata):
    return "high"

NOT_A_FUNCTION = 3
"""


def test_python_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_MODULE)
    assert score("python", "abcde", options={"function": f"{path}:reward"}) == 0.5
    assert score("python", "x", options={"function": f"{path}:steps"}) == [(0.5, 3), (1.0, 7)]
    with pytest.raises(TypeError, match="broken: returned str"):
        score("python", "x", options={"function": f"{path}:broken"})
    with pytest.raises(FileNotFoundError, match="no such file"):
        REWARD_FUNCTIONS["python"]({"function": f"{tmp_path}/missing.py:reward"})
    with pytest.raises(AttributeError, match="no function 'nope'.*'reward'"):
        REWARD_FUNCTIONS["python"]({"function": f"{path}:nope"})
    with pytest.raises(TypeError, match="NOT_A_FUNCTION is a int, not callable"):
        REWARD_FUNCTIONS["python"]({"function": f"{path}:NOT_A_FUNCTION"})
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        REWARD_FUNCTIONS["python"]({"function": str(path)})


# ---------------------------------------------------------------- registry

def test_factories_reject_unknown_options_and_travel_between_processes():
    with pytest.raises(ValueError, match="unknown option.*'timeout'"):
        REWARD_FUNCTIONS["code"]({"timeout": 3})
    for name in ("math", "format", "last_number") + (("code",) if os.geteuid() == 0 else ()):
        scorer = pickle.loads(pickle.dumps(REWARD_FUNCTIONS[name]({})))
        assert callable(scorer)
    # As the pool does it: import in a fresh interpreter, build from a plain dict, score.
    code = ("from rewards.builtin import REWARD_FUNCTIONS as R\n"
            "print(R['math']({})('p', 'The answer is 18.', {'answer': 'x #### 18'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1.0", out.stderr


# ---------------------------------------------------------------- http

class Handler(BaseHTTPRequestHandler):
    calls: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        samples = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["samples"]
        n = self.calls[self.path] = self.calls.get(self.path, 0) + 1
        rewards = [len(s["completion"]) + (s["answer"] == s["metadata"]["answer"]) for s in samples]
        if self.path == "/flaky" and n <= 2:
            return self.reply(503, b"overloaded")
        if self.path == "/hang":
            self.server.release.wait(10)
        body = {"/short": {"rewards": rewards[:-1]}, "/nonnum": {"rewards": ["high"] * len(samples)},
                "/list": rewards}.get(self.path, {"rewards": rewards})
        if self.path == "/bad_request":
            return self.reply(400, b"no such model")
        self.reply(200, json.dumps(body).encode())

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # /hang: the client has given up
            pass


@pytest.fixture
def server():
    Handler.calls = {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.release = threading.Event()
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.release.set()
    srv.shutdown()
    srv.server_close()


SAMPLES = [{"prompt": "p", "completion": "ab", "answer": 1.0, "metadata": {"answer": 1.0, "id": "a"}},
           {"prompt": "p", "completion": "abcd", "answer": "x", "metadata": {"answer": "x", "id": "b"}}]


def http(url, **options):
    return BATCH_REWARD_FUNCTIONS["http"]({"url": url, "backoff_s": 0.05, **options})


def test_http_success(server):
    assert http(server + "/ok")(SAMPLES) == [3.0, 5.0]
    assert http(server + "/ok")([]) == []


@pytest.mark.parametrize("path,message", [
    ("/short", "1 rewards for 2 samples"),
    ("/nonnum", "reward 0 is 'high', not a finite number"),
    ("/list", 'expected an object {"rewards"'),
    ("/bad_request", "HTTP 400.*no such model"),
])
def test_http_malformed_reply_names_url_and_problem(server, path, message):
    with pytest.raises(RewardServerError, match=f"{server}{path}: .*{message}"):
        http(server + path)(SAMPLES)
    assert Handler.calls[path] == 1  # a malformed reply is not retried


def test_http_retries_then_succeeds(server):
    assert http(server + "/flaky", retries=3)(SAMPLES) == [3.0, 5.0]
    assert Handler.calls["/flaky"] == 3


def test_http_gives_up_after_retries(server):
    with pytest.raises(RewardServerError, match="HTTP 503.*gave up after 2 attempts"):
        http(server + "/flaky", retries=1)(SAMPLES)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{probe.getsockname()[1]}"  # bound but not listening: refused
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="connection failed.*gave up after 3 attempts"):
        http(closed, retries=2)(SAMPLES)
    probe.close()
    assert 0.15 <= time.monotonic() - start < 5  # backoff 0.05 + 0.1


def test_http_stays_within_the_batch_deadline(server):
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="time budget ran out after 1 attempt.*within the 0.[45]"):
        http(server + "/hang", timeout_s=30)(SAMPLES, deadline=start + 0.5)
    assert time.monotonic() - start < 1.5
    # Retries stop where the next backoff would cross the deadline: the first (0.3 s) fits, the
    # second (0.6 s more) does not.
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="budget ran out after 2 attempt.*HTTP 503"):
        http(server + "/flaky", retries=3, backoff_s=0.3)(SAMPLES, deadline=start + 0.7)
    assert time.monotonic() - start < 0.7 and Handler.calls["/flaky"] == 2
    with pytest.raises(RewardServerError, match="budget ran out after 0 attempt"):
        http(server + "/ok")(SAMPLES, deadline=time.monotonic())


def test_http_timeout(server):
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="no reply within timeout_s=0.5s"):
        http(server + "/hang", timeout_s=0.5)(SAMPLES)
    assert time.monotonic() - start < 3

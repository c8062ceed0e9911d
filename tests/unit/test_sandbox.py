"""The code sandbox against hostile programs: each must score 0 while the host stays unharmed.

Where a program would pass if run unsandboxed, the test first shows that it does (a control run with
plain subprocess), so only the isolation can be what makes the sandboxed run score 0.
"""
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards.builtin import REWARD_FUNCTIONS, normalize_output
from rewards.sandbox import SandboxError, SandboxLimits, run_sandboxed

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                                reason="the isolated sandbox needs root on Linux")

LIMITS = dict(cpu_s=1, wall_s=2.0, memory_mb=256, nprocs=16, output_kb=64)
ROOT = Path(__file__).resolve().parents[2]


def code_reward(program: str, tests: list[dict], **options) -> float:
    score = REWARD_FUNCTIONS["code"]({**LIMITS, **options})
    return score("", f"Here you go:\n```python\n{program}\n```\n", {"id": "t", "tests": tests})


def unsandboxed_stdout(program: str, stdin: str = "") -> str:
    """Control run: what the program prints with no sandbox at all."""
    return subprocess.run([sys.executable, "-c", program], input=stdin, capture_output=True,
                          text=True, timeout=10).stdout


def sandbox_uid_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == 65534:
                pids.append(int(entry))
        except FileNotFoundError:
            pass
    return pids


@pytest.fixture(autouse=True)
def host_left_clean():
    """Every test: no sandbox process and no sandbox temp dir outlives the run."""
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "groupflow-sandbox-*")))
    yield
    assert sandbox_uid_processes() == []
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "groupflow-sandbox-*"))) <= before
    assert subprocess.run(["true"]).returncode == 0  # the host can still spawn processes


ECHO_SUM = "a, b = map(int, input().split())\nprint(a + b)"
TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"},
         {"input": "0 0", "output": " 0 \n\n"}, {"input": "5 5", "output": "10"}]


def test_correct_program_passes_every_test():
    assert code_reward(ECHO_SUM, TESTS) == 1.0


def test_half_correct_program_gets_half_or_nothing():
    half = "a, b = map(int, input().split())\nprint(a + b if a + b < 5 else a * b)"
    assert code_reward(half, TESTS) == 0.5  # 3 and 0 right, 6 and 10 wrong (-40, 25)
    assert code_reward(half, TESTS, all_or_nothing=True) == 0.0


def test_output_comparison_normalizes_whitespace_only():
    assert normalize_output(" 1   2 \n\n3\n\n") == ["1 2", "", "3"]
    assert normalize_output("1 2\n3") != normalize_output("12\n3")
    assert code_reward("print('1   2')\nprint()\nprint(' 3')", [{"input": "", "output": "1 2\n\n3\n"}]) == 1.0


def test_large_stdin_is_fed_and_read():
    data = "x" * 1_000_000 + "\n"
    assert code_reward("import sys\nprint(len(sys.stdin.read()))", [{"input": data, "output": "1000001"}]) == 1.0


def test_reading_etc_passwd_fails():
    program = "print(open('/etc/passwd').read(), end='')"
    expected = Path("/etc/passwd").read_text()
    assert normalize_output(unsandboxed_stdout(program)) == normalize_output(expected)
    assert code_reward(program, [{"input": "", "output": expected}]) == 0.0
    result = run_sandboxed(program, "", SandboxLimits(**LIMITS))
    assert "FileNotFoundError" in result.stderr and result.stdout == ""


def test_reading_a_file_outside_its_directory_fails():
    secret = uuid.uuid4().hex
    with tempfile.NamedTemporaryFile("w", dir="/tmp", suffix=".secret", delete=False) as f:
        f.write(secret)
    try:
        os.chmod(f.name, 0o644)  # readable by anyone, uid 65534 included: only isolation can stop it
        program = f"print(open({f.name!r}).read())"
        assert unsandboxed_stdout(program).strip() == secret
        assert code_reward(program, [{"input": "", "output": secret}]) == 0.0
        # Nor by walking up from its own directory.
        walk = "import os\nprint(sorted(os.listdir('/')), sorted(os.listdir('..')), os.getcwd())"
        out = run_sandboxed(walk, "", SandboxLimits(**LIMITS)).stdout
        assert "tmp" not in out and "etc" not in out and "/sandbox" in out
    finally:
        os.unlink(f.name)


def test_network_is_unreachable():
    token = uuid.uuid4().hex
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.sendall(token.encode())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
               "print(s.recv(100).decode())")
    try:
        assert unsandboxed_stdout(program).strip() == token  # the control run does get through
        time.sleep(0.2)
        seen = len(accepted)
        assert code_reward(program, [{"input": "", "output": token}]) == 0.0
        time.sleep(0.2)
        assert len(accepted) == seen  # the sandboxed program never reached the server
        result = run_sandboxed(program, "", SandboxLimits(**LIMITS))
        assert "Network is unreachable" in result.stderr or "refused" in result.stderr
    finally:
        server.close()


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    # The nastier kind swallows the errors and spins until the wall clock kills its namespace.
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
])
def test_fork_bomb_is_contained(bomb):
    start = time.monotonic()
    assert code_reward(bomb + "\nprint('done')", [{"input": "", "output": "done"}]) == 0.0
    assert time.monotonic() - start < LIMITS["wall_s"] + 2
    assert sandbox_uid_processes() == []
    assert subprocess.run(["true"]).returncode == 0


def test_a_fork_bomb_does_not_starve_a_sandbox_of_another_uid():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    forker = "import os\nfor _ in range(4):\n    if os.fork() == 0:\n        os._exit(0)\n    os.wait()\nprint('forked')"
    t = threading.Thread(target=run_sandboxed, args=(bomb, "", SandboxLimits(**{**LIMITS, "wall_s": 3.0})))
    t.start()
    try:
        time.sleep(1.0)  # by now the bomb holds every process uid 65534 may have
        try:  # control: the same uid cannot fork, or not even start its program
            starved = not run_sandboxed(forker, "", SandboxLimits(**LIMITS)).ok
        except SandboxError:
            starved = True
        assert starved
        assert run_sandboxed(forker, "", SandboxLimits(**LIMITS, uid=60020)).stdout == "forked\n"
    finally:
        t.join()


def test_tests_that_do_not_fit_in_total_s_fail():
    program = "import time\nx = input()\ntime.sleep(float(x))\nprint(x)"
    tests = [{"input": "0", "output": "0"}, {"input": "3", "output": "3"}, {"input": "0", "output": "0"}]
    score = REWARD_FUNCTIONS["code"]({**LIMITS, "wall_s": 5.0, "total_s": 1.5})
    start = time.monotonic()
    # The first passes, the second is cut at the 1.5 s left, the third gets no time at all.
    assert score("", f"```python\n{program}\n```", {"id": "t", "tests": tests}) == pytest.approx(1 / 3)
    assert time.monotonic() - start < 2.5


def test_background_process_does_not_outlive_the_run():
    program = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()  # try to escape the process group as well
            time.sleep(60)
        print('ok')
    """)
    start = time.monotonic()
    result = run_sandboxed(program, "", SandboxLimits(**LIMITS))
    assert result.ok and result.stdout == "ok\n"
    assert time.monotonic() - start < 1.5  # killed with the namespace, not waited out
    assert sandbox_uid_processes() == []


def test_allocating_10_gib_fails():
    program = "x = bytearray(10 * 2**30)\nprint('allocated')"
    assert code_reward(program, [{"input": "", "output": "allocated"}]) == 0.0
    result = run_sandboxed(program, "", SandboxLimits(**LIMITS))
    assert "MemoryError" in result.stderr and result.returncode == 1


def test_infinite_loop_is_stopped():
    start = time.monotonic()
    assert code_reward("while True:\n    pass\nprint(1)", [{"input": "", "output": "1"}]) == 0.0
    # A wall clock far off, so the CPU limit is what stops it even on a loaded machine.
    result = run_sandboxed("while True:\n    pass", "", SandboxLimits(**{**LIMITS, "wall_s": 20}))
    assert result.killed_by_signal == signal.SIGXCPU and not result.ok and not result.timed_out
    sleeper = run_sandboxed("import time\ntime.sleep(30)", "", SandboxLimits(**LIMITS))
    assert sleeper.timed_out and sleeper.killed_by_signal == signal.SIGKILL
    assert 1.9 < sleeper.duration_s < 3.5
    assert time.monotonic() - start < 12


def test_huge_output_is_truncated():
    program = "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)"  # 1 GiB
    start = time.monotonic()
    result = run_sandboxed(program, "", SandboxLimits(**LIMITS))
    assert result.output_truncated and not result.ok
    assert len(result.stdout) == LIMITS["output_kb"] * 1024
    assert time.monotonic() - start < LIMITS["wall_s"]  # cut at the cap, not at the deadline
    assert code_reward(program, [{"input": "", "output": "x" * 2**30}]) == 0.0


def test_runs_as_nobody_in_a_fresh_directory_with_limits():
    program = textwrap.dedent("""
        import os, resource
        open('scratch.txt', 'w').write('hi')
        print(os.getuid(), os.getcwd(), sorted(os.listdir('.')))
        print(resource.getrlimit(resource.RLIMIT_NPROC), resource.getrlimit(resource.RLIMIT_CPU))
        try:
            open('big', 'w').write('x' * (2 << 20))
        except OSError as e:
            print('fsize', e.errno)
    """)
    result = run_sandboxed(program, "", SandboxLimits(**LIMITS))
    assert result.stdout.splitlines() == [
        "65534 /sandbox ['main.py', 'scratch.txt']", "(16, 16) (1, 2)", "fsize 27"]
    # The next run starts from an empty directory again.
    assert run_sandboxed("import os\nprint(os.listdir('.'))", "", SandboxLimits(**LIMITS)).stdout == "['main.py']\n"


UNPRIVILEGED = """
import sys
sys.path.insert(0, {root!r})
from rewards.sandbox import SandboxLimits, SandboxUnavailableError, run_sandboxed
try:
    run_sandboxed("print(1)", "", SandboxLimits())
    print("RAN")
except SandboxUnavailableError as e:
    print("REFUSED", e)
r = run_sandboxed("print(6 * 7)", "", SandboxLimits(allow_unisolated=True))
print("UNISOLATED", r.stdout.strip(), r.isolated)
from rewards.builtin import REWARD_FUNCTIONS
try:
    REWARD_FUNCTIONS["code"]({{}})
    print("BUILT")
except SandboxUnavailableError as e:
    print("REFUSED AT BUILD", e)
"""


def test_without_privileges_it_refuses_unless_allowed():
    # A new user namespace leaves this process without root on the host: a real non-root caller.
    out = subprocess.run(["unshare", "--user", sys.executable, "-c", UNPRIVILEGED.format(root=str(ROOT))],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED code sandbox unavailable: needs root"), lines
    assert "allow_unisolated=True" in lines[0]
    assert lines[1] == "UNISOLATED 42 False"
    assert lines[2].startswith("REFUSED AT BUILD code sandbox unavailable: needs root"), lines


"""Run untrusted Python (model-written code) in a throwaway sandbox on Linux.

Isolation, set up by a small launcher (this file run as a script, as root) before it execs the program:
  - new mount, network, PID, IPC and UTS namespaces (ctypes `unshare`; Python 3.11 has no os.unshare);
  - a fresh tmpfs as the root, holding read-only, nosuid bind mounts of only what the interpreter needs
    (/usr, /lib*, the interpreter's prefix, /dev/null|zero|urandom), then chroot: /etc, /tmp, /work
    and the rest of the host are simply not there;
  - the program's cwd is /sandbox, a small tmpfs of its own that vanishes with the mount namespace;
  - an unprivileged uid ($GROUPFLOW_SANDBOX_UID, one per scoring process as RLIMIT_NPROC counts per
    uid; else 65534) with no_new_privs, so RLIMIT_NPROC applies and setuid binaries don't;
  - rlimits: CPU seconds, address space, processes, file size, open files, no core dumps;
  - a wall-clock deadline and capped stdout/stderr enforced by the caller, which then has the launcher
    kill the namespace's init (so does the caller's death): the kernel kills every process left in
    the namespace before init is reaped, so nothing outlives a run.

Process tree: caller -> launcher (host namespaces) -> init (PID 1 of the new namespace, root) ->
program (PID 2, the sandbox uid). Init exists because a PID-1 program would ignore signals such as SIGXCPU.
Without root, run_sandboxed refuses unless allow_unisolated is set (then: rlimits and a temp dir only).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SANDBOX_DIR = "/sandbox"
SETUP_FAILED = 125


# ---------------------------------------------------------------- launcher side (runs as a script)

def _libc():
    libc = ctypes.CDLL(None, use_errno=True)  # unshare, mount, prctl return int: the default restype
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, src, dst, fstype, flags, data=None, what=""):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), what or f"mount {dst}")


def _bind_ro(libc, src: str, dst: str) -> None:
    os.makedirs(dst if os.path.isdir(src) else os.path.dirname(dst), exist_ok=True)
    if not os.path.isdir(src):
        open(dst, "a").close()  # a file mounts onto a file
    _mount(libc, src, dst, None, MS_BIND, what=f"bind {src}")
    # A bind mount takes its flags only from a remount; without it the view would be writable.
    ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (0 if src.startswith("/dev/") else MS_NODEV)
    _mount(libc, None, dst, None, ro, what=f"remount {src} read-only")


def _build_root(libc, cfg: dict) -> None:
    root = cfg["root"]
    # Private propagation first, so none of the mounts below leak into the host's namespace.
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, what="make / private")
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755", "tmpfs root")
    for top in ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
        if os.path.islink(top):  # merged-/usr systems: /lib -> usr/lib
            os.symlink(os.readlink(top), root + top)
        elif os.path.isdir(top):
            _bind_ro(libc, top, root + top)
    for path in cfg["ro_binds"]:
        if os.path.exists(path) and not os.path.exists(root + path):
            _bind_ro(libc, path, root + path)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
        _bind_ro(libc, dev, root + dev)
    work = root + SANDBOX_DIR
    os.makedirs(work)
    _mount(libc, "tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,mode=700,uid={cfg['uid']},gid={cfg['gid']}", "tmpfs /sandbox")
    with open(os.path.join(cfg["host_dir"], "main.py"), "rb") as src, \
            open(work + "/main.py", "wb") as dst:
        dst.write(src.read())
    os.chown(work + "/main.py", cfg["uid"], cfg["gid"])
    _mount(libc, None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, what="ro root")


def _exec_program(libc, cfg: dict) -> None:
    """In the program's process: confine, drop privileges, set limits, exec. Never returns."""
    if cfg["isolate"]:
        os.chroot(cfg["root"])
        os.chdir(SANDBOX_DIR)
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    else:
        os.chdir(cfg["host_dir"])
    os.closerange(3, 65536)  # the status pipe and anything else inherited
    mb = 1 << 20
    limits = [(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),  # soft: SIGXCPU, hard: SIGKILL
              (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
              (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb, cfg["file_mb"] * mb),
              (resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"]),
              (resource.RLIMIT_CORE, 0, 0)]
    if cfg["isolate"]:  # only meaningful for the non-root uid; unisolated runs keep the caller's uid
        limits.append((resource.RLIMIT_NPROC, cfg["nprocs"], cfg["nprocs"]))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": ".", "TMPDIR": "."}
    exe = cfg["interpreter"]
    os.execve(exe, [exe, "-I", "-S", "-B", "-X", "utf8", "main.py"], env)


def _report(fd: int, **msg) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _launch(host_dir: str) -> None:
    import select
    import signal
    with open(os.path.join(host_dir, "config.json")) as f:
        cfg = json.load(f)
    fd, ctl, libc, isolate = cfg["status_fd"], cfg["control_fd"], _libc(), cfg["isolate"]
    try:
        if isolate:
            flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
            _check(libc.unshare(flags), "unshare(mount, net, pid, ipc, uts namespaces)")
            _build_root(libc, cfg)
        else:  # no PID namespace to reap orphans: they come back to us instead
            _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    except OSError as e:
        _report(fd, setup_error=str(e))
        os._exit(SETUP_FAILED)
    init = os.fork()
    if init == 0:
        try:
            os.close(ctl)
            if not isolate:
                os.setpgid(0, 0)  # a group of its own that the launcher can kill without dying
            # If the launcher dies, init dies, and with it every process in the namespace.
            _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
            prog = os.fork()
            if prog == 0:
                try:
                    _exec_program(libc, cfg)
                except BaseException as e:  # noqa: BLE001 - report any setup failure, then die
                    _report(fd, setup_error=f"program setup: {e}")
                os._exit(SETUP_FAILED)
            while True:  # as PID 1, reap every orphan until the program itself is gone
                pid, status = os.waitpid(-1, 0)
                if pid == prog:
                    break
            if os.WIFSIGNALED(status):
                _report(fd, signal=os.WTERMSIG(status))
            else:
                _report(fd, exit=os.WEXITSTATUS(status))
        finally:
            os._exit(0)
    # Init stays our unreaped child until the waitpid below, so neither its pid nor its process
    # group id can be recycled: killing by number is safe. Anything on the control pipe, or its EOF
    # (the caller died), means "kill now".
    try:
        pidfd = os.pidfd_open(init)  # readable once init exits
    except (AttributeError, OSError) as e:
        os.kill(init, signal.SIGKILL)
        _report(fd, setup_error=f"pidfd_open (needs Linux >= 5.3): {e}")
        os._exit(SETUP_FAILED)
    ready, _, _ = select.select([pidfd, ctl], [], [])
    try:
        if isolate and ctl in ready:
            os.kill(init, signal.SIGKILL)
        elif not isolate:  # killed on request, or left behind by the program: its whole group
            os.killpg(init, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(init, 0)  # returns only once the kernel has killed the rest of the namespace
    deadline = time.monotonic() + 1.0
    while not isolate and time.monotonic() < deadline:  # reap orphans handed to us, briefly
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.01)
        except ChildProcessError:
            break
    os._exit(0)


# The launcher stops here (it never returns): the caller's side below needs imports it doesn't.
if __name__ == "__main__":
    _launch(sys.argv[1])


# ---------------------------------------------------------------- caller side
import logging  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

log = logging.getLogger("groupflow.sandbox")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it)."""


class SandboxUnavailableError(SandboxError):
    """Isolation cannot be set up here; raised instead of silently running unsandboxed."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 2  # RLIMIT_CPU: SIGXCPU at cpu_s, SIGKILL a second later
    wall_s: float = 5.0  # whole run, interpreter start-up included
    memory_mb: int = 512  # RLIMIT_AS
    nprocs: int = 16  # RLIMIT_NPROC, counted per uid: shared by sandboxes running as the same uid
    file_mb: int = 1  # RLIMIT_FSIZE, largest file the program may write
    disk_mb: int = 16  # size of the program's tmpfs working directory
    open_files: int = 64  # RLIMIT_NOFILE
    output_kb: int = 64  # stdout and stderr are each cut (and the program killed) past this
    uid: int | None = None  # None: $GROUPFLOW_SANDBOX_UID, else 65534 (nobody)
    gid: int = 65534
    interpreter: str | None = None  # default: the real binary behind sys.executable
    ro_binds: tuple[str, ...] = ()  # extra host paths shown read-only, e.g. a site-packages
    allow_unisolated: bool = False  # without namespaces: rlimits and a temp dir only (unsafe)


@dataclass
class SandboxResult:
    returncode: int | None  # subprocess convention: -N if killed by signal N; None if never known
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_by_signal: int | None = None
    output_truncated: bool = False
    isolated: bool = True
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


_problem: str | None = None  # why isolation is impossible here, once known (stays true)
_warned = False


def run_sandboxed(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a Python program with `stdin`; never raises for anything the program does."""
    global _problem, _warned
    if _problem is None and not sys.platform.startswith("linux"):
        _problem = f"needs Linux namespaces (this is {sys.platform})"
    elif _problem is None and os.geteuid() != 0:
        _problem = (f"needs root: namespaces and mounts take CAP_SYS_ADMIN, dropping to the sandbox "
                    f"uid takes CAP_SETUID (running as uid {os.geteuid()})")
    result = _problem or _run(code, stdin, limits, isolate=True)
    if isinstance(result, str):  # isolation impossible, known before or just found by the launcher
        _problem = result
        if not limits.allow_unisolated:
            raise SandboxUnavailableError(
                f"code sandbox unavailable: {result}. Refusing to run model-written code "
                f"unisolated; set allow_unisolated=True to run it with resource limits only.")
        if not _warned:
            _warned = True
            log.warning("running model-written code WITHOUT isolation: %s", result)
        result = _run(code, stdin, limits, isolate=False)
        if isinstance(result, str):
            raise SandboxError(f"sandbox setup failed: {result}")
    return result


def _run(code: str, stdin: str, limits: SandboxLimits, isolate: bool) -> SandboxResult | str:
    interpreter = os.path.realpath(limits.interpreter or sys.executable)
    prefix = os.path.dirname(os.path.dirname(interpreter))  # .../bin/python3 -> its install prefix
    host_dir = tempfile.mkdtemp(prefix="groupflow-sandbox-")
    status_r, status_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    try:
        os.mkdir(os.path.join(host_dir, "root"))
        with open(os.path.join(host_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        cfg = dict(isolate=isolate, root=os.path.join(host_dir, "root"), host_dir=host_dir,
                   interpreter=interpreter, status_fd=status_w, control_fd=ctl_r,
                   ro_binds=[prefix] + [os.path.realpath(p) for p in limits.ro_binds],
                   uid=int(os.environ.get("GROUPFLOW_SANDBOX_UID", 65534)) if limits.uid is None else limits.uid,
                   **{k: getattr(limits, k) for k in ("cpu_s", "memory_mb", "nprocs", "file_mb",
                                                      "disk_mb", "open_files", "gid")})
        with open(os.path.join(host_dir, "config.json"), "w") as f:
            json.dump(cfg, f)
        start = time.monotonic()  # the launcher gets pipes for the program's stdio, a status
        proc = subprocess.Popen(    # pipe to report on it, and a control pipe to order a kill
            [interpreter, "-I", "-S", "-B", os.path.abspath(__file__), host_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(status_w, ctl_r), start_new_session=True, cwd=host_dir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.close(status_w)
        os.close(ctl_r)
        status_w = ctl_r = -1
        try:
            out, err, status, timed_out, truncated = _communicate(
                proc, stdin.encode(), status_r, start + limits.wall_s, limits.output_kb * 1024)
            if timed_out or truncated:
                try:
                    os.write(ctl_w, b"k")
                except BrokenPipeError:  # the launcher is already gone
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # should not happen; the launcher is our own code
                _killpg(proc.pid)
                proc.wait()
        except BaseException:
            _killpg(proc.pid)
            proc.wait()
            raise
        duration = time.monotonic() - start
    finally:
        for fd in (status_r, status_w, ctl_r, ctl_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(host_dir, ignore_errors=True)

    msgs = [json.loads(line) for line in status.decode().splitlines() if line.strip()]
    for error in (m["setup_error"] for m in msgs if "setup_error" in m):
        if error.startswith("program setup:"):  # not a namespace problem: e.g. exec failed
            raise SandboxError(f"sandbox could not start the program: {error}")
        return error
    sig = next((m["signal"] for m in msgs if "signal" in m), None)
    code_ = next((m["exit"] for m in msgs if "exit" in m), None)
    if sig is None and code_ is None:  # killed before its status came back: by us
        sig = int(signal.SIGKILL)
    return SandboxResult(
        returncode=-sig if sig is not None else code_,
        stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
        timed_out=timed_out, killed_by_signal=sig, output_truncated=truncated,
        isolated=isolate, duration_s=duration)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _communicate(proc, data: bytes, status_fd: int, deadline: float, cap: int):
    """Feed stdin and read stdout, stderr and the status pipe until EOF, the deadline or the cap."""
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    pos = 0
    if data:  # non-blocking, or a program that never reads stdin would block us past the deadline
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = truncated = False
    try:
        while sel.get_map() and not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd == in_fd:
                    try:
                        pos += os.write(fd, data[pos:pos + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the program exited or closed stdin: fine
                        pos = len(data)
                    if pos >= len(data):
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                room = len(chunk) if fd == status_fd else cap - len(buf)
                buf += chunk[:room]
                truncated |= len(chunk) > room
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()  # stdin was only written with os.write: nothing buffered to flush
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_fd]), timed_out, truncated

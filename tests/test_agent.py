"""Tests of guest_agent.py: exec server, callback client, supervisor, setup.

The agent runs as a plain process (the stand-in mode of contract section 3)
on 127.0.0.1 under `unshare --uts`, so its hostname change stays private;
network configuration is tested inside a namespace from the `netns`
fixture, and the PID 1 duties inside `unshare --pid --mount --net --uts`.
Every process a test starts is killed at its end, even on failure.
"""
import importlib.util
import json
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from execstream import AgentApi, check_sequence, joined
from procutil import proc_cpu_seconds, proc_state, stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "guest_agent.py"
PYTHON = sys.executable


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ppid_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children_of(pid):
    return [p for p in all_pids() if ppid_of(p) == pid]


def descendants_of(pid):
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def pids_running(marker):
    """Live (non-zombie) processes whose command line contains marker."""
    pids = []
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and proc_state(pid) not in (None, "Z"):
            pids.append(pid)
    return pids


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def marker():
    """A unique sleep duration, so a test can find its own processes in /proc."""
    return f"{int(time.time()) % 1000 + 100}.{uuid.uuid4().int % 10**6:06d}"


def load_agent_module():
    spec = importlib.util.spec_from_file_location("guest_agent_under_test", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LogReader:
    """Collects a process's stderr lines in a thread."""

    def __init__(self, stream):
        self.lines = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text, count=1, timeout=10.0):
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(text in line for line in self.lines) >= count, timeout)
        assert ok, f"no {text!r} (x{count}) in agent log:\n" + "\n".join(self.lines)

    def text(self):
        with self._cond:
            return "\n".join(self.lines)


class Agent(AgentApi):
    """guest_agent.py as a plain process on 127.0.0.1:<free port>; request() and exec() are
    execstream.AgentApi's."""

    def __init__(self, callback_socket, cmdline="cbox.vm=t1", setup=None):
        """setup: a shell command run before the agent, in a mount namespace of its own."""
        self.port = free_port()
        super().__init__(lambda: socket.create_connection(("127.0.0.1", self.port)), timeout=30)
        self.callback_socket = str(callback_socket)
        env = dict(os.environ, CBOX_CMDLINE=cmdline, CBOX_CALLBACK_SOCKET=str(callback_socket))
        prefix = ["--mount", "sh", "-c", setup + ' && exec "$@"', "setup"] if setup else []
        self.proc = subprocess.Popen(
            ["unshare", "--uts", *prefix, PYTHON, str(AGENT), "--port", str(self.port), "--listen", "127.0.0.1"],
            env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.log = LogReader(self.proc.stderr)
        self.log.wait_for("ready on 127.0.0.1")

    def server_pid(self):
        return self.request("GET", "/health")[1]["pid"]

    def stop(self):
        """SIGTERM, then SIGKILL whatever is left of the agent's process tree."""
        tree = descendants_of(self.proc.pid)
        stop_process(self.proc, grace=5.0)
        kill_pids(tree)
        self.proc.stderr.close()


class CallbackServer:
    """The host end of the callback line protocol, on a Unix socket.

    Methods: "echo" -> {"result": {"method", "params"}}, "fail" -> {"error":
    "boom"}, "hang" -> no answer, "bad" -> not JSON, anything else -> result 42.
    """

    def __init__(self, path):
        self.path = path
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line)
                self.requests.append(request)
                method = request["method"]
                if method == "hang":
                    time.sleep(3)
                    return
                if method == "bad":
                    conn.sendall(b"not json\n")
                    continue
                reply = {"echo": {"result": {"method": method, "params": request.get("params")}},
                         "fail": {"error": "boom"}}.get(method, {"result": 42})
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def short_tmp():
    """A short directory for Unix sockets (paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="cbt")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def callback_server(short_tmp):
    server = CallbackServer(str(short_tmp / "cb.sock"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def agent(callback_server):
    """One agent shared by the HTTP and exec tests of this module."""
    hostname = socket.gethostname()
    a = Agent(callback_server.path)
    try:
        yield a
    finally:
        a.stop()
        assert socket.gethostname() == hostname


@pytest.fixture
def fresh_agent(callback_server):
    """An agent of its own, for tests that kill parts of it."""
    a = Agent(callback_server.path)
    try:
        yield a
    finally:
        a.stop()


def raw_exchange(port, data, responses=1, timeout=10):
    """Send raw bytes, read `responses` HTTP responses; returns [(status line, headers, body)]."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_responses(s, responses)


def read_responses(s, count):
    buf = b""
    out = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed, got {buf!r}"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(buf) < length:
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
        body, buf = buf[:length], buf[length:]
        out.append((lines[0], headers, body))
    return out


# ---------------------------------------------------------------------------
# exec server
# ---------------------------------------------------------------------------

def test_health(agent):
    status, body = agent.request("GET", "/health")
    assert status == 200
    assert body["status"] == "ok" and body["vmName"] == "t1"
    assert isinstance(body["uptimeS"], float) and body["uptimeS"] >= 0
    assert isinstance(body["bootUptimeS"], float) and body["bootUptimeS"] > 0
    assert body["pid"] in children_of(agent.proc.pid)
    assert body["version"]
    assert "agent_start=" in agent.log.text() and "uptime=" in agent.log.text()


def pidfd_getfd(pidfd, fd):
    """pidfd_getfd(2): a duplicate of process pidfd's descriptor fd (OSError when it has none)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    new = libc.syscall(438, pidfd, fd, 0)          # SYS_pidfd_getfd
    if new < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return new


def test_a_listening_socket_made_non_blocking_by_another_holder_does_not_make_the_agent_spin(fresh_agent):
    """Guest root can take the agent's listening socket (pidfd_getfd, as tests/hostile_agent.py
    does) and make it non-blocking: the flag is the shared file's, so the agent's accept()
    then failed with EAGAIN at once, in a loop at 100% CPU. It blocks again instead."""
    pid = fresh_agent.server_pid()
    pidfd = os.pidfd_open(pid)
    try:
        for fd in range(3, 64):
            try:
                sock = socket.socket(fileno=pidfd_getfd(pidfd, fd))
            except OSError:
                continue
            with sock:
                if sock.family == socket.AF_INET and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    sock.setblocking(False)
                    break
        else:
            pytest.fail("no listening socket found in the agent")
    finally:
        os.close(pidfd)

    assert fresh_agent.exec(cmd="echo up")["stdout"] == "up\n"       # it accepts (and wakes to find EAGAIN)
    before = proc_cpu_seconds(pid)
    time.sleep(1.0)
    assert proc_cpu_seconds(pid) - before < 0.3, "the agent spins on accept()"
    assert fresh_agent.exec(cmd="echo still")["stdout"] == "still\n"
    fresh_agent.log.wait_for("the listening socket was made non-blocking")


@pytest.mark.parametrize("cmd, code, error", [
    ("true", 0, ""), ("false", 1, "exit status 1"), ("echo out; exit 3", 3, "exit status 3")])
def test_exec_exit_codes(agent, cmd, code, error):
    r = agent.exec(cmd=cmd)
    assert (r["exitCode"], r["error"], r["signal"], r["timedOut"], r["running"]) == (code, error, None, False, False)
    assert isinstance(r["durationMs"], float) and r["execId"]


def test_exec_env(agent):
    r = agent.exec(cmd='echo "$FOO|$HOME|$LANG|$CBOX_VM_NAME|$CBOX_CALLBACK_PORT|$CBOX_CALLBACK_SOCKET"',
                   env={"FOO": "bar baz", "HOME": "/tmp"})
    assert r["stdout"] == f"bar baz|/tmp|C.UTF-8|t1|4032|{agent.callback_socket}\n"
    path = agent.exec(cmd='echo "$PATH|$PYTHONPATH"')["stdout"].strip().split("|")
    assert path[0].split(":")[0] == path[1] and os.access(os.path.join(path[1], "cbox_callback"), os.X_OK)


def test_exec_cwd(agent, tmp_path):
    assert agent.exec(cmd="pwd", cwd=str(tmp_path))["stdout"] == f"{tmp_path}\n"
    status, body = agent.request("POST", "/exec", {"cmd": "pwd", "cwd": str(tmp_path / "missing")})
    assert status == 400 and body["error"] == f"cwd {tmp_path / 'missing'} does not exist"


def test_exec_stdin(agent):
    assert agent.exec(cmd="cat", stdin="hello\nworld")["stdout"] == "hello\nworld"
    assert agent.exec(cmd="cat")["stdout"] == ""  # /dev/null, not a hang
    big = "x" * (1 << 20)
    assert agent.exec(cmd="wc -c", stdin=big)["stdout"].strip() == str(1 << 20)
    r = agent.exec(cmd="head -c 1 >/dev/null; echo ok", stdin=big)  # stops reading: EPIPE is fine
    assert r["stdout"] == "ok\n" and r["exitCode"] == 0


def test_exec_timeout_kills_process_group(agent):
    m1, m2 = marker(), marker()
    try:
        t0 = time.monotonic()
        r = agent.exec(cmd=f"sleep {m1} & sleep {m2}", timeout=0.5)
        took = time.monotonic() - t0
        assert r["timedOut"] is True and r["error"] == "timed out after 0.5s"
        assert r["exitCode"] is None and r["signal"] == 9
        assert 0.4 < took < 2.0
        assert wait_for(lambda: not pids_running(m1) and not pids_running(m2), 2.0)
    finally:
        kill_pids(pids_running(m1) + pids_running(m2))


def test_escaping_grandchild_does_not_hang(agent):
    m = marker()
    try:
        t0 = time.monotonic()
        r = agent.exec(cmd=f"setsid sleep {m} & echo started")
        assert time.monotonic() - t0 < 2.0
        assert r["exitCode"] == 0 and r["stdout"] == "started\n"
        assert pids_running(m), "the escaped grandchild should still run"
    finally:
        kill_pids(pids_running(m))


@pytest.mark.parametrize("pidfd", [True, False])
@pytest.mark.parametrize("watch_after", [0.0, 0.05, 3600.0])
def test_exit_seen_with_or_without_a_pidfd(monkeypatch, watch_after, pidfd):
    """A command's exit is seen whether it exits with its pipes (a quick command), it
    closes them and runs on, it exits while a background child keeps them open a while,
    or it exits while an escaped grandchild keeps them open and silent; on a pidfd opened
    at the start, the agent holding the pipes' write ends until the command was reaped or
    ran EXIT_WATCH_AFTER_S; where there is no pidfd, when its pipes end or once it ran
    EXIT_WATCH_AFTER_S (a waiter thread)."""
    ga = load_agent_module()
    monkeypatch.setattr(ga, "EXIT_WATCH_AFTER_S", watch_after)
    pidfds, waiters = [], []
    original_pidfd, original_notifier = ga.Exec._pidfd, ga.Exec._exit_notifier
    monkeypatch.setattr(ga.Exec, "_pidfd", lambda ex: pidfds.append(ex.id) or (original_pidfd(ex) if pidfd else None))
    monkeypatch.setattr(ga.Exec, "_exit_notifier", lambda ex: waiters.append(ex.id) or original_notifier(ex))
    ids = iter(range(1 << 20))

    def run(cmd, timeout=None):
        ex = ga.Exec(f"{next(ids):016x}", ga.ExecSpec({"cmd": cmd, "timeout": timeout}))
        ex.start({"PATH": os.environ["PATH"]})
        ex.run()
        assert ex._held == ()
        return ex

    def watched(ex):            # on a pidfd from the start, on a waiter thread, or None: seen as the pipes' end
        if pidfd:
            return "pidfd" if pidfds.count(ex.id) == 1 and ex.id not in waiters else None
        return "waiter" if ex.id in waiters else None

    execs = [run("exit 3") for _ in range(10)]
    assert [ex.returncode for ex in execs] == [3] * 10
    assert not pidfd or {watched(ex) for ex in execs} == {"pidfd"}
    ex = run("sleep 1 & exit 4")         # it exits, then the pipes end (a second later: it was reapable by then)
    assert ex.returncode == 4 and watched(ex) == ("pidfd" if pidfd else "waiter" if watch_after < 1 else None)
    ex = run("exec >&- 2>&-; sleep 0.3; exit 5")
    assert ex.returncode == 5 and watched(ex) == ("pidfd" if pidfd else "waiter")
    ex = run("exec >&- 2>&-; sleep 30", timeout=0.5)     # closed its pipes, runs on: still timed out
    assert (ex.timed_out, ex.returncode) == (True, -9)
    if watch_after and not pidfd:
        return              # the rest would wait an hour for the waiter
    m = marker()
    try:
        ex = run(f"setsid sleep {m} & echo started")
        assert (ex.returncode, ex.result()["stdout"].text()) == (0, "started\n") and pids_running(m)
    finally:
        kill_pids(pids_running(m))


def test_a_quick_command_wakes_the_agent_once_when_it_can_be_reaped(monkeypatch, tmp_path):
    """The agent holds the write ends of a command's stdout and stderr until it was reaped:
    a quick command's exit shows on its pidfd alone, not first as its pipes' hang-up (which
    comes before the kernel makes it reapable); the write ends are released once it was
    reaped, or once it ran EXIT_WATCH_AFTER_S, or when it cannot start: no fd is left behind."""
    ga = load_agent_module()
    polled, real_poll = [], select.poll

    class RecordingPoll:
        def __init__(self):
            self.poller = real_poll()

        def register(self, *args):
            self.poller.register(*args)

        def unregister(self, fd):
            self.poller.unregister(fd)

        def poll(self, *args):
            ready = self.poller.poll(*args)
            polled.append([fd for fd, _ in ready])
            return ready

    monkeypatch.setattr(ga.select, "poll", RecordingPoll)
    monkeypatch.setattr(ga, "EXIT_WATCH_AFTER_S", 30.0)    # no wake-up at 50 ms on a loaded host
    fds_before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        ex = ga.Exec("0123456789abcdef", ga.ExecSpec({"cmd": "exit 3"}))
        ex.start({"PATH": os.environ["PATH"]})
        readers, held = set(ex._readers), ex._held
        assert sorted(os.fstat(fd).st_ino for fd in held) == sorted(os.fstat(fd).st_ino for fd in readers)
        del polled[:]
        ex.run()
        assert ex.returncode == 3 and ex._held == ()
        assert len(polled[0]) == 1 and not readers & set(polled[0]), polled   # the pidfd alone
    monkeypatch.setattr(ga, "EXIT_WATCH_AFTER_S", 0.05)
    ex = ga.Exec("0123456789abcdef", ga.ExecSpec({"cmd": "exec >&- 2>&-; sleep 1; exit 6"}))
    ex.start({"PATH": os.environ["PATH"]})
    held = []
    threading.Timer(0.6, lambda: held.append(ex._held)).start()
    ex.run()
    assert ex.returncode == 6 and held == [()]                  # released while it ran
    bad = tmp_path / "not-a-program"
    bad.write_bytes(b"\x7fELF garbage")
    bad.chmod(0o755)
    with pytest.raises(ga.RequestError, match="cannot start command"):
        ga.Exec("0123456789abcdef", ga.ExecSpec({"argv": [str(bad)]})).start({"PATH": os.environ["PATH"]})
    left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds_before}
    assert {fd for fd, what in left.items() if what.startswith(("pipe:", "anon_inode:[pidfd]"))} == set(), left
    assert {str(fd) for fd in ga._devnull} <= set(left)                        # /dev/null, opened once


def test_commands_start_with_no_signal_blocked_and_server_threads_block_sigchld(agent):
    """The server's threads block SIGCHLD (a command's exit wakes none of them), its
    commands block nothing: blocking and background, shell and argv, as another user,
    on a terminal."""
    server = agent.server_pid()
    agent.exec(cmd="true")
    status, r = agent.request("POST", "/exec", {"cmd": "sleep 2", "blocking": False})
    assert status == 200, r
    masks = {}
    for tid in os.listdir(f"/proc/{server}/task"):
        try:                            # a connection's thread may end meanwhile
            with open(f"/proc/{server}/task/{tid}/status") as f:
                masks[tid] = int(next(line.split()[1] for line in f if line.startswith("SigBlk:")), 16)
        except FileNotFoundError:
            pass
    assert len(masks) >= 3              # the accept loop, the log thread, the exec's, connections
    assert all(mask & 1 << (signal.SIGCHLD - 1) for mask in masks.values()), masks
    probe = ["grep", "SigBlk", "/proc/self/status"]     # not through sh: dash unblocks all at start
    unblocked = "SigBlk:\t0000000000000000"
    assert agent.exec(argv=probe)["stdout"] == unblocked + "\n"
    assert agent.exec(argv=probe, user="nobody")["stdout"] == unblocked + "\n"     # fork, not vfork
    assert agent.exec(argv=probe, tty=True)["stdout"] == unblocked + "\r\n"
    exec_id = background(agent, argv=probe)
    assert finished(agent, exec_id)["stdout"] == unblocked + "\n"


def test_big_output_is_capped_and_fast(agent):
    t0 = time.monotonic()
    r = agent.exec(cmd="yes | head -c 20000000; echo tail >&2", maxOutput=1 << 20)
    assert time.monotonic() - t0 < 5
    assert r["truncated"] is True and r["exitCode"] == 0
    assert len(r["stdout"]) == 1 << 20 and len(r["output"]) == 1 << 20
    assert r["stderr"] == "tail\n"
    t0 = time.monotonic()
    r = agent.exec(cmd="yes | head -c 50000000")  # default cap: 4 MiB
    assert time.monotonic() - t0 < 5
    assert r["truncated"] is True and len(r["stdout"]) == 4 << 20 and r["exitCode"] == 0


def vm_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def test_large_output_is_streamed_without_copies(fresh_agent):
    """50 MB of NULs, 4 MiB kept: a ~50 MB response (each NUL is \\u0000 in JSON).

    Building the body whole (decoded strings, JSON string, encoded bytes,
    head + body) made the server peak at 2-3x the response; written in
    pieces it stays near the captured bytes plus the kept-body budget.
    """
    server = fresh_agent.server_pid()
    rss_before = vm_kb(server, "VmRSS")
    t0 = time.monotonic()
    r = fresh_agent.exec(cmd="head -c 52428800 /dev/zero", maxOutput=4 << 20)
    took = time.monotonic() - t0
    growth_mb = (vm_kb(server, "VmHWM") - rss_before) / 1024
    assert r["truncated"] is True and r["exitCode"] == 0 and r["stderr"] == ""
    assert r["stdout"] == "\0" * (4 << 20) and r["output"] == r["stdout"]
    assert took < 3, f"{took:.2f}s"
    assert growth_mb < 40, f"server peak grew by {growth_mb:.0f} MB for a ~50 MB response"


def test_large_output_of_a_running_exec(agent):
    """GET a background exec while its output grows, over the large-response path."""
    cmd = "i=0; while [ $i -lt 30 ]; do head -c 100000 /dev/zero | tr '\\0' x; echo >&2; i=$((i+1)); sleep 0.01; done"
    status, r = agent.request("POST", "/exec", {"cmd": cmd, "blocking": False, "maxOutput": 64 << 20})
    exec_id, seen = r["execId"], []
    while True:
        status, r = agent.request("GET", f"/exec/{exec_id}")
        assert status == 200
        out, err, both = r["stdout"], r["stderr"], r["output"]
        assert set(out) <= {"x"} and set(err) <= {"\n"} and both.replace("\n", "") == out[:len(both) - both.count("\n")]
        assert len(both) == len(out) + len(err)
        seen.append(len(out))
        if not r["running"]:
            break
        time.sleep(0.02)
    assert (len(out), len(err), r["exitCode"], r["truncated"]) == (3000000, 30, 0, False)
    assert any(0 < n < 3000000 for n in seen), "never saw the output while it grew"


class FakeSock:
    def __init__(self):
        self.sends = []

    def sendall(self, data):
        self.sends.append(bytes(data))


@pytest.mark.parametrize("body", [
    b'{"cmd": "true"}', b'{"cmd": "echo \xc3\xa9\\u00e9", "env": {"A": "1"}}', b' {"cmd": "x"} ', b'{"a": [1, 2.5, null]}',
    b'[1]', b'"x"', b'{"cmd": "true"} {}', b'{"cmd": "tr\x01ue"}', b'{"cmd": }', b'{', b'{"a": 1}}', b'\xff{}',
    b'{"a": 1, "a": 2}', b'{"n": 1e400}',
])
def test_request_json_is_json_loads(body):
    """Request.json's shortcut for object bodies (the C scanner straight away) gives what
    json.loads gives, and the same error for what json.loads refuses."""
    ga = load_agent_module()
    request = ga.Request("POST", "/exec", "HTTP/1.1", {}, body)
    try:
        expected = json.loads(body)
    except ValueError as e:
        with pytest.raises(ga.RequestError) as refused:
            request.json()
        assert (refused.value.status, refused.value.message) == (400, f"malformed JSON: {e}")
    else:
        assert request.json() == expected


@pytest.mark.parametrize("cmd", ["true", "printf 'a\\033[1m\\001\"\\\\\\303\\251'; echo err >&2; exit 3",
                                 "head -c 300000 /dev/zero | tr '\\0' x"])
def test_a_blocking_answer_is_the_exec_result(cmd):
    """A finished exec's answer (its exit event's JSON and the output, encoded once) is its
    result; the exit event is the result without the output."""
    ga = load_agent_module()
    ex = ga.Exec("0123456789abcdef", ga.ExecSpec({"cmd": cmd}))
    ex.start({"PATH": os.environ["PATH"]})
    ex.run()
    answer, result = ex.answer(), json.loads(ga.response_json(ex.result()))
    assert json.loads(answer if isinstance(answer, bytes) else ga.response_json(answer)) == result
    assert isinstance(answer, bytes) == (len(result["stdout"]) <= ga.SMALL_BODY)
    [exit_line] = [line for line in ex.events.lines.values() if b'"type":"exit"' in line]
    exit_event = json.loads(exit_line)
    assert exit_event.pop("seq") == ex.events.next_seq - 1 and exit_event.pop("type") == "exit"
    assert exit_event == {k: v for k, v in result.items() if k not in ("output", "stdout", "stderr")}
    start = json.loads(ex.events.lines[0])
    assert start == {"seq": 0, "type": "start", "execId": ex.id, "tag": None, "pid": ex.pid,
                     "startedAt": result["startedAt"], "tty": False}


RESULT_KEYS = ["execId", "tag", "cmd", "user", "running", "exitCode", "signal", "signalName", "error", "timedOut",
               "truncated", "oomKilled", "killScope", "limitsApplied", "tty", "startedAt", "durationMs"]


@pytest.mark.parametrize("fields, expected", [
    ({"cmd": "printf '\\\"\u00e9\\001\\n'; exit 3 # \\ \" \u00e9 \x01 \t"},
     {"exitCode": 3, "error": "exit status 3", "signal": None, "user": None, "tag": None}),
    ({"argv": ["/bin/sh", "-c", "kill -TERM $$", "\u00e9\""], "tag": "t.1-x", "user": "nobody"},
     {"exitCode": None, "signal": 15, "signalName": "SIGTERM", "error": "killed by signal 15 (SIGTERM)",
      "user": "nobody", "tag": "t.1-x", "argv": ["/bin/sh", "-c", "kill -TERM $$", "\u00e9\""]}),
    ({"cmd": "sleep 5", "timeout": 0.2}, {"timedOut": True, "error": "timed out after 0.2s", "signal": 9}),
    ({"cmd": "echo hi", "tty": True}, {"exitCode": 0, "tty": True, "signalName": None, "running": False}),
])
def test_exec_outcome_is_the_compact_json_of_the_result(fields, expected):
    """The exit event's members (and the answer's), written out by hand, are the compact JSON
    (response_json) of the result without its output, for a running exec too."""
    ga = load_agent_module()
    ex = ga.Exec("0123456789abcdef", ga.ExecSpec(fields))
    ex.start({"PATH": os.environ["PATH"]})
    running = ex._outcome(None)
    ex.run()
    keys = [("argv" if key == "cmd" and "argv" in fields else key) for key in RESULT_KEYS]
    for text, want in ((running, {"running": True, "exitCode": None, "error": "", "signal": None}),
                       (ex._outcome_json, dict(expected, running=False))):
        outcome = json.loads(text)
        assert list(outcome) == keys and ga.response_json(outcome) == text
        assert {key: outcome[key] for key in want} == want
        assert (outcome["execId"], outcome.get("cmd"), outcome["killScope"], outcome["limitsApplied"]) == \
               ("0123456789abcdef", fields.get("cmd"), "process-group", False)
        assert isinstance(outcome["durationMs"], float) and outcome["startedAt"] == ex.started_at
    result = ex.result()
    assert {key: value for key, value in result.items() if key not in ga.OUTPUT_FIELDS} == json.loads(ex._outcome_json)
    assert result is ex.result()


def interpreters_to_compare():
    """This interpreter and the other 3.10+ ones on PATH (fork_exec's arguments differ by version)."""
    found = {tuple(sys.version_info[:2]): sys.executable}
    for minor in range(10, 20):
        path = shutil.which(f"python3.{minor}")
        if path and (3, minor) not in found:
            runs = subprocess.run([path, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
            if runs.returncode == 0:     # not a version manager's shim of an inactive version
                found[(3, minor)] = runs.stdout.strip()
    return [pytest.param(path, id=f"{major}.{minor}") for (major, minor), path in sorted(found.items())]


@pytest.mark.parametrize("python", interpreters_to_compare())
def test_fork_exec_fast_path_starts_commands_as_popen(python):
    """spawn_command's fast path (fork_exec called directly) and Popen start a command alike:
    session, signals, fds, cwd, user, environment, stdin, exit status, and the same
    exceptions for a missing or bad cwd, a missing or non-executable program, NUL bytes,
    a bad variable name (tests/spawn_compare.py runs both ways in that interpreter)."""
    out = subprocess.run([python, str(REPO / "tests" / "spawn_compare.py"), str(AGENT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["fastPath"] == ((3, 10) <= tuple(report["version"]) <= (3, 13))
    for fast, popen in zip(report["fast"], report["popen"]):
        assert fast == popen
    probe, _, as_nobody, on_path, missing_cwd, file_cwd, missing, not_on_path, not_executable = report["fast"][:9]
    assert probe["exit"] == probe["again"] == 7
    # what a command finds ignored is what this test's process was given ignored (an earlier
    # test, or whoever started pytest, may have left some: both paths pass them on, as
    # exec does), without the SIGPIPE and SIGXFSZ that Python ignores and restore_signals undoes
    inherited = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("SigIgn:")), 16)
    ignored = inherited & ~(1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    assert f"pid is session leader: yes\nSigBlk:\t0000000000000000\nSigIgn:\t{ignored:016x}\nfds: 0 1 2 3 \n" \
           in probe["output"] and "stdin: hello" in probe["output"]
    assert "uid=65534(nobody)" in as_nobody["output"] and (on_path["exit"], on_path["output"]) == (-9, "found on PATH\n")
    assert (missing_cwd["raised"], missing_cwd["filename"].rsplit("/", 1)[1]) == ("FileNotFoundError", "missing")
    assert (file_cwd["raised"], missing["raised"], not_on_path["raised"], not_executable["raised"]) == \
           ("NotADirectoryError", "FileNotFoundError", "FileNotFoundError", "PermissionError")
    assert [case.get("text") for case in report["fast"][10:12]] == ["embedded null byte", "illegal environment variable name"]
    # the caller blocks SIGCHLD, as the agent server's threads do; the command blocks nothing
    assert [case["output"] for case in report["fast"][13:15]] == ["SigBlk:\t0000000000000000\n"] * 2


def test_commands_start_without_popen_where_fork_exec_is_known():
    """The agent's commands start through fork_exec on this interpreter (3.10-3.13), the
    base environment encoded once, and an exec through either path gives the same result."""
    ga = load_agent_module()
    base = {"PATH": os.environ["PATH"], "HOME": "/root"}
    results = []
    for fast in (True, False):
        if not fast:
            ga.FORK_EXEC = None
        ex = ga.Exec("0123456789abcdef", ga.ExecSpec({"cmd": 'echo "$HOME $A $CBOX_EXEC_ID"; exit 4',
                                                     "env": {"A": "1"}}))
        ex.start(base)
        ex.run()
        assert isinstance(ex._proc, ga.ForkedChild) == fast
        result = ex.result()
        results.append((result["exitCode"], result["stdout"].text()))
    assert results == [(4, "/root 1 0123456789abcdef\n")] * 2
    assert ga._encoded_env[0][1] == {"PATH": b"PATH=" + os.environ["PATH"].encode(), "HOME": b"HOME=/root"}


def test_finished_execs_are_kept_within_count_bytes_and_time(monkeypatch):
    """The registry keeps finished background execs up to MAX_FINISHED of them, holding
    MAX_FINISHED_BYTES of output, for FINISHED_TTL_S: the oldest go first."""
    ga = load_agent_module()

    class Finished:
        def __init__(self, n, size):
            self.id, self.tag, self.output_bytes = f"e{n}", None, size
            self.finished, self.started_epoch = time.monotonic(), n

    registry = ga.ExecRegistry()
    for n in range(ga.MAX_FINISHED + 10):
        registry.finish(Finished(n, 1000), keep=True)
    assert [ex.id for ex in registry.all()] == [f"e{n}" for n in range(10, ga.MAX_FINISHED + 10)]
    big = ga.MAX_FINISHED_BYTES // 3 + 1
    for n in range(1000, 1003):         # the third big one pushes out all older ones and the first big one
        registry.finish(Finished(n, big), keep=True)
    assert [ex.id for ex in registry.all()] == ["e1001", "e1002"]
    assert registry.get("e1000") is None and registry.get("e1002").output_bytes == big
    monkeypatch.setattr(ga.time, "monotonic", lambda: time.time() + ga.FINISHED_TTL_S + 1e6)
    assert registry.all() == []


def test_output_capture_and_json_in_pieces(monkeypatch):
    """Captured output (runs over stdout/stderr, or its own buffer once the runs are many
    and short) gives the same JSON as json.dumps of the decoded bytes, in one piece or many."""
    ga = load_agent_module()
    rng = random.Random(7)
    words = [b"plain text " * 8] * 6 + [b"\n", b"\0", b'"', b"\\", b"\t", b"\x1f", b"\x7f", b"\xc3\xa9",
                                       b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xff", b"\xc3", b"\xf0\x9f"]

    for _ in range(150):
        monkeypatch.setattr(ga, "TEXT_PIECE", rng.choice([1, 2, 3, 7, 64, 1 << 18]))
        monkeypatch.setattr(ga, "DENSE_RUNS", rng.choice([0, 4, 1024]))
        monkeypatch.setattr(ga, "SMALL_BODY", rng.choice([0, 1 << 18]))
        monkeypatch.setattr(ga, "KEEP_BODY", rng.choice([0, 50, 1 << 20]))
        spec = ga.ExecSpec({"cmd": "x", "maxOutput": rng.choice([0, 1, 5, 40, 300, 1 << 20])})
        ex = ga.Exec("x", spec)
        sent = {True: b"", False: b""}
        both = b""
        for _ in range(rng.randint(0, 40)):
            data = b"".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            to_stdout = rng.random() < 0.6
            with ex._lock:
                ex._capture(ex.stdout if to_stdout else ex.stderr, data)
            sent[to_stdout] += data
            both += data
        cap = spec.max_output
        result = ex.result()
        assert result["truncated"] == (len(sent[True]) > cap or len(sent[False]) > cap or len(both) > cap)
        decoded = {"output": both[:cap], "stdout": sent[True][:cap], "stderr": sent[False][:cap]}
        expected = json.dumps({k: decoded[k].decode("utf-8", "replace") if k in decoded else v
                               for k, v in result.items()}, ensure_ascii=False, separators=(",", ":")).encode()
        sock = FakeSock()
        ga.HttpConnection(sock).send_json(200, result)
        head, _, body = b"".join(sock.sends).partition(b"\r\n\r\n")
        assert body == expected
        assert f"\r\nContent-Length: {len(expected)}\r\n".encode() in head + b"\r\n"
        if len(both[:cap]) + len(sent[True][:cap]) + len(sent[False][:cap]) <= ga.SMALL_BODY:
            assert len(sock.sends) == 1, "a small response goes out in one sendall"
        else:
            assert sock.sends[0] == head + b"\r\n\r\n", "a large one: the head apart"

    # output costs no third copy: one 4-byte run for many reads of one stream ...
    ex = ga.Exec("x", ga.ExecSpec({"cmd": "x", "maxOutput": 1 << 20}))
    for _ in range(16):
        ex._capture(ex.stdout, b"y" * 4096)
    assert ex.output_bytes < len(ex.stdout) + 16
    # ... and many short alternating runs turn into a buffer of its own
    for i in range(3000):
        ex._capture(ex.stderr if i % 2 else ex.stdout, b"ab")
    assert ex._output is not None and ex.output_bytes <= 2 * (len(ex.stdout) + len(ex.stderr))
    expected = (b"y" * 65536 + b"ab" * 3000).decode()
    assert json.loads(b"".join(ga.json_parts(ex.result())))["output"] == expected


def test_output_cut_on_bytes_and_decoded_with_replacement(agent):
    r = agent.exec(cmd=r"printf 'a\303\251b\377'", maxOutput=2)
    assert r["stdout"] == "a\ufffd" and r["truncated"] is True
    assert agent.exec(cmd=r"printf '\303\251'")["stdout"] == "\u00e9"


def test_interleaved_output(agent):
    r = agent.exec(cmd="echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c")
    assert (r["output"], r["stdout"], r["stderr"]) == ("a\nb\nc\n", "a\nc\n", "b\n")


def test_death_by_signal(agent):
    r = agent.exec(cmd="kill -9 $$")
    assert (r["exitCode"], r["signal"], r["error"]) == (None, 9, "killed by signal 9 (SIGKILL)")
    # Commands start with no signal ignored or blocked that the agent ignores or blocks
    # itself (it ignores SIGHUP; Python ignores SIGPIPE). Whatever the environment that
    # started the tests already ignores (a CI runner may ignore glibc's signal 32, which
    # no program can reset) is the baseline: a command started from here shows it too.
    probe = "grep -E '^Sig(Ign|Blk)' /proc/self/status"
    baseline = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, text=True).stdout
    assert agent.exec(cmd=probe)["stdout"] == baseline
    assert "SigBlk:\t0000000000000000\n" in baseline
    assert agent.exec(cmd="kill -HUP $$")["signal"] == 1


def test_background_exec_get_and_delete(agent):
    m = marker()
    try:
        status, r = agent.request("POST", "/exec", {"cmd": f"echo start; sleep {m}", "blocking": False})
        assert status == 200 and r == {"execId": r["execId"], "tag": None, "output": "", "error": "", "running": True}
        exec_id = r["execId"]
        r = wait_for(lambda: (lambda s: s[1] if s[1]["output"] else None)(agent.request("GET", f"/exec/{exec_id}")),
                     5.0)
        assert r["running"] is True and r["output"] == "start\n" and r["exitCode"] is None
        status, r = agent.request("DELETE", f"/exec/{exec_id}")
        assert status == 200 and r["running"] is False
        assert (r["exitCode"], r["signal"], r["error"]) == (None, 9, "killed by signal 9 (SIGKILL)")
        assert wait_for(lambda: not pids_running(m), 2.0)
        status, r = agent.request("GET", f"/exec/{exec_id}")
        assert status == 200 and r["running"] is False and r["signal"] == 9
    finally:
        kill_pids(pids_running(m))
    status, r = agent.request("POST", "/exec", {"cmd": "echo done; exit 4", "blocking": False})
    exec_id = r["execId"]
    r = wait_for(lambda: (lambda s: None if s[1]["running"] else s[1])(agent.request("GET", f"/exec/{exec_id}")), 5.0)
    assert (r["exitCode"], r["error"], r["output"]) == (4, "exit status 4", "done\n")
    for method in ("GET", "DELETE"):
        status, r = agent.request(method, "/exec/doesnotexist")
        assert status == 404 and "doesnotexist" in r["error"]


def test_concurrent_execs(agent):
    results = {}

    def run(i):
        results[i] = agent.exec(cmd=f"sleep 0.5; echo {i}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - t0 < 3
    assert {i: r["stdout"] for i, r in results.items()} == {i: f"{i}\n" for i in range(20)}


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "malformed JSON"),
    (b"", "malformed JSON"),
    (b"[1]", "JSON object"),
    ({"cmd": "true", "bogus": 1}, "bogus"),
    ({"env": {}}, "cmd"),
    ({"cmd": 5}, "cmd"),
    ({"cmd": "true", "env": ["A=1"]}, "env"),
    ({"cmd": "true", "env": {"A": 1}}, "env"),
    ({"cmd": "true", "cwd": 3}, "cwd"),
    ({"cmd": "true", "stdin": 3}, "stdin"),
    ({"cmd": "true", "timeout": "5"}, "timeout"),
    ({"cmd": "true", "timeout": -1}, "timeout"),
    ({"cmd": "true", "maxOutput": -1}, "maxOutput"),
    ({"cmd": "true", "maxOutput": 1.5}, "maxOutput"),
    ({"cmd": "true", "blocking": "yes"}, "blocking"),
])
def test_bad_exec_requests(agent, body, needle):
    status, r = agent.request("POST", "/exec", body)
    assert status == 400 and needle in r["error"], r


def test_routes(agent):
    assert agent.request("GET", "/nope")[0] == 404
    assert agent.request("GET", "/exec/a/b")[0] == 404
    status, r = agent.request("PUT", "/exec")
    assert status == 405 and "error" in r
    assert agent.request("POST", "/health", {})[0] == 405
    assert agent.request("PUT", "/exec/x", {})[0] == 405
    [(line, headers, _)] = raw_exchange(agent.port, b"PATCH /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line.startswith("HTTP/1.1 405") and headers["allow"] == "GET"


def test_keep_alive_and_pipelining(agent):
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            [(line, headers, body)] = read_responses(s, 1)
            assert line == "HTTP/1.1 200 OK" and json.loads(body)["status"] == "ok"
            assert headers["content-type"] == "application/json"
        body = b'{"cmd": "echo piped"}'
        request = b"POST /exec HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        s.sendall(request + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        (l1, _, b1), (l2, _, b2) = read_responses(s, 2)
        assert json.loads(b1)["stdout"] == "piped\n" and json.loads(b2)["status"] == "ok"
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(_, headers, _)] = read_responses(s, 1)
        assert headers["connection"] == "close"
        assert s.recv(10) == b""


def test_expect_100_continue_and_limits(agent):
    body = json.dumps({"cmd": "echo continued"}).encode()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(b"POST /exec HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        [(line, _, reply)] = read_responses(s, 1)
        assert line == "HTTP/1.1 200 OK" and json.loads(reply)["stdout"] == "continued\n"
    [(line, _, reply)] = raw_exchange(agent.port, b"POST /exec HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                                  b"Content-Length: %d\r\n\r\n" % (17 << 20))
    assert line.startswith("HTTP/1.1 413") and "error" in json.loads(reply)
    chunked = b"POST /exec HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" \
              b"5\r\n{\"cmd\r\n11\r\n\": \"echo chunks\"}\r\n0\r\n\r\n"
    [(line, _, reply)] = raw_exchange(agent.port, chunked)
    assert json.loads(reply)["stdout"] == "chunks\n"


# ---------------------------------------------------------------------------
# exec v2: argv, user, tag, stream, stdin pipe, signal, DELETE, list
# ---------------------------------------------------------------------------

def api_of(agent):
    return AgentApi(lambda: socket.create_connection(("127.0.0.1", agent.port)), timeout=30)


def background(agent, **fields):
    status, r = agent.request("POST", "/exec", dict(blocking=False, **fields))
    assert status == 200 and r["running"] is True, r
    return r["execId"]


def finished(agent, exec_id, timeout=10.0):
    return wait_for(lambda: (lambda r: None if r["running"] else r)(agent.request("GET", f"/exec/{exec_id}")[1]),
                    timeout, what=f"exec {exec_id} to finish")


def test_argv_runs_without_a_shell(agent, tmp_path):
    r = agent.exec(argv=["printf", "%s|", "a b", "$HOME", "*"], cwd=str(tmp_path))
    assert (r["stdout"], r["exitCode"], r["argv"]) == ("a b|$HOME|*|", 0, ["printf", "%s|", "a b", "$HOME", "*"])
    assert "cmd" not in r
    assert agent.exec(cmd="echo x")["cmd"] == "echo x"
    status, r = agent.request("POST", "/exec", {"argv": ["no-such-program-xyz"]})
    assert status == 400 and r["error"] == "argv[0] 'no-such-program-xyz': command not found"


def test_exec_id_tag_and_result_fields(agent):
    r = agent.exec(cmd='echo "$CBOX_EXEC_ID|$CBOX_EXEC_TAG"', tag="build.1", env={"CBOX_EXEC_ID": "forged"})
    assert r["stdout"] == f"{r['execId']}|build.1\n" and r["tag"] == "build.1"
    assert (r["killScope"], r["limitsApplied"], r["oomKilled"], r["user"]) == ("process-group", False, False, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["startedAt"])
    r = agent.exec(cmd="kill -TERM $$", memoryLimitMb=64, pidsLimit=10)
    assert (r["signal"], r["signalName"], r["exitCode"], r["limitsApplied"]) == (15, "SIGTERM", None, False)


def test_user(agent):
    r = agent.exec(cmd='id -u; id -g; echo "$HOME|$USER|$LOGNAME"', user="nobody")
    nobody = pwd.getpwnam("nobody")
    assert r["stdout"] == f"{nobody.pw_uid}\n{nobody.pw_gid}\n{nobody.pw_dir}|nobody|nobody\n", r
    assert r["user"] == "nobody"
    assert agent.exec(argv=["id", "-u"], user=nobody.pw_uid)["stdout"] == f"{nobody.pw_uid}\n"
    assert agent.exec(argv=["id", "-u"], user=str(nobody.pw_uid))["user"] == "nobody"
    for bad in ("no-such-user-xyz", 4000000, ""):
        status, r = agent.request("POST", "/exec", {"cmd": "true", "user": bad})
        assert status == 400 and "user" in r["error"], r


def test_tags_resolve_and_conflict(agent):
    m = marker()
    try:
        first = background(agent, cmd=f"sleep {m}", tag="job")
        status, r = agent.request("POST", "/exec", {"cmd": "true", "tag": "job", "blocking": False})
        assert status == 409 and "job" in r["error"]
        assert agent.request("GET", "/exec/job")[1]["execId"] == first
        assert agent.request("DELETE", "/exec/job")[1]["signal"] == 9
        second = background(agent, cmd="echo two", tag="job")   # free again once the first ended
        finished(agent, second)
        assert agent.request("GET", "/exec/job")[1]["execId"] == second   # the newest finished one
        third = background(agent, cmd=f"sleep {m}", tag="job")
        assert agent.request("GET", "/exec/job")[1]["execId"] == third    # a running one first
        listing = agent.request("GET", "/exec")[1]["execs"]
        mine = {e["execId"]: e for e in listing if e["tag"] == "job"}
        assert set(mine) >= {first, second, third}
        assert mine[third]["running"] is True and mine[second]["exitCode"] == 0
        assert mine[second]["cmd"] == "echo two" and set(mine[second]) == {
            "execId", "tag", "cmd", "running", "exitCode", "startedAt", "durationMs"}
        agent.request("DELETE", f"/exec/{third}")
    finally:
        kill_pids(pids_running(m))


def test_stream_live_replay_and_reattach(agent):
    """Events arrive while the command runs; a reader that disconnects does not
    stop it; re-attaching with since=last+1 loses nothing; a replay is identical."""
    api = api_of(agent)
    exec_id = background(agent, cmd="for i in 1 2 3 4 5 6; do echo line$i; echo err$i >&2; sleep 0.1; done; exit 3")
    seen = []
    with api.stream(exec_id, since=0) as s:
        assert s.status == 200 and s.headers["content-type"] == "application/x-ndjson"
        assert s.headers["transfer-encoding"] == "chunked"
        for event in s:
            seen.append(event)
            if event["type"] == "stdout" and "line2" in event["data"]:
                break                     # disconnect mid-stream
    assert seen[0]["type"] == "start" and seen[0]["execId"] == exec_id and seen[0]["pid"] > 0
    rest = api.events(exec_id, since=seen[-1]["seq"] + 1)
    events = seen + rest
    check_sequence(events)
    assert joined(events, "stdout") == b"".join(b"line%d\n" % i for i in range(1, 7))
    assert joined(events, "stderr") == b"".join(b"err%d\n" % i for i in range(1, 7))
    exit_event = events[-1]
    assert (exit_event["exitCode"], exit_event["error"], exit_event["execId"]) == (3, "exit status 3", exec_id)
    assert "output" not in exit_event and {"timedOut", "truncated", "durationMs", "signal", "oomKilled"} <= set(exit_event)
    assert api.events(exec_id, since=0) == events              # replay: the same events, the same seqs
    assert api.events(exec_id, since=len(events) - 1) == events[-1:]
    assert api.events(exec_id, since=len(events)) == []          # nothing after the exit event
    with api.stream(exec_id, since=len(events) + 1) as s:
        assert s.status == 400 and s.error["error"] == f"since {len(events) + 1} is beyond the last event {len(events) - 1}"
    for bad in ("-1", "x", "1.5", ""):
        with api.stream(exec_id, since=bad) as s:
            assert s.status == 400 and "since" in s.error["error"]
    with api.stream("no-such-exec") as s:
        assert s.status == 404


def test_stream_of_a_blocking_exec_by_tag_and_keepalives(agent):
    """A second reader attaches by tag to a running exec; keepalives are in the log,
    so both readers see the same seqs."""
    api = api_of(agent)
    results = {}
    t = threading.Thread(target=lambda: results.update(r=agent.exec(
        cmd="sleep 0.5; echo a; sleep 0.7; echo b", tag="ka", keepaliveS=0.2)))
    t.start()
    wait_for(lambda: agent.request("GET", "/exec/ka")[0] == 200, 5, what="the exec to start")
    first = api.events("ka", since=0)
    t.join(10)
    check_sequence(first)
    types = [e["type"] for e in first]
    assert types.count("keepalive") >= 3 and types[0] == "start", types
    assert joined(first, "stdout") == b"a\nb\n"
    assert first[-1]["exitCode"] == 0 and results["r"]["stdout"] == "a\nb\n"


def test_stream_utf8_split_and_binary(agent):
    api = api_of(agent)
    # an e-acute split across two writes, then invalid bytes
    exec_id = background(agent, cmd=r"printf '\303'; sleep 0.2; printf '\251 ok\n'; sleep 0.2; printf 'a\377\376b'")
    events = api.events(exec_id, since=0)
    out = [e for e in events if e["type"] == "stdout"]
    assert "".join(e["data"] for e in out) == "\u00e9 ok\na\ufffd\ufffdb"
    assert not any("\ufffd" in e["data"] for e in out if "dataBase64" not in e)
    assert joined(events, "stdout") == b"\xc3\xa9 ok\na\xff\xfeb"
    binary = background(agent, cmd="head -c 70000 /dev/urandom > /tmp/cbt-rand.$$; cat /tmp/cbt-rand.$$; "
                                   "sha256sum < /tmp/cbt-rand.$$ >&2; rm /tmp/cbt-rand.$$")
    events = api.events(binary, since=0)
    import hashlib
    assert hashlib.sha256(joined(events, "stdout")).hexdigest() == joined(events, "stderr").split()[0].decode()


def test_stream_ring_drops_oldest(agent):
    """The ring holds max(maxOutput, 64 KiB) of events: a late reader gets one "dropped"
    event standing in for the lost ones (seq = oldest kept - 1), then the rest."""
    api = api_of(agent)
    exec_id = background(agent, cmd="i=0; while [ $i -lt 400 ]; do printf '%0999d\\n' $i; i=$((i+1)); sleep 0.001; done",
                         maxOutput=1000)
    finished(agent, exec_id)
    events = api.events(exec_id, since=0)
    assert events[0]["type"] == "dropped"
    first_kept = events[1]["seq"]
    assert events[0] == {"seq": first_kept - 1, "type": "dropped", "missed": first_kept, "fromSeq": 0}
    assert check_sequence(events) == first_kept
    late = api.events(exec_id, since=first_kept - 3)
    assert late[0] == {"seq": first_kept - 1, "type": "dropped", "missed": 3, "fromSeq": first_kept - 3}
    assert late[1:] == events[1:]
    assert sum(len(json.dumps(e)) for e in events[1:]) < 80 << 10
    lines = joined(events, "stdout").split(b"\n")
    assert lines[-2] == b"%0999d" % 399
    r = agent.request("GET", f"/exec/{exec_id}")[1]
    assert r["truncated"] is True and len(r["stdout"]) == 1000


def test_streamed_output_keeps_memory_bounded(fresh_agent):
    """100 MB streamed to a reader while a second reader stalls: the ring and the
    captured output stay within maxOutput each, so the server's peak hardly moves.
    A reader slower than the command loses events, and is told so in sequence."""
    api = api_of(fresh_agent)
    server = fresh_agent.server_pid()
    rss_before = vm_kb(server, "VmRSS")
    exec_id = background(fresh_agent, cmd="head -c 100000000 /dev/zero | tr '\\0' a", maxOutput=1 << 20)
    stalled = api.stream(exec_id, since=0)      # never read: it falls out of the ring
    total, events = 0, []
    with api.stream(exec_id, since=0) as s:
        for event in s:
            if event["type"] == "stdout":
                total += len(event["data"])
                event["data"] = ""
            events.append(event)
    growth_mb = (vm_kb(server, "VmHWM") - rss_before) / 1024
    missed = check_sequence(events)
    assert events[-1]["truncated"] is True
    assert (total == 100000000) == (missed == 0) and total <= 100000000
    assert growth_mb < 40, f"server peak grew by {growth_mb:.0f} MB while streaming 100 MB"
    stalled.close()
    replay = api.events(exec_id, since=0)
    assert replay[0]["type"] == "dropped" and replay[-1]["type"] == "exit"


def test_output_events_hold_at_most_one_output_chunk(agent):
    """Bulk output comes in events of at most OUTPUT_CHUNK bytes each (cbox.py parses an
    event line in one step of its loop: the lines stay modest), every byte in order."""
    import guest_agent
    api = api_of(agent)
    exec_id = background(agent, cmd="head -c 3000000 /dev/zero | tr '\\0' y")
    events = api.events(exec_id, since=0)
    sizes = [len(e["data"]) for e in events if e["type"] == "stdout"]
    assert joined(events, "stdout") == b"y" * 3000000
    assert max(sizes) <= guest_agent.OUTPUT_CHUNK and len(sizes) >= 3000000 // guest_agent.OUTPUT_CHUNK


def test_stdin_pipe(agent):
    api = api_of(agent)
    exec_id = background(agent, cmd="while read -r line; do echo got:$line; done; echo eof", stdin="pipe")
    with api.stream(exec_id, since=0) as s:
        events = iter(s)
        assert next(events)["type"] == "start"
        status, r = agent.request("POST", f"/exec/{exec_id}/stdin", {"data": "one\n"})
        assert (status, r) == (200, {"written": 4})
        assert next(events)["data"] == "got:one\n"
        status, r = agent.request("POST", f"/exec/{exec_id}/stdin", {"data": "two\n", "eof": True})
        assert (status, r) == (200, {"written": 4})
        rest = list(events)
    assert joined(rest, "stdout") == b"got:two\neof\n" and rest[-1]["exitCode"] == 0
    status, r = agent.request("POST", f"/exec/{exec_id}/stdin", {"data": "late"})
    assert status == 409 and "closed" in r["error"]
    plain = background(agent, cmd="sleep 5", stdin="data, not a pipe")
    status, r = agent.request("POST", f"/exec/{plain}/stdin", {"data": "x"})
    assert status == 409 and "no stdin pipe" in r["error"]
    agent.request("DELETE", f"/exec/{plain}")
    big = background(agent, cmd="wc -c", stdin="pipe")
    status, r = agent.request("POST", f"/exec/{big}/stdin", {"data": "y" * (1 << 20), "eof": True})
    assert (status, r) == (200, {"written": 1 << 20})
    assert finished(agent, big)["stdout"].strip() == str(1 << 20)
    status, r = agent.request("POST", f"/exec/{big}/stdin", {"data": "y" * ((1 << 20) + 1)})
    assert status == 413
    for body in ({"data": 1}, {"eof": "yes"}, {"data": "x", "more": 1}, [1]):
        assert agent.request("POST", f"/exec/{big}/stdin", body)[0] == 400


def test_signal(agent):
    exec_id = background(agent, cmd="trap 'echo got TERM; exit 7' TERM; echo ready; "
                                    "while :; do sleep 0.05; done", tag="sig")
    wait_for(lambda: agent.request("GET", f"/exec/{exec_id}")[1]["stdout"] == "ready\n", 5)
    for bad in ("BOGUS", 0, 99, -1, "SIGBOGUS", None, True, 1.5):
        status, r = agent.request("POST", "/exec/sig/signal", {"signal": bad})
        assert status == 400 and "signal" in r["error"], (bad, r)
    status, r = agent.request("POST", "/exec/sig/signal", {"signal": "term"})
    assert (status, r) == (200, {"execId": exec_id, "signal": 15})
    r = finished(agent, exec_id)
    assert (r["exitCode"], r["stdout"]) == (7, "ready\ngot TERM\n")
    status, r = agent.request("POST", f"/exec/{exec_id}/signal", {"signal": "SIGTERM"})
    assert status == 409 and "finished" in r["error"]
    hup = background(agent, cmd="sleep 5")
    assert agent.request("POST", f"/exec/{hup}/signal", {"signal": 1})[1]["signal"] == 1
    assert finished(agent, hup)["signalName"] == "SIGHUP"


def test_delete_with_grace_and_delete_all(agent):
    m = marker()
    try:
        polite = background(agent, cmd=f"trap 'echo bye; exit 5' TERM; sleep {m} & wait")
        stubborn = background(agent, cmd=f"trap '' TERM; sleep {m} & wait; wait")
        # both traps set: each shell has forked its sleep (the marker is in all four command lines)
        wait_for(lambda: len(pids_running(m)) >= 4, what="both traps set")
        assert agent.request("DELETE", f"/exec/{polite}?grace=x")[0] == 400
        assert agent.request("DELETE", f"/exec/{polite}?grace=-1")[0] == 400
        status, r = agent.request("DELETE", f"/exec/{polite}?grace=5")
        assert (status, r["exitCode"], r["stdout"], r["running"]) == (200, 5, "bye\n", False)
        t0 = time.monotonic()
        status, r = agent.request("DELETE", f"/exec/{stubborn}?grace=0.5")
        assert (status, r["signal"], r["killScope"]) == (200, 9, "process-group")
        assert 0.4 < time.monotonic() - t0 < 5
        ids = [background(agent, cmd=f"sleep {m}") for _ in range(3)]
        status, r = agent.request("DELETE", "/exec")
        assert status == 200 and set(ids) <= set(r["killed"])
        assert all(agent.request("GET", f"/exec/{i}")[1]["signal"] == 9 for i in ids)
        assert wait_for(lambda: not pids_running(m), 3.0)
    finally:
        kill_pids(pids_running(m))


@pytest.mark.parametrize("body, status, needle", [
    ({"cmd": "true", "argv": ["true"]}, 400, "cmd"),
    ({"argv": []}, 400, "argv"),
    ({"argv": "true"}, 400, "argv"),
    ({"argv": ["true", 1]}, 400, "argv"),
    ({"argv": ["tr\0ue"]}, 400, "NUL"),
    ({"argv": [""]}, 400, "argv[0]"),
    ({"cmd": "true", "tag": ""}, 400, "tag"),
    ({"cmd": "true", "tag": "-x"}, 400, "tag"),
    ({"cmd": "true", "tag": "a" * 65}, 400, "tag"),
    ({"cmd": "true", "tag": 5}, 400, "tag"),
    ({"cmd": "true", "memoryLimitMb": 0}, 400, "memoryLimitMb"),
    ({"cmd": "true", "memoryLimitMb": "64"}, 400, "memoryLimitMb"),
    ({"cmd": "true", "pidsLimit": -1}, 400, "pidsLimit"),
    ({"cmd": "true", "pidsLimit": True}, 400, "pidsLimit"),
    ({"cmd": "true", "keepaliveS": 0}, 400, "keepaliveS"),
    ({"cmd": "true", "keepaliveS": "1"}, 400, "keepaliveS"),
    ({"cmd": "true", "user": ["root"]}, 400, "user"),
])
def test_bad_exec_v2_requests(agent, body, status, needle):
    got, r = agent.request("POST", "/exec", body)
    assert got == status and needle in r["error"], r


def test_exec_v2_routes(agent):
    exec_id = agent.exec(cmd="true")["execId"]     # blocking execs are not kept
    assert agent.request("GET", f"/exec/{exec_id}")[0] == 404
    done = background(agent, cmd="true")
    finished(agent, done)
    assert agent.request("POST", f"/exec/{done}/nope", {})[0] == 404
    assert agent.request("GET", f"/exec/{done}/signal")[0] == 405
    assert agent.request("POST", f"/exec/{done}/stream", {})[0] == 405
    assert agent.request("POST", "/exec/nope/signal", {"signal": 9})[0] == 404
    # HTTP/1.0 has no chunked encoding: the events, then the connection closes
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(f"GET /exec/{done}/stream HTTP/1.0\r\n\r\n".encode())
        data = b"".join(iter(lambda: s.recv(65536), b""))
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding" not in head
    events = [json.loads(x) for x in body.splitlines()]
    assert [e["type"] for e in events] == ["start", "exit"] and events[-1]["exitCode"] == 0


def test_setsid_escape_in_process_group_mode(agent):
    """Without cgroups (a plain process) a kill reaches the process group only, and
    says so; the cgroup path is tested in a real guest (test_exec_v2_guest.py)."""
    m = marker()
    try:
        r = agent.exec(cmd=f"setsid sleep {m} & sleep {m}", timeout=0.5)
        assert r["timedOut"] is True and r["killScope"] == "process-group"
    finally:
        kill_pids(pids_running(m))


# ---------------------------------------------------------------------------
# exec on a terminal ("tty": true)
# ---------------------------------------------------------------------------

def screen(agent, exec_id):
    """The terminal output of an exec so far."""
    return agent.request("GET", f"/exec/{exec_id}")[1]["stdout"]


def wait_on_screen(agent, exec_id, text, timeout=10.0):
    wait_for(lambda: text in screen(agent, exec_id), timeout, what=f"{text!r} on the terminal of {exec_id}")


def test_tty_size_term_and_controlling_terminal(agent):
    """The command is a session leader whose controlling terminal is a pty of the given
    size; TERM is set; output is the terminal's (ONLCR: \\r\\n), stderr included."""
    probe = ('stty size; echo "$TERM"; [ "$(ps -o sid= -p $$ | tr -d " ")" = "$$" ] && echo leader; '
             ': </dev/tty && echo controlling; echo err >&2; tty')
    r = agent.exec(cmd=probe, tty=True, cols=101, rows=33, term="vt100")
    lines = r["stdout"].split("\r\n")
    assert lines[:5] == ["33 101", "vt100", "leader", "controlling", "err"], r
    assert lines[5].startswith("/dev/pts/") and r["stderr"] == "" and r["output"] == r["stdout"]
    assert (r["exitCode"], r["tty"]) == (0, True)
    r = agent.exec(cmd="stty size; echo $TERM", tty=True)
    assert r["stdout"] == "24 80\r\nxterm-256color\r\n"
    assert agent.exec(cmd="[ -t 0 ] || echo no tty")["stdout"] == "no tty\n"
    assert agent.exec(cmd="true")["tty"] is False
    nobody = pwd.getpwnam("nobody")
    r = agent.exec(argv=["sh", "-c", "id -u; stty size"], tty=True, rows=5, cols=7, user="nobody")
    assert r["stdout"] == f"{nobody.pw_uid}\r\n5 7\r\n", r


def test_tty_resize_sends_sigwinch_and_ctrl_c_interrupts(agent):
    api = api_of(agent)
    exec_id = background(agent, cmd="trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done", tty=True)
    wait_on_screen(agent, exec_id, "ready")
    status, r = agent.request("POST", f"/exec/{exec_id}/resize", {"cols": 132, "rows": 43})
    assert (status, r) == (200, {"execId": exec_id, "cols": 132, "rows": 43})
    wait_on_screen(agent, exec_id, "43 132\r\n")
    assert agent.request("POST", f"/exec/{exec_id}/stdin", {"data": "\x03"}) == (200, {"written": 1})
    r = finished(agent, exec_id)
    assert (r["signal"], r["exitCode"]) == (2, None), r
    events = api.events(exec_id, since=0)
    check_sequence(events)
    assert events[0]["tty"] is True and {e["type"] for e in events} <= {"start", "stdout", "exit", "keepalive"}
    assert joined(events, "stdout").decode() == r["stdout"]
    assert agent.request("POST", f"/exec/{exec_id}/resize", {"cols": 80, "rows": 24})[0] == 409


def test_tty_job_control_foreground_signal_and_exit_code(agent):
    """An interactive shell runs a job in a process group of its own: a signal "to":
    "foreground" reaches the job (as Ctrl-C would), not the shell; the exit code comes back."""
    m = marker()
    try:
        exec_id = background(agent, argv=["sh", "-i"], env={"PS1": "cbox$ "}, tty=True)
        wait_on_screen(agent, exec_id, "cbox$ ")
        agent.request("POST", f"/exec/{exec_id}/stdin", {"data": f"sleep {m}\n"})
        [sleeper] = wait_for(lambda: pids_running(m), 10, what="the job")
        assert os.getpgid(sleeper) == sleeper       # a job of its own: not the shell's group
        status, r = agent.request("POST", f"/exec/{exec_id}/signal", {"signal": "INT", "to": "foreground"})
        assert (status, r) == (200, {"execId": exec_id, "signal": 2, "to": "foreground", "processGroup": sleeper})
        wait_for(lambda: not pids_running(m), 10, what="the job to end")
        wait_on_screen(agent, exec_id, "cbox$ ", timeout=10)
        assert agent.request("GET", f"/exec/{exec_id}")[1]["running"] is True      # the shell lives on
        agent.request("POST", f"/exec/{exec_id}/stdin", {"data": "exit 3\n"})
        r = finished(agent, exec_id)
        assert (r["exitCode"], r["error"]) == (3, "exit status 3"), r
        # DELETE reaches the shell and its foreground job (process-group kill scope)
        exec_id = background(agent, argv=["sh", "-i"], env={"PS1": "cbox$ "}, tty=True)
        wait_on_screen(agent, exec_id, "cbox$ ")
        agent.request("POST", f"/exec/{exec_id}/stdin", {"data": f"trap '' HUP; sleep {m}\n"})
        wait_for(lambda: pids_running(m), 10, what="the job")
        assert agent.request("DELETE", f"/exec/{exec_id}")[1]["signal"] == 9
        assert wait_for(lambda: not pids_running(m), 5, what="the job to be killed")
    finally:
        kill_pids(pids_running(m))


def test_tty_eof_bytes_and_output_cap(agent):
    api = api_of(agent)
    exec_id = background(agent, cmd="cat; echo done", tty=True)
    wait_for(lambda: agent.request("GET", f"/exec/{exec_id}")[1]["durationMs"] > 50, 5)
    assert agent.request("POST", f"/exec/{exec_id}/stdin", {"data": "héllo\n"}) == (200, {"written": 7})
    assert agent.request("POST", f"/exec/{exec_id}/stdin", {"eof": True}) == (200, {"written": 0})
    r = finished(agent, exec_id)
    assert (r["exitCode"], r["stdout"]) == (0, "héllo\r\nhéllo\r\ndone\r\n"), r
    # bytes both ways, losslessly: raw input through dataBase64, binary output through dataBase64
    exec_id = background(agent, cmd="stty raw -echo; head -c 4 | od -An -tx1; printf '\\377\\376ok'", tty=True)
    wait_for(lambda: agent.request("GET", f"/exec/{exec_id}")[1]["durationMs"] > 200, 5)
    status, r = agent.request("POST", f"/exec/{exec_id}/stdin", {"dataBase64": "/wADBA=="})
    assert (status, r) == (200, {"written": 4})
    finished(agent, exec_id)
    events = api.events(exec_id, since=0)
    assert joined(events, "stdout").split() == [b"ff", b"00", b"03", b"04", b"\xff\xfeok"]
    for body in ({"dataBase64": "***"}, {"dataBase64": 1}, {"data": "x", "dataBase64": "eA=="}):
        assert agent.request("POST", f"/exec/{exec_id}/stdin", body)[0] == 400, body
    r = agent.exec(cmd="head -c 100000 /dev/zero | tr '\\0' a", tty=True, maxOutput=1000)
    assert (r["truncated"], len(r["stdout"]), r["exitCode"]) == (True, 1000, 0)


def test_tty_timeout_signal_and_kill(agent):
    m = marker()
    try:
        r = agent.exec(cmd=f"sleep {m}", tty=True, timeout=0.5)
        assert (r["timedOut"], r["signal"], r["error"]) == (True, 9, "timed out after 0.5s"), r
        exec_id = background(agent, cmd=f"trap 'echo got TERM; exit 7' TERM; echo ready; sleep {m} & wait", tty=True)
        wait_on_screen(agent, exec_id, "ready")
        assert agent.request("POST", f"/exec/{exec_id}/signal", {"signal": "TERM"})[0] == 200
        r = finished(agent, exec_id)
        assert (r["exitCode"], r["stdout"]) == (7, "ready\r\ngot TERM\r\n"), r
        exec_id = background(agent, cmd=f"sleep {m}", tty=True)
        wait_for(lambda: pids_running(m), 10, what="the command")
        assert agent.request("DELETE", f"/exec/{exec_id}")[1]["signal"] == 9
        for path, body in ((f"/exec/{exec_id}/resize", {"cols": 10, "rows": 10}),
                           (f"/exec/{exec_id}/signal", {"signal": "INT", "to": "foreground"}),
                           (f"/exec/{exec_id}/stdin", {"data": "x"})):
            status, r = agent.request("POST", path, body)
            assert status == 409 and ("finished" in r["error"] or "closed" in r["error"]), (path, r)
    finally:
        kill_pids(pids_running(m))


def test_tty_execs_leave_no_fds_behind(agent):
    """Every fd of a terminal (master, its dups, the cgroup pipe) is closed when the exec
    ends, however it ends: exit, kill, timeout, a refused request."""
    m = marker()
    server = agent.server_pid()

    def fds():      # but sockets: the HTTP connections come and go
        links = []
        for fd in os.listdir(f"/proc/{server}/fd"):
            try:
                links.append(os.readlink(f"/proc/{server}/fd/{fd}"))
            except OSError:
                pass
        return sorted(link for link in links if not link.startswith("socket:"))

    agent.exec(cmd="true", tty=True)           # the server's lazily opened fds (/dev/null) are open
    before = fds()
    try:
        for _ in range(3):
            agent.exec(cmd="echo hi", tty=True)
            agent.exec(cmd=f"sleep {m}", tty=True, timeout=0.2)
            agent.request("DELETE", f"/exec/{background(agent, cmd=f'sleep {m}', tty=True)}")
            assert agent.request("POST", "/exec", {"cmd": "true", "tty": True, "cwd": "/nonexistent"})[0] == 400
        assert wait_for(lambda: fds() == before, 5, what="the server's fds as before")
    finally:
        kill_pids(pids_running(m))


@pytest.mark.parametrize("body, needle", [
    ({"cmd": "true", "tty": 1}, "tty must be a boolean"),
    ({"cmd": "true", "cols": 80}, 'cols need "tty": true'),
    ({"cmd": "true", "tty": False, "rows": 24, "term": "vt100"}, 'rows, term need "tty": true'),
    ({"cmd": "true", "tty": True, "cols": 0}, "cols"),
    ({"cmd": "true", "tty": True, "rows": 4097}, "rows"),
    ({"cmd": "true", "tty": True, "cols": "80"}, "cols"),
    ({"cmd": "true", "tty": True, "term": "a b"}, "term"),
    ({"cmd": "true", "tty": True, "term": ""}, "term"),
    ({"cmd": "true", "tty": True, "stdin": "input"}, "stdin may only be omitted or \"pipe\""),
])
def test_bad_tty_requests(agent, body, needle):
    status, r = agent.request("POST", "/exec", body)
    assert status == 400 and needle in r["error"], r


def test_tty_routes_refuse_what_cannot_work(agent):
    m = marker()
    try:
        plain = background(agent, cmd=f"sleep {m}")
        status, r = agent.request("POST", f"/exec/{plain}/resize", {"cols": 80, "rows": 24})
        assert status == 409 and "has no terminal" in r["error"]
        status, r = agent.request("POST", f"/exec/{plain}/signal", {"signal": "INT", "to": "foreground"})
        assert status == 409 and "has no terminal" in r["error"]
        status, r = agent.request("POST", f"/exec/{plain}/signal", {"signal": "INT", "to": "everyone"})
        assert status == 400 and "to must be" in r["error"]
        agent.request("DELETE", f"/exec/{plain}")
        tty = background(agent, cmd=f"sleep {m}", tty=True)
        for body in ({"cols": 80}, {"cols": 80, "rows": 0}, {"cols": 80, "rows": 24, "x": 1}, [80, 24]):
            assert agent.request("POST", f"/exec/{tty}/resize", body)[0] == 400, body
        assert agent.request("GET", f"/exec/{tty}/resize")[0] == 405
        agent.request("DELETE", f"/exec/{tty}")
    finally:
        kill_pids(pids_running(m))


def test_tty_refused_where_the_guest_has_no_ptys(callback_server):
    """A guest without devpts (here: an empty /dev/pts in the agent's mount namespace)
    refuses a tty exec with a clear 409 and goes on running the others."""
    a = Agent(callback_server.path, setup="mount -t tmpfs cbox-no-pts /dev/pts")
    try:
        status, r = a.request("POST", "/exec", {"cmd": "true", "tty": True})
        assert status == 409 and r["error"].startswith("tty: this guest cannot open a pseudo-terminal"), r
        assert a.exec(cmd="echo fine")["stdout"] == "fine\n"
    finally:
        a.stop()


# ---------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------

def test_callback_cli_through_agent(agent, callback_server):
    r = agent.exec(cmd="""cbox_callback echo '{"a": 1}'""")
    assert r["exitCode"] == 0, r
    assert json.loads(r["stdout"]) == {"method": "echo", "params": {"a": 1}}
    assert {"method": "echo", "params": {"a": 1}, "execId": r["execId"]} in callback_server.requests
    r = agent.exec(cmd="cbox_callback fail")
    assert (r["exitCode"], r["stdout"], r["stderr"]) == (1, "", "Error: boom\n")
    r = agent.exec(cmd="cbox_callback m '{bad'")
    assert r["exitCode"] == 2 and "not valid JSON" in r["stderr"]
    assert agent.exec(cmd="cbox_callback")["exitCode"] == 2
    r = agent.exec(cmd="echo '[1, 2]' | cbox_callback --timeout 5 echo -")
    assert json.loads(r["stdout"])["params"] == [1, 2]


def test_callback_python_through_agent(agent):
    code = ("from cbox_callback import callback, CallbackError\n"
            "print(callback('echo', {'a': 1}))\n"
            "try:\n    callback('fail', timeout=5)\n"
            "except CallbackError as e:\n    print('caught', e)\n")
    r = agent.exec(cmd="python3 -", stdin=code)
    assert r["exitCode"] == 0, r
    assert r["stdout"] == "{'method': 'echo', 'params': {'a': 1}}\ncaught boom\n"


def test_callback_shim_skips_site(tmp_path, callback_server):
    """The cbox_callback script runs python3 -S: no site import (a .pth or sitecustomize
    may import heavy packages); the module shim still imports in a normal python3."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text("import sys; sys.stderr.write('SITE RAN\\n')\n")
    ga = load_agent_module()
    plain, odd = tmp_path / "shims", tmp_path / "odd"
    ga.write_callback_shims(str(plain), agent_path=str(AGENT))
    ga.write_callback_shims(str(odd), agent_path=str(AGENT), python="/no such dir/python3")
    assert (plain / "cbox_callback").read_text().startswith(f"#!{PYTHON} -S\n")
    assert (odd / "cbox_callback").read_text().startswith("#!/bin/sh\n")
    for shims in (plain, odd):
        env = dict(os.environ, CBOX_CALLBACK_SOCKET=callback_server.path,
                   PYTHONPATH=f"{site_dir}:{shims}", PATH=f"{os.path.dirname(PYTHON)}:{os.environ['PATH']}")
        r = subprocess.run([str(shims / "cbox_callback"), "echo", '{"a": 1}'], env=env,
                           capture_output=True, text=True, timeout=20)
        assert (r.returncode, r.stderr) == (0, ""), r
        assert json.loads(r.stdout) == {"method": "echo", "params": {"a": 1}}
        r = subprocess.run([PYTHON, "-c", "from cbox_callback import callback; print(callback('other'))"],
                           env=env, capture_output=True, text=True, timeout=20)
        assert (r.returncode, r.stdout, r.stderr) == (0, "42\n", "SITE RAN\n"), r


def test_callback_without_server(agent, short_tmp):
    t0 = time.monotonic()
    r = agent.exec(cmd="cbox_callback --timeout 0.5 m", env={"CBOX_CALLBACK_SOCKET": str(short_tmp / "none")})
    assert time.monotonic() - t0 < 3
    assert r["exitCode"] == 1
    assert r["stderr"].startswith("Error: cannot connect to the host callback unix socket")


def test_callback_client_in_process(callback_server, monkeypatch):
    ga = load_agent_module()
    monkeypatch.setenv("CBOX_CALLBACK_SOCKET", callback_server.path)
    assert ga.callback("echo", [1, "x"]) == {"method": "echo", "params": [1, "x"]}
    assert ga.callback("other") == 42
    with pytest.raises(ga.CallbackError, match="^boom$"):
        ga.callback("fail")
    with pytest.raises(ga.CallbackError, match="invalid reply"):
        ga.callback("bad")
    t0 = time.monotonic()
    with pytest.raises(ga.CallbackError, match=r"^callback timed out after 0.3s$"):
        ga.callback("hang", timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(ga.CallbackError, match="JSON"):
        ga.callback("echo", {1, 2})


def test_import_has_no_side_effects(tmp_path):
    code = ("import threading, guest_agent\n"
            "assert threading.active_count() == 1\n"
            "assert callable(guest_agent.callback) and issubclass(guest_agent.CallbackError, Exception)\n")
    r = subprocess.run([PYTHON, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=20,
                       env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert list(tmp_path.iterdir()) == []


def test_callback_cli_usage_errors():
    r = subprocess.run([PYTHON, str(AGENT), "callback"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run([PYTHON, str(AGENT), "callback", "m", "{"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "not valid JSON" in r.stderr


# ---------------------------------------------------------------------------
# supervisor
# ---------------------------------------------------------------------------

def test_supervisor_restarts_killed_server(fresh_agent):
    old = fresh_agent.server_pid()
    assert children_of(fresh_agent.proc.pid) == [old]
    m = marker()
    try:
        fresh_agent.exec(cmd=f"setsid sleep {m} &")
        assert pids_running(m)
        os.kill(old, signal.SIGKILL)
        fresh_agent.log.wait_for("restarting in")
        fresh_agent.log.wait_for("ready on", count=2)
        new = fresh_agent.server_pid()
        assert new != old and fresh_agent.exec(cmd="echo again")["stdout"] == "again\n"
        wait_for(lambda: not pids_running(m), 2.0, what="the leftovers of a dead server to be killed")
    finally:
        kill_pids(pids_running(m))


def test_supervisor_stops_on_sigterm(fresh_agent):
    server = fresh_agent.server_pid()
    m1, m2 = marker(), marker()
    try:
        fresh_agent.exec(cmd=f"setsid sleep {m1} &")
        fresh_agent.request("POST", "/exec", {"cmd": f"sleep {m2}", "blocking": False})
        assert wait_for(lambda: pids_running(m2), 5.0)
        fresh_agent.proc.send_signal(signal.SIGTERM)
        assert fresh_agent.proc.wait(5) == 0
        assert proc_state(server) is None
        assert wait_for(lambda: not pids_running(m1) and not pids_running(m2), 2.0)
        fresh_agent.log.wait_for("stopped by SIGTERM")
    finally:
        kill_pids(pids_running(m1) + pids_running(m2))


# ---------------------------------------------------------------------------
# system setup: network namespace and PID 1
# ---------------------------------------------------------------------------

HOST_FILES = ("/etc/hostname", "/etc/resolv.conf", "/etc/hosts")


def snapshot_host_files():
    return {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in HOST_FILES if os.path.exists(p)}


NS_CLIENT = """
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
c.request(sys.argv[3], sys.argv[4], body=sys.argv[5] if len(sys.argv) > 5 else None)
print(json.dumps(json.loads(c.getresponse().read())))
"""


def test_network_config_in_netns(netns, short_tmp):
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("util-linux unshare/nsenter missing")
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    netns.run("ip", "link", "set", "peer0", "up")
    before, hostname = snapshot_host_files(), socket.gethostname()
    env = dict(os.environ, CBOX_CALLBACK_SOCKET=str(short_tmp / "ns.sock"),
               CBOX_CMDLINE="cbox.vm=x cbox.ip=10.200.7.2/24 cbox.gw=10.200.7.1 cbox.dns=10.200.7.1")
    proc = netns.popen(["unshare", "--uts", PYTHON, str(AGENT)], env=env, stdin=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, start_new_session=True)
    try:
        log = LogReader(proc.stderr)
        log.wait_for("ready on 0.0.0.0:4031 vm=x")
        assert "10.200.7.2/24" in netns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert ",UP" in netns.run("ip", "-o", "link", "show", "eth0").stdout
        assert "default via 10.200.7.1 dev eth0" in netns.run("ip", "route", "show", "default").stdout
        uts = subprocess.run(["nsenter", "-t", str(proc.pid), "-u", "cat", "/proc/sys/kernel/hostname"],
                             capture_output=True, text=True, timeout=10)
        assert uts.stdout.strip() == "x"
        r = json.loads(netns.run(PYTHON, "-c", NS_CLIENT, "10.200.7.2", "4031", "POST", "/exec",
                                 '{"cmd": "cat /proc/sys/kernel/hostname; echo $CBOX_VM_NAME"}').stdout)
        assert r["stdout"] == "x\nx\n"
        assert snapshot_host_files() == before and socket.gethostname() == hostname
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(5) == 0
        finally:
            kill_pids([proc.pid] + descendants_of(proc.pid))
            proc.wait(5)
            proc.stderr.close()


PID1_PRELUDE = """set -e
mount --bind "$T/hostname" /etc/hostname
mount --bind "$T/resolv.conf" /etc/resolv.conf
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /sys/fs/cgroup
ip link add eth0 type veth peer name peer0
ip link set peer0 up
exec "$PY" "$AGENT" --listen 127.0.0.1 --port 4031
"""


def test_pid1_mode_in_namespaces(tmp_path):
    """As PID 1 (of a pid namespace): /etc files, hostname, network, reaping, poweroff."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter") \
            or not shutil.which("ip"):
        pytest.skip("needs root, unshare, nsenter and ip")
    (tmp_path / "hostname").write_text("old\n")
    (tmp_path / "resolv.conf").write_text("")
    before = snapshot_host_files()
    cgroups_before = sorted(os.listdir("/sys/fs/cgroup"))
    env = dict(os.environ, T=str(tmp_path), PY=PYTHON, AGENT=str(AGENT),
               CBOX_CMDLINE="cbox.vm=pid1vm cbox.ip=10.200.9.2/24 cbox.gw=10.200.9.1 "
                            "cbox.dns=10.200.9.1,10.200.9.3 cbox.callback_port=4099")
    env.pop("CBOX_CALLBACK_SOCKET", None)
    proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--uts", "--net",
                             "sh", "-c", PID1_PRELUDE], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    tree = []
    try:
        log = LogReader(proc.stderr)
        log.wait_for("ready on 127.0.0.1:4031 vm=pid1vm")
        assert "init mode" in log.text()
        [init] = children_of(proc.pid)
        tree = [init] + descendants_of(init)

        def call(method, path, body=None):
            args = ["nsenter", "-t", str(init), "-n", PYTHON, "-c", NS_CLIENT, "127.0.0.1", "4031", method, path]
            out = subprocess.run(args + ([json.dumps(body)] if body else []), capture_output=True,
                                 text=True, timeout=20, check=True).stdout
            return json.loads(out)

        r = call("POST", "/exec", {"cmd": "cat /etc/hostname /etc/resolv.conf /proc/sys/kernel/hostname; "
                                          "echo $$ $PATH $CBOX_CALLBACK_PORT; ip -4 -o addr show eth0; "
                                          "ip route show default"})
        lines = r["stdout"].splitlines()
        assert lines[:5] == ["pid1vm", "nameserver 10.200.9.1", "nameserver 10.200.9.3", "pid1vm",
                             lines[4]]
        assert lines[4].split()[1].startswith("/run/cbox:") and lines[4].split()[2] == "4099"
        assert "10.200.9.2/24" in lines[5] and "default via 10.200.9.1" in lines[6]
        assert (tmp_path / "hostname").read_text() == "pid1vm\n"
        # an orphan (double fork) is reparented to PID 1 and reaped there
        orphan = f"1.{uuid.uuid4().int % 10**6:06d}"          # a sleep this test can find in /proc
        call("POST", "/exec", {"cmd": f"sh -c 'sleep {orphan} &'"})
        [pid] = wait_for(lambda: pids_running(orphan), what="the orphan")
        wait_for(lambda: proc_state(pid) is None, what="the orphan reaped (a zombie stays until it is)")
        assert wait_for(lambda: not [p for p in descendants_of(init) if proc_state(p) == "Z"], 3.0)
        tree = [init] + descendants_of(init)
        os.kill(init, signal.SIGTERM)
        proc.wait(10)
        log.wait_for("powering off: stopped by SIGTERM")
        assert snapshot_host_files() == before
        # its cgroup tree went to the namespace's own /sys/fs/cgroup (a tmpfs), not the host's
        assert sorted(os.listdir("/sys/fs/cgroup")) == cgroups_before
    finally:
        kill_pids([proc.pid] + tree)
        proc.wait(5)
        proc.stderr.close()


# ---------------------------------------------------------------------------
# POST /identity (a warm pool VM takes the name of the start request that claimed it)
# ---------------------------------------------------------------------------

def test_identity_renames_the_guest_and_survives_a_server_restart(fresh_agent):
    a = fresh_agent
    assert a.request("GET", "/health")[1]["vmName"] == "t1"
    for bad in ({"vm": "_pool-x"}, {"vm": "a b"}, {"vm": "x" * 64}, {"vm": 3}, {}, {"vm": "ok", "more": 1}, ["ok"]):
        status, body = a.request("POST", "/identity", bad)
        assert status == 400 and body["error"], (bad, body)
    assert a.request("GET", "/identity")[0] == 405
    assert a.exec(cmd='hostname; echo "$CBOX_VM_NAME"')["stdout"] == "t1\nt1\n"     # nothing changed
    status, body = a.request("POST", "/identity", {"vm": "renamed.1"})
    assert status == 200 and body == {"vmName": "renamed.1", "hostname": "renamed.1"}
    a.log.wait_for("identity: vm=renamed.1")
    assert a.request("GET", "/health")[1]["vmName"] == "renamed.1"
    assert a.exec(cmd='hostname; echo "$CBOX_VM_NAME"')["stdout"] == "renamed.1\nrenamed.1\n"
    os.kill(a.server_pid(), signal.SIGKILL)              # the supervisor forks a new server
    a.log.wait_for("ready on", count=2)
    a.log.wait_for("vm=renamed.1")
    assert a.request("GET", "/health")[1]["vmName"] == "renamed.1"
    assert a.exec(cmd='echo "$CBOX_VM_NAME"')["stdout"] == "renamed.1\n"

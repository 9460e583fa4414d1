"""Attacks of a hostile guest on cbox.py, for tests/test_hostile.py and bench/bench.py.

Each attack does what code inside one guest can do: open connections to its
callback vsock port (in the stand-in, and for cbox.py, that is the VM's Unix
socket `<run_dir>/<cid>/vsock.sock_<callback_port>`, which the test opens
directly: a guest connection arrives exactly as such a connection), or answer
cbox.py in place of its guest agent (tests/hostile_agent.py, started by an exec
in the guest). An attack runs in threads of the calling process between
start() and stop(); `seen` counts what the attacker got back.
Stdlib only.
"""
import collections
import json
import os
import socket
import threading
import time
from pathlib import Path

HOSTILE_AGENT = Path(__file__).resolve().with_name("hostile_agent.py")
LINE_MAX = 1024 * 1024


def connect(path, timeout=5.0, wait=True):
    """A blocking connect (a Unix socket's full backlog makes a non-blocking one fail
    with EAGAIN at once; wait=False wants that), then `timeout` for the rest."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not wait:
        sock.setblocking(False)
    sock.connect(str(path))
    sock.settimeout(timeout)
    return sock


def read_line(sock, limit=LINE_MAX + 2):
    """One reply line (bytes, without the newline); b"" when the connection ended first."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        more = sock.recv(1)
        if not more:
            return data
        data += more
    return data[:-1]


def callback_line(method, params=None):
    return json.dumps({"method": method, "params": params}).encode() + b"\n"


class Attack:
    name = "attack"
    what = ""

    def __init__(self):
        self.stopping = threading.Event()
        self.threads = []
        self.socks = []
        self.seen = collections.Counter()
        self.lock = threading.Lock()

    def count(self, key, n=1):
        with self.lock:
            self.seen[key] += n

    def thread(self, fn, *args):
        t = threading.Thread(target=self._guard, args=(fn,) + args, daemon=True)
        t.start()
        self.threads.append(t)

    def _guard(self, fn, *args):
        try:
            fn(*args)
        except OSError as e:
            if not self.stopping.is_set():        # stop() closes sockets under the threads
                self.count(f"oserror {type(e).__name__}: {e}")

    def start(self):
        raise NotImplementedError

    def stop(self):
        self.stopping.set()
        for sock in self.socks:
            try:
                sock.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(30)           # an exec on a dripping agent ends at its deadline (timeout + 15 s)
        self.socks.clear()


def classify(reply):
    """'error: <first words>' / 'result' / 'closed' / 'garbage' for one reply line."""
    if not reply:
        return "closed"
    try:
        obj = json.loads(reply)
    except ValueError:
        return "garbage"
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return "error: " + " ".join(obj["error"].split()[:3])
    if isinstance(obj, dict) and "result" in obj:
        return "result"
    return "garbage"


# ---- the callback socket -------------------------------------------------------------

class PerConnection(Attack):
    """`n` workers, each running `_one` (one connection's attack) in a thread of its own."""
    n = 1

    def __init__(self, path, n=None):
        super().__init__()
        self.path, self.n = path, n or self.n

    def start(self):
        for _ in range(self.n):
            self.thread(self._one)

    def _one(self):
        raise NotImplementedError


class IdleConnections(Attack):
    """Open `n` connections and send nothing (fd exhaustion)."""
    name, what = "idle connections", "1,200 connections to the callback socket, nothing sent"

    def __init__(self, path, n=1200, wait=True, probe=True):
        super().__init__()
        self.path, self.n, self.wait, self.probe = path, n, wait, probe

    def start(self):
        for _ in range(self.n):
            try:
                self.socks.append(connect(self.path, timeout=2.0, wait=self.wait))
            except OSError as e:
                self.count(f"connect {type(e).__name__}")
        self.count("connected", len(self.socks))
        if not self.probe:
            return
        for sock in self.socks:         # the refused ones got an error line and EOF at once
            sock.settimeout(0.05)
            try:
                self.count(classify(read_line(sock)))
            except socket.timeout:
                self.count("open")
            except OSError:
                self.count("reset")


class SlowPipelined(Attack):
    """Each connection: one valid callback to a URL that stalls, then 2 MiB more (memory)."""
    name, what = "slow callbacks + pipelined bytes", "300 connections: a callback the URL stalls on, then 2 MiB pipelined"

    def __init__(self, path, n=300):
        super().__init__()
        self.path, self.n = path, n

    def start(self):
        junk = callback_line("junk", "x" * (LINE_MAX - 64)) * 2
        for _ in range(self.n):
            try:
                sock = connect(self.path, timeout=2.0)
            except OSError as e:
                self.count(f"connect {type(e).__name__}")
                continue
            self.socks.append(sock)
            sock.setblocking(False)
            try:
                sock.send(callback_line("slow", {"mode": "stall"}) + junk)
            except OSError:
                pass
        self.count("connected", len(self.socks))


class NoReader(PerConnection):
    """Connections that send request after request and never read a reply (drain)."""
    name, what = "never reads replies", "20 connections writing bad requests, never reading"
    n = 20

    def _one(self):
        sock = connect(self.path)
        self.socks.append(sock)
        sock.settimeout(0.5)
        chunk = b"[]\n" * 20000
        while not self.stopping.is_set():
            try:
                sock.sendall(chunk)
            except socket.timeout:
                continue                 # cbox's replies back up: it stops reading us
            except OSError:
                self.count("dropped by cbox")
                return


class BigLines(PerConnection):
    """`n` connections sending 1 MiB callback lines as fast as they are answered (the loop)."""
    name, what = "1 MiB lines", "64 connections sending 1 MiB callback lines back to back"
    n = 64

    def _one(self):
        line = callback_line("big", "y" * (LINE_MAX - 64))
        while not self.stopping.is_set():
            sock = connect(self.path, timeout=30)
            self.socks.append(sock)
            while not self.stopping.is_set():
                try:
                    sock.sendall(line)
                    self.count(classify(read_line(sock)))
                except OSError:
                    break
            sock.close()


class Flood(Attack):
    """Tiny callbacks pipelined as fast as the socket takes them (rate and log budgets)."""
    name, what = "callback flood", "4 connections pipelining tiny callbacks"

    def __init__(self, path, n=4):
        super().__init__()
        self.path, self.n = path, n

    def start(self):
        for _ in range(self.n):
            sock = connect(self.path)
            self.socks.append(sock)
            self.thread(self._send, sock)
            self.thread(self._read, sock)

    def _send(self, sock):
        lines = callback_line("tiny", {"i": 1}) * 1000
        while not self.stopping.is_set():
            sock.sendall(lines)

    def _read(self, sock):
        f = sock.makefile("rb")
        while not self.stopping.is_set():
            line = f.readline()
            if not line:
                return
            self.count(classify(line.strip()))


class BadLines(Attack):
    """Deeply nested params, invalid JSON, lines over 1 MiB, half lines that stall."""
    name, what = "bad lines", "nested 980 and 100,000 deep, invalid JSON, >1 MiB lines, half lines"

    def __init__(self, path):
        super().__init__()
        self.path = path

    def start(self):
        self.thread(self._nested)
        self.thread(self._oversize)
        self.thread(self._half)

    def _nested(self):
        lines = [b'{"method": "deep", "params": ' + b"[" * depth + b"]" * depth + b"}\n"
                 for depth in (980, 5000, 100000)] + [b'{"method": \xff}\n', b"\x00\n", b'"x"\n']
        while not self.stopping.is_set():
            sock = connect(self.path)
            self.socks.append(sock)
            for line in lines:
                sock.sendall(line)
                self.count("nested " + classify(read_line(sock)))
            sock.close()

    def _oversize(self):
        while not self.stopping.is_set():
            sock = connect(self.path)
            self.socks.append(sock)
            try:
                sock.sendall(b"z" * (LINE_MAX + 4096))
            except OSError:
                pass
            self.count("oversize " + classify(read_line(sock)))
            sock.close()

    def _half(self):
        sock = connect(self.path, timeout=30)
        self.socks.append(sock)
        sock.sendall(b'{"method": "half", "par')
        self.count("half " + classify(read_line(sock)))


# ---- the guest agent ---------------------------------------------------------------------

class AgentAnswers(Attack):
    """Execs on the attacked VM while hostile_agent.py answers them badly, in `modes`."""
    name = "bad agent answers"
    what = ("the agent replaced; execs on the bad VM (each kind 10 a second) answered with endless 1-byte "
            "chunks, a dripping body, nested JSON, an endless body, endless trailers")
    MODES = ("chunked1", "drip", "nested", "nested_ok", "nolength", "trailers")

    def __init__(self, post_exec, modes=MODES, timeout=1.0, pause=0.1):
        super().__init__()
        self.post_exec, self.modes, self.timeout, self.pause = post_exec, modes, timeout, pause
        self.durations = collections.defaultdict(list)

    def start(self):
        for mode in self.modes:
            self.thread(self._one, mode)

    def _one(self, mode):
        while not self.stopping.is_set():
            t0 = time.monotonic()
            status, _ = self.post_exec({"cmd": f"hostile:{mode}", "timeout": self.timeout})
            self.durations[mode].append(time.monotonic() - t0)
            self.count(f"{mode} {status}")
            self.stopping.wait(self.pause)      # the bad VM's REST user is not the attacker


def start_hostile_agent(post_exec, stop_file, max_seconds=120):
    """Start hostile_agent.py in the guest through a background exec; post_exec(body) -> (status, json)."""
    cmd = f"exec python3 {HOSTILE_AGENT} {stop_file} {max_seconds:g}"
    status, r = post_exec({"cmd": cmd, "blocking": False})
    assert status == 200, r
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, r = post_exec({"cmd": "hostile:probe", "timeout": 5})
        if status == 200 and r.get("stdout") == "hostile\n":
            return
        time.sleep(0.1)
    raise AssertionError(f"the hostile agent did not take over: {status} {r}")


def stop_hostile_agent(post_exec, stop_file):
    Path(stop_file).touch()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, r = post_exec({"cmd": "echo real", "timeout": 5})
        if status == 200 and r.get("stdout") == "real\n":
            return
        time.sleep(0.1)
    raise AssertionError(f"the real agent did not come back: {status} {r}")


# ---- watching cbox.py ------------------------------------------------------------------------

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """Peak RSS and fd count of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid):
        self.pid, self.peak_rss_kb, self.peak_fds = pid, 0, 0
        self.stopping = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                self.peak_rss_kb = max(self.peak_rss_kb, rss_kb(self.pid))
                self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            except OSError:
                return
            self.stopping.wait(0.05)

    def stop(self):
        self.stopping.set()
        self.t.join(5)
        return self


# ---- an attack in a process of its own --------------------------------------------------------

SOCKET_ATTACKS = {cls.__name__: cls for cls in (IdleConnections, SlowPipelined, NoReader, BigLines, Flood, BadLines)}


class Remote:
    """A callback-socket attack run by `python3 hostile.py NAME PATH ARGS_JSON` in a process of its
    own, like a guest on vCPUs of its own: its threads do not share the caller's GIL (which would
    slow the caller's measurements, not cbox.py). `seen` follows the child's counters."""

    def __init__(self, cls, path, **kw):
        import subprocess
        import sys
        self.cls, self.name, self.what = cls, cls.name, cls.what
        self.argv = [sys.executable, __file__, cls.__name__, str(path), json.dumps(kw)]
        self.popen = subprocess.Popen
        self.seen = collections.Counter()
        self.proc = None

    def start(self):
        import subprocess
        self.proc = self.popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        first = self.proc.stdout.readline()          # after the attack's start()
        if not first:
            raise RuntimeError(f"attack {self.name} did not start (exit {self.proc.wait()})")
        self.seen = collections.Counter(json.loads(first))
        self.reader = threading.Thread(target=self._follow, daemon=True)
        self.reader.start()

    def _follow(self):
        for line in self.proc.stdout:
            self.seen = collections.Counter(json.loads(line))

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)


def _child(name, path, kw):
    import sys
    attack = SOCKET_ATTACKS[name](path, **json.loads(kw))
    attack.start()

    def report():
        with attack.lock:
            line = json.dumps(dict(attack.seen))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    report()
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.wait(0.2):
        report()
    attack.stop()
    report()


if __name__ == "__main__":
    import sys
    _child(*sys.argv[1:4])

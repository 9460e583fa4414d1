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
    """Tiny callbacks pipelined as fast as the socket takes them (rate and log budgets), or,
    with `rate`, that many a second over the `n` connections together (within a VM's budget)."""
    name, what = "callback flood", "4 connections pipelining tiny callbacks"

    def __init__(self, path, n=4, rate=None):
        super().__init__()
        self.path, self.n, self.rate = path, n, rate

    def start(self):
        for _ in range(self.n):
            sock = connect(self.path)
            self.socks.append(sock)
            self.thread(self._send, sock)
            self.thread(self._read, sock)

    def _send(self, sock):
        if self.rate:
            return self._send_paced(sock, self.rate / self.n)
        lines = callback_line("tiny", {"i": 1}) * 1000
        while not self.stopping.is_set():
            sock.sendall(lines)

    def _send_paced(self, sock, rate, tick=0.05):
        """`rate` callbacks a second, sent in bursts every `tick` seconds."""
        line, owed, due = callback_line("tiny", {"i": 1}), 0.0, time.monotonic()
        while not self.stopping.is_set():
            owed += rate * tick
            sock.sendall(line * int(owed))
            owed -= int(owed)
            due += tick
            self.stopping.wait(max(0.0, due - time.monotonic()))

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


def start_hostile_agent(post_exec, stop_file, max_seconds=120, wait=20):
    """Start hostile_agent.py in the guest through a background exec; post_exec(body) -> (status, json)."""
    cmd = f"exec python3 {HOSTILE_AGENT} {stop_file} {max_seconds:g}"
    status, r = post_exec({"cmd": cmd, "blocking": False})
    assert status == 200, r
    answered(post_exec, "hostile:probe", "hostile\n", wait, "the hostile agent did not take over")


def stop_hostile_agent(post_exec, stop_file, wait=30):
    Path(stop_file).touch()
    answered(post_exec, "echo real", "real\n", wait, "the real agent did not come back")


def answered(post_exec, cmd, stdout, wait, failure):
    """Exec `cmd` every 0.1 s until it answers 200 with `stdout`; AssertionError(failure) after `wait` s."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status, r = post_exec({"cmd": cmd, "timeout": 5})
        if status == 200 and r.get("stdout") == stdout:
            return
        time.sleep(0.1)
    raise AssertionError(f"{failure}: {status} {r}")


# ---- clients of cbox.py's REST API, and many VMs at once ------------------------------------------

class RestAttack(Attack):
    """Clients of cbox.py's REST API at `api` = {"ns": network namespace path, "addr": [host, port],
    "token": api_token or ""}: what a tenant (with the token) or anyone who reaches the port
    (without) can do."""

    def __init__(self, api):
        super().__init__()
        self.api = api

    def connect(self, timeout=30.0):
        from nsutil import socket_in_ns        # tests/: beside this file
        sock = socket_in_ns(self.api["ns"])
        self.socks.append(sock)
        sock.settimeout(timeout)
        sock.connect(tuple(self.api["addr"]))
        return sock

    def head(self, method, target, length=None, close=False):
        auth = f"Authorization: Bearer {self.api['token']}\r\n" if self.api.get("token") else ""
        return (f"{method} {target} HTTP/1.1\r\nHost: cbox\r\n{auth}"
                + ("" if length is None else f"Content-Type: application/json\r\nContent-Length: {length}\r\n")
                + ("Connection: close\r\n" if close else "") + "\r\n").encode("latin-1")

    def post_json(self, target, body, close=True):
        data = json.dumps(body).encode()
        sock = self.connect()
        sock.sendall(self.head("POST", target, len(data), close) + data)
        return sock

    def drain(self, sock):
        """Read a response to its end (the server closes: Connection: close) without keeping it;
        its status line is counted."""
        first = sock.recv(65536)
        self.count(first.split(b"\r\n", 1)[0].decode("latin-1", "replace")[9:12] or "closed")
        total = len(first)
        while first and not self.stopping.is_set():
            more = sock.recv(1 << 20)
            if not more:
                break
            total += len(more)
        self.count("bytes read", total)
        sock.close()


class StreamedExecs(RestAttack):
    """`clients` streamed execs (POST exec `body` with "stream": true) at once per VM, their
    events read as fast as they come and dropped; each started again `pause` s after it ended."""
    pause = 0.05

    def __init__(self, api, vms, clients, body):
        super().__init__(api)
        self.vms, self.clients, self.body = vms, clients, dict(body, stream=True)

    def start(self):
        for vm in self.vms:
            for _ in range(self.clients):
                self.thread(self._one, vm)

    def _one(self, vm):
        while not self.stopping.is_set():
            self.drain(self.post_json(f"/v1/vms/{vm}/exec", self.body))
            self.stopping.wait(self.pause)


class BigEventStreams(StreamedExecs):
    """Streamed execs on VMs whose agent hostile_agent.py replaced, answered in `mode` (its
    STREAM_LINES: stream_huge, 12 stdout events of ~50 MB each; cbox.py reads and relays
    them); `clients` at once per VM."""
    name = "huge event lines"
    what = "replaced agents answer streamed execs with 12 event lines of ~50 MB each, 4 clients per VM"

    def __init__(self, api, vms, clients=4, mode="stream_huge"):
        super().__init__(api, vms, clients, {"cmd": f"hostile:{mode}", "timeout": 60})


class BoundEventStreams(BigEventStreams):
    """BigEventStreams whose 12 event lines are legal: just under cbox.py's 512 KiB bound, their
    data `yes` output (every other character an escape: the slowest to decode), 4 clients per VM."""
    name = "event lines at the bound"
    what = "replaced agents answer streamed execs with 12 legal event lines just under 512 KiB, 4 clients per VM"

    def __init__(self, api, vms, clients=4, mode="stream_bound"):
        super().__init__(api, vms, clients, mode)


class YesStreams(StreamedExecs):
    """`readers` streamed execs of `yes` per VM, read as fast as they come (the stream budget)."""
    name, what = "yes streams", "each attacking VM runs `yes` in 4 streamed execs, read as fast as they come"
    pause = 0.5

    def __init__(self, api, vms, readers=4, timeout=60):
        super().__init__(api, vms, readers, {"cmd": "yes", "timeout": timeout})


class BusyVcpus(RestAttack):
    """Each VM's guest keeps `procs` processes spinning, in one exec started at start() and
    killed at stop() (DELETE /v1/vms/NAME/exec): a tenant burning every CPU its VM has.  A
    real guest runs them on its vCPUs; the stand-in holds a process guest to its boot_vcpus
    (tests/fake_chv.py GuestCpus), so 4 processes in a 1-vCPU guest share one CPU."""
    name = "busy vCPUs"
    what = "each attacking VM's guest spins 4 processes on its 1 vCPU"

    def __init__(self, api, vms, procs=4, timeout=600):
        super().__init__(api)
        self.vms, self.procs, self.timeout = vms, procs, timeout

    def start(self):
        spin = "(while :; do :; done) & " * self.procs + "wait"
        for vm in self.vms:
            self.drain(self.post_json(f"/v1/vms/{vm}/exec", {"cmd": spin, "blocking": False,
                                                              "timeout": self.timeout}))

    def stop(self):
        for vm in self.vms:
            try:
                sock = self.connect()
                sock.sendall(self.head("DELETE", f"/v1/vms/{vm}/exec", close=True))
                self.drain(sock)
            except OSError as e:
                self.count(f"stop {type(e).__name__}")
        super().stop()


FORGED = "cbox-forged-line:"          # starts a log line only when a method's newline reached the log


class UnauthBodies(RestAttack):
    """Without the token: `clients` x `conns` connections, each sending a request whose
    `body`-byte body misses its last byte (held open; sent again when cbox.py answers or
    closes), and once a second a request whose method holds a newline and FORGED."""
    name = "unauthenticated bodies"
    what = ("no token: 250 connections per client (256 sending at once at most), each an 8 MiB body but its "
            "last byte; a method with a newline once a second")

    def __init__(self, api, clients=1, conns=250, body=8 * 1024 * 1024, senders=256):
        super().__init__(dict(api, token=""))
        self.slots, self.body, self.senders = clients * conns, body, min(senders, clients * conns)
        self.payload = memoryview(b"x" * (body - 1))        # one copy for every sender

    def start(self):
        for i in range(self.senders):
            self.thread(self._fill, range(i, self.slots, self.senders))
        self.thread(self._forge)

    def _fill(self, slots):
        head = self.head("POST", "/v1/vms", self.body)
        live = {}
        while not self.stopping.is_set():
            for slot in slots:
                if slot in live or self.stopping.is_set():
                    continue
                sock = None
                try:
                    sock = self.connect(timeout=5.0)
                    sock.sendall(head)
                    sock.sendall(self.payload)
                    live[slot] = sock
                    self.count("bodies held")
                except OSError as e:
                    if not self.stopping.is_set():
                        self.count(f"send {type(e).__name__}")
                    if sock:
                        sock.close()
            for slot, sock in list(live.items()):
                sock.settimeout(0.001)
                try:
                    answer = sock.recv(4096)
                    self.count(f"answered {answer[9:12].decode('latin-1', 'replace')}" if answer else "closed by cbox")
                except socket.timeout:
                    continue
                except OSError as e:
                    self.count(f"recv {type(e).__name__}")
                sock.close()
                del live[slot]
            self.stopping.wait(0.2)

    def _forge(self):
        while not self.stopping.wait(1.0):
            sock = self.connect(timeout=5.0)
            sock.sendall(f"GET\n{FORGED}the-method-held-a-newline /v1/vms HTTP/1.1\r\nHost: cbox\r\n\r\n".encode())
            try:
                self.count("forged " + (sock.recv(4096)[9:12].decode("latin-1", "replace") or "closed"))
            except OSError as e:
                self.count(f"forged {type(e).__name__}")
            sock.close()


def many_labels(n=4500):
    return "&".join(f"label=k{i}=v" for i in range(n))


def many_params(n=8000):
    return "&".join(f"u{i}=1" for i in range(n))


class RestQueries(RestAttack):
    """With the token: `clients` keep-alive connections looping GET /v1/vms, with 4,500 label=
    filters and 8,000 unknown parameters in turn."""
    name = "rest queries"
    what = "with the token: clients looping GET /v1/vms with 4,500 label= filters or 8,000 unknown parameters in turn"

    def __init__(self, api, clients=1):
        super().__init__(api)
        self.clients = clients

    def start(self):
        for _ in range(self.clients):
            self.thread(self._one)

    def _one(self):
        requests = [self.head("GET", "/v1/vms?" + many_labels()), self.head("GET", "/v1/vms?" + many_params())]
        sock, buf, i = self.connect(), bytearray(), 0
        while not self.stopping.is_set():
            sock.sendall(requests[i % 2])
            status, buf = read_response(sock, buf)
            self.count(status)
            i += 1


def read_response(sock, buf):
    """(status text, the bytes after the response) of one Content-Length response."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed by cbox")
        buf += more
    head = bytes(buf[:end]).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buf) < end + 4 + length:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed by cbox")
        buf += more
    return head[9:12], buf[end + 4 + length:]


class Many(Attack):
    """One attack class on many targets at once (one per attacking VM), in one process."""

    def __init__(self, cls, targets, **kw):
        super().__init__()
        self.attacks = [cls(target, **kw) for target in targets]
        self.lock = threading.Lock()

    @property
    def seen(self):
        total = collections.Counter()
        for attack in self.attacks:
            with attack.lock:
                total.update(attack.seen)
        return total

    @seen.setter
    def seen(self, value):
        pass                     # Attack.__init__ sets it: the counters are the attacks' own

    def start(self):
        for attack in self.attacks:
            attack.start()

    def stop(self):
        for attack in self.attacks:
            attack.stopping.set()
        for attack in self.attacks:
            attack.stop()


def pin(pid, cpus):
    """Set the CPUs of every thread of a process (sched_setaffinity sets one thread's); a
    process that is gone is skipped."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def process_tree(root):
    """pids of `root` and its descendants."""
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            children[int(stat[stat.rindex(")") + 2:].split()[1])].append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def pin_tree(root, cpus):
    for pid in process_tree(root):
        pin(pid, cpus)


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
    """Peak RSS and fd count of a process, sampled every 50 ms in a thread. With `cap_kb`,
    on_cap() is called (once, in a thread of its own) when the RSS goes beyond it: a guard
    for the machine, which an attack on a cbox.py without bounds could run out of memory."""

    def __init__(self, pid, cap_kb=None, on_cap=None):
        self.pid, self.peak_rss_kb, self.peak_fds = pid, 0, 0
        self.cap_kb, self.on_cap, self.capped_after = cap_kb, on_cap, None
        self.started = time.monotonic()
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
            if self.cap_kb and self.peak_rss_kb > self.cap_kb and self.capped_after is None:
                self.capped_after = time.monotonic() - self.started
                if self.on_cap:
                    threading.Thread(target=self.on_cap, daemon=True).start()
            self.stopping.wait(0.05)

    def stop(self):
        self.stopping.set()
        self.t.join(5)
        return self


# ---- an attack in a process of its own --------------------------------------------------------

SOCKET_ATTACKS = {cls.__name__: cls for cls in (IdleConnections, SlowPipelined, NoReader, BigLines, Flood, BadLines)}
REST_ATTACKS = {cls.__name__: cls for cls in (BigEventStreams, BoundEventStreams, YesStreams, UnauthBodies,
                                               RestQueries, BusyVcpus)}


class Remote:
    """An attack run by `python3 hostile.py NAME TARGET_JSON ARGS_JSON CPUS_JSON MAX_SECONDS` in a
    process of its own, like a guest on vCPUs of its own: its threads do not share the caller's GIL (which
    would slow the caller's measurements, not cbox.py). TARGET: a callback socket's path, a list
    of them (the attack on each, Many) or a REST attack's api. With `cpus` the process runs on
    those CPUs only. `seen` follows the child's counters. The child ends with its parent, and
    after `max_seconds` in any case."""

    def __init__(self, cls, path, cpus=None, max_seconds=900, **kw):
        import subprocess
        import sys
        self.cls, self.name, self.what = cls, cls.name, cls.what
        target = path if isinstance(path, (list, dict)) else str(path)
        if isinstance(target, list):
            target = [str(p) for p in target]
        self.argv = [sys.executable, __file__, cls.__name__, json.dumps(target), json.dumps(kw),
                     json.dumps(sorted(cpus) if cpus else None), str(max_seconds)]
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

    def halt(self):
        """Tell the child to stop, without waiting (stop() waits)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def stop(self):
        self.halt()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)


def _child(name, target, kw, cpus="null", max_seconds="900"):
    import ctypes
    import resource
    import sys
    ctypes.CDLL(None).prctl(1, 9)                  # PR_SET_PDEATHSIG, SIGKILL: it ends with the caller
    if json.loads(cpus):
        os.sched_setaffinity(0, json.loads(cpus))  # before any thread: they all inherit it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cls = {**SOCKET_ATTACKS, **REST_ATTACKS}[name]
    target, kw = json.loads(target), json.loads(kw)
    attack = Many(cls, target, **kw) if isinstance(target, list) else cls(target, **kw)
    attack.start()

    def report():
        with attack.lock:
            line = json.dumps(dict(attack.seen))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    report()
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    deadline = time.monotonic() + float(max_seconds)
    while not done.wait(0.2) and time.monotonic() < deadline:
        report()
    attack.stop()
    report()


if __name__ == "__main__":
    import sys
    _child(*sys.argv[1:])

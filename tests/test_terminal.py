"""The terminal (issue 21): exec with "tty": true and GET /v1/vms/{name}/exec/{id}/attach as a
WebSocket (RFC 6455), through cbox.py's REST API with the stand-in hypervisor and the real
guest agent (process-group mode), and `cbox.py shell` driven through a pseudo-terminal.

The WebSocket client is written here with the standard library (not cbox.py's framing), so
the server is checked against an independent reading of RFC 6455.
"""
import base64
import fcntl
import hashlib
import json
import os
import re
import select
import struct
import sys
import termios
import time

import pytest

from conftest import REPO

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsClient:
    """A browser-style WebSocket client: masked frames, answers pings."""

    def __init__(self, server, path, token=None, key=None):
        self.sock = server.ns.connect(("127.0.0.1", server.settings["port"]), timeout=30)
        key = key or base64.b64encode(os.urandom(16)).decode()
        head = (f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
        self.sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, self.buffer = data.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n")[0].decode()
        self.headers = {k.strip().lower(): v.strip() for k, _, v in
                        (line.decode().partition(":") for line in head.split(b"\r\n")[1:])}
        self.accept_ok = self.headers.get("sec-websocket-accept") == base64.b64encode(
            hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.text, self.binary, self.pongs = [], bytearray(), []
        self.closed = None              # the server's close code

    def send_frame(self, opcode, payload, mask=True, fin=True):
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        bit = 0x80 if mask else 0
        if n < 126:
            head += bytes([bit | n])
        elif n < 65536:
            head += bytes([bit | 126]) + struct.pack(">H", n)
        else:
            head += bytes([bit | 127]) + struct.pack(">Q", n)
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.sock.sendall(head + payload)

    def type(self, data):
        self.send_frame(2, data)

    def control(self, **message):
        self.send_frame(1, json.dumps(message).encode())

    def _frame(self):
        while True:
            buf = self.buffer
            if len(buf) >= 2:
                n, at = buf[1] & 0x7F, 2
                if n == 126:
                    n, at = struct.unpack(">H", buf[2:4])[0], 4
                elif n == 127:
                    n, at = struct.unpack(">Q", buf[2:10])[0], 10
                if len(buf) >= at + n:
                    assert not buf[1] & 0x80, "a masked frame from the server"
                    self.buffer = buf[at + n:]
                    return buf[0] & 0x0F, buf[at:at + n]
            chunk = self.sock.recv(65536)
            if not chunk:
                return None, b""
            self.buffer += chunk

    def read_until(self, done, timeout=60):
        """Read frames until done(self) or the close; True when done."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while not done(self):
            assert time.monotonic() < deadline, (bytes(self.binary)[-500:], self.text)
            if self.closed is not None:
                return False
            opcode, payload = self._frame()
            if opcode is None:
                self.closed = self.closed or 1006
            elif opcode == 2:
                self.binary += payload
            elif opcode == 1:
                self.text.append(json.loads(payload))
            elif opcode == 9:
                self.send_frame(10, payload)
            elif opcode == 10:
                self.pongs.append(payload)
            elif opcode == 8:
                self.closed = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        return True

    def saw(self, text):
        return lambda ws: text.encode() in ws.binary

    def exit_event(self):
        return next((m for m in self.text if m.get("type") == "exit"), None)

    def close(self, code=1000):
        self.send_frame(8, struct.pack(">H", code))
        self.sock.close()


def start_tty(server, cmd, **fields):
    status, answer = server.api.post("/v1/vms/sv/exec", dict(cmd=cmd, tty=True, blocking=False, **fields))
    assert status == 200, answer
    return answer["execId"]


def attach(server, exec_id, **kw):
    ws = WsClient(server, f"/v1/vms/sv/exec/{exec_id}/attach", **kw)
    assert ws.status_line.startswith("HTTP/1.1 101 ") and ws.accept_ok, (ws.status_line, ws.buffer)
    return ws


@pytest.fixture
def vm(cbox_factory):
    server = cbox_factory(http_body_timeout_s=3).start()
    server.api.start_vm("sv")
    yield server
    server.api.delete("/v1/vms", timeout=60)


def test_resize_reaches_the_terminal_and_the_exit_event_ends_the_session(vm):
    exec_id = start_tty(vm, "stty size; read line; stty size; echo got $line; exit 7", cols=100, rows=30)
    ws = attach(vm, exec_id)
    assert ws.read_until(ws.saw("30 100"))
    resize = json.dumps({"type": "resize", "cols": 123, "rows": 45}).encode()
    ws.send_frame(1, resize[:10], fin=False)             # a message in fragments, a ping between them
    ws.send_frame(9, b"are you there")
    ws.send_frame(0, resize[10:])
    ws.type(b"hello\r")
    assert ws.read_until(lambda w: w.exit_event() is not None)
    assert b"45 123" in ws.binary and b"got hello" in ws.binary
    assert ws.exit_event()["exitCode"] == 7 and ws.text[0]["type"] == "start"
    assert ws.pongs == [b"are you there"]
    ws.read_until(lambda w: w.closed is not None)
    assert ws.closed == 1000


def test_a_signal_goes_to_the_foreground_process_group(vm):
    exec_id = start_tty(vm, "trap 'echo caught; exit 3' INT; echo ready; while :; do sleep 0.1; done")
    ws = attach(vm, exec_id)
    assert ws.read_until(ws.saw("ready"))
    ws.control(type="signal", signal="INT")
    assert ws.read_until(lambda w: w.exit_event() is not None)
    assert b"caught" in ws.binary and ws.exit_event()["exitCode"] == 3
    ws.control(type="signal", signal="NOPE")       # the exec is gone; the session already ended
    ws.sock.close()


def test_detach_leaves_the_command_running_and_a_new_attach_replays_the_screen(vm):
    exec_id = start_tty(vm, "echo first-line; read x; echo second $x")
    ws = attach(vm, exec_id)
    assert ws.read_until(ws.saw("first-line"))
    ws.close()
    status, state = vm.api.get(f"/v1/vms/sv/exec/{exec_id}")
    assert status == 200 and state["running"] is True
    again = attach(vm, exec_id)
    assert again.read_until(again.saw("first-line"))         # the replay of what the screen showed
    again.type(b"there\r")
    assert again.read_until(lambda w: w.exit_event() is not None)
    assert b"second there" in again.binary and again.exit_event()["exitCode"] == 0


def test_the_first_attach_writes_the_others_read_only(vm):
    exec_id = start_tty(vm, "read a; echo one $a; read b; echo two $b")
    writer, reader = attach(vm, exec_id), attach(vm, exec_id)
    reader.type(b"ignored\r")
    assert reader.read_until(lambda w: any(m.get("type") == "error" for m in w.text))
    assert "reads only" in [m for m in reader.text if m["type"] == "error"][0]["error"]
    writer.type(b"x\r")
    assert reader.read_until(reader.saw("one x"))
    writer.close()                                  # the writer leaves: a new attach may write
    third = attach(vm, exec_id)
    third.type(b"y\r")
    assert reader.read_until(lambda w: w.exit_event() is not None) and b"two y" in reader.binary
    assert b"ignored" not in reader.binary.replace(b"ignored\r", b"")  # never typed


def test_attaches_per_vm_are_bounded(vm):
    exec_id = start_tty(vm, "sleep 600")
    attached = [attach(vm, exec_id) for _ in range(16)]
    refused = WsClient(vm, f"/v1/vms/sv/exec/{exec_id}/attach")
    assert refused.status_line.startswith("HTTP/1.1 409 ") and b"16 terminals" in refused.buffer
    attached.pop().close()                        # one leaves: room for one more
    deadline = time.monotonic() + 30
    while True:
        again = WsClient(vm, f"/v1/vms/sv/exec/{exec_id}/attach")
        if again.status_line.startswith("HTTP/1.1 101 ") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.status_line.startswith("HTTP/1.1 101 "), again.status_line
    for ws in attached + [again]:
        ws.close()


def test_eof_ends_input_of_a_command_reading_lines(vm):
    exec_id = start_tty(vm, "cat; echo cat-ended")
    ws = attach(vm, exec_id)
    ws.type(b"abc\r")
    assert ws.read_until(ws.saw("abc"))
    ws.control(type="eof")
    assert ws.read_until(lambda w: w.exit_event() is not None) and b"cat-ended" in ws.binary


def test_hostile_clients_are_refused_and_dropped(vm):
    exec_id = start_tty(vm, "echo up; sleep 600")
    ws = attach(vm, exec_id)
    ws.read_until(ws.saw("up"))
    ws.sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 1 << 30) + b"\0\0\0\0")   # 1 GiB announced
    assert not ws.read_until(lambda w: False, timeout=30) and ws.closed == 1009
    ws = attach(vm, exec_id)
    ws.send_frame(2, b"x", mask=False)               # a client must mask
    assert not ws.read_until(lambda w: False, timeout=30) and ws.closed == 1002
    ws = attach(vm, exec_id)
    ws.control(type="resize\ncbox: forged log line", cols=1)
    assert ws.read_until(lambda w: any(m.get("type") == "error" for m in w.text))
    ws.sock.close()
    assert "\ncbox: forged" not in vm.log()
    # one that does not read: `yes` fills its socket; it is dropped, the command runs on
    exec_id = start_tty(vm, "yes terminal-output")
    ws = attach(vm, exec_id)
    ws.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    deadline = time.monotonic() + 60
    while "terminal closed" not in vm.log() or "stalled" not in vm.log():
        assert time.monotonic() < deadline, vm.log()[-3000:]
        time.sleep(0.2)
    status, state = vm.api.get(f"/v1/vms/sv/exec/{exec_id}")
    assert status == 200 and state["running"] is True
    vm.api.delete(f"/v1/vms/sv/exec/{exec_id}")
    ws.sock.close()


def test_attach_needs_a_websocket_request_and_the_token(cbox_factory):
    server = cbox_factory(api_token="tok").start()
    server.api.start_vm("sv")
    exec_id = start_tty(server, "sleep 60")
    status, answer = server.api.get(f"/v1/vms/sv/exec/{exec_id}/attach")
    assert status == 400 and "WebSocket" in answer["error"]
    ws = WsClient(server, f"/v1/vms/sv/exec/{exec_id}/attach")          # no token
    assert ws.status_line.startswith("HTTP/1.1 401 ")
    ws = WsClient(server, f"/v1/vms/sv/exec/{exec_id}/attach", token="tok", key="short")
    assert ws.status_line.startswith("HTTP/1.1 400 ")
    ws = WsClient(server, f"/v1/vms/sv/exec/{exec_id}/attach", token="tok")
    assert ws.status_line.startswith("HTTP/1.1 101 ") and ws.accept_ok
    server.api.delete("/v1/vms", timeout=60)


def tty_request_errors(server):
    for body, fragment in [({"tty": 1}, "tty"), ({"tty": True, "cols": 0}, "cols"),
                           ({"tty": True, "rows": 5000}, "rows"), ({"tty": True, "term": "x y"}, "term")]:
        status, answer = server.api.post("/v1/vms/sv/exec", dict(cmd="true", **body))
        assert status == 400 and fragment in answer["error"], (body, answer)


def test_tty_fields_are_checked(vm):
    tty_request_errors(vm)


def run_shell(server, *args, rows=33, cols=101, keys=(), timeout=60):
    """`cbox.py shell` on a pseudo-terminal of the given size; (exit status, output, the
    terminal's attributes before and after). `keys`: (text, bytes to type or action(master
    fd)) in turn, each once the output shows its text."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    before = termios.tcgetattr(slave)
    pid = os.fork()
    if pid == 0:                          # the child: the terminal's session, as a login would make it
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.execvp("ip", ["ip", "netns", "exec", server.ns.name, sys.executable, str(REPO / "cbox.py"),
                         "--server", f"http://127.0.0.1:{server.settings['port']}", "shell", *args])
    output, keys, status = bytearray(), list(keys), None
    deadline = time.monotonic() + timeout
    while status is None:                 # the parent keeps the terminal open: its settings stay readable
        assert time.monotonic() < deadline, bytes(output)
        if keys and keys[0][0].encode() in output:
            action = keys.pop(0)[1]
            action(master) if callable(action) else os.write(master, action)
        done, status_now = os.waitpid(pid, os.WNOHANG)
        ready, _, _ = select.select([master], [], [], 0 if done else 0.2)
        if ready:
            output += os.read(master, 65536)
        elif done:
            status = status_now
    after = termios.tcgetattr(slave)
    os.close(slave)
    os.close(master)
    return os.waitstatus_to_exitcode(status), bytes(output), before, after


def test_cbox_shell_sizes_the_terminal_types_and_passes_the_exit_code(vm):
    code, output, before, after = run_shell(
        vm, "sv", "--", "sh", "-c", "stty size; read x; echo got $x; exit 5",
        keys=[("33 101", b"abc\r")])
    assert code == 5, output
    assert b"33 101" in output and b"got abc" in output
    assert after[3] == before[3]        # lflag (ICANON, ECHO) restored


def test_cbox_shell_follows_the_window_size(vm):
    """The local window changes (the kernel sends SIGWINCH): the remote terminal follows."""
    def resize(master):
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    code, output, _, _ = run_shell(vm, "sv", "--", "sh", "-c",
                                   "trap 'stty size' WINCH; echo ready; while :; do sleep 0.1; done",
                                   keys=[("ready", resize), ("40 120", b"\x03")])
    assert code == 130 and b"40 120" in output, output


def test_cbox_shell_restores_the_terminal_when_the_server_goes_away(cbox_factory):
    server = cbox_factory().start()
    server.api.start_vm("sv")
    code, output, before, after = run_shell(server, "sv", "--", "sh", "-c", "echo in-shell; sleep 600",
                                            keys=[("in-shell", lambda master: server.proc.kill())])
    assert code == 1 and b"the connection to the server broke" in output, output
    assert after[3] == before[3]


def test_cbox_shell_detaches_with_tilde_dot(vm):
    code, output, _, _ = run_shell(vm, "sv", "--", "sh", "-c", "echo in-shell; sleep 600",
                                   keys=[("in-shell", b"\r~.")])
    assert code == 0 and b"detached" in output, output
    exec_id = re.search(rb"--attach ([A-Za-z0-9_.-]+)", output).group(1).decode()
    status, state = vm.api.get(f"/v1/vms/sv/exec/{exec_id}")
    assert status == 200 and state["running"] is True          # detaching left it running
    code, output, _, _ = run_shell(vm, "sv", "--attach", exec_id, keys=[("in-shell", b"\x03")])
    assert code == 130 and output.count(b"in-shell") == 1, output   # the replay, then Ctrl-C ends it


def test_a_terminal_in_a_real_guest(cbox_factory, tmp_path):
    """Through cbox.py's WebSocket into a booted guest (QEMU engine) running this checkout's
    agent as PID 1: the terminal is the command's controlling terminal, sized, resized, typed
    into, and its exit code comes in the exit event."""
    from test_images import real_guest_server
    server = real_guest_server(cbox_factory, tmp_path, "sv")
    exec_id = start_tty(server, "stty size; : </dev/tty && echo has-tty; read x; stty size; echo got $x; exit 4",
                        cols=90, rows=20)
    ws = attach(server, exec_id)
    assert ws.read_until(ws.saw("has-tty"), timeout=120)
    ws.control(type="resize", cols=100, rows=50)
    ws.type(b"typed\r")
    assert ws.read_until(lambda w: w.exit_event() is not None, timeout=120)
    assert b"20 90" in ws.binary and b"50 100" in ws.binary and b"got typed" in ws.binary, bytes(ws.binary)
    assert ws.exit_event()["exitCode"] == 4 and ws.exit_event()["killScope"] == "cgroup"
    assert server.api.delete("/v1/vms/sv", timeout=60)[0] == 200


def test_a_client_that_answers_no_pings_is_dropped_and_any_frame_counts_as_an_answer():
    """TerminalAttach.keep_alive in-process (PING_S shortened): a ping each period, the
    session ends after MISSED_PINGS unanswered ones; a frame from the client (here a pong,
    read by read_client) starts the count again."""
    import asyncio
    import cbox

    class Writer:
        def __init__(self):
            self.frames = []

        def write(self, data):
            self.frames.append(data)

    async def scenario():
        session = cbox.TerminalAttach.__new__(cbox.TerminalAttach)
        session.PING_S = 0.05
        session.frames = cbox.WebSocketFrames(client=False)
        session.writer, session.unanswered = Writer(), 0
        session.input_bytes = 0
        assert await asyncio.wait_for(session.keep_alive(), 5) == (None, "no answer to 3 pings")
        ping = session.frames.frame(cbox.WebSocketFrames.PING, b"cbox")
        assert session.writer.frames == [ping] * 3
        # a client that answers each ping (a masked pong, as a browser sends) stays
        session.writer, session.unanswered = Writer(), 0
        reader = asyncio.StreamReader()
        keeper = asyncio.ensure_future(session.keep_alive())
        reading = asyncio.ensure_future(session.read_client(reader))
        for _ in range(15):                     # 2.5 pongs a ping: 6 pings in all
            await asyncio.sleep(0.02)
            reader.feed_data(bytes([0x8A, 0x80 | 4]) + b"\0\0\0\0" + b"cbox")
        assert not keeper.done() and len(session.writer.frames) >= 5
        reader.feed_eof()
        assert await asyncio.wait_for(reading, 5) == (None, "the client closed the connection")
        assert await asyncio.wait_for(keeper, 5) == (None, "no answer to 3 pings")

    asyncio.run(scenario())

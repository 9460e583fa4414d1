"""Exec v2 through cbox.py's REST API and CLI, with the stand-in hypervisor and the real
guest agent (process-group mode): streams and re-attach, stdin, signals, kills, tags,
listing and the bad inputs.

Everything runs inside a network namespace created per test (contract section 5).
"""
import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from conftest import REPO
from execstream import AgentApi, EventStream, check_sequence, joined
from procutil import wait_for


class VmExecApi(AgentApi):
    """The exec v2 client of tests/execstream.py, pointed at one VM's /v1/vms/NAME/exec."""

    def __init__(self, connect, vm_name):
        super().__init__(connect, timeout=60.0)
        self.prefix = f"/v1/vms/{vm_name}"

    def stream(self, exec_id, since=None, timeout=None):
        conn = self._connection(timeout or self.timeout)
        query = "" if since is None else f"?since={since}"
        conn.request("GET", f"{self.prefix}/exec/{exec_id}/stream{query}")
        return EventStream(conn, conn.getresponse())


def rest(server, vm_name="sv"):
    return VmExecApi(lambda: server.ns.connect(("127.0.0.1", server.settings["port"])), vm_name)


def start_stream(server, name, **fields):
    """POST .../exec with "stream": true; the open response (execstream.EventStream)."""
    api = rest(server)
    conn = api._connection(60.0)
    conn.request("POST", f"/v1/vms/{name}/exec", body=json.dumps(dict(stream=True, **fields)),
                 headers={"Content-Type": "application/json"})
    return EventStream(conn, conn.getresponse())


def stream_all(server, name, **fields):
    with start_stream(server, name, **fields) as s:
        assert s.status == 200, s.error
        assert s.headers["content-type"] == "application/x-ndjson"
        assert s.headers["transfer-encoding"] == "chunked"
        events = list(s)
        assert s.ended
    return events


@pytest.fixture
def vm(cbox_server):
    cbox_server.api.start_vm("sv")
    return cbox_server


def test_stream_order_seq_and_exit_last(vm):
    events = stream_all(vm, "sv", cmd="for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.05; done; exit 7")
    check_sequence(events)
    start, exit_ = events[0], events[-1]
    assert start["type"] == "start" and start["execId"] and start["pid"] > 0
    assert joined(events, "stdout") == b"out1\nout2\nout3\n"
    assert joined(events, "stderr") == b"err1\nerr2\nerr3\n"
    assert exit_["exitCode"] == 7 and exit_["error"] == "exit status 7" and exit_["execId"] == start["execId"]
    assert exit_["killScope"] == "process-group" and exit_["timedOut"] is False
    # the exit event carries the whole exec result, output included
    assert exit_["stdout"] == "out1\nout2\nout3\n" and exit_["stderr"] == "err1\nerr2\nerr3\n"
    assert sorted(exit_["output"].splitlines()) == sorted("out1 out2 out3 err1 err2 err3".split())
    assert exit_["truncated"] is False and exit_["durationMs"] > 0
    # output arrives as it is written: out1 comes before err3 in seq order
    kinds = [e.get("data") for e in events if e["type"] in ("stdout", "stderr")]
    assert "".join(kinds).index("out1") < "".join(kinds).index("err3")


def test_stream_binary_output_and_argv(vm):
    events = stream_all(vm, "sv", argv=["python3", "-c", "import sys; sys.stdout.buffer.write(bytes([0xff, 0, 65, 0xc3]))"])
    check_sequence(events)
    assert joined(events, "stdout") == bytes([0xff, 0, 65, 0xc3])
    assert any("dataBase64" in e for e in events if e["type"] == "stdout")
    assert events[-1]["argv"][0] == "python3" and events[-1]["exitCode"] == 0


def test_stream_sse(vm):
    conn = rest(vm)._connection(30.0)
    conn.request("POST", "/v1/vms/sv/exec", body=json.dumps({"cmd": "echo hi", "stream": True}),
                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    text = resp.read().decode()
    conn.close()
    blocks = [b for b in text.split("\n\n") if b]
    ids = [int(b.split("\n")[0][len("id: "):]) for b in blocks]
    events = [json.loads(b.split("\n")[1][len("data: "):]) for b in blocks]
    assert ids == [e["seq"] for e in events]
    check_sequence(events)
    assert joined(events, "stdout") == b"hi\n"
    # Last-Event-ID resumes after the event named
    api = rest(vm)
    conn = api._connection(30.0)
    conn.request("GET", f"/v1/vms/sv/exec/{events[0]['execId']}/stream",
                 headers={"Accept": "text/event-stream", "Last-Event-ID": "0"})
    again = conn.getresponse().read().decode()
    conn.close()
    assert again.startswith("id: 1\n")


def test_a_large_output_stream_ends_with_the_whole_result(vm):
    """Over 256 KiB of output: the exit event's result is copied through from the agent."""
    cmd = "python3 -c \"import sys; [print('line %d ' % i + 'y' * 90) for i in range(4000)]; sys.stderr.write('e\\n')\""
    events = stream_all(vm, "sv", cmd=cmd)
    check_sequence(events)
    exit_ = events[-1]
    assert exit_["type"] == "exit" and exit_["exitCode"] == 0
    assert exit_["stdout"].encode() == joined(events, "stdout") and len(exit_["stdout"]) > 256 * 1024
    assert exit_["stderr"] == "e\n" and len(exit_["output"]) == len(exit_["stdout"]) + 2
    # re-attached after it ended: the same exit event
    with rest(vm).stream(events[0]["execId"], since=exit_["seq"]) as s:
        again = list(s)
    assert again == [exit_]


def test_stream_to_an_http10_client_is_unframed(vm):
    sock = vm.ns.connect(("127.0.0.1", vm.settings["port"]))
    body = json.dumps({"cmd": "echo one", "stream": True}).encode()
    sock.sendall(b"POST /v1/vms/sv/exec HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, text = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    events = [json.loads(x) for x in text.splitlines()]
    check_sequence(events)
    assert joined(events, "stdout") == b"one\n"


def test_disconnect_mid_stream_then_reattach_loses_nothing(vm):
    cmd = "for i in $(seq 1 40); do echo line$i; sleep 0.05; done"
    s = start_stream(vm, "sv", cmd=cmd, tag="ticker")
    assert s.status == 200
    seen = []
    for event in s:
        seen.append(event)
        if event["type"] == "stdout" and "line5" in event["data"]:
            break
    s.close()                                   # the client hangs up mid-stream
    exec_id = seen[0]["execId"]
    wait_for(lambda: "answer not delivered; connection dropped path=/v1/vms/sv/exec" in vm.log(),
             what="cbox.py to notice the client is gone")
    status, body = vm.api.get(f"/v1/vms/sv/exec/{exec_id}")
    assert status == 200 and body["running"] is True        # hanging up did not end the command
    rest_events = rest(vm).events("ticker", since=seen[-1]["seq"] + 1)     # by tag
    events = seen + rest_events
    check_sequence(events)
    assert joined(events, "stdout") == "".join(f"line{i}\n" for i in range(1, 41)).encode()
    # a finished exec replays from any kept seq, again and again
    assert rest(vm).events(exec_id, since=0) == events


def test_stream_of_a_destroyed_vm_ends_with_an_error_event(vm):
    s = start_stream(vm, "sv", cmd="echo up; sleep 60")
    it = iter(s)
    assert [next(it)["type"], next(it)["type"]] == ["start", "stdout"]
    assert vm.api.delete("/v1/vms/sv")[0] == 200
    rest_events = list(it)
    s.close()
    # the guest's end cuts the stream (an error event), or, when the dying agent still
    # killed the command and said so, the stream ends with that exit
    assert [e["type"] for e in rest_events] in (["error"], ["exit"]) and rest_events[0]["seq"] == 2
    if rest_events[0]["type"] == "error":
        assert "broke" in rest_events[0]["error"]
    else:
        assert rest_events[0]["exitCode"] is None and rest_events[0]["signal"]
    vm.api.start_vm("sv")            # for the fixture's cleanup check


def test_cbox_stops_promptly_with_streams_open(cbox_factory):
    server = cbox_factory(destroy_on_exit=True).start()
    server.api.start_vm("st")
    s = start_stream(server, "st", cmd="echo up; sleep 60")
    it = iter(s)
    assert [next(it)["type"], next(it)["type"]] == ["start", "stdout"]
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 15            # not held by the stream (its stall timeout is 40 s)
    s.close()
    server.assert_clean()


def test_since_out_of_range_and_bad(vm):
    r = vm.api.exec("sv", "echo x", blocking=False)
    exec_id = r["execId"]
    wait_for(lambda: not vm.api.get(f"/v1/vms/sv/exec/{exec_id}")[1]["running"], timeout=10)
    api = rest(vm)
    with api.stream(exec_id, since=1000) as s:
        assert s.status == 400 and "beyond" in s.error["error"]
    for bad in ("-1", "x", "1.5", "9" * 30):
        with api.stream(exec_id, since=bad) as s:
            assert s.status == 400 and "since" in s.error["error"], (bad, s.error)
    with api.stream("nosuchexec", since=0) as s:
        assert s.status == 404


def test_stdin_pipe(vm):
    s = start_stream(vm, "sv", cmd="while read line; do echo got:$line; done; echo done", stdin="pipe", tag="cat")
    assert s.status == 200
    it = iter(s)
    assert next(it)["type"] == "start"
    assert vm.api.post("/v1/vms/sv/exec/cat/stdin", {"data": "one\n"}) == (200, {"written": 4})
    event = next(it)
    assert event["type"] == "stdout" and event["data"] == "got:one\n"
    assert vm.api.post("/v1/vms/sv/exec/cat/stdin", {"data": "two\n", "eof": True})[0] == 200
    rest_events = list(it)
    s.close()
    out = "".join(e.get("data", "") for e in rest_events if e["type"] == "stdout")
    assert out == "got:two\ndone\n" and rest_events[-1]["exitCode"] == 0
    status, body = vm.api.post("/v1/vms/sv/exec/cat/stdin", {"data": "late\n"})
    assert status == 409, body


def test_stdin_without_pipe_is_409(vm):
    r = vm.api.exec("sv", "sleep 5", blocking=False)
    status, body = vm.api.post(f"/v1/vms/sv/exec/{r['execId']}/stdin", {"data": "x"})
    assert status == 409 and "pipe" in body["error"]
    assert vm.api.post(f"/v1/vms/sv/exec/{r['execId']}/stdin", {"data": 5})[0] == 400
    assert vm.api.post(f"/v1/vms/sv/exec/{r['execId']}/stdin", {})[0] == 400


def ready_exec(vm, cmd, **fields):
    """Start `cmd` (which prints "ready" once set up, e.g. its traps) as a background exec and
    return its execId once that line came."""
    with start_stream(vm, "sv", cmd=cmd, **fields) as s:
        it = iter(s)
        start = next(it)
        assert start["type"] == "start" and next(it)["data"] == "ready\n"
    return start["execId"]


def test_signal(vm):
    exec_id = ready_exec(vm, "trap 'echo got-usr1; exit 3' USR1; echo ready; while true; do sleep 0.05; done",
                         tag="trapper")
    status, body = vm.api.post("/v1/vms/sv/exec/trapper/signal", {"signal": "USR1"})
    assert status == 200, body
    events = rest(vm).events(exec_id)
    assert events[-1]["exitCode"] == 3 and joined(events, "stdout") == b"ready\ngot-usr1\n"
    status, body = vm.api.post("/v1/vms/sv/exec/trapper/signal", {"signal": "TERM"})
    assert status == 409, body                                        # it finished
    for bad in ("NOPE", 0, 999, True, "", None):
        status, body = vm.api.post(f"/v1/vms/sv/exec/{exec_id}/signal", {"signal": bad})
        assert status == 400 and "signal" in body["error"], (bad, body)
    r = vm.api.exec("sv", "sleep 30", blocking=False)
    assert vm.api.post(f"/v1/vms/sv/exec/{r['execId']}/signal", {"signal": 9})[0] == 200
    events = rest(vm).events(r["execId"])
    assert events[-1]["signal"] == 9 and events[-1]["signalName"] == "SIGKILL" and events[-1]["exitCode"] is None


def test_delete_with_grace_and_delete_all(vm):
    exec_id = ready_exec(vm, "trap 'echo bye; exit 5' TERM; echo ready; while true; do sleep 0.05; done")
    status, body = vm.api.delete(f"/v1/vms/sv/exec/{exec_id}?grace=5")
    assert status == 200 and body["exitCode"] == 5 and body["stdout"] == "ready\nbye\n", body
    assert vm.api.delete(f"/v1/vms/sv/exec/{exec_id}?grace=x")[0] == 400
    ids = [vm.api.exec("sv", "sleep 60", blocking=False)["execId"] for _ in range(3)]
    status, body = vm.api.delete("/v1/vms/sv/exec?grace=0")
    assert status == 200 and sorted(body["killed"]) == sorted(ids)
    listing = vm.api.get("/v1/vms/sv/exec")[1]["execs"]
    assert not any(e["running"] for e in listing)


def test_list_and_tags(vm):
    a = vm.api.exec("sv", "sleep 30", blocking=False, tag="web.1")
    b = vm.api.exec("sv", "echo done", blocking=False)
    assert a["tag"] == "web.1"
    status, body = vm.api.post("/v1/vms/sv/exec", {"cmd": "true", "blocking": False, "tag": "web.1"})
    assert status == 409 and "web.1" in body["error"]
    status, body = vm.api.post("/v1/vms/sv/exec", {"cmd": "true", "stream": True, "tag": "web.1"})
    assert status == 409
    wait_for(lambda: not vm.api.get(f"/v1/vms/sv/exec/{b['execId']}")[1]["running"], timeout=10)
    status, body = vm.api.get("/v1/vms/sv/exec")
    assert status == 200
    by_id = {e["execId"]: e for e in body["execs"]}
    assert by_id[a["execId"]]["running"] is True and by_id[a["execId"]]["tag"] == "web.1"
    assert by_id[a["execId"]]["cmd"] == "sleep 30"
    assert by_id[b["execId"]]["exitCode"] == 0 and by_id[b["execId"]]["running"] is False
    for entry in body["execs"]:
        assert {"execId", "tag", "running", "exitCode", "startedAt", "durationMs"} <= set(entry)
    assert vm.api.get("/v1/vms/sv/exec/web.1")[1]["execId"] == a["execId"]
    assert vm.api.delete("/v1/vms/sv/exec/web.1")[0] == 200


@pytest.mark.parametrize("body, words", [
    ({"cmd": "x", "argv": ["x"]}, "exactly one"),
    ({}, "exactly one"),
    ({"argv": []}, "argv"),
    ({"argv": "ls"}, "argv"),
    ({"argv": ["ls", 3]}, "argv"),
    ({"argv": ["", "x"]}, "argv"),
    ({"argv": ["ls", "a\0b"]}, "NUL"),
    ({"cmd": "x", "tag": "-bad"}, "tag"),
    ({"cmd": "x", "tag": "a" * 65}, "tag"),
    ({"cmd": "x", "user": "a b"}, "user"),
    ({"cmd": "x", "user": -1}, "user"),
    ({"cmd": "x", "memoryLimitMb": 0}, "memoryLimitMb"),
    ({"cmd": "x", "pidsLimit": 10 ** 9}, "pidsLimit"),
    ({"cmd": "x", "pidsLimit": "5"}, "pidsLimit"),
    ({"cmd": "x", "stream": "yes"}, "stream"),
    ({"cmd": "x", "keepaliveS": 1}, "unknown field"),
])
def test_bad_exec_requests(vm, body, words):
    status, answer = vm.api.post("/v1/vms/sv/exec", body)
    assert status == 400 and words in answer["error"], answer


def test_user_and_exec_id_env(vm):
    r = vm.api.exec("sv", 'echo "$CBOX_EXEC_ID"; id -u', user=0, blocking=False)
    events = rest(vm).events(r["execId"])
    assert joined(events, "stdout").decode().split() == [r["execId"], str(os.getuid())]
    status, body = vm.api.post("/v1/vms/sv/exec", {"cmd": "true", "user": "no-such-user"})
    assert status == 400 and "user" in body["error"]


def test_keepalive_events(cbox_factory):
    server = cbox_factory(stream_keepalive_s=0.2).start()
    server.api.start_vm("ka")
    events = stream_all(server, "ka", cmd="sleep 1; echo end")
    check_sequence(events)
    assert [e["type"] for e in events].count("keepalive") >= 2
    server.api.delete("/v1/vms", timeout=60)


def cli(server, *args, stdin=None):
    """./cbox.py run inside the test namespace against the server."""
    return server.ns.run(sys.executable, str(REPO / "cbox.py"), "--server",
                         f"http://127.0.0.1:{server.settings['port']}", *args, check=False, input=stdin)


def test_cli_streams_and_exits_with_the_code(vm):
    r = cli(vm, "exec", "sv", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 4")
    assert r.returncode == 4, r
    assert r.stdout == "to-out\n" and r.stderr == "to-err\n"
    r = cli(vm, "exec", "sv", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15, r
    r = cli(vm, "exec", "--no-stream", "sv", "--", "sh", "-c", "echo old; exit 2")
    assert r.returncode == 2 and r.stdout == "old\n"
    r = cli(vm, "exec", "--stdin", "sv", "--", "cat", stdin="piped in\n")
    assert r.returncode == 0 and r.stdout == "piped in\n"
    r = cli(vm, "exec", "--tag", "cli1", "sv", "--", "printf", "%s", "a b")
    assert r.returncode == 0 and r.stdout == "a b"


# ---- the relay against a hostile agent's streams (in-process, loopback only) ---------

import cbox  # noqa: E402


def line(seq, kind, **fields):
    return json.dumps(dict(seq=seq, type=kind, **fields)).encode() + b"\n"


GOOD_EXIT = line(2, "exit", exitCode=0)
HOSTILE_STREAMS = {   # body after the head -> what the error event must say
    "no exit event": (line(0, "start", execId="e") + line(1, "stdout", data="x"), "without an exit event"),
    "seq gap": (line(0, "start", execId="e") + line(5, "stdout", data="x"), "seq 5 where 1 was due"),
    "seq back": (line(0, "start", execId="e") + line(0, "dropped", missed=1), "seq 0 where 1 was due"),
    "not JSON": (line(0, "start", execId="e") + b"{nope\n", "not JSON"),
    "no seq": (line(0, "start", execId="e") + b'{"type":"stdout"}\n', "without seq"),
    "too long": (line(0, "start", execId="e") + b'{"seq":1,"type":"stdout","data":"' + b"a" * 3_000_000, "longer than"),
    "stalls": (line(0, "start", execId="e", note="stalls"), "no event for"),
}


async def relay_from(agent_body, line_max=1_000_000, stall_s=0.5, since=0, client_reads=True, event_rate=None,
                     result=None, sse=False):
    """A fake agent answering one stream request with `agent_body` (after a 200 head) and
    GET /exec/e with `result` (a 200 body; None: 404), and cbox's relay to a client socket
    pair; returns (what the client read, the agent side's end)."""
    closed = asyncio.Event()

    async def fake_agent(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /exec/e "):
            status, body = (b"200 OK", result) if result is not None else (b"404 Not Found", b'{"error":"no"}')
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + agent_body)
        try:
            if agent_body.endswith(b"\n") and b'"stalls"' not in agent_body:
                writer.write_eof()      # a body that ends (HTTP/1.0: by closing)
            await reader.read()         # until cbox closes it
        except ConnectionError:
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(fake_agent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    agent = cbox.GuestAgent("vm", "127.0.0.1", port, 1 << 20)
    agent.event_line_max = line_max
    if event_rate:
        agent.stream_budget.events = cbox.TokenBucket(event_rate, event_rate)
    events = await agent.events("e", since, stall_s)
    relay = cbox.EventRelay(events, sse=sse)
    a, b = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=a)
    out = bytearray()
    if client_reads:
        def read_all():
            b.settimeout(10)
            while chunk := b.recv(1 << 20):
                out.extend(chunk)
        reading = threading.Thread(target=read_all)
        reading.start()
        keep = await relay.send(writer, True, 5.0)
        writer.close()
        await writer.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, reading.join)
    else:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with pytest.raises(asyncio.TimeoutError):
            await relay.send(writer, True, 0.5)
        keep = None
        writer.transport.abort()
    b.close()
    await asyncio.wait_for(closed.wait(), 5)            # the agent connection was closed
    server.close()
    assert not agent.streams
    return bytes(out), keep


def chunks_of(body):
    """The NDJSON lines of a chunked body, and whether the terminating chunk came."""
    lines, rest = [], body.split(b"\r\n\r\n", 1)[1]
    while rest:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return lines, True
        lines.append(json.loads(rest[:int(size, 16)]))
        rest = rest[int(size, 16) + 2:]
    return lines, False


@pytest.mark.parametrize("case", sorted(HOSTILE_STREAMS))
def test_relay_ends_a_broken_stream_with_an_error_event(case):
    body, words = HOSTILE_STREAMS[case]
    out, keep = asyncio.run(relay_from(body))
    events, ended = chunks_of(out)
    assert ended and keep is False
    assert events[0]["type"] == "start" and events[-1]["type"] == "error" and words in events[-1]["error"]
    assert [e["seq"] for e in events] == list(range(len(events)))     # the error's seq: where to resume


def test_relay_passes_a_good_stream_and_a_dropped_event():
    body = (line(4, "dropped", missed=4, fromSeq=1) + line(5, "stdout", data="é")
            + line(9, "dropped", missed=4, fromSeq=6) + line(10, "exit", exitCode=0))     # fell behind twice
    out, keep = asyncio.run(relay_from(body, since=1))
    events, ended = chunks_of(out)
    assert ended and keep is True and [e["seq"] for e in events] == [4, 5, 9, 10] and events[1]["data"] == "é"


def test_relay_holds_an_event_flood_to_the_vms_budget():
    n = 3000
    body = line(0, "start", execId="e") + b"".join(line(i, "keepalive") for i in range(1, n)) + line(n, "exit")
    t0 = time.monotonic()
    out, keep = asyncio.run(relay_from(body, stall_s=10.0, event_rate=1000.0))
    took = time.monotonic() - t0
    events, ended = chunks_of(out)
    assert ended and keep is True and [e["seq"] for e in events] == list(range(n + 1))
    assert took >= (n + 1 - 1000) / 1000.0 * 0.9         # a flood waits for its budget (a lower bound)


RESULT = {"execId": "e", "exitCode": 0, "output": "a\nb", "stdout": "a\n", "stderr": "b", "error": ""}


@pytest.mark.parametrize("size", ["small", "large"])
def test_relay_completes_the_exit_event_with_the_result(size):
    """The agent's exit event lacks output/stdout/stderr; the relay adds the exec's result
    (GET /exec/{id}), a large one copied through with raw line breaks made harmless."""
    result = dict(RESULT, stdout="x" * (300_000 if size == "large" else 10))
    body = json.dumps(result).encode()
    body = body[:-1] + b',\n"hostile":\r1}'        # raw line breaks: not JSON's, must not end the line
    for sse in (False, True):
        out, keep = asyncio.run(relay_from(line(0, "start", execId="e") + line(1, "exit", exitCode=0),
                                           result=body, sse=sse))
        assert keep is True
        if sse:
            blocks = out.split(b"\r\n\r\n", 1)[1].split(b"\n\n")
            exit_block = [b for b in blocks if b"id: 1\n" in b][0].split(b"id: 1\n", 1)[1]
            assert exit_block.count(b"\n") == 0 and exit_block.startswith(b"data: ")
            exit_ = json.loads(exit_block[len(b"data: "):].split(b"\r\n")[0])
        else:
            events, ended = chunks_of(out)
            assert ended and len(events) == 2
            exit_ = events[1]
        assert exit_["seq"] == 1 and exit_["type"] == "exit" and exit_["hostile"] == 1
        assert {k: exit_[k] for k in result} == result


@pytest.mark.parametrize("result", [None, b"[1, 2]", b"not json", b"[" + b"1," * 200_000 + b"1]"],
                         ids=["gone", "not-an-object", "not-json", "large-not-an-object"])
def test_relay_sends_the_agents_exit_event_without_a_result(result):
    out, keep = asyncio.run(relay_from(line(0, "start", execId="e") + line(1, "exit", exitCode=3), result=result))
    events, ended = chunks_of(out)
    assert ended and keep is True and events[1] == {"seq": 1, "type": "exit", "exitCode": 3}


def test_relay_drops_a_client_that_does_not_read():
    body = line(0, "start", execId="e") + b"".join(line(i, "stdout", data="z" * 60000) for i in range(1, 200))
    asyncio.run(relay_from(body, stall_s=5.0, client_reads=False))


# ---- through cbox.py into a real guest (QEMU engine, the agent as PID 1 with cgroups) -----

def test_stream_kill_and_limits_through_cbox_in_a_real_guest(cbox_factory, tmp_path):
    """The REST path end to end into a booted guest running this checkout's agent: a
    streamed command whose setsid child is ended by DELETE with grace (cgroup kill
    scope), and a memory limit's OOM kill reported in the exit event."""
    from test_images import real_guest_server
    server = real_guest_server(cbox_factory, tmp_path, "real")
    api = rest(server, "real")

    s = start_stream(server, "real", cmd="setsid sleep 300 & echo started; sleep 300", tag="escape")
    assert s.status == 200, s.error
    it = iter(s)
    first = [next(it), next(it)]
    assert first[0]["type"] == "start" and first[1] == {"seq": 1, "type": "stdout", "data": "started\n"}
    status, result = server.api.delete("/v1/vms/real/exec/escape?grace=1", timeout=60)
    assert status == 200 and result["killScope"] == "cgroup" and result["running"] is False, result
    rest_events = list(it)
    s.close()
    check_sequence(first + rest_events)
    assert rest_events[-1]["killScope"] == "cgroup"
    r = server.api.exec("real", "pgrep -f 'slee[p] 300' || echo none")
    assert r["stdout"] == "none\n", r                # the setsid child went with the cgroup

    events = api.events(server.api.exec("real", "python3 -c 'b = bytearray(400 << 20)'", blocking=False,
                                        memoryLimitMb=64)["execId"])
    assert events[-1]["oomKilled"] is True and events[-1]["limitsApplied"] is True, events[-1]
    assert server.api.get("/v1/vms/real/exec")[1]["execs"]       # the agent still answers
    assert server.api.delete("/v1/vms/real", timeout=60)[0] == 200
    server.assert_clean()


def test_cli_reattaches_a_broken_stream(netns):
    """./cbox.py exec against a server whose first stream breaks (no exit event, then an
    error event): the CLI re-attaches from the next seq and exits with the command's code."""
    import threading
    listener = netns.listen(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests = []
    answers = [  # one per connection
        [line(0, "start", execId="abc"), line(1, "stdout", data="a\n")],                   # just ends
        [line(2, "stderr", data="b\n"), line(3, "error", error="the VM's agent went quiet")],
        [line(3, "stdout", data="c\n"), line(4, "exit", exitCode=3, error="exit status 3")],
    ]

    def serve():
        for events in answers:
            conn, _ = listener.accept()
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            requests.append(head.split(b"\r\n")[0].decode())
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
            last = b"0\r\n\r\n" if events[-1].find(b'"exit"') > 0 or events[-1].find(b'"error"') > 0 else b""
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n" + chunks + last)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    r = netns.run(sys.executable, str(REPO / "cbox.py"), "--server", f"http://127.0.0.1:{port}",
                  "exec", "vm1", "--", "true", check=False)
    thread.join(10)
    listener.close()
    assert r.returncode == 3, r
    assert r.stdout == "a\nc\n" and r.stderr.count("re-attaching") == 2 and "b\n" in r.stderr, r
    assert requests == ["POST /v1/vms/vm1/exec HTTP/1.1", "GET /v1/vms/vm1/exec/abc/stream?since=2 HTTP/1.1",
                        "GET /v1/vms/vm1/exec/abc/stream?since=3 HTTP/1.1"]


def test_a_streamed_exec_is_counted_finished_once(vm):
    """The exit event of a streamed exec counts it finished (metrics, exec.finished event),
    once: not again when a stream re-attaches or a status shows it ended."""
    from test_metrics import scrape, value
    before = scrape(vm.api)
    events = stream_all(vm, "sv", cmd="exit 5")
    assert events[-1]["type"] == "exit" and events[-1]["exitCode"] == 5
    exec_id = events[0]["execId"]

    def finished():
        after = scrape(vm.api)
        return (value(after, "cbox_execs_finished_total") - value(before, "cbox_execs_finished_total"),
                value(after, "cbox_events_total", type="exec.finished") -
                value(before, "cbox_events_total", type="exec.finished"))
    assert finished() == (1, 1)                 # by the stream's exit event alone
    assert rest(vm).events(exec_id, since=0)[-1]["type"] == "exit"        # re-attached: seen ending again
    assert vm.api.get(f"/v1/vms/sv/exec/{exec_id}")[1]["running"] is False
    assert finished() == (1, 1)
    _, listed = vm.api.get("/v1/events?since=0")
    assert [e["execId"] for e in listed["events"] if e["type"] == "exec.finished"] == [exec_id]

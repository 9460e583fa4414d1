"""cbox.Client, its VMs and exec streams, and cbox.CallbackServer, against a live cbox.py
(the stand-in hypervisor) in a test network namespace.

The test's own thread enters that namespace for the test (entered()), so the client's
sockets and the CallbackServer's listener are made in it, as a program on that host would.
"""
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import cbox
from conftest import REPO
from imageutil import standin_image
import nsutil
from procutil import wait_for

def entered(ns_name):
    """This thread in the test's network namespace (threads it starts too), then back."""
    return nsutil.entered(f"/run/netns/{ns_name}")


@pytest.fixture
def client(cbox_server):
    with entered(cbox_server.ns.name):
        c = cbox.Client("http://127.0.0.1:7000", timeout=60)
        yield c
        c.close()


class Proxy:
    """A TCP proxy to cbox.py on loopback that counts connections and can cut them all."""

    def __init__(self, port=7000, tls=None):
        self.target, self.tls = ("127.0.0.1", port), tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections, self.live, self.lock = 0, [], threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            if self.tls:
                try:
                    down = self.tls.wrap_socket(down, server_side=True)
                except OSError:             # a client refusing the certificate
                    down.close()
                    continue
            up = socket.create_connection(self.target)
            with self.lock:
                self.connections += 1
                self.live += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self):
        """Break every open connection (as a proxy restart or a network fault would)."""
        with self.lock:
            live, self.live = self.live, []
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)      # wakes the accept() of its thread (Linux)
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(client):
    p = Proxy()
    yield p
    p.close()


# ---- every route ---------------------------------------------------------------------

def served_routes(metrics_text):
    """{(METHOD, route pattern)} answered 200 (101: a WebSocket), from cbox_http_requests_total."""
    return {(m["method"], m["route"]) for m in (
        dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in metrics_text.splitlines()
        if line.startswith("cbox_http_requests_total{")) if m.get("status") in ("200", "101")}


def test_every_route_through_the_client(client, cbox_server):
    """Each route of GET /v1/openapi.json, called through a method of the client (nothing
    else here talks to the server), answers 200: cbox.py's own request counter shows it."""
    health = client.health()
    assert health["status"] == "healthy" and health["vms"] == 0
    doc = client.openapi()
    assert doc["openapi"].startswith("3.1")

    vm = client.start("one", ttl=3600, idle_timeout=600, labels={"team": "a"}, network="nat", vcpus=1)
    assert isinstance(vm, cbox.ClientVM) and vm.name == "one" and vm.status == "RUNNING"
    assert vm.info["labels"] == {"team": "a"} and vm.info["expiresAt"] and vm.ip == "10.20.1.2/24"
    other = client.start("two", labels={"team": "b"})
    assert client.get("one").info["vmName"] == "one"
    assert [v.name for v in client.list(label={"team": "a"})] == ["one"]
    assert sorted(v.name for v in client.list(status="RUNNING")) == ["one", "two"]
    assert vm.refresh().info["idleTimeoutSeconds"] == 600

    r = vm.exec("echo out; echo err >&2; exit 3", env={"X": "1"}, cwd="/tmp", timeout=30)
    assert isinstance(r, cbox.ExecResult) and (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert r["error"] == "exit status 3" and r.error == "exit status 3" and r.exec_id
    r = vm.exec(["sh", "-c", 'printf "%s|" "$@"', "x", "a b", "$c"])
    assert r.ok and r.stdout == "a b|$c|"
    assert vm.exec("wc -c", stdin=b"12345").stdout.strip() == "5"

    # a background exec fed through stdin, by its tag
    bg = vm.exec(["sh", "-c", "while read line; do echo got $line; done"], blocking=False, stdin="pipe", tag="reader")
    assert bg.running and bg.exec_id
    assert vm.stdin("reader", "hello\n") == 6
    assert vm.stdin("reader", eof=True) == 0
    done = wait_for(lambda: (s := vm.exec_status(bg.exec_id)) and not s.running and s, 20, what="the reader to end")
    assert done.stdout == "got hello\n" and done.exit_code == 0
    assert bg.exec_id in [e["execId"] for e in vm.execs()]

    sleeper = vm.exec("sleep 60", blocking=False)
    wait_for(lambda: vm.exec_status(sleeper.exec_id).running, 10, what="the sleeper")
    assert vm.signal(sleeper.exec_id, "TERM") == 15
    ended = wait_for(lambda: (s := vm.exec_status(sleeper.exec_id)) and not s.running and s, 20, what="TERM")
    assert ended.signal == 15 and ended.exit_code is None
    sleeper = vm.exec("sleep 60", blocking=False)
    killed = vm.kill(sleeper.exec_id, grace=0)
    assert not killed.running and killed.signal == 9
    sleeper = vm.exec("sleep 60", blocking=False)
    assert vm.kill_all(grace=0) == [sleeper.exec_id]

    with vm.stream("for i in 1 2 3; do echo $i; done; echo e >&2", tag="counted") as stream:
        events = list(stream)
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "exit"
    assert "".join(e["data"] for e in events if e["type"] == "stdout") == "1\n2\n3\n"
    assert stream.result.exit_code == 0 and stream.result.stderr == "e\n" and stream.exec_id
    replay = list(vm.attach("counted", since=1))               # a finished exec, replayed from seq 1
    assert replay == events[1:]
    vm.terminal("counted").close()                # its WebSocket (README, Terminal): test_terminal.py

    assert "cbox-agent" in vm.logs()
    assert set(vm.stats()) == {"guest", "vmm"}
    assert vm.set_ttl(None).info["expiresAt"] is None
    assert vm.set_ttl(7200).info["expiresAt"]
    assert vm.set_network("nat").info["network"] == {"egress": "nat", "allowOut": []}

    events = client.events(since=0)
    assert [e["vmName"] for e in events["events"] if e["type"] == "vm.started"] == ["one", "two"]
    assert client.events(since=events["next"], wait=0.2)["events"] == []
    assert client.failed_starts() == []
    standin_image(cbox_server.tmp / "out" / "images", "extra")    # the config's images_dir: out/images
    assert [image["name"] for image in client.images()] == ["default", "extra"]
    assert client.image("default")["vms"] == ["one", "two"]
    client.remove_image("extra")
    assert [image["name"] for image in client.images()] == ["default"]
    assert [v.name for v in client.list(image="default")] == ["one", "two"] and client.list(image=["nope"]) == []
    with pytest.raises(cbox.ClientError) as refused:
        client.remove_image("default")
    assert refused.value.status == 409 and "never removed" in str(refused.value)
    assert "cbox_vms" in client.metrics()

    assert client.destroy_all(label="team=b") == ["two"]
    with pytest.raises(cbox.ClientError):
        other.refresh()
    vm.destroy()
    assert client.list() == []

    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops
                  if method in ("get", "put", "post", "delete", "patch")}
    assert documented - served_routes(client.metrics()) == set()


def test_a_vm_as_context_manager_is_destroyed(client):
    with client.start("ctx") as vm:
        assert vm.exec("hostname").stdout == "ctx\n"
    assert client.list() == []
    with pytest.raises(RuntimeError):
        with client.start("ctx2"):
            raise RuntimeError("the program failed")
    assert client.list() == []
    with client.start("ctx3") as vm:
        vm.destroy()                    # already gone at the end: not an error
    assert client.list() == []


# ---- errors ----------------------------------------------------------------------------

def test_errors_are_exceptions_with_status_message_and_stop_reason(client):
    with pytest.raises(cbox.ClientError) as e:
        client.get("nosuch")
    assert e.value.status == 404 and "nosuch" in str(e.value) and e.value.stop_reason is None
    assert isinstance(e.value, cbox.ApiError) and (e.value.method, e.value.path) == ("GET", "/v1/vms/nosuch")
    with pytest.raises(cbox.ClientError) as e:
        client.start("bad name!")
    assert e.value.status == 400
    with pytest.raises(cbox.ClientError) as e:
        client.start("x", bogusField=1)
    assert e.value.status == 400 and "bogusField" in str(e.value)
    vm = client.start("taken")
    with pytest.raises(cbox.ClientError) as e:
        client.start("taken")
    assert e.value.status == 409
    with pytest.raises(cbox.ClientError) as e:
        vm.signal("nosuchexec", "TERM")
    assert e.value.status == 404
    with pytest.raises(cbox.ClientError) as e:
        vm.signal(vm.exec("true").exec_id, "NOSUCHSIGNAL")
    assert e.value.status == 400
    with pytest.raises(TypeError):
        vm.exec(42)
    with pytest.raises(cbox.ClientError) as e:
        list(client.vm("nosuch").stream("true"))
    assert (e.value.status, e.value.method, e.value.path) == (404, "POST", "/v1/vms/nosuch/exec")
    with pytest.raises(cbox.ClientError) as e:
        list(vm.attach("nosuchexec"))
    assert (e.value.status, e.value.method) == (404, "GET") and e.value.path.endswith("/exec/nosuchexec/stream")
    # a VM its deadline ended: 404 with the tombstone's stopReason
    vm.set_ttl(1)
    def gone():
        try:
            vm.refresh()
        except cbox.ClientError as e:
            return e
    e = wait_for(gone, 20, what="the TTL to end the VM")
    assert e.status == 404 and e.stop_reason == "ttl" and "console" in e.fields
    with pytest.raises(cbox.ServerUnreachable) as e:
        cbox.Client("http://127.0.0.1:9", timeout=5).health()
    assert e.value.status is None and "cannot reach" in str(e.value)
    with pytest.raises(ValueError):
        cbox.Client("ftp://example.invalid/")


def test_token_and_failed_starts(cbox_factory, tmp_path):
    server = cbox_factory(kernel=str(tmp_path / "missing-kernel"), api_token="s3cret").start()
    with entered(server.ns.name):
        anonymous = cbox.Client("http://127.0.0.1:7000")
        assert anonymous.health()["status"] == "healthy"        # no token needed
        with pytest.raises(cbox.ClientError) as e:
            anonymous.list()
        assert e.value.status == 401 and "token" in str(e.value)
        client = cbox.Client("127.0.0.1:7000", token="s3cret")
        with pytest.raises(cbox.ClientError) as e:
            client.start("broken")
        assert e.value.status == 500 and e.value.stop_reason and "evidence" in e.value.fields
        failures = client.failed_starts()
        assert [f["vmName"] for f in failures] == ["broken"] and failures[0]["stopReason"] == e.value.stop_reason
    server.assert_clean()


# ---- connections: keep-alive, a connection the server closed, streams re-attached -----------

def test_keep_alive_and_a_kept_connection_that_broke(client, proxy, monkeypatch):
    c = cbox.Client(proxy.url)
    for _ in range(5):
        c.health()
        c.list()
    assert proxy.connections == 1
    proxy.cut()                          # the kept connection is gone: the next call opens another,
    time.sleep(0.1)                      # also for a POST (not retried: it may have been received)
    with pytest.raises(cbox.ClientError) as e:
        c.vm("nosuch").exec("true")
    assert e.value.status == 404
    assert c.list() == [] and c.health()["status"] == "healthy"
    assert proxy.connections == 2
    # the server closing a kept connection just as a call goes out (the check above cannot see
    # it yet): an idempotent call is sent again on a new connection, a POST is not
    monkeypatch.setattr(cbox, "socket_readable", lambda sock: False)
    proxy.cut()
    time.sleep(0.1)
    assert c.list() == []
    assert proxy.connections == 3
    proxy.cut()
    time.sleep(0.1)
    with pytest.raises(cbox.ServerUnreachable):
        c.vm("nosuch").exec("true")


def test_one_client_shared_by_threads(client, proxy):
    from concurrent.futures import ThreadPoolExecutor
    client.start("shared")
    c = cbox.Client(proxy.url)
    vm = c.vm("shared")
    with ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(lambda i: vm.exec(f"echo {i}").stdout, range(60)))
    assert outputs == [f"{i}\n" for i in range(60)]
    assert proxy.connections <= 6 and len(c.idle) <= c.IDLE_CONNECTIONS
    c.destroy("shared")


def test_https_through_a_tls_proxy(client, tmp_path):
    """cbox.py behind a TLS-terminating proxy (README: "use TLS in front"): https:// URLs,
    the certificate checked against the context given (and refused without it)."""
    import ssl
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=cbox-test",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    tls = Proxy(tls=server_side)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        c = cbox.Client(tls.url, ssl_context=trusting)
        assert tls.url.startswith("https://") and c.health()["status"] == "healthy" and c.list() == []
        assert tls.connections == 1
        with pytest.raises(cbox.ServerUnreachable) as e:
            cbox.Client(tls.url).health()               # the system's CAs do not know this certificate
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)
    finally:
        tls.close()


def test_cli_errors_name_the_request():
    r = subprocess.run([sys.executable, str(REPO / "cbox.py"), "--server", "http://127.0.0.1:9", "health"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("cbox: cannot reach http://127.0.0.1:9: ") and "cbox.py serve" in r.stderr


def test_stream_reattaches_after_a_broken_connection_losing_nothing(client, proxy):
    vm = client.start("streamer")
    via_proxy = cbox.Client(proxy.url).vm("streamer")
    problems = []
    stream = via_proxy.stream("for i in $(seq 1 60); do echo line$i; sleep 0.02; done; echo done >&2",
                              on_reattach=problems.append)
    seen, cuts = [], 0
    for event in stream:
        seen.append(event)
        if event["type"] == "stdout" and cuts < 3 and event["seq"] >= 10 * (cuts + 1):
            proxy.cut()
            cuts += 1
    assert cuts == 3 and proxy.connections >= 4 and len(problems) == 3, "the stream was not cut and re-attached"
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(len(seen))), "an event was lost or repeated"
    stdout = "".join(e["data"] for e in seen if e["type"] == "stdout")
    assert stdout == "".join(f"line{i}\n" for i in range(1, 61))
    assert seen[-1]["type"] == "exit" and stream.result.exit_code == 0 and stream.result.stderr == "done\n"
    vm.destroy()


def test_a_quiet_command_outlasts_the_client_timeout(client):
    vm = client.start("quiet")
    quick = cbox.Client(client.url, timeout=0.5)
    events = list(quick.vm("quiet").stream("sleep 3; echo late", reattach=1))   # ~6 quiet timeouts
    assert [e["type"] for e in events] == ["start", "stdout", "exit"] and events[1]["data"] == "late\n"
    vm.destroy()


def test_a_stream_that_cannot_reattach_raises_stream_broken(client, proxy):
    vm = client.start("lonely")
    stream = cbox.Client(proxy.url).vm("lonely").stream("echo first; sleep 30", reattach=2)
    assert next(stream)["type"] == "start"
    proxy.close()                        # the proxy is gone for good
    t0 = time.monotonic()
    with pytest.raises(cbox.StreamBroken) as e:
        for _ in stream:
            pass
    assert "re-attaches in a row failed" in str(e.value) and time.monotonic() - t0 < 30
    assert vm.exec_status(stream.exec_id).running         # the command itself goes on
    vm.kill_all()
    vm.destroy()


# ---- CallbackServer ----------------------------------------------------------------------

def test_callback_server_end_to_end_with_a_guest(cbox_factory):
    server = cbox_factory(callback_secret="cb-secret").start()
    calls = []

    def handler(call):
        calls.append(call)
        if call.method == "fail":
            raise ValueError("no such user")
        return {"echo": call.params, "vm": call.vm}

    with entered(server.ns.name), cbox.CallbackServer(handler, secret="cb-secret") as receiver:
        client = cbox.Client("http://127.0.0.1:7000")
        with client.start("cbvm", callback_url=receiver.url) as vm:
            r = vm.exec("""cbox_callback lookup '{"user": "ada"}'""")
            assert r.exit_code == 0, r
            assert json.loads(r.stdout) == {"echo": {"user": "ada"}, "vm": "cbvm"}
            assert calls[-1].exec_id == r.exec_id and calls[-1].id and calls[-1].method == "lookup"
            r = vm.exec("cbox_callback fail")
            assert r.exit_code == 1 and r.stderr.strip() == "Error: no such user"
        # a receiver with another secret refuses cbox.py's POSTs: the guest gets an error
        with cbox.CallbackServer(handler, secret="other") as wrong, client.start("cbvm2", callback_url=wrong.url) as vm:
            count = len(calls)
            r = vm.exec("cbox_callback lookup")
            assert r.exit_code == 1 and "401" in r.stderr and len(calls) == count
    server.assert_clean()


def post(url, body, headers):
    import http.client
    split = url.split("/")[2].split(":")
    conn = http.client.HTTPConnection(split[0], int(split[1]), timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_callback_server_refuses_bad_signatures_stale_and_replayed_requests():
    calls = []
    secret = "s"
    body = json.dumps({"vmName": "v", "method": "m", "params": [1]}).encode()
    with cbox.CallbackServer(lambda call: calls.append(call) or "ok", secret=secret, max_age_s=300) as receiver:
        signed = cbox.callback_headers(secret, "v", body)
        assert post(receiver.url, body, signed) == (200, {"result": "ok"})
        assert post(receiver.url, body, signed)[0] == 409                     # the same request again
        fresh = cbox.callback_headers(secret, "v", body)
        assert post(receiver.url, body + b" ", fresh)[0] == 401                # body changed
        assert post(receiver.url, body, cbox.callback_headers("wrong", "v", body))[0] == 401
        assert post(receiver.url, body, {"X-CBox-VM": "v"})[0] == 401          # unsigned
        for skew in (-301, 301):                                               # stale, or from the future
            status, answer = post(receiver.url, body, cbox.callback_headers(secret, "v", body, now=time.time() + skew))
            assert status == 401 and "away from now" in answer["error"]
        within = cbox.callback_headers(secret, "v", body, now=time.time() - 290)
        assert post(receiver.url, body, within) == (200, {"result": "ok"})
        no_id = {k: v for k, v in cbox.callback_headers(secret, "v", body).items() if k != "X-CBox-Callback-Id"}
        assert post(receiver.url, body, no_id)[0] == 401
        assert len(calls) == 2                                                 # the handler saw only those two
    with cbox.CallbackServer(lambda call: 1 / 0) as unsigned:                 # no secret: anything is a call
        assert post(unsigned.url, body, {}) == (200, {"error": "division by zero"})
        assert post(unsigned.url, b"[1]", {})[0] == 400


def test_seen_ids_forget_only_outside_the_window():
    seen = cbox.SeenIds(window_s=10, limit=3)
    assert seen.first_time("a", now=0) and not seen.first_time("a", now=19)
    assert seen.first_time("a", now=21)                       # 2 windows later its timestamp is stale anyway
    for name in "bcd":
        assert seen.first_time(name, now=22)
    assert seen.first_time("a", now=22)                       # the limit pushed out the oldest


def test_the_readme_from_python_example_runs_as_it_is(client, capsys):
    block = re.search(r"<!-- from-python:[^>]*-->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README lost its from-python block"
    exec(compile(block.group(1), "README.md (From Python)", "exec"), {})
    assert capsys.readouterr().out == ('0 hello from demo\nlive: 1\nlive: 2\nlive: 3\n'
                                       '{"user": "ada", "uid": 1000}\n')
    assert client.list() == []


# ---- import ------------------------------------------------------------------------------

def test_import_cbox_has_no_side_effects(tmp_path):
    probe = ("import os, sys, threading\n"
             "before = set(os.listdir('/proc/self/fd'))\n"
             "import cbox\n"
             "assert threading.active_count() == 1, threading.enumerate()\n"
             "assert set(os.listdir('/proc/self/fd')) == before\n"
             "assert 'http.client' not in sys.modules and 'http.server' not in sys.modules\n"
             "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")
    assert os.listdir(tmp_path) == []

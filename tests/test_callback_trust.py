"""Callbacks the receiver can trust and trace (issue 13): signed POSTs, their
headers, the guest's execId, and the README's verifier run as it is written."""
import json
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsutil import CallbackURLServer

import cbox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-for-tests"


def readme_verifier():
    """verify_cbox_callback, from the README's code block marked verify-callback."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- verify-callback:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its verify-callback block"
    namespace = {}
    exec(block.group(1), namespace)
    return namespace["verify_cbox_callback"]


class Headers(dict):
    """Case-insensitive get, as http.server's and most frameworks' header objects."""

    def get(self, name, default=None):
        for key, value in self.items():
            if key.lower() == name.lower():
                return value
        return default


# ---- the signature and the README's verifier ------------------------------------------

def test_readme_verifier_accepts_signed_callbacks_only():
    verify = readme_verifier()
    body = b'{"vmName":"v1","method":"m","params":{"a":1}}'
    headers = Headers(cbox.callback_headers(SECRET, "v1", body))
    assert headers["X-CBox-VM"] == "v1"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-CBox-Callback-Id"])
    assert abs(int(headers["X-CBox-Timestamp"]) - time.time()) < 5
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body + b" ")                 # body changed
    assert not verify("other secret", headers, body)                  # wrong key
    changed = Headers(headers, **{"X-CBox-Timestamp": str(int(headers["X-CBox-Timestamp"]) + 1)})
    assert not verify(SECRET, changed, body)                         # timestamp is signed too
    old = Headers(cbox.callback_headers(SECRET, "v1", body, now=time.time() - 600))
    assert not verify(SECRET, old, body)                             # a replay past max_age_s
    assert verify(SECRET, old, body, max_age_s=3600)


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    import hashlib
    import hmac
    headers = cbox.callback_headers("k", "vm", b"{}", now=1700000000.7)
    assert headers["X-CBox-Timestamp"] == "1700000000"
    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert headers["X-CBox-Signature"] == "sha256=" + expected


def test_without_a_secret_only_vm_and_id_headers():
    first = cbox.callback_headers("", "vm", b"{}")
    second = cbox.callback_headers("", "vm", b"{}")
    assert set(first) == {"X-CBox-VM", "X-CBox-Callback-Id"}
    assert first["X-CBox-Callback-Id"] != second["X-CBox-Callback-Id"]
    assert not readme_verifier()("anything", Headers(first), b"{}")


# ---- execId in the guest's request line ---------------------------------------------

def test_exec_id_is_passed_on():
    method, body = cbox.parse_callback_line(b'{"method": "m", "params": 1, "execId": "ab-1.x_Y"}\n', "vm")
    assert method == "m"
    assert json.loads(body) == {"vmName": "vm", "method": "m", "params": 1, "execId": "ab-1.x_Y"}
    method, body = cbox.parse_callback_line(b'{"method": "m"}', "vm")
    assert "execId" not in json.loads(body)


@pytest.mark.parametrize("exec_id", ["", "a" * 65, "a b", "a/b", "é", 5, None, ["x"], "x\n"])
def test_bad_exec_ids_are_errors(exec_id):
    method, error = cbox.parse_callback_line(json.dumps({"method": "m", "execId": exec_id}).encode(), "vm")
    assert method is None and "execId" in error


# ---- config ----------------------------------------------------------------------------

def write_config(tmp_path, lines):
    path = tmp_path / "config.yaml"
    path.write_text("hostservices:\n  restserver:\n" + "".join(f"    {line}\n" for line in lines))
    return path


def test_secret_from_a_file(tmp_path):
    (tmp_path / "cb.key").write_text("from-file\nignored\n")
    cfg = cbox.load_config(write_config(tmp_path, ['callback_secret_file: "cb.key"']))
    assert cfg.callback_secret == "from-file"
    assert cbox.load_config(write_config(tmp_path, [])).callback_secret == ""
    (tmp_path / "empty.key").write_text("\n")
    for lines, fragment in ((['callback_secret_file: "empty.key"'], "is empty"),
                            (['callback_secret_file: "missing.key"'], "missing.key"),
                            (['callback_secret: "x"', 'callback_secret_file: "cb.key"'], "not both")):
        with pytest.raises(cbox.ConfigError, match=fragment):
            cbox.load_config(write_config(tmp_path, lines))


def test_check_config_does_not_print_secrets(tmp_path):
    path = write_config(tmp_path, ['callback_secret: "hush-hush"', 'api_token: "tok-tok"'])
    r = subprocess.run([sys.executable, str(REPO / "cbox.py"), "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hush-hush" not in r.stdout and "tok-tok" not in r.stdout
    assert "callback_secret: (set)" in r.stdout and "callback_secret_file: ''" in r.stdout


# ---- end to end: signed POSTs from a VM ------------------------------------------------

def guest_line(sock_path, line, timeout=20):
    """What the guest's side of the callback socket gets for one request line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            more = s.recv(65536)
            if not more:
                break
            reply += more
    return json.loads(reply)


def test_callbacks_are_signed_and_traceable(cbox_factory, netns):
    cb = CallbackURLServer(netns.listen(("127.0.0.1", 0)), lambda body: (200, b'{"result": "pong"}'))
    try:
        server = cbox_factory(callback_secret=SECRET).start()
        api = server.api
        vm = api.start_vm("signed", callbackUrl=cb.url)
        for _ in range(2):
            r = api.exec("signed", """cbox_callback ping '{"a": 1}'""")
            assert r["exitCode"] == 0 and json.loads(r["stdout"]) == "pong", r
        verify = readme_verifier()
        ids = set()
        for headers, raw in cb.requests:
            assert verify(SECRET, headers, raw), dict(headers)
            assert headers.get("X-CBox-VM") == "signed"
            ids.add(headers.get("X-CBox-Callback-Id"))
        assert len(ids) == len(cb.requests) == 2

        # an execId from the guest's line is in the signed body; a bad one never leaves cbox.py
        sock_path = server.run_dir / str(vm["cid"]) / "vsock.sock_4032"
        reply = guest_line(sock_path, b'{"method": "traced", "params": [1], "execId": "e-42"}\n')
        assert reply == {"result": "pong"}
        headers, raw = cb.requests[-1]
        assert json.loads(raw) == {"vmName": "signed", "method": "traced", "params": [1], "execId": "e-42"}
        assert verify(SECRET, headers, raw)
        reply = guest_line(sock_path, b'{"method": "traced", "execId": "../../etc"}\n')
        assert "execId" in reply["error"] and len(cb.requests) == 3
    finally:
        cb.close()


# ---- per VM: callbackMethods and callbacks in flight -------------------------------------

def test_callback_methods_validation():
    assert cbox.check_callback_methods(None) is None
    assert cbox.check_callback_methods([]) == []
    assert cbox.check_callback_methods(["a", "b.c", "a"]) == ["a", "b.c"]
    for bad in ("ping", {"a": 1}, [1], [""], ["x" * 129], ["a\nb"], ["m"] * 65 + ["n"],
                [f"m{i}" for i in range(65)]):
        with pytest.raises(cbox.ApiError, match="callbackMethods") as e:
            cbox.check_callback_methods(bad)
        assert e.value.status == 400


def test_callback_methods_allowlist(cbox_factory, netns):
    cb = CallbackURLServer(netns.listen(("127.0.0.1", 0)), lambda body: (200, b'{"result": "pong"}'))
    try:
        server = cbox_factory().start()
        api = server.api
        for bad in ("ping", ["ok", 5], [f"m{i}" for i in range(65)], ["x" * 200]):
            status, body = api.post("/v1/vms", {"vmName": "nope", "callbackUrl": cb.url, "callbackMethods": bad})
            assert status == 400 and "callbackMethods" in body["error"], (bad, body)
        vm = api.start_vm("allow", callbackUrl=cb.url, callbackMethods=["ping", "log.write"])
        assert vm["callbackMethods"] == ["ping", "log.write"]
        assert api.start_vm("open", callbackUrl=cb.url)["callbackMethods"] is None

        def check(server):
            r = server.api.exec("allow", "cbox_callback ping && cbox_callback log.write '[1]'")
            assert r["exitCode"] == 0, r
            calls = len(cb.calls)
            r = server.api.exec("allow", "cbox_callback shutdown.host")
            assert r["exitCode"] == 1 and "callbackMethods" in r["stderr"], r
            assert len(cb.calls) == calls                       # never sent to the URL
            assert server.api.exec("open", "cbox_callback shutdown.host")["exitCode"] == 0

        check(server)
        server.stop()                                           # VMs keep running; the record keeps the list
        first_log = server.log()
        again = cbox_factory().start()
        assert again.api.get("/v1/vms/allow")[1]["callbackMethods"] == ["ping", "log.write"]
        check(again)
        assert again.api.delete("/v1/vms/allow")[0] == 200
        # this run's refusal, in the VM's budget counters logged at its end
        assert "refused_method=1" in again.log()[len(first_log):]
        assert again.api.delete("/v1/vms", timeout=60)[0] == 200
        again.assert_clean()
    finally:
        cb.close()


def test_callbacks_over_the_in_flight_cap_are_refused_at_once(cbox_factory, netns):
    import threading
    release = threading.Event()

    def reply(body):
        if body["method"] == "hold":
            release.wait(60)
        return 200, b'{"result": "done"}'

    cb = CallbackURLServer(netns.listen(("127.0.0.1", 0)), reply)
    held = []
    try:
        server = cbox_factory(callback_max_in_flight=2, callback_timeout_s=60).start()
        vm = server.api.start_vm("capped", callbackUrl=cb.url)
        sock_path = server.run_dir / str(vm["cid"]) / "vsock.sock_4032"
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(str(sock_path))
            s.sendall(b'{"method": "hold"}\n')
            held.append(s)
        deadline = time.monotonic() + 30
        while len(cb.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cb.calls) == 2
        # a third callback, while both wait on the URL: an error at once, not a wait
        reply3 = guest_line(sock_path, b'{"method": "hold"}\n', timeout=30)
        assert "too many callbacks in flight (at most 2 per VM)" in reply3["error"], reply3
        assert select.select(held, [], [], 0)[0] == []          # both still wait on the URL
        release.set()
        for s in held:
            assert json.loads(s.makefile("rb").readline()) == {"result": "done"}
        assert len(cb.calls) == 2                               # the refused one never reached the URL
        assert guest_line(sock_path, b'{"method": "again"}\n') == {"result": "done"}
        assert server.api.delete("/v1/vms/capped")[0] == 200
        assert "refused_in_flight=1" in server.log()
    finally:
        release.set()
        for s in held:
            s.close()
        cb.close()

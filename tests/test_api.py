"""End-to-end tests of cbox.py's REST API with the stand-in hypervisor.

Everything runs inside a network namespace created per test (contract section 5):
cbox.py, its bridge and taps, the stand-in and the guest agents it starts.
"""
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from procutil import wait_for


def ok_json(obj, status=200):
    return lambda body: (status, json.dumps(obj).encode())


# ---- basics --------------------------------------------------------------------

def test_health(cbox_server):
    status, body = cbox_server.api.get("/v1/health")
    assert status == 200
    assert body["status"] == "healthy" and body["vms"] == 0 and body["version"]
    assert body["timestamp"].endswith("Z")


def test_vm_lifecycle_exec_and_cleanup(cbox_server):
    api = cbox_server.api
    vm = api.start_vm("alpha", vcpus=2, memoryMb=256)
    assert vm["vmName"] == "alpha" and vm["status"] == "RUNNING"
    assert vm["ip"] == "10.20.1.2/24" and vm["cid"] == 3 and vm["tapDeviceName"] == "cbt3"
    assert vm["vcpus"] == 2 and vm["memoryMb"] == 256 and vm["callbackUrl"] is None
    assert vm["callbackMethods"] is None
    assert set(vm) == {"vmName", "status", "ip", "tapDeviceName", "callbackUrl", "callbackMethods", "cid", "vcpus",
                       "memoryMb", "createdAt", "stopReason", "network", "expiresAt",
                       "idleTimeoutSeconds", "lastActivityAt", "labels", "image", "diskMb"}
    assert vm["image"] == "default" and vm["diskMb"] == 64           # stateful_size_in_mb of the test config
    assert vm["stopReason"] is None and vm["expiresAt"] is None and vm["labels"] == {}
    status, got = api.get("/v1/vms/alpha")          # naming the VM is activity: lastActivityAt moves
    assert status == 200 and got == dict(vm, lastActivityAt=got["lastActivityAt"])
    assert got["lastActivityAt"] >= vm["lastActivityAt"]
    assert api.get("/v1/vms") == (200, {"vms": [got]})
    assert cbox_server.taps() == ["cbt3"]

    r = api.exec("alpha", "echo hello; hostname; ip -4 -o addr show eth0")
    assert r["exitCode"] == 0 and r["error"] == "" and r["timedOut"] is False
    out = r["stdout"].splitlines()
    assert out[0] == "hello" and out[1] == "alpha" and "10.20.1.2/24" in out[2]

    status, logs = api.get("/v1/vms/alpha/logs")
    assert status == 200 and "cbox-agent" in logs

    assert api.delete("/v1/vms/alpha") == (200, {"success": True})
    assert api.get("/v1/vms/alpha")[0] == 404
    cbox_server.assert_clean()
    log = cbox_server.log()
    assert "start step vm=alpha step=vm.boot" in log and "VM destroyed vm=alpha" in log


def test_exec_features(cbox_server):
    api = cbox_server.api
    api.start_vm("ex")
    r = api.exec("ex", "exit 3")
    assert r["exitCode"] == 3 and r["error"] == "exit status 3"
    r = api.exec("ex", 'echo "$FOO" && pwd', env={"FOO": "bar baz"}, cwd="/tmp")
    assert r["stdout"] == "bar baz\n/tmp\n"
    r = api.exec("ex", "wc -c", stdin="x" * 100000)
    assert r["stdout"].strip() == "100000"
    r = api.exec("ex", "echo out; echo err >&2")
    assert r["stdout"] == "out\n" and r["stderr"] == "err\n" and sorted(r["output"].splitlines()) == ["err", "out"]
    t0 = time.monotonic()
    r = api.exec("ex", "sleep 30", timeout=1)
    assert time.monotonic() - t0 < 10
    assert r["timedOut"] is True and r["exitCode"] is None and r["error"] == "timed out after 1s"
    r = api.exec("ex", "head -c 20000000 /dev/zero | tr '\\0' a")
    assert r["truncated"] is True and len(r["stdout"]) == 4 * 1024 * 1024
    r = api.exec("ex", "cbox_callback ping")
    assert r["exitCode"] == 1 and "has no callbackUrl" in r["stderr"]


def test_background_exec(cbox_server):
    api = cbox_server.api
    api.start_vm("bg")
    status, r = api.post("/v1/vms/bg/exec", {"cmd": "echo started; sleep 30", "blocking": False})
    assert status == 200 and r["running"] is True and r["output"] == "" and r["error"] == ""
    exec_id = r["execId"]
    def started():
        status, r = api.get(f"/v1/vms/bg/exec/{exec_id}")
        assert status == 200
        return "started" in r["stdout"] and r
    r = wait_for(started, 10, interval=0.05, what="the exec's first output")
    assert r["running"] is True and r["stdout"] == "started\n"
    status, r = api.delete(f"/v1/vms/bg/exec/{exec_id}")
    assert status == 200 and r["running"] is False and r["exitCode"] is None
    status, r = api.post("/v1/vms/bg/exec", {"cmd": "exit 7", "blocking": False})
    exec_id = r["execId"]
    wait_for(lambda: not api.get(f"/v1/vms/bg/exec/{exec_id}")[1]["running"], 10, interval=0.05,
             what="the exec to end")
    assert api.get(f"/v1/vms/bg/exec/{exec_id}")[1]["exitCode"] == 7
    assert api.get("/v1/vms/bg/exec/nope")[0] == 404


def filesystem_uuid(path):
    """The UUID in an ext4 superblock (bytes 0x68..0x78 of the superblock at 1024)."""
    with open(path, "rb") as f:
        f.seek(1024 + 0x68)
        return f.read(16).hex()


def test_concurrent_starts_and_execs(cbox_server):
    api = cbox_server.api
    names = [f"c{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        vms = list(pool.map(lambda n: api.start_vm(n), names))
    assert sorted(vm["ip"] for vm in vms) == [f"10.20.1.{i}/24" for i in range(2, 6)]
    assert len({vm["cid"] for vm in vms}) == 4
    jobs = [(n, i) for n in names for i in range(6)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda j: api.exec(j[0], f"sleep 0.2; echo {j[0]}-{j[1]}; hostname"), jobs))
    for (name, i), r in zip(jobs, results):
        assert r["stdout"] == f"{name}-{i}\n{name}\n"
    # each stateful disk (copies of one template) is a clean ext4 with a UUID of its own
    disks = [cbox_server.state_dir / "vms" / n / "stateful.ext4" for n in names]
    assert len({filesystem_uuid(d) for d in disks}) == len(names)
    fsck = subprocess.run(["e2fsck", "-fn", str(disks[0])], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # a slow exec does not hold up other requests
    slow = ThreadPoolExecutor(1).submit(api.exec, "c0", "sleep 3")
    wait_for(lambda: [e for e in api.get("/v1/vms/c0/exec")[1]["execs"] if e["running"]], 10,
             what="the slow exec to run")
    t0 = time.monotonic()
    assert api.get("/v1/health")[0] == 200 and api.exec("c1", "true")["exitCode"] == 0
    assert time.monotonic() - t0 < 2
    assert slow.result()["exitCode"] == 0
    status, body = api.delete("/v1/vms")
    assert status == 200 and sorted(body["destroyed"]) == names
    cbox_server.assert_clean()


# ---- callbacks -------------------------------------------------------------------

def test_callbacks_results_and_errors(cbox_server, callback_server):
    def reply(body):
        p = body["params"]
        kind = p.get("kind") if isinstance(p, dict) else None
        if kind == "error":
            return 200, json.dumps({"error": "nope"}).encode()
        if kind == "plain":
            return 200, b"just text"
        if kind == "other":
            return 200, json.dumps({"x": 1}).encode()
        if kind == "500":
            return 500, b"boom"
        return 200, json.dumps({"result": {"echo": p, "vm": body["vmName"], "method": body["method"]}}).encode()

    cb = callback_server(reply)
    api = cbox_server.api
    api.start_vm("cbvm", callbackUrl=cb.url)
    r = api.exec("cbvm", """cbox_callback greet '{"a": 1}'""")
    assert r["exitCode"] == 0, r
    assert json.loads(r["stdout"]) == {"echo": {"a": 1}, "vm": "cbvm", "method": "greet"}
    # the agent gives the command CBOX_EXEC_ID; its callback carries it
    assert cb.calls[-1] == {"vmName": "cbvm", "method": "greet", "params": {"a": 1}, "execId": r["execId"]}
    r = api.exec("cbvm", """cbox_callback m '{"kind": "error"}'""")
    assert r["exitCode"] == 1 and r["stderr"].strip() == "Error: nope"
    r = api.exec("cbvm", """cbox_callback m '{"kind": "plain"}'""")
    assert json.loads(r["stdout"]) == "just text"
    r = api.exec("cbvm", """cbox_callback m '{"kind": "other"}'""")
    assert json.loads(r["stdout"]) == {"x": 1}
    r = api.exec("cbvm", """cbox_callback m '{"kind": "500"}'""")
    assert r["exitCode"] == 1 and "HTTP 500" in r["stderr"]
    script = ("from cbox_callback import callback, CallbackError\n"
              "print(callback('py', [1, 2], timeout=10)['echo'])\n"
              "try:\n    callback('m', {'kind': 'error'})\nexcept Exception as e:\n    print('raised', e)\n")
    r = api.exec("cbvm", "python3 -", stdin=script)
    assert r["stdout"] == "[1, 2]\nraised nope\n", r


def test_callback_slow_and_dead_urls(cbox_factory, callback_server):
    server = cbox_factory(callback_timeout_s=1).start()
    api = server.api
    slow = callback_server(lambda body: (time.sleep(3), (200, b'{"result": 1}'))[1])
    api.start_vm("slowcb", callbackUrl=slow.url)
    t0 = time.monotonic()
    r = api.exec("slowcb", "cbox_callback m")
    assert r["exitCode"] == 1 and "timed out" in r["stderr"] and time.monotonic() - t0 < 3
    api.start_vm("deadcb", callbackUrl="http://127.0.0.1:9/nothing")
    r = api.exec("deadcb", "cbox_callback m")
    assert r["exitCode"] == 1 and "refused" in r["stderr"].lower()
    api.delete("/v1/vms")


# ---- bad input ---------------------------------------------------------------------

def test_bad_requests(cbox_server):
    api = cbox_server.api
    cases = [
        (("POST", "/v1/vms"), {"raw": b"{not json"}, 400, "malformed JSON"),
        (("POST", "/v1/vms"), {"body": {"vmName": "a", "bogus": 1}}, 400, "unknown field(s): bogus"),
        (("POST", "/v1/vms"), {"body": {"vmName": 5}}, 400, "invalid vmName"),
        (("POST", "/v1/vms"), {"body": {"vmName": "../etc"}}, 400, "invalid vmName"),
        (("POST", "/v1/vms"), {"body": {"vmName": "x" * 200}}, 400, "invalid vmName"),
        (("POST", "/v1/vms"), {"body": {"vmName": "a", "vcpus": "1"}}, 400, "'vcpus' must be an integer"),
        (("POST", "/v1/vms"), {"body": []}, 400, "JSON object"),
        (("POST", "/v1/vms"), {"raw": b"x" * (9 * 1024 * 1024)}, 413, "larger than"),
        (("GET", "/v1/vms/nope"), {}, 404, "not found"),
        (("GET", "/v1/vms/a%2Fb"), {}, 400, "invalid vmName"),
        (("POST", "/v1/vms/nope/exec"), {"body": {"cmd": "true"}}, 404, "not found"),
        (("DELETE", "/v1/vms/nope"), {}, 404, "not found"),
        (("GET", "/v1/nothing"), {}, 404, "no route"),
        (("PUT", "/v1/vms"), {}, 405, "not allowed"),
        (("POST", "/v1/health"), {}, 405, "not allowed"),
    ]
    for (method, path), kw, status, fragment in cases:
        got_status, body = api.request(method, path, **kw)
        assert (got_status, fragment in body.get("error", "")) == (status, True), (method, path, body)
    api.start_vm("dup")
    status, body = api.post("/v1/vms", {"vmName": "dup"})
    assert status == 409 and "already exists" in body["error"]
    status, body = api.post("/v1/vms/dup/exec", {"cmd": "true", "extra": 1})
    assert status == 400 and "unknown field(s): extra" in body["error"]
    status, body = api.post("/v1/vms/dup/exec", {"cmd": "true", "cwd": "/does/not/exist"})
    assert status == 400, body
    assert api.get("/v1/health")[0] == 200
    assert "Traceback" not in cbox_server.log()


def test_auth_token(cbox_factory):
    server = cbox_factory(api_token="s3cret").start()
    api = server.api
    assert api.get("/v1/vms")[0] == 200
    api.token = None
    assert api.get("/v1/health")[0] == 200
    status, body = api.get("/v1/vms")
    assert status == 401 and "token" in body["error"]
    api.token = "wrong"
    assert api.post("/v1/vms", {"vmName": "x"})[0] == 401
    api.token = "s3cret"
    assert api.get("/v1/vms") == (200, {"vms": []})


# ---- faults ---------------------------------------------------------------------

def test_hypervisor_dies_under_running_vm(cbox_server):
    api = cbox_server.api
    api.start_vm("victim")
    [pid] = cbox_server.vmm_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: api.get("/v1/vms/victim")[1]["status"] != "RUNNING", 10, interval=0.05,
             what="the VM to leave RUNNING")
    assert api.get("/v1/vms/victim")[1]["status"] == "FAILED"
    status, body = api.post("/v1/vms/victim/exec", {"cmd": "true"})
    assert status == 409 and "not running" in body["error"]
    wait_for(lambda: cbox_server.taps() == [], 10, interval=0.05, what="the tap to go")
    assert api.delete("/v1/vms/victim")[0] == 200
    cbox_server.assert_clean()


def test_guest_agent_server_dies_and_is_restarted(cbox_server):
    api = cbox_server.api
    api.start_vm("agentdies")
    r = api.exec("agentdies", "echo $PPID")
    server_pid = int(r["stdout"])
    api.post("/v1/vms/agentdies/exec", {"cmd": f"kill -9 {server_pid}", "blocking": False})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, r = api.post("/v1/vms/agentdies/exec", {"cmd": "echo $PPID"})
        if status == 200 and int(r["stdout"]) != server_pid:
            break
        time.sleep(0.2)
    assert status == 200 and int(r["stdout"]) != server_pid


def test_failed_start_cleans_up_and_reports_console(cbox_factory, tmp_path):
    server = cbox_factory(kernel=str(tmp_path / "missing-kernel")).start()
    status, body = server.api.post("/v1/vms", {"vmName": "broken"})
    assert status == 500 and "vm.boot" in body["error"] and "console" in body["error"]
    assert server.api.get("/v1/vms") == (200, {"vms": []})
    server.assert_clean()


def test_kill9_restart_readopts_running_and_cleans_dead(cbox_factory, callback_server):
    server = cbox_factory().start()
    api = server.api
    cb = callback_server(ok_json({"result": "pong"}))
    api.start_vm("keep", callbackUrl=cb.url)
    api.start_vm("dies")
    pids_before = set(server.vmm_pids())
    server.stop(signal.SIGKILL)
    # while cbox.py is down, one hypervisor dies
    dead_pid = max(pids_before)
    os.kill(dead_pid, signal.SIGKILL)
    server2 = cbox_factory()
    server2.start()
    api = server2.api
    status, vms = api.get("/v1/vms")
    names = {vm["vmName"]: vm for vm in vms["vms"]}
    assert status == 200
    assert "keep" in names and names["keep"]["status"] == "RUNNING"
    assert "dies" not in names
    r = api.exec("keep", "echo still here; cbox_callback ping")
    assert r["stdout"] == 'still here\n"pong"\n', r
    assert api.delete("/v1/vms/keep")[0] == 200
    server2.assert_clean()


def test_sigterm_leaves_vms_running_for_next_start(cbox_factory):
    server = cbox_factory().start()
    server.api.start_vm("survivor")
    rules = firewall_rules(server.ns)
    assert "-A CBOX-INPUT -i cbox0 -m comment --comment cbox -j DROP" in rules
    server.stop(signal.SIGTERM)
    assert len(server.vmm_pids()) == 1
    server2 = cbox_factory().start()
    assert server2.api.exec("survivor", "echo ok")["stdout"] == "ok\n"
    assert firewall_rules(server.ns) == rules        # restarts neither duplicate nor lose rules
    server2.api.delete("/v1/vms")
    server2.assert_clean()


def firewall_rules(ns):
    return ns.run("iptables", "-S").stdout + ns.run("iptables", "-t", "nat", "-S").stdout


def test_destroy_on_exit(cbox_factory):
    server = cbox_factory(destroy_on_exit=True).start()
    server.api.start_vm("gone")
    server.stop(signal.SIGTERM)
    server.assert_clean()


def test_guest_cannot_reach_host_services_or_other_guests(cbox_factory):
    # The API listens on all addresses here, so only the firewall keeps guests out.
    server = cbox_factory(host="0.0.0.0", api_token="t").start()
    api = server.api
    api.start_vm("g1")
    api.start_vm("g2")
    probe = ("python3 -c \"import socket,sys; s=socket.socket(); s.settimeout(1.5)\n"
             "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
             "except OSError as e: print('blocked', e)\" ")
    r = api.exec("g1", probe + "10.20.1.1 7000")
    assert r["stdout"].startswith("blocked timed out"), r
    r = api.exec("g1", probe + "10.20.1.3 4031")
    assert r["stdout"].startswith("blocked"), r
    assert "WITHOUT api_token" not in server.log()
    api.delete("/v1/vms")


def test_cli_client(cbox_server):
    import sys
    from conftest import REPO
    cli = [sys.executable, str(REPO / "cbox.py"), "--server", "http://127.0.0.1:7000"]
    ns = cbox_server.ns
    r = ns.run(*cli, "vm", "start", "clivm", "--vcpus", "1")
    assert r.stdout.startswith("clivm RUNNING ip=10.20.1.2/24")
    r = ns.run(*cli, "exec", "clivm", "--", "sh", "-c", "echo hi; echo oops >&2; exit 5", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (5, "hi\n", "oops\n")
    r = ns.run(*cli, "exec", "clivm", "--timeout", "0.5", "--", "sleep 5", check=False)
    assert r.returncode == 124 and "timed out after 0.5s" in r.stderr
    assert "clivm" in ns.run(*cli, "vm", "ls").stdout
    assert "cbox-agent" in ns.run(*cli, "vm", "logs", "clivm").stdout
    r = ns.run(*cli, "exec", "nosuchvm", "--", "true", check=False)
    assert r.returncode == 1 and "HTTP 404" in r.stderr
    assert ns.run(*cli, "vm", "rm", "clivm").stdout == "clivm destroyed\n"
    cbox_server.assert_clean()


def test_restart_cleans_a_start_killed_before_its_pid_was_recorded(cbox_factory):
    server = cbox_factory().start()
    server.api.start_vm("nopid")
    server.stop(signal.SIGKILL)
    record_path = server.state_dir / "vms" / "nopid.json"
    record = json.loads(record_path.read_text())
    record.update(pid=None, pidStart=None, phase="starting", status="CREATED")
    record_path.write_text(json.dumps(record))
    assert len(server.vmm_pids()) == 1
    server2 = cbox_factory().start()
    assert server2.api.get("/v1/vms/nopid")[0] == 404
    server2.assert_clean()


def test_nat_out_of_the_default_route_interface(cbox_factory, netns):
    # An uplink that exists only inside this test's namespace (TEST-NET-1 addresses, no traffic sent).
    netns.run("ip", "link", "add", "cbtup0", "type", "veth", "peer", "name", "cbtup1")
    netns.run("ip", "addr", "add", "192.0.2.1/24", "dev", "cbtup0")
    netns.run("ip", "link", "set", "cbtup0", "up")
    netns.run("ip", "link", "set", "cbtup1", "up")
    netns.run("ip", "route", "add", "default", "via", "192.0.2.2")
    server = cbox_factory(nat_interface="auto").start()
    nat = netns.run("iptables", "-t", "nat", "-S", "CBOX-POSTROUTING").stdout
    assert "-A CBOX-POSTROUTING -s 10.20.1.0/24 -o cbtup0 -m comment --comment cbox -j MASQUERADE" in nat
    assert netns.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert "NAT enabled out=cbtup0" in server.log()

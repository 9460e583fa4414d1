"""VMs that clean up after themselves (ttlSeconds, idleTimeoutSeconds, PUT /ttl,
tombstones) and labels with bulk operations: end to end with the stand-in
hypervisor, inside a network namespace per test (contract section 5).
"""
import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO
from procutil import wait_for

import cbox  # noqa: E402


def epoch(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wait_gone(api, name, timeout=15.0):
    """The wall time at which GET /v1/vms stops listing the VM (the list is no activity)."""
    def gone():
        return all(vm["vmName"] != name for vm in api.get("/v1/vms")[1]["vms"])
    wait_for(gone, timeout, interval=0.02, what=f"VM {name} to be destroyed")
    return time.time()


def assert_tombstone(api, name, reason):
    """GET, exec, logs and DELETE naming a VM a deadline destroyed answer 404 saying why."""
    for method, path, body in (("GET", f"/v1/vms/{name}", None), ("POST", f"/v1/vms/{name}/exec", {"cmd": "true"}),
                               ("GET", f"/v1/vms/{name}/logs", None), ("DELETE", f"/v1/vms/{name}", None)):
        status, answer = api.request(method, path, body)
        assert status == 404 and answer["stopReason"] == reason, (method, path, answer)
        assert answer["error"].startswith(f"VM '{name}' was destroyed: {reason}"), answer
    return answer


# ---- TTL ---------------------------------------------------------------------------

def test_short_ttl_expires_within_a_second(cbox_server):
    api = cbox_server.api
    other = api.start_vm("stays")
    assert other["expiresAt"] is None
    t0 = time.time()
    vm = api.start_vm("short", ttlSeconds=3)            # counted from the request: the boot is part of it
    expires = epoch(vm["expiresAt"])
    assert vm["expiresAt"].endswith("Z") and t0 + 2.9 <= expires <= time.time() + 3.1
    time.sleep(max(0.0, expires - 0.3 - time.time()))
    assert api.get("/v1/vms/short")[0] == 200               # not before its time
    gone = wait_gone(api, "short")
    assert expires - 0.05 <= gone <= expires + 1.0, gone - expires
    answer = assert_tombstone(api, "short", "ttl")
    assert vm["expiresAt"] in answer["error"] and answer["destroyedAt"].endswith("Z")
    assert any("cbox-agent" in line for line in answer["console"]), answer["console"]
    assert api.get("/v1/vms/stays")[0] == 200
    wait_for(lambda: "VM destroyed vm=short stopReason=ttl" in cbox_server.log(), 10, what="the teardown's end")
    assert cbox_server.taps() == ["cbt3"] and len(cbox_server.vmm_pids()) == 1   # everything of 'short' freed
    assert not (cbox_server.state_dir / "vms" / "short.json").exists()


def test_put_ttl_sets_extends_and_clears(cbox_server):
    api = cbox_server.api
    vm = api.start_vm("t1", ttlSeconds=60)
    status, vm = api.request("PUT", "/v1/vms/t1/ttl", {"ttlSeconds": 3600})
    assert status == 200 and vm["vmName"] == "t1" and 3590 <= epoch(vm["expiresAt"]) - time.time() <= 3600
    status, vm = api.request("PUT", "/v1/vms/t1/ttl", {"ttlSeconds": None})
    assert status == 200 and vm["expiresAt"] is None
    api.start_vm("tick", ttlSeconds=1)          # once it is gone the deadline keeper has run since
    wait_for(lambda: api.get("/v1/vms/tick")[0] == 404, 10, what="the 1 s VM to end")
    assert api.get("/v1/vms/t1")[0] == 200
    for body in ({"ttlSeconds": -1}, {"ttlSeconds": 1.5}, {"ttlSeconds": "10"}, {"ttlSeconds": True}, {},
                 {"ttlSeconds": 10, "extra": 1}, {"ttlSeconds": 10 ** 12}, [1]):
        status, answer = api.request("PUT", "/v1/vms/t1/ttl", body)
        assert status == 400 and answer["error"], (body, answer)
    assert api.request("PUT", "/v1/vms/t1/ttl", raw=b"{nope")[0] == 400
    assert api.get("/v1/vms/t1")[1]["expiresAt"] is None     # nothing changed
    assert api.request("PUT", "/v1/vms/nope/ttl", {"ttlSeconds": 5})[0] == 404
    assert api.request("GET", "/v1/vms/t1/ttl")[0] == 405
    status, vm = api.request("PUT", "/v1/vms/t1/ttl", {"ttlSeconds": 1})
    assert status == 200
    gone = wait_gone(api, "t1")
    assert gone <= epoch(vm["expiresAt"]) + 1.0
    assert_tombstone(api, "t1", "ttl")


def test_ttl_config_defaults_and_maximum(cbox_factory):
    server = cbox_factory(max_ttl_s="100", default_idle_timeout_s=50).start()
    api = server.api
    vm = api.start_vm("capped")
    assert 90 <= epoch(vm["expiresAt"]) - time.time() <= 100 and vm["idleTimeoutSeconds"] == 50
    for ttl in (0, 101):
        status, answer = api.post("/v1/vms", {"vmName": "over", "ttlSeconds": ttl})
        assert status == 400 and "1..100" in answer["error"], answer
    assert api.request("PUT", "/v1/vms/capped/ttl", {"ttlSeconds": None})[0] == 400
    assert api.request("PUT", "/v1/vms/capped/ttl", {"ttlSeconds": 101})[0] == 400
    assert api.request("PUT", "/v1/vms/capped/ttl", {"ttlSeconds": 100})[0] == 200
    assert [v["vmName"] for v in api.get("/v1/vms")[1]["vms"]] == ["capped"]
    api.delete("/v1/vms")
    server.assert_clean()


# ---- idle timeout --------------------------------------------------------------------

def test_idle_timeout_waits_for_running_execs(cbox_server):
    api = cbox_server.api
    vm = api.start_vm("idler", idleTimeoutSeconds=1)
    assert vm["idleTimeoutSeconds"] == 1 and vm["expiresAt"] is None
    r = api.exec("idler", "sleep 2.5; echo done")                 # longer than the idle timeout
    assert r["stdout"] == "done\n"
    status, r = api.post("/v1/vms/idler/exec", {"cmd": "sleep 3", "blocking": False})
    assert status == 200
    started = time.time()
    gone = wait_gone(api, "idler", timeout=20)                     # nothing names the VM from here on
    assert gone >= started + 3, gone - started                    # not while the background exec ran
    assert_tombstone(api, "idler", "idle")


def test_idle_timeout_waits_for_a_callback_in_flight(cbox_server, netns):
    from nsutil import CallbackURLServer

    def slow(body):
        time.sleep(3)
        return 200, b'{"result": "late"}'
    cb = CallbackURLServer(netns.listen(("127.0.0.1", 0)), slow)
    try:
        api = cbox_server.api
        api.start_vm("caller", idleTimeoutSeconds=2, callbackUrl=cb.url)
        # a process the agent does not track (its exec ends at once) calls back after 1 s
        r = api.exec("caller", "setsid sh -c 'sleep 1; cbox_callback slow' >/dev/null 2>&1 < /dev/null &")
        assert r["exitCode"] == 0
        started = time.time()
        gone = wait_gone(api, "caller", timeout=20)
        assert len(cb.calls) == 1 and cb.calls[0]["vmName"] == "caller"
        assert gone >= started + 4 - 0.1, gone - started        # kept while the callback was in flight (1..4 s)
        assert_tombstone(api, "caller", "idle")
    finally:
        cb.close()


def test_idle_timeout_without_activity_and_api_calls_keep_it(cbox_server):
    api = cbox_server.api
    api.start_vm("poked", idleTimeoutSeconds=3)
    last = api.start_vm("quiet", idleTimeoutSeconds=1)["lastActivityAt"]    # its idle clock starts when it runs
    t_end, quiet_gone = time.time() + 4, None
    while time.time() < t_end:                                     # GET naming 'poked' is activity
        status, vm = api.get("/v1/vms/poked")
        assert status == 200, vm
        listed = [v["vmName"] for v in api.get("/v1/vms")[1]["vms"]]
        quiet_gone = quiet_gone or ("quiet" not in listed and time.time())
        time.sleep(0.1)
    assert epoch(vm["lastActivityAt"]) > time.time() - 1
    assert quiet_gone and epoch(last) + 1 <= quiet_gone <= epoch(last) + 1 + 1.0, (quiet_gone, last)
    assert_tombstone(api, "quiet", "idle")
    gone = wait_gone(api, "poked")
    assert epoch(vm["lastActivityAt"]) + 3 <= gone <= epoch(vm["lastActivityAt"]) + 3 + 1.0
    assert_tombstone(api, "poked", "idle")


# ---- tombstones and restarts --------------------------------------------------------

def test_tombstone_goes_when_the_name_is_reused_and_survives_a_restart(cbox_factory):
    server = cbox_factory().start()
    api = server.api
    api.start_vm("again", ttlSeconds=1)
    api.start_vm("twice", ttlSeconds=1)
    wait_gone(api, "again")
    wait_gone(api, "twice")
    server.stop(signal.SIGTERM)
    assert {e["vmName"] for e in json.loads((server.state_dir / "tombstones.json").read_text())} == {"again", "twice"}
    server = cbox_factory().start()
    api = server.api
    assert_tombstone(api, "again", "ttl")
    vm = api.start_vm("again", labels={"round": "2"})             # the name may be used again
    assert vm["status"] == "RUNNING" and vm["expiresAt"] is None
    assert api.get("/v1/vms/again")[1]["labels"] == {"round": "2"}
    assert api.delete("/v1/vms/again")[0] == 200
    status, answer = api.get("/v1/vms/again")
    assert status == 404 and "stopReason" not in answer          # a DELETE leaves no tombstone
    assert_tombstone(api, "twice", "ttl")
    server.assert_clean()


def test_tombstones_expire(cbox_factory):
    server = cbox_factory(tombstone_minutes=0).start()
    api = server.api
    api.start_vm("nostone", ttlSeconds=1)
    wait_gone(api, "nostone")
    status, answer = api.get("/v1/vms/nostone")
    assert status == 404 and answer == {"error": "VM 'nostone' not found"}
    server.assert_clean()


def test_restart_with_ttls_in_place(cbox_factory):
    server = cbox_factory().start()
    api = server.api
    long = api.start_vm("long", ttlSeconds=12)
    api.start_vm("forever")
    short = api.start_vm("short", ttlSeconds=3, labels={"k": "v"})
    server.stop(signal.SIGKILL)
    time.sleep(max(0.0, epoch(short["expiresAt"]) + 0.5 - time.time()))   # 'short' expires while cbox.py is down
    server = cbox_factory().start()
    api = server.api
    assert_tombstone(api, "short", "ttl")                          # destroyed at adoption, before serving
    log = server.log()
    assert log.index("VM re-adopted vm=short") < log.index("VM deadline vm=short") < log.rindex("cbox: serving")
    status, vm = api.get("/v1/vms/long")
    assert status == 200 and vm["status"] == "RUNNING" and vm["expiresAt"] == long["expiresAt"]
    assert len(server.taps()) == 2 and len(server.vmm_pids()) == 2
    server.stop(signal.SIGTERM)                                    # and once more, gracefully
    server = cbox_factory().start()
    api = server.api
    gone = wait_gone(api, "long")
    assert epoch(long["expiresAt"]) - 0.05 <= gone <= epoch(long["expiresAt"]) + 1.0
    assert_tombstone(api, "long", "ttl")
    assert api.exec("forever", "echo ok")["stdout"] == "ok\n"
    api.delete("/v1/vms")
    server.assert_clean()


def test_restart_keeps_the_idle_clock(cbox_factory):
    server = cbox_factory().start()
    api = server.api
    vm = api.start_vm("sleepy", idleTimeoutSeconds=2)
    server.stop(signal.SIGKILL)
    time.sleep(2.5)                           # idle through the downtime: nothing could use it
    server = cbox_factory().start()
    assert_tombstone(server.api, "sleepy", "idle")
    assert epoch(vm["lastActivityAt"]) + 2 <= time.time()
    server.assert_clean()


# ---- labels and bulk operations ------------------------------------------------------

def test_labels_filter_and_bulk_delete(cbox_server):
    api = cbox_server.api
    api.start_vm("a", labels={"owner": "job42", "tier": "x"})
    api.start_vm("b", labels={"owner": "job42"})
    api.start_vm("c", labels={"owner": "other", "k/with.dots_-": "any value, spaces ok"})

    def names(query):
        status, body = api.get("/v1/vms" + query)
        assert status == 200, body
        return sorted(vm["vmName"] for vm in body["vms"])
    assert names("") == ["a", "b", "c"]
    assert names("?label=owner=job42") == ["a", "b"]
    assert names("?label=owner%3Djob42&label=tier=x") == ["a"]
    assert names("?label=tier") == ["a"]
    assert names("?label=owner=nobody") == []
    assert names("?status=RUNNING&label=owner=other") == ["c"]
    assert names("?status=running") == ["a", "b", "c"]
    assert names("?status=STOPPED") == []
    assert names("?label=k/with.dots_-=any%20value,%20spaces%20ok") == ["c"]
    assert api.get("/v1/vms/a")[1]["labels"] == {"owner": "job42", "tier": "x"}
    for query in ("?label=", "?label==job42", "?label=bad%20key=1", "?status=NOPE", "?foo=1", "?label"):
        for method in ("GET", "DELETE"):
            status, answer = api.request(method, "/v1/vms" + query)
            assert status == 400 and answer["error"], (method, query, answer)
    assert names("") == ["a", "b", "c"]                            # the bad DELETEs destroyed nothing
    status, answer = api.delete("/v1/vms?label=owner=job42")
    assert status == 200 and answer["success"] is True and sorted(answer["destroyed"]) == ["a", "b"]
    assert names("") == ["c"]
    assert api.get("/v1/vms/a") == (404, {"error": "VM 'a' not found"})
    assert api.delete("/v1/vms?label=owner=job42") == (200, {"success": True, "destroyed": []})


@pytest.mark.parametrize("fields,fragment", [
    ({"ttlSeconds": -1}, "'ttlSeconds' must be a whole number"),
    ({"ttlSeconds": 1.5}, "'ttlSeconds' must be an integer"),
    ({"ttlSeconds": "10"}, "'ttlSeconds' must be an integer"),
    ({"ttlSeconds": True}, "'ttlSeconds' must be an integer"),
    ({"ttlSeconds": 10 ** 12}, "'ttlSeconds' must be at most"),
    ({"idleTimeoutSeconds": -5}, "'idleTimeoutSeconds' must be a whole number"),
    ({"labels": ["a"]}, "'labels' must be an object"),
    ({"labels": {f"k{i}": "v" for i in range(33)}}, "too many labels: at most 32"),
    ({"labels": {"bad key": "v"}}, "bad label key"),
    ({"labels": {"-lead": "v"}}, "bad label key"),
    ({"labels": {"k" * 64: "v"}}, "bad label key"),
    ({"labels": {"k": 1}}, "label 'k' must be a string"),
    ({"labels": {"k": "v" * 256}}, "at most 255 printable"),
    ({"labels": {"k": "line\nbreak"}}, "at most 255 printable"),
])
def test_bad_lifetime_and_label_requests(cbox_server, fields, fragment):
    status, answer = cbox_server.api.post("/v1/vms", dict(vmName="bad", **fields))
    assert status == 400 and fragment in answer["error"], answer
    assert cbox_server.api.get("/v1/vms")[1] == {"vms": []}


def test_longest_allowed_labels(cbox_server):
    labels = {f"{i:02d}" + "k" * 61: "v" * 255 for i in range(32)}
    vm = cbox_server.api.start_vm("full", labels=labels)
    assert vm["labels"] == labels


def test_cli_labels_ttl_ls_rm(cbox_server):
    cli = [sys.executable, str(REPO / "cbox.py"), "--server", "http://127.0.0.1:7000"]
    ns = cbox_server.ns
    r = ns.run(*cli, "vm", "start", "c1", "--label", "owner=me", "--label", "team=x", "--ttl", "600")
    assert r.stdout.startswith("c1 RUNNING ip=10.20.1.2/24") and " expires=" in r.stdout
    ns.run(*cli, "vm", "start", "c2", "--label", "owner=you", "--idle-timeout", "600")
    out = ns.run(*cli, "vm", "ls", "--label", "owner=me").stdout.splitlines()
    assert len(out) == 2 and out[1].startswith("c1 ") and out[1].endswith("owner=me,team=x")
    assert len(ns.run(*cli, "vm", "ls", "--status", "RUNNING").stdout.splitlines()) == 3
    r = ns.run(*cli, "vm", "ls", "--label", "bad key", check=False)
    assert r.returncode == 1 and "HTTP 400" in r.stderr
    assert ns.run(*cli, "vm", "ttl", "c1", "none").stdout == "c1 expires=never\n"
    assert cbox_server.api.get("/v1/vms/c1")[1]["expiresAt"] is None
    r = ns.run(*cli, "vm", "start", "c3", "--label", "novalue", check=False)
    assert r.returncode == 1 and "use KEY=VALUE" in r.stderr
    assert ns.run(*cli, "vm", "rm", "--label", "owner=me").stdout == "destroyed: c1\n"
    assert ns.run(*cli, "vm", "rm", "--label", "owner=me").stdout == "destroyed: (none)\n"
    assert [vm["vmName"] for vm in cbox_server.api.get("/v1/vms")[1]["vms"]] == ["c2"]


# ---- pure parts ------------------------------------------------------------------------

def write_config(tmp_path, lines):
    path = tmp_path / "config.yaml"
    path.write_text("hostservices:\n  restserver:\n" + "".join(f"    {line}\n" for line in lines))
    return path


def test_lifetime_config_keys(tmp_path):
    cfg = cbox.load_config(write_config(tmp_path, ['max_ttl_s: "3600"', "default_ttl_s: 60", 'tombstone_minutes: "5"']))
    assert (cfg.max_ttl_s, cfg.default_ttl_s, cfg.tombstone_minutes) == (3600, 60, 5)
    assert (cfg.default_idle_timeout_s, cfg.max_idle_timeout_s) == (0, 0)
    for lines, fragment in ((["default_ttl_s: 61", "max_ttl_s: 60"], "default_ttl_s must not be more than max_ttl_s"),
                            (["max_idle_timeout_s: -1"], "must be 0.."),
                            (["tombstone_minutes: -1"], "tombstone_minutes must not be negative"),
                            (['default_ttl_s: "1.5"'], "'default_ttl_s' must be int")):
        with pytest.raises(cbox.ConfigError, match=fragment):
            cbox.load_config(write_config(tmp_path, lines))


def test_vm_filter_parsing():
    class V:
        def __init__(self, status, labels):
            self.status, self.labels = status, labels
    vm = V("RUNNING", {"a": "1", "b": ""})
    assert cbox.parse_vm_filter({})(vm)
    assert cbox.parse_vm_filter({"label": ["a=1", "b="]})(vm)
    assert cbox.parse_vm_filter({"label": ["b"], "status": ["running"]})(vm)
    assert not cbox.parse_vm_filter({"label": ["b=x"]})(vm)
    assert not cbox.parse_vm_filter({"label": ["c"]})(vm)
    assert cbox.parse_vm_filter({"label": ["a=1=2"]})(V("RUNNING", {"a": "1=2"}))
    for query in ({"label": ["=1"]}, {"status": ["DEAD"]}, {"labels": ["a=1"]}):
        with pytest.raises(cbox.ApiError) as e:
            cbox.parse_vm_filter(query)
        assert e.value.status == 400


def test_tombstones_are_bounded_and_kept_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(cbox.Tombstones, "MAX", 3)
    stones = cbox.Tombstones(tmp_path / "t.json", 10)
    for i in range(5):
        stones.add(f"vm{i}", "ttl", f"VM 'vm{i}' was destroyed: ttl", "boot\n\n" + "\n".join(f"l{n}" for n in range(30)))
    assert list(stones.entries) == ["vm2", "vm3", "vm4"]
    again = cbox.Tombstones(tmp_path / "t.json", 10)
    entry = again.get("vm4")
    assert entry["stopReason"] == "ttl" and entry["console"] == [f"l{n}" for n in range(15, 30)]
    again.discard("vm4")
    assert cbox.Tombstones(tmp_path / "t.json", 10).get("vm4") is None
    entry = again.get("vm3")
    entry["until"] = time.time() - 1
    assert again.get("vm3") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert cbox.Tombstones(tmp_path / "bad.json", 10).entries == {}


@pytest.mark.parametrize("field,value", [("expiresAt", "tomorrow"), ("expiresAt", 5), ("labels", {"bad key": "v"}),
                                         ("idleTimeoutSeconds", -1), ("lastActivityAt", "nope"),
                                         ("backgroundExecs", "abc")])
def test_a_record_with_bad_lifetime_fields_is_unusable(tmp_path, field, value):
    cfg = cbox.load_config(write_config(tmp_path, [f"state_dir: {tmp_path}"]))
    record = {"vmName": "r", "status": "RUNNING", "ip": "10.20.1.2/24", "cid": 3, "phase": "running",
              "expiresAt": "2030-01-01T00:00:00.000Z", "labels": {"a": "b"}, "idleTimeoutSeconds": 5,
              "lastActivityAt": "2030-01-01T00:00:00.000Z", "backgroundExecs": ["x1"]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    vm = cbox.VM.from_record(cfg, path)
    assert vm.deadline() == (cbox.utc_epoch("2030-01-01T00:00:00.000Z"), "ttl")
    assert vm.lastActivityAt == "2030-01-01T00:00:00.000Z" and vm.labels == {"a": "b"}
    path.write_text(json.dumps(dict(record, **{field: value})))
    with pytest.raises((ValueError, TypeError, AttributeError, cbox.ApiError)):
        cbox.VM.from_record(cfg, path)

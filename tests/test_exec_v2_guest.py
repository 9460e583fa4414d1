"""Exec v2 in a real guest (QEMU engine): per-exec cgroups, limits and the agent's self-protection.

One VM boots the kernel and initramfs of `make images` with a copy of
out/rootfs.ext4 that carries THIS checkout's guest_agent.py (written in
with debugfs), so the agent under test runs as PID 1 with cgroup v2. The
tests talk to the agent's port 4031 from inside a network namespace of
the module (contract 5), as tests/test_images.py does, with no cbox.py.
Everything skips with a reason when the images, QEMU or debugfs are missing.
"""
import contextlib
import os
import pathlib
import time

import pytest

from conftest import REPO, NetNS, unique
from execstream import AgentApi, check_sequence, joined
from procutil import run, wait_for
from qemu_engine import QemuEngine
from test_images import (BOOT_TIMEOUT, GUEST_IP, HOST_IP, INITRAMFS, KERNEL, ROOTFS,
                         console, need_images, need_qemu, need_tool, tail, vm_config, wait_ready)

AGENT_IN_IMAGE = "/usr/local/sbin/guest_agent.py"


def rootfs_with_this_agent(directory, agent=REPO / "guest_agent.py"):
    """A sparse copy of the rootfs image whose guest agent is `agent` (this checkout's)."""
    image = directory / "rootfs.ext4"
    run("cp", "--sparse=always", str(ROOTFS), str(image))
    for request in (f"rm {AGENT_IN_IMAGE}", f"write {agent} {AGENT_IN_IMAGE}",
                    f"sif {AGENT_IN_IMAGE} mode 0100755"):
        run("debugfs", "-w", "-R", request, str(image))
    out = run("debugfs", "-R", f"cat {AGENT_IN_IMAGE}", str(image)).stdout
    assert out == pathlib.Path(agent).read_text(), "debugfs did not replace the agent"
    return image


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """(AgentApi, engine) of one booted VM shared by this module's tests."""
    need_images(KERNEL, INITRAMFS, ROOTFS)
    need_qemu()
    need_tool("debugfs", "e2fsprogs")
    with booted_guest(tmp_path_factory.mktemp("execv2")) as booted:
        yield booted


@contextlib.contextmanager
def booted_guest(tmp, agent=REPO / "guest_agent.py"):
    """(AgentApi, engine) of a VM booted from the out/ images with `agent` as its guest
    agent, in a network namespace of its own; everything is gone after the block."""
    rootfs = rootfs_with_this_agent(tmp, agent)
    ns = NetNS(unique("cbtns"))
    run("ip", "netns", "add", ns.name)
    eng = None
    try:
        ns.run("ip", "link", "set", "lo", "up")
        tap = unique("cbit")[:15]
        ns.bridge_with_tap(tap, f"{HOST_IP}/24")
        eng = QemuEngine(vm_config(tmp, rootfs=rootfs, tap=tap), lambda line: None, prefix=ns.prefix)
        eng.start()
        wait_ready(ns, eng, tmp, time.monotonic() + BOOT_TIMEOUT)
        api = AgentApi(lambda: ns.connect((GUEST_IP, 4031), timeout=60), timeout=120)
        api.console = lambda: console(tmp)
        yield api, eng
    finally:
        if eng is not None:
            eng.stop(5)
        for pid in ns.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        run("ip", "netns", "del", ns.name, check=False)


def sh(api, cmd, **fields):
    return api.exec(cmd=cmd, **fields)


def no_processes(api, pattern):
    """True when no process in the guest matches the extended regex."""
    return sh(api, f"pgrep -f '{pattern}' || true")["stdout"] == ""


def answers(api, eng):
    """The agent answers /health and runs a command; the server's pid (a new one
    would mean the supervisor restarted a killed server)."""
    assert eng.alive(), tail(api.console())
    status, health = api.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert sh(api, "echo alive")["stdout"] == "alive\n"
    return health["pid"]


def test_execs_run_in_cgroups_and_the_agent_is_protected(guest):
    api, eng = guest
    r = sh(api, "cat /proc/self/cgroup; cat /proc/self/oom_score_adj; cat /proc/1/oom_score_adj; "
                "cat /proc/1/cgroup; cat /sys/fs/cgroup/cbox-exec/$CBOX_EXEC_ID/pids.max", tag="where")
    lines = r["stdout"].split()
    assert lines[0] == f"0::/cbox-exec/{r['execId']}", r
    assert lines[1:4] == ["500", "-1000", "0::/cbox-agent"], r
    assert lines[4] == "1024", "the default pidsLimit"
    assert (r["killScope"], r["limitsApplied"], r["tag"]) == ("cgroup", True, "where")
    r = sh(api, "cat /sys/fs/cgroup/cbox-exec/$CBOX_EXEC_ID/memory.max /sys/fs/cgroup/cbox-exec/$CBOX_EXEC_ID/pids.max",
           memoryLimitMb=48, pidsLimit=20)
    assert r["stdout"].split() == [str(48 << 20), "20"], r
    assert sh(api, "id -un; cat /proc/self/cgroup", user="nobody")["stdout"].split()[0] == "nobody"
    leaves = sh(api, "ls /sys/fs/cgroup/cbox-exec")["stdout"].split()
    assert r["execId"] not in leaves, "a finished exec's cgroup is removed"


def test_commands_behind_the_cgroup_handshake(guest):
    """The line the agent writes before the command runs is not the command's input:
    stdin data arrives whole, no stdin is /dev/null, argv and exit codes are as elsewhere."""
    api, eng = guest
    assert sh(api, "cat", stdin="hello\nworld")["stdout"] == "hello\nworld"
    assert sh(api, "cat", timeout=20)["stdout"] == ""
    big = "x" * (1 << 20)
    assert sh(api, "wc -c", stdin=big)["stdout"].strip() == str(1 << 20)
    r = api.exec(argv=["printf", "%s|", "a b", "$HOME"])
    assert (r["stdout"], r["exitCode"]) == ("a b|$HOME|", 0)
    r = sh(api, "echo out; echo err >&2; exit 3")
    assert (r["exitCode"], r["stdout"], r["stderr"], r["error"]) == (3, "out\n", "err\n", "exit status 3")
    r = sh(api, "kill -9 $$")
    assert (r["signal"], r["signalName"]) == (9, "SIGKILL")
    assert api.request("POST", "/exec", {"argv": ["no-such-program"]})[0] == 400


def test_setsid_and_double_fork_escapes_are_killed(guest):
    """Timeout and DELETE end every process of the exec (cgroup.kill), also those
    that left the process group with setsid or by a double fork."""
    api, eng = guest
    t0 = time.monotonic()
    r = sh(api, "setsid sleep 1001 & (sleep 1002 &) ; sleep 1003", timeout=2)
    assert r["timedOut"] is True and r["killScope"] == "cgroup" and r["signal"] == 9, r
    assert time.monotonic() - t0 < 30
    assert wait_for(lambda: no_processes(api, "^sleep 100[123]"), 10, interval=0.5)
    exec_id = api.exec(cmd="setsid sleep 1004 & (setsid sleep 1005 &); sleep 1006", blocking=False)["execId"]
    wait_for(lambda: sh(api, "pgrep -f '^sleep 100[456]' | wc -l")["stdout"].strip() == "3", 20, interval=0.3)
    status, r = api.request("DELETE", f"/exec/{exec_id}")
    assert status == 200 and r["signal"] == 9 and r["killScope"] == "cgroup", r
    assert wait_for(lambda: no_processes(api, "^sleep 100[456]"), 10, interval=0.5)


def test_memory_hog_is_oom_killed_and_the_agent_answers(guest):
    api, eng = guest
    server = answers(api, eng)
    hog = "python3 -c \"x = b'a' * (400 << 20); print(len(x))\""
    r = sh(api, hog, memoryLimitMb=64, timeout=120)
    assert r["oomKilled"] is True and (r["signal"], r["exitCode"]) in ((9, None), (None, 137)), r
    assert r["stdout"] == "", r
    assert answers(api, eng) == server
    # no limit given: all execs together stay below the agent's reserve
    r = sh(api, "python3 -c \"x = [b'a' * (64 << 20) for _ in range(64)]\"", timeout=180)
    assert r["oomKilled"] is True, r
    assert answers(api, eng) == server
    assert sh(api, "true")["oomKilled"] is False


@pytest.mark.parametrize("limit", [40, None], ids=["pidsLimit", "default-limit"])
def test_fork_bomb_leaves_the_agent_and_other_execs_answering(guest, limit):
    """A fork bomb at its pids limit (its own, or the default for every exec):
    the agent answers, runs and streams other commands, and DELETE ends it."""
    api, eng = guest
    fields = {"pidsLimit": limit} if limit else {}
    server = answers(api, eng)
    bomb = api.exec(cmd="f() { f | f & }; f; sleep 1000", blocking=False, timeout=300, tag="bomb", **fields)["execId"]
    leaf = f"/sys/fs/cgroup/cbox-exec/{bomb}"

    def at_limit():
        current, events = sh(api, f"cat {leaf}/pids.current; grep max {leaf}/pids.events")["stdout"].splitlines()
        return int(events.split()[1]) > 0 and current

    current = wait_for(at_limit, 120, interval=1, what="the bomb to hit its pids limit")
    t0 = time.monotonic()
    assert answers(api, eng) == server
    other = api.exec(cmd="echo other", blocking=False)["execId"]
    events = api.events(other, since=0, timeout=120)
    assert joined(events, "stdout") == b"other\n"
    print(f"\nfork bomb at its limit ({current} pids): health + 2 execs in {time.monotonic() - t0:.2f}s")
    status, r = api.request("DELETE", "/exec/bomb", timeout=120)
    assert status == 200 and r["killScope"] == "cgroup" and r["running"] is False, r
    assert wait_for(lambda: sh(api, "ls /sys/fs/cgroup/cbox-exec")["stdout"].split().count(bomb) == 0,
                    90, interval=0.5, what="the bomb's cgroup to be removed")   # TCG on a busy host: generous
    assert answers(api, eng) == server


def test_stream_stdin_signal_and_tags_in_the_guest(guest):
    api, eng = guest
    exec_id = api.exec(cmd="while read -r l; do echo got:$l; done; echo eof", stdin="pipe", tag="cat",
                       blocking=False)["execId"]
    status, r = api.request("POST", "/exec", {"tag": "cat", "cmd": "true"})
    assert status == 409 and "cat" in r["error"]
    with api.stream("cat", since=0) as s:
        events = iter(s)
        assert next(events)["type"] == "start"
        assert api.request("POST", "/exec/cat/stdin", {"data": "a\n"}) == (200, {"written": 2})
        assert next(events)["data"] == "got:a\n"
    assert api.request("POST", "/exec/cat/stdin", {"data": "b\n", "eof": True}) == (200, {"written": 2})
    replay = api.events(exec_id, since=1)
    check_sequence(replay, first=1)
    assert joined(replay, "stdout") == b"got:a\ngot:b\neof\n" and replay[-1]["exitCode"] == 0
    status, r = api.request("POST", f"/exec/{exec_id}/stdin", {"data": "x"})
    assert status == 409
    with api.stream(exec_id, since=len(replay) + 5) as s:
        assert s.status == 400 and "beyond the last event" in s.error["error"]

    trap = api.exec(cmd="trap 'echo term; exit 9' TERM; echo ready; while :; do sleep 0.1; done",
                    blocking=False)["execId"]
    with api.stream(trap, since=1) as s:          # the trap is set once "ready" is out
        assert next(iter(s))["data"] == "ready\n"
    assert api.request("POST", f"/exec/{trap}/signal", {"signal": "NOPE"})[0] == 400
    assert api.request("POST", f"/exec/{trap}/signal", {"signal": "TERM"}) == (200, {"execId": trap, "signal": 15})
    events = api.events(trap, since=0)
    assert events[-1]["exitCode"] == 9 and joined(events, "stdout") == b"ready\nterm\n"
    plain = api.exec(cmd="sleep 30", blocking=False)["execId"]
    status, r = api.request("POST", f"/exec/{plain}/stdin", {"data": "x"})
    assert status == 409 and "no stdin pipe" in r["error"]
    status, r = api.request("DELETE", "/exec")
    assert status == 200 and plain in r["killed"]
    listing = api.request("GET", "/exec")[1]["execs"]
    assert {e["execId"]: e["running"] for e in listing}[plain] is False

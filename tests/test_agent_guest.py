"""The guest agent's newer exec paths in a real guest (QEMU engine): the agent as PID 1,
with cgroups, so every command waits for its cgroup before user code runs: a "cmd" in the
shell that runs it, a terminal's command before it opens its terminal.

The VM is test_exec_v2_guest.py's (this checkout's guest_agent.py written into a copy
of out/rootfs.ext4), booted once for this module; everything skips with a reason when
the images, QEMU or debugfs are missing.
"""
import time

from execstream import check_sequence, joined
from procutil import wait_for
from test_exec_v2_guest import guest, no_processes, sh  # noqa: F401 (guest is a fixture)


def screen(api, exec_id):
    return api.request("GET", f"/exec/{exec_id}")[1]["stdout"]


def test_tty_in_the_guest(guest):  # noqa: F811
    api, eng = guest
    probe = ('stty size; echo "$TERM"; : </dev/tty && echo controlling; cat /proc/self/cgroup; '
             'read -r line; echo "got $line"')
    exec_id = api.exec(cmd=probe, tty=True, cols=120, rows=40, blocking=False)["execId"]
    wait_for(lambda: "cbox-exec" in screen(api, exec_id), 60, interval=0.2, what="the probe")
    assert api.request("POST", f"/exec/{exec_id}/stdin", {"data": "typed\n"}) == (200, {"written": 6})
    events = api.events(exec_id, since=0)
    check_sequence(events)
    lines = joined(events, "stdout").decode().split("\r\n")
    # the "go" line of the cgroup handshake went to its own pipe: never typed into the terminal
    assert lines[:6] == ["40 120", "xterm-256color", "controlling", f"0::/cbox-exec/{exec_id}", "typed", "got typed"], lines
    assert (events[-1]["exitCode"], events[-1]["killScope"], events[-1]["tty"]) == (0, "cgroup", True)

    # Ctrl-C, resize (SIGWINCH), timeout and kill reach the command and what it started
    exec_id = api.exec(cmd="trap 'stty size' WINCH; echo ready; while :; do sleep 0.1; done", tty=True,
                       blocking=False)["execId"]
    wait_for(lambda: "ready" in screen(api, exec_id), 60, interval=0.2, what="ready")
    assert api.request("POST", f"/exec/{exec_id}/resize", {"cols": 90, "rows": 30})[0] == 200
    wait_for(lambda: "30 90" in screen(api, exec_id), 30, interval=0.2, what="SIGWINCH")
    api.request("POST", f"/exec/{exec_id}/stdin", {"data": "\x03"})
    r = wait_for(lambda: (lambda r: None if r["running"] else r)(api.request("GET", f"/exec/{exec_id}")[1]), 30)
    assert r["signal"] == 2, r
    t0 = time.monotonic()
    r = sh(api, "setsid sleep 1011 & sleep 1012", tty=True, timeout=2)
    assert (r["timedOut"], r["killScope"]) == (True, "cgroup") and time.monotonic() - t0 < 60, r
    assert wait_for(lambda: no_processes(api, "^sleep 101[12]"), 20, interval=0.5)


def test_a_cmd_waits_for_its_cgroup_in_its_own_shell(guest):  # noqa: F811
    """A "cmd" is one sh that first waits for the agent's "go" line: nothing of the
    handshake shows to the command (no variable, no stdin line, line numbers and $0 as
    sh -c's), and it is in its cgroup from its first line on."""
    api, eng = guest
    r = sh(api, 'echo "[$0] [$#] [${CBOX_GO-unset}]"; cat /proc/self/cgroup; '
                'ps -o args= -p $$; no-such-command-xyz')
    lines = r["stdout"].splitlines()
    assert lines[:2] == ["[/bin/sh] [0] [unset]", f"0::/cbox-exec/{r['execId']}"], r
    assert lines[2].startswith("/bin/sh -c read -r CBOX_GO") and lines[2].count("/bin/sh") == 1, r
    assert r["stderr"] == "/bin/sh: 1: no-such-command-xyz: not found\n" and r["exitCode"] == 127, r
    assert sh(api, "cat; echo; cat <&0", stdin="line one\nline two")["stdout"] == "line one\nline two\n"
    assert sh(api, "read -r x; echo \"[$x]\"")["stdout"] == "[]\n"          # no stdin: /dev/null
    assert sh(api, "exit 7")["exitCode"] == 7

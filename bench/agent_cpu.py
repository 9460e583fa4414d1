#!/usr/bin/env python3
"""The guest agent's own cost per exec of `true`, three ways that do not depend on the load
of a shared machine the way bench.py's CPU split does (issue 23).

  python3 bench/agent_cpu.py instructions [AGENT.py ...]
      Instructions (callgrind's Ir) the agent's exec path runs per blocking exec of
      `true` (the body cbox.py sends), in-process: the HTTP request parsed, routed, the command spawned and
      waited for, the answer encoded (to a socket stand-in). The difference of two
      runs of 50 and 250 execs, so start-up is left out; the shell the agent starts is
      not counted (it is the same for any agent). Needs valgrind. Repeatable to ~1%.
  python3 bench/agent_cpu.py switches [--execs N] [AGENT.py ...]
      Context switches of the agent's process per blocking exec of `true` (the same
      in-process exec path; getrusage: voluntary ones, each a sleep and a wakeup, and
      involuntary ones), over N execs (default 2000), 3 rounds, the agents alternating:
      how often the exec path sleeps, which costs CPU in a VM whatever the load; the
      shell's own are not counted. Load shifts them somewhat: compare agents, not runs.
  python3 bench/agent_cpu.py guest [--execs N] [AGENT.py ...]
      CPU per exec of `true` inside a real guest under the QEMU engine (cgroups, as in
      a VM): the agent server's utime + stime + the same of the commands it reaped,
      from its /proc/<pid>/stat in the guest, over N blocking execs, 3 rounds. TCG
      emulates every instruction, so the figures are emulated time (ms, noisy): compare
      agents, not absolute values. Needs root, the out/ images, QEMU and debugfs.

AGENT.py defaults to this checkout's guest_agent.py; give several to compare (a file
named guest_agent.py in another directory, e.g. `git show REV:guest_agent.py`).
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = (50, 250)


def exec_path_in_process(agent, count):
    """Run `count` blocking execs of `true` through the agent's HTTP parser, router and
    answer, in this process (the child of `instructions`, under callgrind)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("agent_under_test", agent)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.proc_shows_our_pids = lambda: False   # as under the stand-in: no oom_score_adj write
    config = module.GuestConfig({"vm": "bench"})
    server = module.AgentServer(None, config, module.command_environment(config, "/tmp", False),
                                time.monotonic(), None)
    # what cbox.py sends the agent for {"cmd": "true"} with the default config (exec_parts)
    body = json.dumps({"cmd": "true", "timeout": 300.0, "env": {}, "blocking": True, "maxOutput": 4 << 20}).encode()
    request = (b"POST /exec HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    class Socket:
        pending = b""

        def recv(self, size):
            data, self.pending = self.pending, b""
            return data

        def sendall(self, data):
            pass

    sock = Socket()
    conn = module.HttpConnection(sock)
    for _ in range(20 + count):
        sock.pending = request
        status, obj, headers = server.route(conn.read_request())
        conn.send_json(status, obj)


def instructions(agents):
    python = os.path.realpath(sys.executable)    # valgrind must see the interpreter, not a shim
    for agent in agents:
        counts = []
        with tempfile.TemporaryDirectory() as tmp:
            for count in RUNS:
                out = os.path.join(tmp, f"callgrind.{count}")
                subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python,
                                __file__, "run-execs", str(agent), str(count)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open(out) as f:
                    counts.append(next(int(line.split()[1]) for line in f if line.startswith("summary:")))
        print(f"{agent}: {(counts[1] - counts[0]) / (RUNS[1] - RUNS[0]):,.0f} instructions per exec")


def switches(agents, execs):
    rounds = {agent: [] for agent in agents}
    for _ in range(3):
        for agent in agents:
            out = subprocess.run([sys.executable, __file__, "count-switches", str(agent), str(execs)],
                                 check=True, capture_output=True, text=True).stdout
            rounds[agent].append(json.loads(out))
    for agent, runs in rounds.items():
        print(f"{agent}: context switches per exec (voluntary + involuntary): " +
              " ".join(f"{v:.2f}+{i:.2f}" for v, i in runs))


def count_switches(agent, execs):
    """The process's context switches per exec over `execs` execs in process (after 20)."""
    import resource
    exec_path_in_process(agent, 0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    exec_path_in_process(agent, execs - 20)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps([(after.ru_nvcsw - before.ru_nvcsw) / execs, (after.ru_nivcsw - before.ru_nivcsw) / execs]))


def guest(agents, execs):
    sys.path.insert(0, str(REPO / "tests"))
    from test_exec_v2_guest import booted_guest
    for agent in agents:
        with tempfile.TemporaryDirectory(prefix="cbox-agent-cpu") as tmp, \
                booted_guest(pathlib.Path(tmp), agent) as (api, _):
            probe = f"cat /proc/{api.request('GET', '/health')[1]['pid']}/stat; getconf CLK_TCK"

            def cpu_seconds():
                stat, ticks = api.exec(cmd=probe)["stdout"].splitlines()[:2]
                return sum(int(x) for x in stat.rsplit(")", 1)[1].split()[11:15]) / int(ticks)

            for _ in range(20):
                api.exec(cmd="true")
            rounds = []
            for _ in range(3):
                before = cpu_seconds()
                for _ in range(execs):
                    api.exec(cmd="true")
                rounds.append((cpu_seconds() - before) / (execs + 1) * 1000)   # + the probe
            print(f"{agent}: guest CPU ms per exec (emulated): " + " ".join(f"{x:.1f}" for x in rounds))


def main(args):
    if args[:1] == ["run-execs"]:
        exec_path_in_process(args[1], int(args[2]))
        return 0
    if args[:1] == ["count-switches"]:
        count_switches(args[1], int(args[2]))
        return 0
    if not args or args[0] not in ("instructions", "switches", "guest"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    mode, rest, execs = args[0], args[1:], 2000 if args[0] == "switches" else 100
    if rest[:1] == ["--execs"]:
        execs, rest = int(rest[1]), rest[2:]
    agents = [os.path.abspath(a) for a in rest] or [str(REPO / "guest_agent.py")]
    if mode == "instructions":
        instructions(agents)
    elif mode == "switches":
        switches(agents, execs)
    else:
        guest(agents, execs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

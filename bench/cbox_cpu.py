#!/usr/bin/env python3
"""cbox.py's own cost per blocking exec of `true` in instructions (callgrind's Ir), which
does not depend on the load of a shared machine the way bench.py's CPU split does (issue 23).

  python3 bench/cbox_cpu.py [CBOX.py ...]

Runs bench.py's CPU_PROBE (one process: a cbox.py's REST server on loopback with a VM,
driven over one keep-alive connection by a client in the same process) under callgrind,
for 200 and 1000 execs after the probe's warm-up, and prints the difference per exec:
start-up and warm-up are left out; the probe's client is counted (the same for every
cbox.py). Two figures per cbox.py:
  in-process   the VM's agent hands back a canned exec result in-process (as bench.py's
               monitoring section runs the probe): the REST side only
  via agent    cbox.py's own agent client (GuestAgent: HTTP to the agent) to a canned
               agent on loopback, a process of its own that callgrind does not count:
               all of cbox.py's exec path, as in a VM
Needs valgrind. Repeatable to ~1%. CBOX.py defaults to this checkout's cbox.py; give
several to compare (e.g. `git show main:cbox.py > /tmp/old.py`).
"""
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench import CPU_PROBE, EVENTS_RECEIVER  # noqa: E402

RUNS = (200, 1000)
PROBE_CONFIG = 'hostservices:\n  restserver:\n    host: "127.0.0.1"\n'    # keys every cbox.py knows

# A guest agent's answer to every request: the result of `true` as guest_agent.py writes it
# (its head: guest_agent._response_head), from bench.py's lean HTTP server (EVENTS_RECEIVER)
BODY = (b'{"execId":"e1","running":false,"output":"","stdout":"","stderr":"","exitCode":0,"signal":null,'
        b'"error":"","timedOut":false,"truncated":false,"durationMs":1.2}')
AGENT_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def instructions(cbox, tmp, agent_port=None):
    """Instructions per exec of the probe serving with `cbox` (a path); with `agent_port`,
    through GuestAgent to the canned agent listening there."""
    python = os.path.realpath(sys.executable)    # valgrind must see the interpreter, not a shim
    config = os.path.join(tmp, "probe-config.yaml")
    with open(config, "w") as f:
        f.write(PROBE_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "CPU_PROBE_AGENT"}
    if agent_port:
        env["CPU_PROBE_AGENT"] = str(agent_port)
    counts = []
    for count in RUNS:
        out = os.path.join(tmp, f"callgrind.{count}")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, "-c", CPU_PROBE,
                        config, "1", "0", cbox], env={**env, "CPU_PROBE_EXECS": str(count)},
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            counts.append(next(int(line.split()[1]) for line in f if line.startswith("summary:")))
    return (counts[1] - counts[0]) / (RUNS[1] - RUNS[0])


def main(args):
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    agent = subprocess.Popen([sys.executable, "-c", EVENTS_RECEIVER, AGENT_ANSWER.decode("latin-1")],
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(agent.stdout.readline())
        for cbox in [os.path.abspath(a) for a in args] or [str(REPO / "cbox.py")]:
            with tempfile.TemporaryDirectory(prefix="cbox-cpu") as tmp:
                print(f"{cbox}: {instructions(cbox, tmp):,.0f} instructions per exec in-process, "
                      f"{instructions(cbox, tmp, port):,.0f} via agent", flush=True)
    finally:
        agent.kill()
        agent.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""What one cbox.py event loop can do a second, by kind of guest-caused work.

    python3 bench/loop_capacity.py [--seconds 5]

Runs cbox.py's own code in this process (CallbackBridge, GuestAgent + AgentEvents +
EventRelay, BoundedReader) with every budget out of the way (the host-wide fair share
off, per-VM rates huge) against peers in processes of their own (a flooding guest, a
fake agent streaming events, `yes`, a client reading), and prints, per kind, the work
done per second of this process's CPU: the loop's capacity. The README's "Fair
share" paragraph derives FairShare.ITEM and FairShare.CALLBACK from these
figures, and cbox.py's YARDSTICK_UNITS (what measure_unit_seconds divides by) is fitted
to them: it prints the fit for this host. Loopback and Unix sockets only. Stdlib only.
"""
import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cbox  # noqa: E402

FLOODER = r"""
import socket, sys, threading, time
lines = b'{"method": "tiny", "params": {"i": 1}}\n' * 1000     # as tests/hostile.py's Flood
def flood(path):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    threading.Thread(target=lambda: [None for _ in iter(lambda: s.recv(1 << 16), b"")], daemon=True).start()
    try:
        while True:
            s.sendall(lines)
    except OSError:
        pass
for path in sys.argv[1:]:
    for _ in range(4):
        threading.Thread(target=flood, args=(path,), daemon=True).start()
time.sleep(3600)
"""

FAKE_AGENT = r"""
import json, socket, sys
size = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.recv(65536)
conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")
data = json.dumps("y\n" * (size // 2))[1:-1]
seq = 0
try:
    while True:
        out = []
        for _ in range(max(1, 65536 // (size + 40))):
            out.append('{"seq":%d,"type":"stdout","data":"%s"}\n' % (seq, data))
            seq += 1
        conn.sendall("".join(out).encode())
except OSError:
    pass
"""

SINK = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while s.recv(1 << 20):
    pass
"""


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class FakeVM:
    vmName = "capacity"
    callbackUrl = ""
    callbackMethods = None

    def touch(self):
        pass


async def measure(seconds, count):
    """(what count() says, CPU seconds) over `seconds` of wall time."""
    c0, n0 = cpu(), count()
    await asyncio.sleep(seconds)
    return count() - n0, cpu() - c0


async def callbacks(seconds, vms):
    """`vms` VMs' callback sockets (default budgets: 500 callbacks a second each), each
    flooded on 4 connections: lines handled (callbacks and refusals) and CPU."""
    cfg = cbox.load_config(REPO / "config.yaml")
    tmp = Path(tempfile.mkdtemp())
    bridges = [cbox.CallbackBridge(cfg, FakeVM()) for _ in range(vms)]
    for i, bridge in enumerate(bridges):
        bridge.listen(tmp / f"cb{i}.sock")
    peer = subprocess.Popen([sys.executable, "-c", FLOODER, *[str(tmp / f"cb{i}.sock") for i in range(vms)]])
    await asyncio.sleep(0.5)
    lines = lambda: sum(b.counters["callbacks"] + b.counters["refused_rate"] for b in bridges)  # noqa: E731
    n, used = await measure(seconds, lines)
    peer.kill()
    for bridge in bridges:
        bridge.close()
    return n, used


async def stream(seconds, event_bytes):
    agent_proc = subprocess.Popen([sys.executable, "-c", FAKE_AGENT, str(event_bytes)], stdout=subprocess.PIPE)
    port = int(agent_proc.stdout.readline())
    agent = cbox.GuestAgent("capacity", "127.0.0.1", port, 1 << 20)
    agent.stream_budget.events = cbox.TokenBucket(1e12, 1e12)
    agent.stream_budget.bytes = cbox.TokenBucket(1e15, 1e15)
    events = await agent.events("e", 0, 30.0)
    a, b = socket.socketpair()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(b.fileno())], pass_fds=(b.fileno(),))
    b.close()
    _, writer = await asyncio.open_connection(sock=a)
    relay = cbox.EventRelay(events, sse=False)
    task = asyncio.ensure_future(relay.send(writer, True, 30.0))
    await asyncio.sleep(0.5)
    n_events, used = await measure(seconds, lambda: events.next_seq)
    task.cancel()
    writer.transport.abort()
    agent_proc.kill()
    sink.kill()
    line = len('{"seq":100000,"type":"stdout","data":""}\n') + len(json.dumps("y\n" * (event_bytes // 2))) - 2
    return n_events, n_events * line, used


class CountingReader(cbox.BoundedReader):
    """A console reader writing to a console log on disk, as SerialConsole does."""

    def __init__(self, fd, vm_dir):
        self.bytes = 0
        self.console = cbox.ConsoleLog(vm_dir, 1024 * 1024)
        super().__init__(fd, 1e15, 1e15)

    def received(self, data):
        self.bytes += len(data)
        self.console.append(data)


async def console(seconds):
    r, w = os.pipe()
    os.set_blocking(r, False)
    peer = subprocess.Popen(["yes"], stdout=w)
    os.close(w)
    reader = CountingReader(r, Path(tempfile.mkdtemp()))
    await asyncio.sleep(0.5)
    n, used = await measure(seconds, lambda: reader.bytes)
    peer.kill()
    reader.close()
    return n, used


async def yardstick_fit(line_s):
    """cbox.py's YARDSTICK_UNITS from this host's figures: a unit is what the loop spends on
    a flooding guest's callback line (`line_s`, 10 VMs) beyond its parse, over the units
    the line is charged besides its parse (FairShare.CALLBACK and its bytes)."""
    line = cbox.YARDSTICK_LINE
    parse_s = min(cbox.cpu_timed(cbox.parse_callback_line, line, "capacity")[1] for _ in range(2000))
    reply = cbox.no_callback_url_line(FakeVM.vmName)
    unit_s = (line_s - parse_s) / (cbox.FairShare.CALLBACK + len(line) + len(reply))
    measured = min([await asyncio.to_thread(cbox.measure_unit_seconds) for _ in range(3)])  # runs its own loop
    yardstick_s = measured * cbox.YARDSTICK_UNITS
    print(f"  a unit of the loop: {unit_s * 1e9:.1f} ns (callback lines, 10 VMs, beyond their parse of "
          f"{parse_s * 1e6:.1f} us); the yardstick: {yardstick_s * 1e6:.1f} us a line, so YARDSTICK_UNITS fits "
          f"{yardstick_s / unit_s:.0f} here (cbox.py has {cbox.YARDSTICK_UNITS}: a unit {measured * 1e9:.1f} ns)")


async def main(seconds):
    cbox.GUEST_WORK.configure(0)
    print(f"one cbox.py loop, {seconds:g} s per kind, per CPU second of the loop (load: {os.getloadavg()[0]:.2f})")
    for vms in (1, 10):
        n, used = await callbacks(seconds, vms)
        print(f"  callback lines, {vms:2d} VMs flooding: {n / used:8.0f} /s   {used / n * 1e6:6.1f} us each "
              f"(loop {used / seconds:.0%} busy)")
    await yardstick_fit(used / n)
    for size in (64, 256 * 1024):
        events, nbytes, used = await stream(seconds, size)
        print(f"  stream events of {size:>6} B:  {events / used:10.0f} /s   {nbytes / used / 1e6:7.1f} MB/s "
              f"  {used / nbytes * 1e9:6.2f} ns/B  {used / events * 1e6:7.1f} us/event")
    n, used = await console(seconds)
    print(f"  console bytes (to its log on disk): {n / used / 1e6:8.1f} MB/s   {used / n * 1e9:6.2f} ns/B")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main(parser.parse_args().seconds))

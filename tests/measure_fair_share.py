"""Figures, not a test (no assertion on speed): a healthy VM's exec and health latency and
cbox.py's loop lag, idle and while guests attack, for several guest_work_cpu_share (0 =
no fair share). Under the stand-in, unpinned; the README's "Fair share" figures:

    python3 -m pytest -q -s tests/measure_fair_share.py

Attacks: flood10, 10 VMs flooding callbacks within their own budget (tests/hostile.py's
Flood, a process each); yes4, one VM streaming `yes` to 4 readers (restarted every 5 s).
bench/bench.py --only hostile measures the attacks pinned, with more VMs.
"""
import statistics
import threading
import time

import pytest

import hostile
from procutil import proc_cpu_seconds
from test_fair import host  # noqa: F401  (the fixture)
import test_fair


def latencies(fn, n=40):
    """(p50, p99) of fn() in ms."""
    ts = []
    for _ in range(n):
        t0 = time.monotonic()
        fn()
        ts.append((time.monotonic() - t0) * 1000)
    ts.sort()
    return statistics.median(ts), ts[int(len(ts) * 0.99) - 1]


def probe(h, label, idle=None):
    c0, t0 = proc_cpu_seconds(h.pid), time.monotonic()
    exec_ms = latencies(lambda: h.api.exec("good", "true", timeout=30))
    health_ms = latencies(lambda: h.api.get("/v1/health", timeout=30))
    cpu = (proc_cpu_seconds(h.pid) - c0) / (time.monotonic() - t0)
    line = (f"  {label:13s} exec p50 {exec_ms[0]:6.1f} p99 {exec_ms[1]:6.1f} ms | health p50 {health_ms[0]:6.1f} "
            f"p99 {health_ms[1]:6.1f} ms | cbox.py CPU {cpu:4.0%} | loopLagMs {h.health()['loopLagMs']}")
    if idle:
        line += f" | exec p50 x{exec_ms[0] / idle[0][0]:.1f}, health p50 x{health_ms[0] / idle[1][0]:.1f}"
    print(line, flush=True)
    return exec_ms, health_ms


def stream_yes(h, vm, stop):
    while not stop.is_set():
        sock = h.api.ns.connect(("127.0.0.1", h.server.settings["port"]), 30)
        body = b'{"cmd": "timeout 5 yes", "stream": true, "timeout": 30}'
        sock.sendall(b"POST /v1/vms/%s/exec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (vm.encode(), len(body)) + body)
        while not stop.is_set() and sock.recv(1 << 20):
            pass
        sock.close()


@pytest.mark.parametrize("cpu_share", [0, 0.05, 0.1, 0.2])
@pytest.mark.parametrize("attack", ["flood10", "yes4"])
def test_measure(host, attack, cpu_share):   # noqa: F811
    h = host(10 if attack == "flood10" else 1, guest_work_units_per_s=0, guest_work_cpu_share=cpu_share)
    print(f"\n== {attack}, guest_work_cpu_share={cpu_share} ({h.metric('cbox_guest_work_units_per_second'):.0f} "
          f"units a second)", flush=True)
    idle = probe(h, "idle")
    stop, attacks = threading.Event(), []
    if attack == "flood10":
        attacks = [hostile.Remote(hostile.Flood, h.socket_of(vm)) for vm in h.bad]
        for a in attacks:
            a.start()
    else:
        for _ in range(4):
            threading.Thread(target=stream_yes, args=(h, h.bad[0]["vmName"], stop), daemon=True).start()
    time.sleep(2)
    try:
        probe(h, "under attack", idle)
    finally:
        stop.set()
        for a in attacks:
            a.stop()

#!/usr/bin/env python3
"""Why cbox.py's busy VMs yield in a cpu.idle subtree of their own (VmCpuGroups), and what
judging the VMs' CPU demand costs: prints a table.

1. A quiet task runs `sh -c true` every 100 ms beside 39 cgroups of 4 spinning tasks each
   (the bench's busy vCPUs, unpinned), in four layouts: no spinners (the quiet machine),
   the spinners' groups plain siblings of the quiet task's, the same with cpu.idle on each
   spinning group, and the spinning groups in a subtree of their own with cpu.idle.
2. VmCpuGroups.judge_all over 40 groups of 3 sleeping tasks each (one nested group per
   VM, as the stand-in's guest): its CPU time, the median of 10 rounds.

Needs root and a cgroup v1 or v2 hierarchy with the cpu controller (cpu.idle: Linux 5.15+).
Usage: sudo python3 bench/cpu_groups.py [--spinners 39] [--samples 50]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cbox  # noqa: E402

LAYOUTS = {
    "quiet machine (no spinners)": None,
    "spinning groups beside the quiet one": ("{i}", None),
    "cpu.idle on each spinning group, beside the quiet one": ("{i}", "{i}"),
    "spinning groups in a cpu.idle subtree of their own": ("busy/{i}", "busy"),
}


def cpu_point():
    point, version = cbox.mounted_cpu_hierarchy()
    if point is None:
        sys.exit(f"no cgroup hierarchy with the cpu controller: {version}")
    return point, version


def make(group, version):
    group.mkdir(parents=True, exist_ok=True)
    if version == 2:
        cbox.VmCpuGroups.enable_cpu_below(group.parent)
    return group


def quiet_latency(top, version, layout, spinners, samples):
    """Median and p90 ms of `sh -c true` every 100 ms, run from a cgroup `quiet` below top."""
    procs = []
    try:
        if layout:
            where, idle = layout
            for i in range(spinners):
                group = make(top / where.format(i=f"a{i}"), version)
                if idle:
                    (top / idle.format(i=f"a{i}") / "cpu.idle").write_text("1")
                for _ in range(4):
                    p = subprocess.Popen(["sh", "-c", "while :; do :; done"])
                    procs.append(p)
                    (group / "cgroup.procs").write_text(str(p.pid))
        (make(top / "quiet", version) / "cgroup.procs").write_text(str(os.getpid()))
        time.sleep(1)
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            subprocess.run(["sh", "-c", "true"], check=True)
            times.append((time.perf_counter() - t) * 1000)
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        (top.parent / "cgroup.procs").write_text(str(os.getpid()))
        time.sleep(0.3)
        cbox.remove_empty_cgroups(top)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9) - 1]


def judge_cost(top, version, vms=40, rounds=10):
    """CPU ms of one VmCpuGroups.judge_all over `vms` groups of 3 sleeping tasks."""
    procs, demands = [], []
    try:
        for i in range(vms):
            group = make(top / f"vmm-{i}", version)
            nested = make(group / "guest", version) if version == 1 else group
            for where in (group, nested, nested):
                p = subprocess.Popen(["sleep", "100"])
                procs.append(p)
                (where / "cgroup.procs").write_text(str(p.pid))
            demand = cbox.VmCpuDemand(group, 1)
            demand.since = 0                     # past its boot: judged
            demands.append(demand)
        groups = cbox.VmCpuGroups()
        groups.parent, groups.version = top, version
        times = []
        for _ in range(rounds):
            t = time.thread_time()
            groups.judge_all(demands)
            times.append((time.thread_time() - t) * 1000)
        return statistics.median(times)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        time.sleep(0.2)
        cbox.remove_empty_cgroups(top)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spinners", type=int, default=39, help="spinning groups (4 tasks each)")
    p.add_argument("--samples", type=int, default=50, help="quiet commands per layout")
    args = p.parse_args()
    point, version = cpu_point()
    top = point / f"cbox-bench-{os.getpid()}"
    make(top, version)
    try:
        print(f"cgroup v{version} at {point}, {len(os.sched_getaffinity(0))} CPUs, "
              f"{args.spinners} groups of 4 spinning tasks\n")
        print("| layout | quiet `sh -c true` p50 | p90 |\n|---|---|---|")
        for name, layout in LAYOUTS.items():
            p50, p90 = quiet_latency(top, version, layout, args.spinners, args.samples)
            print(f"| {name} | {p50:.2f} ms | {p90:.2f} ms |", flush=True)
        print(f"\nVmCpuGroups.judge_all over 40 VMs (3 tasks each, one nested group): "
              f"{judge_cost(top, version):.2f} ms of CPU a round (one a second)")
    finally:
        cbox.remove_empty_cgroups(top, keep_top=False)


if __name__ == "__main__":
    main()

"""The VMs' cpu cgroups (cbox.py VmCpuGroups): each hypervisor in a group of its own,
weighted by its vCPUs, all below one parent per state_dir that weighs as a thread a host CPU, so
busy guests cannot starve cbox.py (README "Security model")."""
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

import fake_chv
from procutil import wait_for


def hierarchy_or_skip():
    point, version = fake_chv.cpu_hierarchy()
    if point is None:
        pytest.skip(f"no cgroup hierarchy with the cpu controller here ({version})")
    return point, version


def parent_of(point, server):
    return point / ("cbox-" + hashlib.sha256(str(server.state_dir.resolve()).encode()).hexdigest()[:12])


def vmm_pid(server, name):
    return json.loads((server.state_dir / "vms" / f"{name}.json").read_text())["pid"]


def cpu_cgroup(pid, version):
    """The cpu cgroup of a process, as /proc/<pid>/cgroup names it."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if ("cpu" in names.split(",")) if version == 1 else names == "":
            return path
    raise AssertionError(f"no cpu line in /proc/{pid}/cgroup")


def weight(group, version):
    return int((group / ("cpu.shares" if version == 1 else "cpu.weight")).read_text())


def agent_pid(vm_pid):
    """The guest agent of a stand-in VM: the python3 process below its hypervisor."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                if b"guest_agent.py" in cmd and vm_pid in ancestors(int(entry)):
                    return int(entry)
            except OSError:
                continue
    raise AssertionError(f"no agent below {vm_pid}")


def ancestors(pid):
    seen = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
        seen.append(pid)
    return seen


def wait_gone(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def test_each_hypervisor_gets_a_group_weighted_by_its_vcpus_below_one_parent(cbox_factory):
    point, version = hierarchy_or_skip()
    server = cbox_factory(max_vcpus=4).start()
    api = server.api
    api.start_vm("one")
    api.start_vm("two", vcpus=2)
    parent = parent_of(point, server)
    cpus = len(os.sched_getaffinity(0))          # cbox.py inherits the test's affinity
    for group in (parent, parent / "quiet"):    # all VMs: a thread's worth a host CPU
        assert weight(group, version) == cpus * (1024 if version == 1 else 100)
    for name, vcpus in (("one", 1), ("two", 2)):
        pid = vmm_pid(server, name)
        group = parent / "quiet" / f"vmm-{pid}"
        assert cpu_cgroup(pid, version) == f"/{parent.name}/quiet/{group.name}", server.log()
        assert weight(group, version) == vcpus * (1024 if version == 1 else 100)
        # the guest's processes run where its vCPU threads would: in the hypervisor's group
        # (below it on v1; beside it on v2, whose inner groups hold no processes)
        assert cpu_cgroup(agent_pid(pid), version).startswith(f"/{parent.name}/"), cpu_cgroup(agent_pid(pid), version)
        assert api.exec(name, "echo hi")["stdout"] == "hi\n"
    one = parent / "quiet" / f"vmm-{vmm_pid(server, 'one')}"
    assert api.delete("/v1/vms/one")[0] == 200
    assert wait_gone(one), list(one.rglob("*"))
    assert api.delete("/v1/vms")[0] == 200
    server.stop()
    assert not parent.exists(), list(parent.iterdir())
    assert "VMs' cpu cgroups" in server.log() and "Traceback" not in server.log()


def test_an_adopted_vm_keeps_its_group_and_empty_ones_go_at_start(cbox_factory):
    point, version = hierarchy_or_skip()
    server = cbox_factory().start()
    server.api.start_vm("kept")
    pid = vmm_pid(server, "kept")
    parent = parent_of(point, server)
    server.stop(signal.SIGKILL)
    left = parent / "quiet" / "vmm-4194000"    # a VM's group whose hypervisor died while cbox.py was down
    (left / "cbox-standin-4194000").mkdir(parents=True)
    again = cbox_factory().start()
    assert not left.exists(), again.log()
    assert cpu_cgroup(pid, version) == f"/{parent.name}/quiet/vmm-{pid}"
    assert again.api.exec("kept", "echo still")["stdout"] == "still\n"
    assert again.api.delete("/v1/vms")[0] == 200
    assert wait_gone(parent / "quiet" / f"vmm-{pid}")
    again.stop()
    assert not parent.exists()


def test_with_vm_cpu_cgroups_false_hypervisors_run_in_cbox_pys_cgroup(cbox_factory):
    point, version = hierarchy_or_skip()
    server = cbox_factory(vm_cpu_cgroups=False).start()
    server.api.start_vm("flat")
    pid = vmm_pid(server, "flat")
    assert cpu_cgroup(pid, version) == cpu_cgroup(server.proc.pid, version)
    assert not parent_of(point, server).exists()
    assert "VMs' cpu cgroups off" in server.log() and "vm_cpu_cgroups is false" in server.log()
    assert server.api.delete("/v1/vms")[0] == 200


def test_a_busy_vm_yields_to_the_quiet_ones_until_it_is_quiet_again(cbox_factory):
    """busy_vms_yield: a VM whose vCPU ran or waited to run all of the last second (past its
    first 5 s, its boot) moves, its guest and their cpu limits with it, to the parent's
    `busy` group (cpu.idle: behind the quiet VMs, still with every CPU they leave), and back
    to `quiet` once it is quiet again; cbox_vms_busy counts them."""
    point, version = hierarchy_or_skip()
    server = cbox_factory().start()
    api = server.api
    api.start_vm("busy")
    api.start_vm("quiet")
    parent = parent_of(point, server)
    if not (parent / "busy" / "cpu.idle").exists():
        pytest.skip("this kernel's cpu cgroups have no cpu.idle (Linux 5.15+)")
    assert (parent / "busy" / "cpu.idle").read_text().strip() == "1"
    busy, quiet = vmm_pid(server, "busy"), vmm_pid(server, "quiet")
    side = lambda pid: cpu_cgroup(pid, version).split("/")[2]          # noqa: E731
    agent = agent_pid(busy)
    guest_group = cpu_cgroup(agent, version)
    api.exec("busy", "(timeout 12 sh -c 'while :; do :; done') >/dev/null 2>&1 &")
    wait_for(lambda: side(busy) == "busy", timeout=15, what="the spinning VM to yield")
    assert side(quiet) == "quiet"
    assert cpu_cgroup(agent, version) == guest_group.replace("/quiet/", "/busy/")    # its guest went with it
    if version == 1:            # the stand-in's hold on the guest's vCPUs went along too
        moved = point / guest_group.replace("/quiet/", "/busy/").lstrip("/")
        assert (moved / "cpu.cfs_quota_us").read_text().strip() == str(fake_chv.CPU_PERIOD_US)
    assert api.exec("quiet", "echo quick")["stdout"] == "quick\n"
    assert api.exec("busy", "echo slow")["stdout"] == "slow\n"     # it still runs, with what is left
    assert "\ncbox_vms_busy 1\n" in api.get("/v1/metrics")[1]
    wait_for(lambda: side(busy) == "quiet", timeout=20, what="the VM to be quiet again once its loop ended")
    wait_for(lambda: "\ncbox_vms_busy 0\n" in api.get("/v1/metrics")[1], timeout=5, what="the gauge")
    assert not (parent / "busy" / f"vmm-{busy}").exists()
    assert api.delete("/v1/vms")[0] == 200


def test_busy_vms_yield_false_leaves_a_busy_vm_where_it_is(cbox_factory):
    point, version = hierarchy_or_skip()
    server = cbox_factory(busy_vms_yield=False).start()
    server.api.start_vm("busy")
    pid = vmm_pid(server, "busy")
    server.api.exec("busy", "(timeout 9 sh -c 'while :; do :; done') >/dev/null 2>&1 &")
    time.sleep(8)                       # past its first 5 s and two readings, were they made
    assert cpu_cgroup(pid, version).split("/")[2] == "quiet"
    assert "busy_vms_yield=off" in server.log()
    assert server.api.delete("/v1/vms")[0] == 200

"""Disk admission: a start is refused (503) when state_dir's free space, times
disk_overcommit, cannot hold what the VMs' sparse stateful disks may still grow to and
the new VM's disk (README "Configuration", "Disk space")."""
import os
import re
import subprocess
import time

MiB = 1024 * 1024
DISK_MB = 16
TMPFS_MB = 64


def promised_bytes(state):
    """What the VMs' disks (state/vms/*/stateful.ext4) may still grow by, as the test sees it."""
    total = 0
    for disk in (state / "vms").glob("*/stateful.ext4"):
        st = os.stat(disk)
        total += st.st_size - st.st_blocks * 512
    return total


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def metric(api, name):
    return int(float(re.search(rf"^{name} (\S+)$", api.get("/v1/metrics")[1], re.M).group(1)))


def start_until_refused(api, prefix, most=12):
    """Start VMs until one is refused; returns (names started, the refusal's answer)."""
    started = []
    for i in range(most):
        status, answer = api.post("/v1/vms", {"vmName": f"{prefix}{i}", "memoryMb": 64})
        if status != 200:
            return started, (status, answer)
        started.append(f"{prefix}{i}")
    raise AssertionError(f"{most} VMs started on a {TMPFS_MB} MiB state_dir")


def test_starts_are_admitted_against_free_disk_space(cbox_factory, tmp_path):
    """On a 64 MiB state_dir with 16 MiB disks: (n + 1) x 16 MiB must fit in free space that the
    template and the VMs' own blocks take a little of, so 3 VMs start and the 4th is refused at
    disk_overcommit 1.0, 5 at 1.5 (6 x 16 > 1.5 x 64); each place admits again once a VM is gone."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "cboxdisk", str(state)], check=True)
    server = None
    try:
        for overcommit, admitted in ((1.0, 3), (1.5, 5)):
            server = cbox_factory(stateful_size_in_mb=DISK_MB, disk_overcommit=overcommit).start()
            api = server.api
            started, (status, answer) = start_until_refused(api, f"d{int(overcommit * 10)}x")
            assert len(started) == admitted, (overcommit, started, answer)
            assert status == 503, answer
            assert "not enough disk space in state_dir" in answer["error"], answer
            assert f"disk_overcommit={overcommit:g}" in answer["error"], answer
            # what the refusal weighed, as the test sees it
            promised, free = promised_bytes(state), free_bytes(state)
            assert promised + DISK_MB * MiB > free * overcommit
            assert promised > (admitted - 1) * DISK_MB * MiB
            # the metrics say the same
            assert metric(api, "cbox_stateful_disks_promised_bytes") == promised
            assert abs(metric(api, "cbox_state_dir_free_bytes") - free) < MiB
            # a VM gone: a start fits again
            assert api.delete(f"/v1/vms/{started[0]}")[0] == 200
            api.start_vm("again", memoryMb=64)
            assert api.post("/v1/vms", {"vmName": "nope", "memoryMb": 64})[0] == 503
            assert api.delete("/v1/vms")[0] == 200
            server.assert_clean()
            assert "Traceback" not in server.log()
            server.stop()
    finally:
        if server:
            server.stop(9)
        subprocess.run(["umount", "-l", str(state)])


def test_a_disk_filling_up_leaves_the_admission_unchanged(cbox_factory, tmp_path):
    """Blocks a guest writes move from the promise to the used space: the promise metric falls
    by what was written, and what may be admitted stays the same."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "cboxdisk", str(state)], check=True)
    server = None
    try:
        server = cbox_factory(stateful_size_in_mb=DISK_MB).start()
        api = server.api
        api.start_vm("w0", memoryMb=64)
        before = metric(api, "cbox_stateful_disks_promised_bytes")
        disk = state / "vms" / "w0" / "stateful.ext4"
        blocks = os.stat(disk).st_blocks
        with open(disk, "r+b") as f:        # as the guest writing 4 MiB into its disk
            f.seek(8 * MiB)
            f.write(b"\1" * (4 * MiB))
        allocated = (os.stat(disk).st_blocks - blocks) * 512
        assert 3 * MiB < allocated <= 4 * MiB          # most of it was a hole
        assert metric(api, "cbox_stateful_disks_promised_bytes") == before - allocated
        started, (status, answer) = start_until_refused(api, "more", most=12)
        assert status == 503 and len(started) == 2, (started, answer)       # w0 and two more, as before
    finally:
        if server:
            server.stop(9)
        subprocess.run(["umount", "-l", str(state)])


def test_pool_boots_are_admitted_against_free_disk_space(cbox_factory, tmp_path):
    """The warm pool does not boot past the disk space either: it stays short and says why."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "cboxdisk", str(state)], check=True)
    server = None
    try:
        server = cbox_factory(stateful_size_in_mb=DISK_MB, pool_size=6, default_memory_mb=64).start()
        api = server.api

        def pool():
            return api.get("/v1/health")[1]["pool"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pool()["lastError"] or "").startswith("no room"):
            time.sleep(0.2)
        state_of = pool()
        assert state_of["ready"] + state_of["booting"] == 3, state_of
        assert "not enough disk space in state_dir" in state_of["lastError"], state_of
        status, answer = api.post("/v1/vms", {"vmName": "big", "memoryMb": 128})   # not the pool's shape
        assert status == 200, answer      # a ready pool VM was given up to make room (make_room)
        assert api.delete("/v1/vms")[0] == 200
    finally:
        if server:
            server.stop(9)
        subprocess.run(["umount", "-l", str(state)])

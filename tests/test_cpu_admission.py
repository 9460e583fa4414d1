"""CPU admission: with vcpu_overcommit set, a start is refused (503) when the VMs' vCPUs and
the new VM's would not fit in the host CPUs cbox.py may run on x vcpu_overcommit (README
"Configuration")."""
import os


def start(api, name, vcpus=1):
    return api.post("/v1/vms", {"vmName": name, "vcpus": vcpus, "memoryMb": 64})


def test_starts_are_admitted_against_the_hosts_cpus(cbox_factory):
    cpus = len(os.sched_getaffinity(0))        # cbox.py inherits the test's affinity
    server = cbox_factory(vcpu_overcommit=1.5, max_vcpus=8).start()
    api = server.api
    budget = int(cpus * 1.5)
    assert start(api, "big", vcpus=2)[0] == 200
    for i in range(budget - 2):
        status, answer = start(api, f"v{i}")
        assert status == 200, answer
    status, answer = start(api, "one-too-many")
    assert status == 503, answer
    assert answer["error"] == (f"not enough CPU: the VMs have {budget} vCPUs, 1 more do not fit in {cpus} host "
                               f"CPUs x vcpu_overcommit=1.5"), answer
    assert api.get("/v1/vms/one-too-many")[0] == 404          # nothing of it is left
    metrics = api.get("/v1/metrics")[1]
    assert f"\ncbox_vcpus {budget}\n" in metrics and f"\ncbox_host_cpus {cpus}\n" in metrics
    assert api.delete("/v1/vms/big")[0] == 200                 # two vCPUs freed: a 2-vCPU VM fits again
    assert start(api, "again", vcpus=3)[0] == 503
    assert start(api, "again", vcpus=2)[0] == 200
    assert api.delete("/v1/vms")[0] == 200
    server.assert_clean()


def test_without_vcpu_overcommit_cpus_are_not_counted(cbox_factory):
    cpus = len(os.sched_getaffinity(0))
    server = cbox_factory(max_vcpus=8).start()
    api = server.api
    for i in range(cpus + 1):                  # more vCPUs than the host has CPUs
        status, answer = start(api, f"v{i}", vcpus=2)
        assert status == 200, answer
    assert api.delete("/v1/vms")[0] == 200

"""Starts that fail: the answer names the hypervisor's own reason with a stopReason, the
evidence (VmConfig sent, tails of the -v log, stdout/stderr and console) is kept under
state_dir/failed-starts (the newest failed_starts_kept, each file bounded), shown by
GET /v1/failed-starts and `cbox.py vm failures`, and nothing else of the VM is left.

The stand-in fails as Cloud Hypervisor does (CBOX_STANDIN_BOOT_FAULT, tests/fake_chv.py):
a vCPU error while the guest boots (the -v log's "VCPU generated error", exit code 0, the
same exit as a guest power-off), a kernel its loader refuses, a kernel that never reaches
user space."""
import json
import sys
import threading

from conftest import REPO
from procutil import wait_for
from test_openapi import validate

CLI = [sys.executable, str(REPO / "cbox.py"), "--server", "http://127.0.0.1:7000"]
VCPU_WORDS = ("VCPU generated error: VcpuRun(Failed to run vcpu Caused by: "
              "Unexpected exit reason on vcpu run: InternalError)")


def failing_server(cbox_factory, fault, **settings):
    return cbox_factory(**settings).start(env={"CBOX_STANDIN_BOOT_FAULT": fault})


def failed_start(server, name):
    status, body = server.api.post("/v1/vms", {"vmName": name}, timeout=120)
    assert status == 500, body
    return body


def kept(server):
    """The evidence directories under state_dir/failed-starts, oldest first."""
    directory = server.state_dir / "failed-starts"
    return sorted(p for p in directory.iterdir()) if directory.exists() else []


def assert_nothing_else_left(server):
    """No tap, hypervisor, record, run directory or egress chain of the failed VMs."""
    server.assert_clean()
    assert "CBOX-EG-" not in server.ns.run("iptables", "-S").stdout
    assert server.api.get("/v1/vms")[1]["vms"] == []


def test_a_vcpu_error_while_booting_names_it_and_keeps_the_evidence(cbox_factory):
    server = failing_server(cbox_factory, "vcpu-error")
    body = failed_start(server, "v1")
    assert body["stopReason"] == "vcpu-error", body
    error = body["error"]
    assert error.startswith("starting VM 'v1' failed at step agent: the VM stopped while booting: "
                            f"the guest's vCPU failed: {VCPU_WORDS} (stopReason vcpu-error); console: "), error
    assert "never reaches user space" in error                 # the console's tail
    [evidence] = kept(server)
    assert body["evidence"] == str(evidence) and error.endswith(f"; evidence kept in {evidence}")
    assert evidence.name.endswith("_v1")
    assert sorted(p.name for p in evidence.iterdir()) == ["cloud-hypervisor.log", "cloud-hypervisor.out",
                                                          "console.log", "failure.json", "vmconfig.json"]
    failure = json.loads((evidence / "failure.json").read_text())
    assert failure["vmName"] == "v1" and failure["step"] == "agent" and failure["stopReason"] == "vcpu-error"
    assert VCPU_WORDS in failure["error"] and failure["failedAt"].endswith("Z")
    config = json.loads((evidence / "vmconfig.json").read_text())
    assert "cbox.vm=v1" in config["payload"]["cmdline"] and config["vsock"]["cid"] == 3
    vmm_log = (evidence / "cloud-hypervisor.log").read_bytes()
    assert b"VCPU generated error: VcpuRun(Failed to run vcpu\n\nCaused by:\n" in vmm_log
    assert b"VM exit event\r\n" in vmm_log and b"VM guest exit event" not in vmm_log
    assert b"never reaches user space" in (evidence / "console.log").read_bytes()
    log = server.log()
    assert f"start failed vm=v1 step=agent stopReason=vcpu-error" in log and f"evidence={evidence}" in log
    assert_nothing_else_left(server)


def test_a_kernel_the_loader_refuses(cbox_factory, tmp_path):
    server = failing_server(cbox_factory, "load-kernel")
    body = failed_start(server, "k1")                       # the tests' kernel is a placeholder text
    assert body["stopReason"] == "kernel-load", body
    assert ("failed at step vm.boot: vm.boot: HTTP 500: Error from API: The VM could not boot: Cannot load the "
            "kernel into memory: Kernel Loader: failed to load bzImage kernel image: Kernel Loader: Unable to "
            "read bzImage header (stopReason kernel-load)") in body["error"], body
    [evidence] = kept(server)
    assert json.loads((evidence / "vmconfig.json").read_text())["payload"]["kernel"] == server.settings["kernel"]
    assert b"Loading kernel" in (evidence / "cloud-hypervisor.log").read_bytes()
    assert_nothing_else_left(server)
    # the same stand-in boots a kernel its loader takes (an ELF file): the check can pass
    (tmp_path / "images" / "vmlinux").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    assert server.api.start_vm("k2")["status"] == "RUNNING"
    assert server.api.delete("/v1/vms/k2")[0] == 200
    assert len(kept(server)) == 1


def test_a_kernel_that_never_boots_times_out_with_its_console(cbox_factory):
    server = failing_server(cbox_factory, "hang", boot_timeout_s=2)
    body = failed_start(server, "h1")
    assert body["stopReason"] == "boot-timeout", body
    assert "failed at step agent: guest agent did not answer within 2s" in body["error"]
    assert "CBOX_STANDIN_BOOT_FAULT=hang: this kernel never reaches user space" in body["error"]
    [evidence] = kept(server)
    assert b"Linux version" in (evidence / "console.log").read_bytes()
    assert_nothing_else_left(server)


def test_only_the_newest_are_kept_each_file_bounded_and_listed(cbox_factory):
    server = failing_server(cbox_factory, "hang", boot_timeout_s=3, failed_starts_kept=2)
    for name in ("f1", "f2"):
        failed_start(server, name)
    # the guest can make the -v log grow at will (NOTES.md): only its newest part is kept
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(body=failed_start(server, "f3")))
    thread.start()
    chv_log = server.state_dir / "vms" / "f3" / "cloud-hypervisor.log"
    wait_for(lambda: chv_log.exists() and b"vm.boot -> 204" in chv_log.read_bytes(), 10, what="f3's vm.boot")
    with open(chv_log, "ab") as f:
        f.write(b"guest-caused noise\r\n" * 20000 + b"the newest line\r\n")
    thread.join(60)
    assert answer["body"]["stopReason"] == "boot-timeout"
    dirs = kept(server)
    assert [d.name.rpartition("_")[2] for d in dirs] == ["f2", "f3"]          # f1, the oldest, is gone
    sizes = {f.name: f.stat().st_size for d in dirs for f in d.iterdir()}
    assert max(sizes.values()) <= 64 * 1024 and sizes["cloud-hypervisor.log"] == 64 * 1024
    assert (dirs[1] / "cloud-hypervisor.log").read_bytes().endswith(b"the newest line\r\n")

    status, listing = server.api.get("/v1/failed-starts")
    assert status == 200
    doc = server.api.get("/v1/openapi.json")[1]
    validate(listing, doc["paths"]["/v1/failed-starts"]["get"]["responses"]["200"]["content"]["application/json"]
             ["schema"], doc)
    validate(answer["body"], {"$ref": "#/components/schemas/Error"}, doc)
    failures = listing["failedStarts"]
    assert [f["vmName"] for f in failures] == ["f3", "f2"]                     # newest first
    newest = failures[0]
    assert newest["directory"] == str(dirs[1]) and newest["stopReason"] == "boot-timeout"
    assert newest["step"] == "agent" and "guest agent did not answer" in newest["error"]
    assert newest["files"]["cloud-hypervisor.log"] == 64 * 1024 and "vmconfig.json" in newest["files"]
    assert newest["vmmLog"][-1] == "the newest line" and len(newest["vmmLog"]) == 20
    assert any("never reaches user space" in line for line in newest["console"])

    out = server.ns.run(*CLI, "vm", "failures", "--logs").stdout
    assert out.index("  f3  step=agent  stopReason=boot-timeout") < out.index("  f2  step=agent")
    assert f"  evidence: {dirs[1]}/ (" in out and "cloud-hypervisor.log 65536 B" in out
    assert "    the newest line\n" in out and "never reaches user space" in out
    assert_nothing_else_left(server)


def test_cli_says_when_none_is_kept(cbox_server):
    assert cbox_server.ns.run(*CLI, "vm", "failures").stdout == "no failed start is kept (state_dir/failed-starts)\n"
    assert cbox_server.api.get("/v1/failed-starts") == (200, {"failedStarts": []})


def test_none_kept_with_failed_starts_kept_0(cbox_factory):
    server = failing_server(cbox_factory, "load-kernel", failed_starts_kept=0)
    body = failed_start(server, "z1")
    assert body["stopReason"] == "kernel-load" and body["evidence"] is None
    assert "evidence kept" not in body["error"] and kept(server) == []
    assert_nothing_else_left(server)


def test_the_standin_loader_refuses_what_cloud_hypervisor_refuses(tmp_path):
    import fake_chv
    header = bytearray(0x1F1 + fake_chv.SETUP_HEADER_BYTES)
    header[0x202:0x206], header[0x206:0x208], header[0x211] = b"HdrS", (0x20F).to_bytes(2, "little"), 1
    cases = {"bzimage": (bytes(header), None), "elf": (b"\x7fELF" + bytes(60), None),
             "short": (bytes(header[:0x200]), "Unable to read bzImage header"),
             "no-magic": (bytes(0x1F1 + 200), "Invalid bzImage"),
             "not-loaded-high": (bytes(header[:0x211]) + b"\0" + bytes(header[0x212:]), "Invalid bzImage")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        expected = None if why is None else ["Cannot load the kernel into memory",
                                             "Kernel Loader: failed to load bzImage kernel image", f"Kernel Loader: {why}"]
        assert fake_chv.kernel_load_error(tmp_path / name) == expected, name
    vmlinuz = REPO / "out" / "vmlinuz"           # the project's own kernel, where it is built
    if vmlinuz.exists():
        assert fake_chv.kernel_load_error(vmlinuz) is None


def test_a_hypervisor_without_kvm_is_named_from_its_stderr(cbox_factory):
    server = failing_server(cbox_factory, "no-kvm")
    body = failed_start(server, "n1")
    assert body["stopReason"] == "kvm", body
    assert ("failed at step spawn: before its API answered, cloud-hypervisor exited with "
            "code 1: Failed to open hypervisor interface (is hypervisor interface available?): Failed to create "
            "the hypervisor: no supported hypervisor (see ") in body["error"], body
    [evidence] = kept(server)
    assert "vmconfig.json" not in {p.name for p in evidence.iterdir()}        # it never got to vm.create
    assert b"Failed to open hypervisor interface" in (evidence / "cloud-hypervisor.out").read_bytes()
    assert b"Fatal error: CreateHypervisor" in (evidence / "cloud-hypervisor.log").read_bytes()
    assert_nothing_else_left(server)


def test_the_hypervisors_words(tmp_path):
    import cbox
    log = tmp_path / "cloud-hypervisor.log"
    log.write_bytes(b"cloud-hypervisor:   0.1s: <vmm> INFO:vmm/src/lib.rs:2080 -- VM exit\r\n"
                    b"cloud-hypervisor: 110.2s: <vcpu0> ERROR:vmm/src/cpu.rs:1460 -- VCPU generated error: "
                    b"VcpuRun(Failed to run vcpu\n\nCaused by:\n    VCPU error EINVAL)\r\n"
                    b"cloud-hypervisor: 110.2s: <vmm> INFO:vmm/src/lib.rs:2080 -- VM exit event\r\n")
    assert cbox.vcpu_error_in_vmm_log(log) == "VCPU generated error: VcpuRun(Failed to run vcpu Caused by: VCPU error EINVAL)"
    log.write_bytes(b"cloud-hypervisor: 1.0s: <vmm> INFO:vmm/src/lib.rs:2096 -- VM guest exit event\r\n")
    assert cbox.vcpu_error_in_vmm_log(log) is None
    out = tmp_path / "cloud-hypervisor.out"
    out.write_text("Error: Cloud Hypervisor exited with the following chain of errors:\n  0: Error booting VM\n"
                   "  1: The VM could not boot\n  2: Error from device manager\n  3: Cannot open tap interface\n"
                   "later output\n")
    chain = cbox.vmm_error_chain(out)
    assert chain == "Error booting VM: The VM could not boot: Error from device manager: Cannot open tap interface"
    assert cbox.hypervisor_reason(chain) == "device-refused"
    assert cbox.hypervisor_reason("vm.boot: HTTP 500: Error from API: The VM could not boot: Error from CPU manager: "
                                  "Error creating vCPU: ...") == "kvm"
    assert cbox.hypervisor_reason("vm.boot: HTTP 500: Error from API: The VM could not boot: VM is already created") is None
    out.write_text("nothing of the kind\n")
    assert cbox.vmm_error_chain(out) is None

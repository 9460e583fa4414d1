#!/usr/bin/env python3
"""Stand-in for the `cloud-hypervisor` binary (Cloud Hypervisor v53 REST API subset).

CBox's tests run cbox.py against this program instead of a real Cloud
Hypervisor (CHV): this machine has no CHV binary and nested KVM cannot run
real guest kernels.  It speaks the same command line and the same HTTP API,
validates every VmConfig against CHV's own OpenAPI description, and "boots"
a guest by running the guest agent as a plain process inside private
network, UTS and PID namespaces, joined to the host tap like a virtio-net
device would be.  Stdlib only, Python 3.10+, Linux, root (taps, namespaces).

Command line (as cloud-hypervisor)
----------------------------------
    fake_chv.py --api-socket path=/run/x/api.sock [--log-file PATH] [-v ...]
                [--event-monitor path=FILE | --event-monitor fd=N]
    fake_chv.py --api-socket /run/x/api.sock          (older bare form)
    fake_chv.py --api-socket fd=3                      (inherited listening socket)
    fake_chv.py --version | --help
Options may also be written --opt=value.  -v may repeat (-v, -vv, -v -v).
Any other argument: message on stderr, exit code 1.  Like CHV the stand-in
sets umask 077: its log, serial file, event file and sockets are owner-only
(the process guest runs with umask 022, as a guest's init would).

API socket choice (v53 semantics): like CHV v53 the stand-in takes an
exclusive flock on `<api socket>.lock` (created, and left behind on exit, as
CHV does).  If the lock is held, or something answers on the existing socket,
it refuses to start ("API socket in use", exit 1).  Otherwise an existing file
at the path is a stale leftover: it is unlinked and the socket is bound again.
On a clean exit (vmm.shutdown, SIGTERM/SIGINT, guest power-off) the stand-in
removes its API socket file; after SIGKILL it stays, as with CHV.

Event monitor (event_monitor/src/lib.rs, vmm/src/lib.rs, cloud-hypervisor/src/main.rs)
------------------------------------------------------------------------------------
--event-monitor path=FILE opens FILE write+create+truncate (mode 0600) before
the API socket is bound: on a FIFO that open waits until a reader exists;
fd=N takes an inherited descriptor.  The descriptor is made non-blocking and
a writer thread writes each event as serde_json's pretty JSON (2-space indent)
followed by "\n\n":
    {"timestamp": {"secs": S, "nanos": N}, "source": ..., "event": ...,
     "properties": null | {"key": "value"}}
timestamps counted from the monitor's start.  Write errors (EAGAIN on a full
FIFO, EPIPE without a reader) are ignored: that event is lost or cut short, as
in CHV.  Every event is also logged ("Event: source = vm event = booted").
Events the stand-in emits, in CHV's order:
    start                       vmm starting
    vm.boot                     vm booting (also when it then fails: no config),
                                vm booted (on success)
    vm.pause / vm.resume        vm pausing (also before a refused transition),
                                vm paused / vm resuming, vm resumed
    vm.shutdown                 vm shutdown
    vm.reboot, guest reset      vm rebooting, vm rebooted (see "Reset")
    vm.delete                   [vm shutdown if booted], vm deleted (only when a
                                config existed)
    vmm.shutdown                vm.delete's events, vmm shutdown
    guest power-off             log "VM guest exit event", then vmm.shutdown's
    SIGTERM/SIGINT              log "VM exit event", then vmm.shutdown's
Not emitted: virtio-device activated/reset (the process engine has no virtio
devices), resize/snapshot/migration events (endpoints not supported).

Test hooks (signals to the stand-in process)
--------------------------------------------
    SIGUSR1  a vCPU error (vmm/src/cpu.rs: KVM_RUN fails, exit_evt): logs
             "VCPU generated error: VcpuRun(Failed to run vcpu" + LF LF
             "Caused by:" LF "    <cause>)" (ERROR: anyhow's Debug, its lines
             inside one CRLF-ended record) and "VM exit event",
             then vmm.shutdown's events (vm shutdown, vm deleted, vmm shutdown)
             and exit code 0: the same events and exit code as a guest
             power-off, which logs "VM guest exit event" instead (CHV v53's
             exit_evt vs guest_exit_evt; SIGTERM/SIGINT also log "VM exit
             event").  Ignored when no VM runs.  Any engine.
    SIGUSR2  a guest kernel panic (process engine, VM Running): the console
             gets "Kernel panic - not syncing: ..."; with "pvpanic": true in the
             VmConfig the log gets "pvpanic got guest event panic" and the event
             monitor source guest, event panic, properties {"event": "panic"}
             (devices/src/pvpanic.rs); then the guest kernel's panic=N (from
             payload.cmdline) decides: N < 0 an immediate reset (see "Reset"),
             N > 0 "Rebooting in N seconds.." and the reset N s later, 0 or
             absent "---[ end Kernel panic ... ]---" and a hung guest (its
             processes stopped, vm.info still Running).  Under the QEMU engine
             a real guest panics by itself: QMP GUEST_PANICKED gives the same
             event (see tests/qemu_engine.py).

Environment
-----------
    CBOX_CHV_SCHEMA         OpenAPI JSON to validate VmConfigs against
                            (default: <checkout>/../shared/cloud-hypervisor/
                            cloud-hypervisor.json).  Missing: a loud warning
                            in the log and on stderr, no schema validation.
    CBOX_GUEST_AGENT        guest agent script (default <repo>/guest_agent.py)
    CBOX_STANDIN_PYTHON     interpreter for the agent (default sys.executable)
    CBOX_STANDIN_ENGINE     process (default) | qemu (tests/qemu_engine.py)
    CBOX_STANDIN_STOP_TIMEOUT  seconds a stopped guest (vm.shutdown, vm.delete,
                            vm.reboot, vmm.shutdown) gets to be gone (default 1;
                            the process engine waits at least 2 s)
    CBOX_STANDIN_GUEST_GRACE_S  process engine: seconds the agent gets after
                            SIGTERM before the SIGKILL that stops a guest
                            (default 0: none; CHV stops the vCPUs without
                            telling the guest, see ProcessEngine.stop)
    CBOX_STANDIN_PASS_ENV   comma list of variable names passed on to the agent
    CBOX_STANDIN_VCPU_LIMIT 0: a process guest is not held to its boot_vcpus
                            (default 1: it is; see GuestCpus)
    CBOX_STANDIN_RELAY      kernel (default) | python: how the process engine
                            moves net[0]'s frames (see "Process engine");
                            kernel falls back to python when the kernel
                            refuses the setup; only python enforces net[0]'s
                            rate_limiter_config
    CBOX_STANDIN_BOOT_FAULT how every boot of this stand-in goes wrong (unset:
                            it does not):
        no-kvm        as CHV without /dev/kvm: at start, before the event
                      monitor and the API socket, "Fatal error: ..." in the log,
                      CHV's error chain on stderr ("Failed to open hypervisor
                      interface (is hypervisor interface available?)", ...),
                      exit code 1 (no_hypervisor)
        load-kernel   vm.boot loads payload.kernel as CHV's x86-64 loader does
                      (an ELF file, else a bzImage with a "HdrS" setup header;
                      kernel_load_error) and refuses anything else with CHV's
                      500 ["Error from API", "The VM could not boot", "Cannot
                      load the kernel into memory", "Kernel Loader: failed to
                      load bzImage kernel image", "Kernel Loader: Unable to read
                      bzImage header" | "Kernel Loader: Invalid bzImage"]
                      (vmm/src/vm.rs load_kernel; linux-loader 0.13); the
                      tests' placeholder images are not kernels
        hang          the guest kernel starts (its first console lines) and
                      never reaches user space: no agent (process engine)
        vcpu-error    as hang, then CBOX_STANDIN_FAULT_AFTER_S (default 0.5)
                      seconds after vm.boot its vCPU fails as SIGUSR1 plays it,
                      with KVM_RUN's "Unexpected exit reason on vcpu run:
                      InternalError" (what nested KVM gives a real guest here)
                      and exit code 0; any engine
                            Another value: a message on stderr, exit code 1.

API (all under /api/v1/, serialized: one request at a time, keep-alive ok)
----------------------------------------------------------------------------
    GET  vmm.ping      200 {"build_version","version":"53.0.0","pid","features":[]}
    PUT  vm.create     204; body VmConfig (schema-checked); makes the console
                       devices (File: creates/truncates serial.file, Socket:
                       binds serial.socket)
    PUT  vm.boot       204; starts the engine
    GET  vm.info       200 {"config","state","memory_actual_size"}
    PUT  vm.shutdown   204; guest gone, config kept (state Created)
    PUT  vm.delete     204; also when nothing exists
    PUT  vm.pause / vm.resume / vm.reboot / vm.power-button   204
    PUT  vmm.shutdown  200 with an empty body (Content-Type application/json,
                       Content-Length 0: as v53, not 204), then the process exits 0
    GET  vm.counters   200 {} while a guest runs
Error bodies are JSON arrays of strings, outer error first, root cause last:
    404 ["Not Found"]                          unknown endpoint
    400 ["Bad Request", ...]                   wrong method, body on a body-less
                                               action, no body for vm.create,
                                               body without Content-Type
                                               application/json, bad framing
    400 ["Failed to deserialize JSON", ...]    bad JSON; VmConfig not matching
                                               the schema: one entry per problem,
                                               each starting with its JSON path
                                               ("$.net[0].macc: unknown field");
                                               an unknown key inside a
                                               rate_limiter_config is CHV's own
                                               400 too (deny_unknown_fields)
    404 ["Error from API", "The VM info is not available", "VM is not created"]
        before vm.create (vm.reboot: "The VM could not reboot", "VM is not
        created"; vm.boot: "The VM could not boot", "VM config is missing")
    500 ["Error from API", "The VM could not be created", "VM is already created"]
    500 ["Error from API", "The VM could not boot", "VM is already created"]
    500 ["Error from API", "The VM could not shutdown", "VM is not running"]
        (same shape for pause/resume/power-button; vm.counters says "The VM
        info is not available")
    500 ["Error from API", "API response receive error", "receiving on a
        closed channel"] for vm.create with serial mode Socket and no
        serial.socket: v53's VMM thread panics (console_devices.rs unwraps
        None) and the process exits 1; the stand-in does the same
    500 ["Error from API", "The VM could not boot", ...cause...] for: invalid
        configuration (memory.size not a multiple of 4096, boot_vcpus >
        max_vcpus, net num_queues/2 > boot_vcpus, disk num_queues >
        boot_vcpus, no kernel, disk serial over 20 bytes), missing
        kernel/initramfs/firmware/disk file, image_type differing from the
        detected one, existing vsock socket path, busy or unopenable tap
    500 ["Error from API", "The VM could not boot", "Failed to validate
        config", cause] for VmConfig::validate's rate limit and id checks
        (vmm/src/config.rs), cause one of: "Invalid rate-limiter group" (a
        rate_limit_groups entry with an empty id or neither bandwidth nor ops,
        a disk's rate_limit_group naming no group, a disk with both
        rate_limiter_config and rate_limit_group), "Rate limiting is not
        supported with vhost-user", "Identifier X is not unique" (ids of
        groups and devices share one name space), "Identifier __x is not
        invalid" (CHV's text; "__" ids are reserved).  A bucket with size or
        refill_time 0 is accepted and disabled (rate_limiter/src/lib.rs
        TokenBucket::new).
    Disks without image_type: CHV's autodetection warnings go to the log; a
    writable one detected raw gets sector-0 writes disabled on CHV v51+ (the
    guest's ext4 goes read-only): the process engine refuses such a boot (500
    quoting CHV's warning), the QEMU engine really fails those writes.
    500 ["Error from API", "<endpoint> ...", "... not supported by the CBox
        stand-in"] for the other CHV endpoints (resize, hotplug, snapshot...).
Deviations from CHV, on purpose: unknown VmConfig fields are errors (CHV
ignores them); negative integers are rejected everywhere in a VmConfig (all
CHV fields are unsigned); 400s for vm.create without a body carry ["Bad Request"] (CHV sends no body),
a body on a body-less action gets a second message; a request body without
Content-Type: application/json is a 400 (CHV v53 accepts it); vm.info
returns the config as sent (CHV fills in defaults); a vm.boot that fails
leaves the VM Created (CHV v53 keeps the half-built VM: a second vm.boot
says "VM is already created", vm.shutdown/vm.delete drop it); a
rate_limit_groups entry without id or rate_limiter_config is a 400 at
vm.create (the OpenAPI description requires both; CHV defaults them and
refuses the group at vm.boot, "Invalid rate-limiter group").

Process engine (default)
------------------------
vm.boot opens net[0].tap with TUNSETIFF (IFF_TAP|IFF_NO_PI, plus
IFF_MULTI_QUEUE when num_queues > 2) in the stand-in's own namespace (EBUSY
when another process holds it -> 500), binds vsock.socket, then forks:

    stand-in (S)
      `- guest VMM (G): setsid; unshare(NET), joins the new netns to the tap
         (below); unshare(UTS|PID); serves vsock.socket (CONNECT <port> ->
         TCP 127.0.0.1:<port> inside the guest netns, answers "OK <n>", EOF
         when nothing listens there);
         `- guest init (I, pid 1 of the new pid ns): reaps, forwards SIGTERM
            `- `python3 <agent>` with stdout+stderr appended to the serial
               file, cwd /, env: PATH, HOME=/, TERM=linux, LANG=C.UTF-8,
               PYTHONUNBUFFERED=1, CBOX_CMDLINE=payload.cmdline,
               CBOX_CALLBACK_SOCKET=<vsock.socket>_<cbox.callback_port or 4032>
G has PR_SET_PDEATHSIG(SIGKILL) towards S, I towards G, and I is the init of
the guest's pid namespace, so when I dies the kernel kills every process of
the guest (even `setsid cmd &`): kill -9 of the stand-in leaks no process.

vCPUs (GuestCpus).  A VM's processes run on its boot_vcpus vCPU threads.  I
joins a cpu cgroup of its own, cbox-standin-<S's pid> below S's own cpu cgroup
(beside it on cgroup v2, whose inner cgroups hold no processes; cbox.py puts each
hypervisor in one of its own: VmCpuGroups), as a VM's vCPU threads are its
hypervisor's (v1 cpu.cfs_quota_us / cpu.shares, v2 cpu.max / cpu.weight), before
it starts the agent: the guest gets at most boot_vcpus CPUs (per 20 ms) and
the weight of boot_vcpus threads against the host's other processes; G (the
relay, the vsock proxy) stays outside, as CHV's device threads run beside the
vCPUs.  The console says "cbox-standin: cpus: N vCPU(s): the guest's
processes held to N CPU(s) (cpu cgroup <dir>)" or "NOT held (<why>)".  Under
`ip netns exec` (the tests) the host's cgroup mounts are hidden; S then mounts
the same hierarchy at /run/cbox-standin/cpu in that mount namespace.  S
removes the cgroup once the guest is gone; one whose stand-in died is removed
when the next guest starts.

Guest network (net[0]).  G keeps the tap's fd for the VM's life (carrier up,
EBUSY for another VMM); the guest gets an `eth0` with MAC net[0].mac and MTU
net[0].mtu (default 1500).  Frames take one of two paths, CBOX_STANDIN_RELAY
chooses; the console says which ("cbox-standin: net: eth0 <-> <tap> (kernel
relay: ...)" or "(Python relay: ...)") and so does the log ("net relay ..."):

  kernel (default): eth0 is one end of a veth pair whose other end,
    cbveth<G's pid>, is in S's netns: up, no address (IPv6 addrgenmode none),
    not bridged, same MTU.  G sets it up over rtnetlink (a socket opened
    before its unshare stays bound to S's netns; no ip/tc binary is needed),
    with tc rules equivalent to
        tc qdisc add dev <tap> clsact       (one left on the tap is replaced)
        tc filter add dev <tap> egress protocol all u32 match u32 0 0 \
           action mirred egress redirect dev cbveth<pid>
        tc qdisc add dev cbveth<pid> clsact
        tc filter add dev cbveth<pid> ingress protocol all u32 match u32 0 0 \
           action mirred ingress redirect dev <tap>
    What the bridge sends to the tap port goes to eth0; what the guest sends
    arrives as if received on the tap, so it enters the bridge through the
    tap port as before.  No frame passes through the tap's fd or through
    Python.  G deletes the veth pair (through a device group, in batches
    with the other guests stopping: KernelRelay.stop) and the tap's clsact
    before it exits (guest power-off, vm.shutdown/delete/reboot, SIGTERM of
    S); S does it when G died of a signal.  vm.pause sets the host end down
    (the guest's kernel neither gets nor sends frames while paused),
    vm.resume sets it up.
    Needs veth, clsact (NET_SCH_INGRESS), u32 and mirred in the kernel.  When
    a step fails G undoes the others, writes "cbox-standin: net: kernel relay
    unavailable (<why>), relaying frames in Python" to the console (and the
    same to the log) and uses the Python relay.  A rate limit on net[0]
    (below) is NOT enforced by the kernel relay (a deviation: tc mirred does
    not limit; cbox.py sends one for every VM by default, and the Python relay
    costs every test and bench CPU): the console's net line says so, and
    CBOX_STANDIN_RELAY=python enforces it.
  python: eth0 is a tap in the guest netns and G copies every frame between
    the two taps (epoll, os.read/os.write; a frame is dropped when eth0 is
    down or its queue is full, like a NIC).  eth0 goes away with G's fd.

Rate limits (rate_limiter/src/lib.rs, net_util/src/queue_pair.rs,
virtio-devices/src/net.rs).  net[0].rate_limiter_config gives two limiters,
rx (frames to the guest) and tx (frames from it), each with the whole config:
token buckets for bandwidth (bytes) and ops (frames) that start full (plus
one_time_burst), refill size per refill_time ms and are off when size or
refill_time is 0.  As in CHV a frame goes through, then takes one op and its
bytes; when a bucket cannot pay (nothing is taken) the direction stops for
100 ms, when a frame is larger than the bucket it empties the bucket and the
direction stops ratio * refill_time.  A stopped direction's frames wait in
the tap's (rx) or eth0's (tx) queue, they are not dropped by the limiter;
the queues themselves drop when full, where a CHV guest's virtio queue would
make its driver wait.  The console line says "rx and tx each rate-limited".
Disk limits (rate_limit_groups, disks[].rate_limit_group/rate_limiter_config)
are validated as CHV does but not enforced by the process engine, whose
guests have no virtio disks; the QEMU engine enforces them (QEMU throttle
groups, tests/qemu_engine.py).

After kill -9 of S, G dies of PDEATHSIG and nothing undoes the kernel relay:
the tap keeps its clsact qdisc (cbox.py deletes the tap anyway; a later VMM on
the same tap replaces it), and the host veth lives as long as the guest's
netns, which the kernel keeps until TCP connections the guest left open give
up retransmitting their FIN (up to ~2 minutes; with none open it goes at once).
The guest starts with hostname "(none)", lo and eth0 down and no address, as
a fresh kernel would; the agent configures them.  When the agent exits by
itself (guest power-off) the stand-in exits 0, as CHV does.

Reset (vmm/src/lib.rs control_loop Reset -> vm_reboot).  What the process
guest does, and what it means:
    the agent exits (any code), or dies      power-off (CHV: ACPI shutdown,
                                             GuestExit): "VM guest exit event",
                                             vm shutdown, vm deleted, vmm
                                             shutdown, exit code 0
    reboot(2) LINUX_REBOOT_CMD_POWER_OFF     power-off too ("reboot: Power down")
    reboot(2) LINUX_REBOOT_CMD_RESTART       reset ("reboot: Restarting system")
reboot(2) called in the guest's pid namespace makes the kernel kill the
namespace's init, which its parent (the guest VMM) then sees killed by SIGHUP
for RESTART and by SIGINT for POWER_OFF/HALT (reboot(2), "pid namespaces");
the guest VMM exits GUEST_RESET_EXIT (3) for a reset, 0 otherwise.  A reset,
like PUT vm.reboot, rebuilds the VM inside the same process: log "VM reset
event" (guest reset only), event vm rebooting, the guest stopped, its
console devices made again (File: truncated, so the text before the reset
is gone; Socket: socket file removed and bound again, clients cut off), the
vsock socket closed, unlinked and bound again, the guest booted again, event
vm rebooted; vm.info stays Running.  If the rebuild fails, CHV's control
loop ends with an error: the stand-in logs it and exits 1.  With the QEMU
engine a guest reset (reboot, triple fault, panic=-1 after a panic) makes
QEMU exit (-no-reboot) with QMP SHUTDOWN reason guest-reset, and the
stand-in starts QEMU again the same way.  The guest sees
the host's /proc and /sys (no mount namespace).  Only net[0] is supported.

Serial (vmm/src/console_devices.rs, serial_manager.rs, serial_buffer/src/lib.rs):
mode File -> the agent's output (and a few boot lines); Tty -> the
stand-in's stdout; Off/Null/Pty -> discarded.  Socket -> as CHV: vm.create
binds a Unix listener at serial.socket (never unlinking first: an existing
file fails with "Address already in use", 500, config kept); vm.boot starts
a serial manager thread on it: the guest's output goes into a ring of 1 MiB
(oldest bytes dropped) while no client is connected and is replayed to the
next client; a new client replaces the previous one (which is shut down);
the client socket is non-blocking and what it cannot take goes back into
the ring, flushed only on the guest's next output (as in CHV); bytes the
client sends are the guest's serial input (the process engine's agent reads
them on stdin; a lone "\n" becomes "\r", as CHV does; dropped when nobody
reads them, where CHV queues them without bound).  vm.shutdown, vm.delete
and a reboot remove the socket file (the SerialManager's Drop); vm.create
followed by vm.delete without a boot leaves the listener bound and its file
in place, as CHV does, so the next vm.create fails until the file is removed.
Console devices are made by vm.create, and again by a boot after
vm.shutdown and by every reboot: a File-mode file is truncated each time
(File::create), a Socket-mode socket is bound again.

Engine interface (CBOX_STANDIN_ENGINE=qemu loads tests/qemu_engine.py:QemuEngine)
---------------------------------------------------------------------------------
    engine = Engine(config: dict, log)   # config: the VmConfig as sent;
                                         # log: callable(str) -> stand-in log
    # set by the stand-in before start() (an engine may ignore them):
    engine.vsock_listener   listening socket.socket bound at vsock.socket, or
                            None; owned by the stand-in, closed and unlinked
                            by it after stop()/exit
    engine.console_fd       fd where the guest console output goes (serial);
                            owned by the stand-in
    engine.console_in_fd    Socket mode: fd the guest reads serial input from
                            (else None); owned by the stand-in
    engine.agent_argv       [python, agent]  (the process engine runs it)
    engine.guest_env        environment for the agent
    engine.start()          raises an exception (EngineError) on failure; the
                            message becomes the root cause of the 500
    engine.pid              pid of a process whose exit means guest power-off
                            (the stand-in polls it with a pidfd); if absent
                            or None the stand-in calls wait_exit() in a thread
    engine.alive() -> bool
    engine.wait_exit()      blocks until the guest is gone, returns exit code
    engine.on_event         set by the stand-in: callable(source, event,
                            properties) for events the engine sees (QEMU:
                            pvpanic's guest panic); callable from any thread
    engine.exit_reason()    after the guest is gone: "reset" (the stand-in
                            rebuilds the VM) or "poweroff" (optional; absent
                            means "poweroff")
    engine.stop(timeout)    stop the guest as vm.shutdown does (no guest
                            cooperation: SIGKILL, QMP quit), wait up to timeout
                            for it to be gone; frees the tap; returns when
                            everything is gone (timeout 0: a panicked guest)
    engine.pause() / engine.resume()   (SIGSTOP/SIGCONT of the guest)
    Engine.models_sector0_writes  class attribute, True when the engine itself
                            fails writes at sector 0 of a writable disk sent
                            without image_type (else the stand-in refuses it)
"""
import contextlib
import copy
import ctypes
import errno
import fcntl
import importlib
import json
import logging
import os
import queue
import re
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

from procutil import proc_state     # tests/, beside this file: on the path when it runs as a script

VERSION = "53.0.0"                  # vmm.ping "version": CARGO_PKG_VERSION of v53.0 (seen: "53.0.0")
BUILD_VERSION = "v53.0-cbox-standin"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "shared/cloud-hypervisor/cloud-hypervisor.json"
PAGE_SIZE = 4096
VIRTIO_BLK_ID_BYTES = 20          # longest disk serial (virtio_bindings, checked by CHV)
DEFAULT_MEMORY = 512 << 20
MAX_HEADER = 64 << 10
MAX_BODY = 16 << 20
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Linux constants (x86-64 / generic)
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc = ctypes.CDLL(None, use_errno=True)


class EngineError(Exception):
    """A guest engine could not start; args are messages, outer first."""


# ---------------------------------------------------------------------------
# small OS helpers

def rust_io(e):
    """Format an OSError the way Rust's io::Error displays."""
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)} (os error {e.errno})"
    return str(e)


def _ctypes_check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags):
    _ctypes_check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def set_pdeathsig(sig):
    _ctypes_check(_libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig),
                              ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


def set_comm(name):
    try:
        _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]),
                    ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    except Exception:
        pass


def open_tap(name, multi_queue=False):
    """Attach to (or create) tap `name` in the caller's netns; returns a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    flags = IFF_TAP | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    os.set_blocking(fd, False)
    return fd


def parse_mac(text):
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", p) for p in parts):
        return None
    return bytes(int(p, 16) for p in parts)


def cmdline_value(cmdline, key):
    for word in (cmdline or "").split():
        if word.startswith(key + "="):
            return word[len(key) + 1:]
    return None


# CBOX_STANDIN_BOOT_FAULT (module docstring, "Environment"): how a boot goes wrong
BOOT_FAULTS = ("", "no-kvm", "load-kernel", "hang", "vcpu-error")
SETUP_HEADER_BYTES = 123           # linux-loader's bootparam::setup_header, read at offset 0x1F1
# the process guest's "kernel" under hang and vcpu-error: it starts, never reaches user space
STUCK_KERNEL = ("import os, signal, sys\n"
                "fault = os.environ.get('CBOX_STANDIN_BOOT_FAULT')\n"
                "sys.stdout.write('[    0.000000] Linux version 6.1.0-cbox-standin (stand-in kernel)\\n'\n"
                "                 f'[    0.000000] Command line: {os.environ.get(\"CBOX_CMDLINE\", \"\")}\\n'\n"
                "                 f'[    0.104117] cbox-standin: CBOX_STANDIN_BOOT_FAULT={fault}: this kernel '\n"
                "                 'never reaches user space\\n')\n"
                "sys.stdout.flush()\n"
                "signal.pause()\n")


def kernel_load_error(path):
    """Why Cloud Hypervisor's x86-64 loader refuses a kernel file, as its error chain
    (outer first), or None. vmm/src/vm.rs load_kernel tries linux-loader's Elf::load, then
    BzImage::load, and reports the bzImage error wrapped in Error::KernelLoad ("Cannot load
    the kernel into memory"); linux-loader 0.13 src/loader/mod.rs says "Kernel Loader:
    failed to load bzImage kernel image" and src/loader/x86_64/bzimage/mod.rs why: the
    setup header at 0x1F1 cannot be read, or it lacks "HdrS" at 0x202, boot protocol
    2.00+ and LOADED_HIGH. The stand-in takes any ELF file for a loadable vmlinux."""
    with open(path, "rb") as f:
        data = f.read(0x1F1 + SETUP_HEADER_BYTES)
    if data[:4] == b"\x7fELF":
        return None
    if len(data) < 0x1F1 + SETUP_HEADER_BYTES:
        why = "Unable to read bzImage header"
    elif data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x200 or not data[0x211] & 1:
        why = "Invalid bzImage"
    else:
        return None
    return ["Cannot load the kernel into memory", "Kernel Loader: failed to load bzImage kernel image",
            f"Kernel Loader: {why}"]


def _wait_readable(fd, timeout):
    try:
        r, _, _ = select.select([fd], [], [], max(0.0, timeout))
    except InterruptedError:
        return False
    return bool(r)


# ---------------------------------------------------------------------------
# kernel frame path: a veth pair and tc mirred rules, set up over rtnetlink
# (no ip/tc binaries, no extra process on the boot path)

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200           # in an NLMSG_ERROR's echoed header: extended ack attributes follow
NLMSGERR_ATTR_MSG = 1
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER = 36, 37, 44
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_AF_SPEC, IFLA_GROUP, IFLA_NET_NS_FD = 1, 3, 4, 18, 26, 27, 28
DYING_GROUP = 0xCB0E             # device group of guests' veth pairs being deleted (KernelRelay.stop);
                                 # cbox.py deletes its taps through groups of 2**20 and more
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_U32_SEL, TCA_U32_ACT, TC_U32_TERMINAL = 5, 7, 1
TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_MIRRED_PARMS = 1, 2, 2
TCA_EGRESS_REDIR, TCA_INGRESS_REDIR, TC_ACT_STOLEN = 1, 3, 4
TC_H_CLSACT = 0xFFFFFFF1
TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_H_CLSACT_EGRESS = 0xFFFFFFF3   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
ETH_P_ALL = 0x0003


def _nla(kind, data):
    """One netlink attribute (nested ones are attributes of attributes)."""
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def _ifinfomsg(index=0, flags=0, change=0):
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def _tcmsg(index, handle, parent, info=0):
    return struct.pack("=BxxxiIII", socket.AF_UNSPEC, index, handle, parent, info)


def _nl_messages(data):
    """(type, seq, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        size, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if size < 16:
            break
        yield kind, seq, data[offset + 16:offset + size]
        offset += (size + 3) & ~3


def _extack_text(payload):
    """The kernel's explanation in an NLMSG_ERROR (extended ack), or ''."""
    if len(payload) < 20 or not struct.unpack_from("=H", payload, 10)[0] & NLM_F_ACK_TLVS:
        return ""
    offset = 20                                   # error code + the echoed (capped) header
    while offset + 4 <= len(payload):
        size, kind = struct.unpack_from("=HH", payload, offset)
        if size < 4:
            break
        if kind == NLMSGERR_ATTR_MSG:
            return payload[offset + 4:offset + size].split(b"\0")[0].decode("utf-8", "replace")
        offset += (size + 3) & ~3
    return ""


class Rtnl:
    """A small rtnetlink client.  A netlink socket stays bound to the network
    namespace it was created in, even after its owner unshares a new one."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:
                pass
        self.sock.bind((0, 0))
        self.seq = 0
        self.netns = os.stat("/proc/self/ns/net").st_ino    # the netns it is bound to

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def call(self, kind, flags, body, what):
        """Send one request; returns the payloads of its replies, raises OSError on a NACK."""
        self.seq += 1
        self.sock.send(struct.pack("=IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK,
                                   self.seq, 0) + body)
        replies = []
        while True:
            for got, seq, payload in _nl_messages(self.sock.recv(65536)):
                if seq != self.seq:
                    continue
                if got != NLMSG_ERROR:
                    replies.append(payload)
                    continue
                err = -struct.unpack_from("=i", payload)[0]
                if err:
                    why = _extack_text(payload)
                    raise OSError(err, f"{what}: {os.strerror(err)}{' (' + why + ')' if why else ''}")
                return replies

    def call_all(self, requests):
        """Send (kind, flags, body) requests in one datagram, which the kernel runs in turn
        (each one's failure alone); returns each one's errno, 0 for done."""
        first, data = self.seq + 1, b""
        for kind, flags, body in requests:          # bodies are 4-byte aligned: no padding
            self.seq += 1
            data += struct.pack("=IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK,
                                self.seq, 0) + body
        self.sock.send(data)
        errors = {}
        while len(errors) < len(requests):
            for got, seq, payload in _nl_messages(self.sock.recv(65536)):
                if got == NLMSG_ERROR and first <= seq <= self.seq:
                    errors[seq] = -struct.unpack_from("=i", payload)[0]
        return [errors[seq] for seq in range(first, self.seq + 1)]

    # ---- links ------------------------------------------------------------

    def link_index(self, name):
        [reply] = self.call(RTM_GETLINK, 0, _ifinfomsg() + _nla(IFLA_IFNAME, name.encode() + b"\0"),
                            f"find link {name}")
        return struct.unpack_from("=i", reply, 4)[0]

    def add_veth(self, name, peer, peer_netns_fd, peer_mac=None, mtu=None):
        """veth pair `name` (here, down) <-> `peer` (in the netns of peer_netns_fd, down)."""
        mtu_attr = _nla(IFLA_MTU, struct.pack("=I", mtu)) if mtu else b""
        peer_msg = (_ifinfomsg() + _nla(IFLA_IFNAME, peer.encode() + b"\0") + mtu_attr
                    + _nla(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
                    + (_nla(IFLA_ADDRESS, peer_mac) if peer_mac else b""))
        info = _nla(IFLA_INFO_KIND, b"veth\0") + _nla(IFLA_INFO_DATA, _nla(VETH_INFO_PEER, peer_msg))
        self.call(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                  _ifinfomsg() + _nla(IFLA_IFNAME, name.encode() + b"\0") + mtu_attr + _nla(IFLA_LINKINFO, info),
                  f"create veth {name} <-> {peer}")

    def no_ipv6_address(self, index):
        """ip link set ... addrgenmode none: no IPv6 link-local address (nor its frames)."""
        mode = _nla(socket.AF_INET6, _nla(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE])))
        self.call(RTM_NEWLINK, 0, _ifinfomsg(index) + _nla(IFLA_AF_SPEC, mode), "set addrgenmode none")

    def set_up(self, index, up=True):
        self.call(RTM_NEWLINK, 0, _ifinfomsg(index, IFF_UP if up else 0, IFF_UP), "set link up/down")

    # ---- tc ----------------------------------------------------------------

    def replace_clsact(self, index, what):
        """tc qdisc replace dev X clsact, dropping the filters of a leftover one."""
        self.del_clsact(index)
        self.call(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, _tcmsg(index, 0xFFFF0000, TC_H_CLSACT)
                  + _nla(TCA_KIND, b"clsact\0"), f"tc qdisc add dev {what} clsact")

    def del_clsact(self, index):
        """tc qdisc del dev X clsact; False when there was none (or no such device)."""
        try:
            self.call(RTM_DELQDISC, 0, _tcmsg(index, 0xFFFF0000, TC_H_CLSACT), "tc qdisc del clsact")
            return True
        except OSError:
            return False

    def add_redirect(self, index, parent, eaction, target_index, what):
        """tc filter add dev X {ingress|egress} protocol all u32 match u32 0 0
           action mirred {egress|ingress} redirect dev Y"""
        key = struct.pack("=IIii", 0, 0, 0, 0)                                  # mask 0, value 0, at 0
        sel = struct.pack("=BBBxHHhhI", TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0) + key
        mirred = struct.pack("=IIiiiiI", 0, 0, TC_ACT_STOLEN, 0, 0, eaction, target_index)
        action = _nla(1, _nla(TCA_ACT_KIND, b"mirred\0") + _nla(TCA_ACT_OPTIONS, _nla(TCA_MIRRED_PARMS, mirred)))
        info = (1 << 16) | socket.htons(ETH_P_ALL)                               # prio 1, protocol all
        self.call(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL,
                  _tcmsg(index, 0, parent, info) + _nla(TCA_KIND, b"u32\0")
                  + _nla(TCA_OPTIONS, _nla(TCA_U32_SEL, sel) + _nla(TCA_U32_ACT, action)), what)


# ---------------------------------------------------------------------------
# VmConfig validation

INT_FORMATS = {
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "int64": (-(1 << 63), (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1), "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1), "uint64": (0, (1 << 64) - 1),
}


# CHV structs with #[serde(deny_unknown_fields)] among those a VmConfig holds
# (virtio-devices/src/lib.rs RateLimiterConfig): serde's own refusal, not a stand-in deviation
DENY_UNKNOWN_FIELDS = {"RateLimiterConfig"}


class SchemaValidator:
    """Checks JSON values against the subset of OpenAPI 3 schema that CHV's
    description uses: $ref, type (integer is not boolean), properties,
    required, items, enum, minimum/maximum, minLength, additionalProperties,
    integer formats.  Unknown object fields are errors unless the schema
    has additionalProperties."""

    def __init__(self, doc, unsigned_ints=True):
        self.doc = doc
        self.unsigned_ints = unsigned_ints

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def _resolve(self, ref):
        if not ref.startswith("#/"):
            raise ValueError(f"unsupported $ref {ref}")
        node = self.doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def validate(self, value, schema_name="VmConfig"):
        errors = []
        self._check(value, {"$ref": f"#/components/schemas/{schema_name}"}, "$", errors, schema_name)
        return errors

    @staticmethod
    def _tname(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "boolean"
        if isinstance(v, int):
            return "integer"
        if isinstance(v, float):
            return "number"
        if isinstance(v, str):
            return "string"
        if isinstance(v, list):
            return "array"
        if isinstance(v, dict):
            return "object"
        return type(v).__name__

    def _check(self, v, schema, path, errors, name):
        while "$ref" in schema:
            ref = schema["$ref"]
            name = ref.rsplit("/", 1)[-1]
            schema = self._resolve(ref)
        t = schema.get("type")
        if t is None and "properties" in schema:
            t = "object"
        got = self._tname(v)
        if t == "object":
            if got != "object":
                errors.append(f"{path}: expected an object ({name}), got {got}")
                return
            props = schema.get("properties", {})
            for req in schema.get("required", []):
                if req not in v:
                    errors.append(f"{path}.{req}: missing required field of {name}")
            addl = schema.get("additionalProperties", False)
            for key, sub in v.items():
                sub_path = f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{json.dumps(key)}]"
                if key in props:
                    self._check(sub, props[key], sub_path, errors, f"{name}.{key}")
                elif isinstance(addl, dict):
                    self._check(sub, addl, sub_path, errors, name)
                elif addl is True:
                    pass
                elif name in DENY_UNKNOWN_FIELDS:
                    expected = " or ".join(f"`{p}`" for p in props)
                    errors.append(f"{sub_path}: unknown field `{key}`, expected {expected} "
                                  f"(Cloud Hypervisor refuses it too: {name} is deny_unknown_fields)")
                else:
                    errors.append(f"{sub_path}: unknown field (not in the {name} schema; "
                                  f"Cloud Hypervisor would silently ignore it)")
        elif t == "array":
            if got != "array":
                errors.append(f"{path}: expected an array, got {got}")
                return
            items = schema.get("items")
            if items is not None:
                for i, sub in enumerate(v):
                    self._check(sub, items, f"{path}[{i}]", errors, name)
        elif t == "integer":
            if got != "integer":
                errors.append(f"{path}: expected an integer, got {got} {json.dumps(v)[:40]}")
                return
            fmt = schema.get("format")
            lo, hi = INT_FORMATS.get(fmt, (None, None))
            if self.unsigned_ints:
                lo = 0 if lo is None else max(lo, 0)
            if "minimum" in schema:
                lo = schema["minimum"] if lo is None else max(lo, schema["minimum"])
            if "maximum" in schema:
                hi = schema["maximum"] if hi is None else min(hi, schema["maximum"])
            if lo is not None and v < lo:
                errors.append(f"{path}: {v} is below the minimum {lo}")
            if hi is not None and v > hi:
                errors.append(f"{path}: {v} is above the maximum {hi}" + (f" ({fmt})" if fmt else ""))
        elif t == "number":
            if got not in ("integer", "number"):
                errors.append(f"{path}: expected a number, got {got}")
                return
        elif t == "boolean":
            if got != "boolean":
                errors.append(f"{path}: expected a boolean, got {got} {json.dumps(v)[:40]}")
                return
        elif t == "string":
            if got != "string":
                errors.append(f"{path}: expected a string, got {got} {json.dumps(v)[:40]}")
                return
            if "minLength" in schema and len(v) < schema["minLength"]:
                errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "enum" in schema and v not in schema["enum"]:
            errors.append(f"{path}: {json.dumps(v)[:40]} is not one of {schema['enum']}")


def extra_create_checks(config):
    """Checks CHV's deserializer does besides the schema (so: 400 at vm.create)."""
    errors = []
    for i, net in enumerate(config.get("net") or []):
        if isinstance(net, dict):
            for key in ("mac", "host_mac"):
                if isinstance(net.get(key), str) and parse_mac(net[key]) is None:
                    errors.append(f"$.net[{i}].{key}: {net[key]!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    return errors


def semantic_errors(config):
    """CHV's VmConfig::validate-like checks; v53 runs them at vm.boot (500)."""
    errors = []
    payload = config.get("payload") or {}
    if not any(payload.get(k) for k in ("kernel", "firmware", "igvm")):
        errors.append("payload: a kernel (or firmware/igvm) is required")
    cpus = config.get("cpus") or {}
    boot = cpus.get("boot_vcpus", 1)
    maxv = cpus.get("max_vcpus", boot)
    if isinstance(boot, int) and isinstance(maxv, int) and boot > maxv:
        errors.append(f"cpus: boot_vcpus {boot} is greater than max_vcpus {maxv}")
    mem = (config.get("memory") or {}).get("size", DEFAULT_MEMORY)
    if isinstance(mem, int) and mem % PAGE_SIZE:
        errors.append(f"memory.size {mem} is not a multiple of the page size ({PAGE_SIZE})")
    for i, net in enumerate(config.get("net") or []):
        q = net.get("num_queues", 2)
        if isinstance(q, int) and isinstance(boot, int):
            if q < 2 or q % 2:
                errors.append(f"net[{i}].num_queues {q}: must be an even number >= 2")
            elif q // 2 > boot:
                errors.append(f"net[{i}].num_queues {q}: num_queues/2 exceeds boot_vcpus {boot}")
    for i, disk in enumerate(config.get("disks") or []):
        q = disk.get("num_queues", 1)
        if isinstance(q, int) and isinstance(boot, int) and q > boot:
            errors.append(f"disks[{i}].num_queues {q} exceeds boot_vcpus {boot}")
        serial = disk.get("serial")
        if isinstance(serial, str) and len(serial.encode()) > VIRTIO_BLK_ID_BYTES:
            # vmm/src/config.rs DiskConfig::validate (ValidationError::InvalidSerialLength)
            errors.append(f"Block device serial length ({len(serial.encode())}) exceeds maximum "
                          f"allowed length ({VIRTIO_BLK_ID_BYTES})")
    errors += rate_limit_errors(config)
    errors += identifier_errors(config)
    return errors


INVALID_RATE_LIMITER_GROUP = "Invalid rate-limiter group"        # ValidationError::InvalidRateLimiterGroup
VHOST_USER_RATE_LIMITER = "Rate limiting is not supported with vhost-user"


def rate_limit_errors(config):
    """vmm/src/config.rs v53: RateLimiterGroupConfig::validate (a non-empty id and
    at least one bucket; a bucket given with size or refill_time 0 still counts
    as present), VmConfig::validate (a disk's rate_limit_group must name a group),
    DiskConfig::validate (rate_limiter_config and rate_limit_group together)."""
    errors = []
    groups = config.get("rate_limit_groups") or []
    for group in groups:
        limiter = group.get("rate_limiter_config") or {}
        if not group.get("id") or (limiter.get("bandwidth") is None and limiter.get("ops") is None):
            errors.append(INVALID_RATE_LIMITER_GROUP)
    group_ids = {group.get("id") for group in groups}
    for disk in config.get("disks") or []:
        limited = disk.get("rate_limiter_config") is not None or disk.get("rate_limit_group") is not None
        if disk.get("vhost_user") and limited:
            errors.append(VHOST_USER_RATE_LIMITER)
        elif disk.get("rate_limit_group") is not None and disk["rate_limit_group"] not in group_ids:
            errors.append(INVALID_RATE_LIMITER_GROUP)
        elif disk.get("rate_limiter_config") is not None and disk.get("rate_limit_group") is not None:
            errors.append(INVALID_RATE_LIMITER_GROUP)
    for net in config.get("net") or []:
        if net.get("vhost_user") and net.get("rate_limiter_config") is not None:
            errors.append(VHOST_USER_RATE_LIMITER)
    return errors


# VmConfig::validate passes these ids to validate_identifier, in this order
IDENTIFIED_DEVICES = ("rate_limit_groups", "disks", "net", "fs", "generic_vhost_user", "pmem", "rng", "rtc",
                      "console", "user_devices", "vdpa", "balloon", "devices", "vsock")


def identifier_errors(config):
    """vmm/src/config.rs VmConfig::validate_identifier: every device id (and rate
    limit group id) is unique across the VmConfig and does not start with "__"
    (reserved for the ids CHV makes up).  The texts are CHV's, its typo included."""
    errors, seen = [], set()
    for key in IDENTIFIED_DEVICES:
        devices = config.get(key)
        for device in devices if isinstance(devices, list) else [devices] if devices else []:
            ident = device.get("id")
            if not isinstance(ident, str):
                continue
            if ident.startswith("__"):
                errors.append(f"Identifier {ident} is not invalid")
            elif ident in seen:
                errors.append(f"Identifier {ident} is not unique")
            seen.add(ident)
    return errors


def detect_image_type(path):
    """CHV's block/src/lib.rs detect_image_type, for the formats the stand-in tells
    apart: Qcow2 (magic QFI\xfb), Vhdx (signature "vhdxfile"), else Raw (fixed VHD,
    told by a footer, is taken for Raw here)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"QFI\xfb":
        return "Qcow2"
    if head == b"vhdxfile":
        return "Vhdx"
    return "Raw"


def disk_image_checks(disk, log):
    """CHV v51+ at vm.boot (vmm/src/device_manager.rs make_virtio_block_device):
    without image_type the type is autodetected, with warnings in the log, and an
    autodetected raw disk gets sector-0 writes disabled (virtio-devices/src/block.rs
    check_request answers them with VIRTIO_BLK_S_IOERR, so the guest's ext4, whose
    superblock is in block 0, goes read-only).  A given image_type that differs from
    the detected one fails the boot.  Returns CHV's warning when sector-0 writes are
    disabled on a writable disk, else None."""
    path = disk["path"]
    detected = detect_image_type(path)
    given = disk.get("image_type", "Unknown")
    if given == "Unknown":
        log("DEPRECATION: auto-detection of disk image type is deprecated and will be removed in a "
            "future release. Please specify image type explicitly.", logging.WARNING)
        log(f"No image_type specified - detected as {detected.lower()}. "
            "Configuration updated to persist type across reboots and migrations.", logging.WARNING)
        if detected == "Raw":
            warning = "Autodetected raw image type. Disabling sector 0 writes."
            log(f"{warning} ({path})", logging.WARNING)
            return None if disk.get("readonly") else warning
        return None
    if given != detected:
        raise EngineError("Error from device manager",
                          f"Disk image type does not match expected type: specified = {given.lower()}, "
                          f"detected = {detected.lower()}")
    return None


# ---------------------------------------------------------------------------
# process engine: guest side (runs in forked children, never returns to S)

def _console_write(fd, text):
    if fd is None or fd < 0:
        return
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


class _End:
    __slots__ = ("sock", "fd", "peer", "out", "eof", "shut", "mask")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = None
        self.out = bytearray()
        self.eof = False
        self.shut = False
        self.mask = None  # None: not registered


class _VsockProxy:
    """CHV hybrid vsock, host side: `CONNECT <port>\\n` -> TCP 127.0.0.1:<port>
    in the guest netns; "OK <n>\\n" then a byte pipe; EOF when nobody listens."""

    LIMIT = 1 << 20

    def __init__(self, ep):
        self.ep = ep
        self.pending = {}   # fd -> [sock, bytearray]
        self.ends = {}      # fd -> _End

    def owns(self, fd):
        return fd in self.pending or fd in self.ends

    def accept(self, lsock):
        for _ in range(64):
            try:
                c, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            c.setblocking(False)
            self.pending[c.fileno()] = [c, bytearray()]
            self.ep.register(c.fileno(), select.EPOLLIN)

    def event(self, fd, ev):
        if fd in self.pending:
            self._handshake(fd)
        elif fd in self.ends:
            self._on(self.ends[fd], ev)

    def _drop_pending(self, fd):
        c, _ = self.pending.pop(fd)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        c.close()

    def _handshake(self, fd):
        c, buf = self.pending[fd]
        try:
            data = c.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_pending(fd)
            return
        buf += data
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > 256:
                self._drop_pending(fd)
            return
        line = bytes(buf[:nl]).decode("ascii", "replace").strip()
        rest = bytes(buf[nl + 1:])
        del self.pending[fd]
        self.ep.unregister(fd)
        parts = line.split()
        if len(parts) != 2 or parts[0] != "CONNECT" or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
            c.close()
            return
        try:
            t = socket.create_connection(("127.0.0.1", int(parts[1])), timeout=1.0)
        except OSError:
            c.close()   # no listener in the guest: the host reads EOF
            return
        try:
            t.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.settimeout(1.0)
            c.sendall(f"OK {t.getsockname()[1]}\n".encode())
            c.setblocking(False)
            t.setblocking(False)
        except OSError:
            c.close()
            t.close()
            return
        a, b = _End(c), _End(t)
        a.peer, b.peer = b, a
        b.out += rest
        self.ends[a.fd] = a
        self.ends[b.fd] = b
        try:
            self._flush(b)
        except OSError:
            self._close(a)
            return
        self._rearm(a)
        self._rearm(b)

    def _on(self, end, ev):
        peer = end.peer
        try:
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not end.eof:
                while len(peer.out) < self.LIMIT:
                    try:
                        data = end.sock.recv(262144)
                    except (BlockingIOError, InterruptedError):
                        break
                    if not data:
                        end.eof = True
                        break
                    peer.out += data
            self._flush(peer)
            self._flush(end)
        except OSError:
            self._close(end)
            return
        if end.eof and peer.eof and not end.out and not peer.out:
            self._close(end)
            return
        self._rearm(end)
        self._rearm(peer)

    @staticmethod
    def _flush(end):
        while end.out:
            try:
                n = end.sock.send(end.out)
            except (BlockingIOError, InterruptedError):
                return
            del end.out[:n]
        if end.peer.eof and not end.shut:
            end.shut = True
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _rearm(self, e):
        m = 0
        if not e.eof and len(e.peer.out) < self.LIMIT:
            m |= select.EPOLLIN
        if e.out:
            m |= select.EPOLLOUT
        if m == 0:
            if e.mask is not None:
                self.ep.unregister(e.fd)
                e.mask = None
            return
        if e.mask is None:
            self.ep.register(e.fd, m)
        elif m != e.mask:
            self.ep.modify(e.fd, m)
        e.mask = m

    def _close(self, end):
        for e in (end, end.peer):
            if e is None:
                continue
            self.ends.pop(e.fd, None)
            if e.mask is not None:
                try:
                    self.ep.unregister(e.fd)
                except OSError:
                    pass
                e.mask = None
            e.sock.close()
        if end.peer is not None:
            end.peer.peer = None
        end.peer = None


class TokenBucket:
    """rate_limiter/src/lib.rs TokenBucket: starts full (size tokens) plus a
    one_time_burst spent first; refills size tokens per refill_time ms."""

    def __init__(self, size, one_time_burst, refill_time_ms, now):
        self.size, self.one_time_burst, self.refill_time_ms = size, one_time_burst, refill_time_ms
        self.budget, self.last_update = size, now

    def reduce(self, tokens, now):
        """True (taken), False (not enough budget: nothing taken) or the ratio
        tokens/size of an over-consumption (more than the bucket holds: the budget
        is emptied and the caller blocks ratio * refill_time)."""
        if self.one_time_burst > 0:
            if self.one_time_burst >= tokens:
                self.one_time_burst -= tokens
                self.last_update = now
                return True
            tokens -= self.one_time_burst
            self.one_time_burst = 0
        elapsed, self.last_update = now - self.last_update, now
        self.budget = min(self.size, self.budget + elapsed * 1000 * self.size / self.refill_time_ms)
        if tokens > self.budget:
            if tokens > self.size:
                tokens -= self.budget
                self.budget = 0
                return tokens / self.size
            return False
        self.budget -= tokens
        return True


RATE_LIMITER_TIMER_S = 0.1      # rate_limiter/src/lib.rs REFILL_TIMER_INTERVAL_MS


class RateLimiter:
    """rate_limiter/src/lib.rs RateLimiter for one RateLimiterConfig: a bandwidth
    and an ops bucket (None when off: size or refill_time 0, TokenBucket::new).
    A refused consume() arms the 100 ms timer; while it runs every consume()
    is refused (the device stops taking frames until it fires)."""

    def __init__(self, config, now):
        self.buckets = {}
        for kind in ("bandwidth", "ops"):
            b = config.get(kind) or {}
            if b.get("size") and b.get("refill_time"):
                self.buckets[kind] = TokenBucket(b["size"], b.get("one_time_burst") or 0, b["refill_time"], now)
        self.blocked_until = 0.0

    def consume(self, tokens, kind, now):
        if now < self.blocked_until:
            return False
        bucket = self.buckets.get(kind)
        if bucket is None:
            return True
        result = bucket.reduce(tokens, now)
        if result is False:
            self.blocked_until = now + RATE_LIMITER_TIMER_S
            return False
        if result is not True:
            self.blocked_until = now + result * bucket.refill_time_ms / 1000
        return True

    def take_frame(self, length, now):
        """net_util/src/queue_pair.rs: the frame has gone through; one op, then its
        bytes.  False: the limit is reached, take no frame until unblocked_at()."""
        return self.consume(1, "ops", now) and self.consume(length, "bandwidth", now)

    def unblocked_at(self):
        return self.blocked_until


def net_rate_limiters(net):
    """(rx, tx) RateLimiters of a NetConfig, or None when it limits nothing:
    virtio-devices/src/net.rs gives each queue pair two limiters built from the
    whole rate_limiter_config (frames to the guest, frames from it)."""
    config, now = net.get("rate_limiter_config") or {}, time.monotonic()
    rx = RateLimiter(config, now)
    return (rx, RateLimiter(config, now)) if rx.buckets else None


def _relay_frames(src, dst, limiter, now):
    """Move up to 256 frames src -> dst; stops early when limiter (or None)
    refuses more (the rest wait in src's queue).  Returns True when stopped so."""
    read, write = os.read, os.write
    for _ in range(256):
        try:
            frame = read(src, 65536)
        except OSError:
            break
        if not frame:
            break
        try:
            write(dst, frame)
        except OSError:
            continue   # eth0 down (EIO) or queue full: the frame is dropped, like a NIC
        if limiter is not None and not limiter.take_frame(len(frame), now()):
            return True
    return False


def _relay_loop(tap_fd, eth_fd, vsock_fd, pidfd, init_pid, console_fd=-1, limiters=None):
    """Guest VMM main loop: vsock proxy, guest exit, and the frames tap <-> eth0
    when they go through Python (eth_fd >= 0; -1 with the kernel relay), each
    direction held by its RateLimiter when limiters is (rx, tx): a source whose
    limiter refuses is left out of the poll until its timer ends.
    Returns GUEST_RESET_EXIT when the guest rebooted, GUEST_POWEROFF_EXIT else."""
    ep = select.epoll()
    direction = {}          # source fd -> (destination fd, its RateLimiter or None)
    if eth_fd >= 0:
        rx, tx = limiters or (None, None)
        direction = {tap_fd: (eth_fd, rx), eth_fd: (tap_fd, tx)}
        ep.register(tap_fd, select.EPOLLIN)
        ep.register(eth_fd, select.EPOLLIN)
    ep.register(pidfd, select.EPOLLIN)
    lsock = None
    if vsock_fd >= 0:
        lsock = socket.socket(fileno=vsock_fd)
        lsock.setblocking(False)
        ep.register(vsock_fd, select.EPOLLIN)
    proxy = _VsockProxy(ep)
    poll, now = ep.poll, time.monotonic
    held = {}               # source fd -> when its limiter lets frames through again
    while True:
        timeout = max(0.0, min(held.values()) - now()) if held else -1
        for fd, ev in poll(timeout):
            if fd in direction:
                dst, limiter = direction[fd]
                if _relay_frames(fd, dst, limiter, now):
                    held[fd] = limiter.unblocked_at()
                    ep.modify(fd, 0)
            elif fd == pidfd:
                _, status = os.waitpid(init_pid, 0)
                return _guest_outcome(status, console_fd)
            elif fd == vsock_fd:
                proxy.accept(lsock)
            else:
                proxy.event(fd, ev)
        for fd, until in list(held.items()):
            if until <= now():
                del held[fd]
                ep.modify(fd, select.EPOLLIN)


GUEST_POWEROFF_EXIT = 0     # guest VMM exit codes: the guest powered off...
GUEST_RESET_EXIT = 3        # ...or reset (the stand-in rebuilds the VM)


def _guest_outcome(status, console_fd):
    """What the end of the guest's init means.  reboot(2) in a child pid namespace
    ("pid namespaces" in reboot(2)): the kernel kills the namespace's init, whose
    parent then sees it killed by SIGHUP for LINUX_REBOOT_CMD_RESTART(2) and by
    SIGINT for POWER_OFF/HALT.  So SIGHUP is a guest reset; everything else (the
    agent's exit, POWER_OFF) is a power-off.  The console gets the kernel's line."""
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP:
        _console_write(console_fd, "cbox-standin: reboot: Restarting system\n")
        return GUEST_RESET_EXIT
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT:
        _console_write(console_fd, "cbox-standin: reboot: Power down\n")
    return GUEST_POWEROFF_EXIT


def _guest_init_main(console_fd, argv, env, close_fds, cpus=None):
    """pid 1 of the guest's pid namespace: join the guest's vCPUs (GuestCpus), start the
    agent, reap, forward SIGTERM."""
    set_pdeathsig(signal.SIGKILL)
    set_comm("cbox-guest-init")
    if cpus is not None:
        cpus.join(console_fd)
    for fd in close_fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    agent = [0]

    def forward(signum, frame):
        if agent[0]:
            try:
                os.kill(agent[0], signum)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    pid = os.fork()
    if pid == 0:
        try:
            set_pdeathsig(signal.SIGKILL)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            if console_fd >= 0:
                os.dup2(console_fd, 1)
                os.dup2(console_fd, 2)
            os.chdir("/")
            os.execve(argv[0], argv, env)
        except BaseException as e:
            _console_write(2, f"cbox-standin: cannot start {' '.join(argv)}: {e}\n")
        finally:
            os._exit(127)
    agent[0] = pid
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if got == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    how = f"exit code {code}" if code >= 0 else f"signal {-code}"
    _console_write(console_fd, f"cbox-standin: init (guest agent) ended with {how}\n"
                               f"cbox-standin: reboot: Power down\n")
    return code if code >= 0 else 128 - code


def host_veth_name(vmm_pid):
    """The stand-in side of a guest's veth pair (<= 15 characters, IFNAMSIZ)."""
    return f"cbveth{vmm_pid}"


class KernelRelay:
    """net[0]'s frames through the kernel instead of Python:

        tap egress  --tc u32 + mirred egress redirect-->  host veth --> eth0 (guest)
        eth0 --> host veth ingress --tc u32 + mirred ingress redirect--> tap

    so the bridge sends to and receives from the tap port as before, while the
    tap's fd (held for carrier and exclusivity) sees no frame.  `rtnl` is bound
    to the stand-in's netns, where the tap and the host veth live."""

    def __init__(self, rtnl, tap, veth):
        self.rtnl, self.tap, self.veth = rtnl, tap, veth
        self.indexes = None          # (tap's, host veth's) once made

    def start(self, guest_netns_fd, mac=None, mtu=None):
        """Create the pair (eth0 in the guest netns, down) and the tc rules; undoes
        what it did and raises OSError when the kernel refuses a step."""
        rtnl = self.rtnl
        tap = rtnl.link_index(self.tap)
        rtnl.add_veth(self.veth, "eth0", guest_netns_fd, mac, mtu)
        try:
            veth = rtnl.link_index(self.veth)
            self.indexes = tap, veth
            try:
                rtnl.no_ipv6_address(veth)
            except OSError:
                pass    # a kernel without IPv6 has no address to suppress
            rtnl.replace_clsact(veth, self.veth)
            rtnl.add_redirect(veth, TC_H_CLSACT_INGRESS, TCA_INGRESS_REDIR, tap,
                              f"tc filter add dev {self.veth} ingress ... mirred ingress redirect dev {self.tap}")
            rtnl.replace_clsact(tap, self.tap)
            rtnl.add_redirect(tap, TC_H_CLSACT_EGRESS, TCA_EGRESS_REDIR, veth,
                              f"tc filter add dev {self.tap} egress ... mirred egress redirect dev {self.veth}")
            rtnl.set_up(veth)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """Delete the veth pair and the tap's clsact qdisc (the tap itself is cbox's).

        Each `ip link del` waits for RCU grace periods (~16 ms here: 100 pairs one after the
        other take 1.6 s), while the devices of one `ip link del group` go together (100 pairs:
        0.04 s), and 250 guests stopping together queue for the rtnl lock.  So the pair joins
        DYING_GROUP, then the group is deleted: the guests stopping meanwhile go in one batch,
        whoever deletes it (a call that finds the group empty: ours went with an earlier
        batch).  Not left to the guest's netns going away: a netns can outlive its processes
        (seen here: two of three guests' veths still there 10 s after their VMs were
        deleted), and a netns that dies is dismantled by one kernel worker, late on a loaded
        host.

        Joining the group is cheap; deleting it is what costs.  So one guest at a time
        deletes (dying_group_deleter, per netns): the pairs that joined while it worked go
        with the next call, and a guest whose pair went with someone else's has nothing
        left to do (250 guests stopping together share a few deletions).  Requests go in
        one datagram where they can: the kernel runs them in turn within one sendmsg,
        without this process waiting to be scheduled between them."""
        tap, veth = self.indexes or (self._index(self.tap), self._index(self.veth))
        group = _nla(IFLA_GROUP, struct.pack("=I", DYING_GROUP))
        try:
            self.rtnl.call_all([(RTM_NEWLINK, 0, _ifinfomsg(veth) + group),        # ip link set VETH group G
                                (RTM_DELQDISC, 0, _tcmsg(tap, 0xFFFF0000, TC_H_CLSACT))])   # tc qdisc del clsact
        except OSError:
            pass
        def delete_group():
            with contextlib.suppress(OSError):
                self.rtnl.call_all([(RTM_DELLINK, 0, _ifinfomsg() + group)])     # ip link del group G
        dying_group_deleter(self.rtnl.netns, lambda: self._index(self.veth) >= 0, delete_group)

    def _index(self, name):
        """A link's index, -1 when there is none (a request naming -1 fails alone)."""
        try:
            return self.rtnl.link_index(name)
        except OSError:
            return -1

    def set_up(self, up):
        """Carrier of the guest's eth0 (vm.pause: no frame in or out)."""
        self.rtnl.set_up(self.rtnl.link_index(self.veth), up)


def dying_group_deleter(netns, mine_left, delete_group):
    """Until mine_left() is false: delete DYING_GROUP as the one deleter of the netns at a
    time, or wait for the deleter at work.  An flock on a file of /dev/shm named by the
    netns' inode (inodes are reused: the files stay few): the deleter holds it exclusive,
    the others wait for it shared, so its release wakes them all at once to look whether
    their pair went with its batch (an exclusive queue would hand the lock on one waiter
    at a time, each woken with all the others: seconds for 250)."""
    fd = os.open(f"/dev/shm/cbox-standin-dying-{netns}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while mine_left():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_SH)      # the deleter at work (or others looking): wait
                fcntl.flock(fd, fcntl.LOCK_UN)
                time.sleep(0.001)
                continue
            try:
                if mine_left():
                    delete_group()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_kernel_relay(tap, veth):
    """KernelRelay.stop() from the stand-in, for a guest VMM that died by a signal."""
    try:
        rtnl = Rtnl()
    except OSError:
        return
    try:
        KernelRelay(rtnl, tap, veth).stop()
    finally:
        rtnl.close()


def _unshare_net(net, relay_mode):
    """unshare(CLONE_NEWNET) for the guest; with a tap and relay_mode "kernel" also
    join the new netns to the tap through the kernel.  Returns (KernelRelay or
    None, why the kernel relay is unavailable or None)."""
    if not net.get("tap") or relay_mode != "kernel":
        unshare(CLONE_NEWNET)
        return None, None
    try:
        rtnl = Rtnl()            # created here: stays bound to the stand-in's netns
    except OSError as e:
        unshare(CLONE_NEWNET)
        return None, f"rtnetlink: {rust_io(e)}"
    unshare(CLONE_NEWNET)
    relay = KernelRelay(rtnl, net["tap"], host_veth_name(os.getpid()))
    mtu = net["mtu"] if isinstance(net.get("mtu"), int) else None
    try:
        ns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            relay.start(ns_fd, parse_mac(net.get("mac") or ""), mtu)
        finally:
            os.close(ns_fd)
    except OSError as e:
        rtnl.close()
        return None, e.strerror or rust_io(e)
    return relay, None


def _make_guest_tap(net):
    """The Python relay's eth0: a tap in the guest netns; returns its fd."""
    eth_fd = open_tap("eth0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        mac = parse_mac(net.get("mac") or "")
        if mac:
            fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, struct.pack("16sH6s16x", b"eth0", ARPHRD_ETHER, mac))
        if isinstance(net.get("mtu"), int):
            fcntl.ioctl(s.fileno(), SIOCSIFMTU, struct.pack("16si20x", b"eth0", net["mtu"]))
    return eth_fd


def _guest_vmm_main(parent, wr, tap_fd, vsock_fd, console_fd, net, relay_mode, argv, env, cmdline,
                    console_in_fd=-1, cpus=None):
    """First child of the stand-in: becomes the guest's VMM side."""
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        return 1
    set_comm("cbox-guest-vmm")
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    os.setsid()
    os.umask(0o022)         # a guest kernel starts init with umask 0022, not the VMM's 077
    # Neutralize every inherited descriptor except ours: /dev/null over them
    # (not close) so a stand-in object collected here cannot close a new fd.
    keep = {0, 1, 2, wr, tap_fd, vsock_fd, console_fd, console_in_fd}
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != devnull:
            try:
                os.dup2(devnull, fd, inheritable=False)
            except OSError:
                pass
    os.dup2(console_in_fd if console_in_fd >= 0 else devnull, 0)    # serial input: the guest's stdin
    if console_in_fd > 2:
        os.dup2(devnull, console_in_fd, inheritable=False)
    kernel, why_not = _unshare_net(net if tap_fd >= 0 else {}, relay_mode)
    try:
        return _guest_vmm_run(wr, tap_fd, vsock_fd, console_fd, net, kernel, why_not, argv, env, cmdline, cpus)
    finally:
        if kernel is not None:
            kernel.stop()    # before the tap fd is released: no other VMM can hold the tap yet


def _net_console_line(net, tap_fd, kernel):
    if tap_fd < 0:
        return "none"
    limits = net_rate_limiters(net)
    if kernel is not None:
        return (f"eth0 <-> {net['tap']} (kernel relay: veth {kernel.veth} <-> eth0, "
                f"tc mirred {net['tap']} <-> {kernel.veth}"
                + (", rate_limiter_config NOT enforced: the Python relay enforces it)" if limits else ")"))
    limited = ", rx and tx each rate-limited" if limits else ""
    return f"eth0 <-> {net['tap']} (Python relay: tap eth0, read/write in the guest VMM{limited})"


def _guest_vmm_run(wr, tap_fd, vsock_fd, console_fd, net, kernel, why_not, argv, env, cmdline, cpus=None):
    """The guest VMM, its netns made: UTS and pid namespaces, eth0, init, main loop."""
    unshare(CLONE_NEWUTS | CLONE_NEWPID)
    socket.sethostname("(none)")
    eth_fd = _make_guest_tap(net) if tap_fd >= 0 and kernel is None else -1
    note = f"net: kernel relay unavailable ({why_not}), relaying frames in Python" if why_not else None
    if note:
        os.write(wr, f"LOG {note}\n".encode())
    _console_write(console_fd,
                   f"cbox-standin: Cloud Hypervisor {VERSION} stand-in, process engine\n"
                   f"cbox-standin: Command line: {cmdline}\n"
                   + (f"cbox-standin: {note}\n" if note else "")
                   + f"cbox-standin: net: {_net_console_line(net, tap_fd, kernel)}\n"
                   + (f"cbox-standin: cpus: {cpus.describe()}\n" if cpus is not None else "")
                   + f"cbox-standin: Run {' '.join(argv)} as init\n")
    rtnl_fd = kernel.rtnl.fileno() if kernel is not None else -1
    init_pid = os.fork()
    if init_pid == 0:
        code = 70
        try:
            code = _guest_init_main(console_fd, argv, env, (wr, tap_fd, eth_fd, vsock_fd, rtnl_fd), cpus)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(init_pid)
    signal.signal(signal.SIGTERM, lambda *a: os.kill(init_pid, signal.SIGTERM))
    relay = f"kernel {kernel.veth}" if kernel is not None else ("python" if tap_fd >= 0 else "none")
    os.write(wr, f"OK {init_pid} {relay}\n".encode())
    os.close(wr)
    return _relay_loop(tap_fd, eth_fd, vsock_fd, pidfd, init_pid, console_fd,
                       net_rate_limiters(net) if eth_fd >= 0 else None)


# ---------------------------------------------------------------------------
# process engine: a guest held to its vCPUs

CPU_PERIOD_US = 20_000      # CFS bandwidth period: a guest over its vCPUs waits at most about this long
CPU_CGROUP_PREFIX = "cbox-standin-"
CPU_MOUNT = Path("/run/cbox-standin/cpu")      # where the stand-in mounts it when it cannot see it


def cpu_hierarchy():
    """(directory, 1 or 2) of the cgroup hierarchy that has the cpu controller, or (None, why not).
    Where this process's mounts do not show it (`ip netns exec`, which runs the tests'
    namespaces, remounts /sys and so hides the host's cgroup mounts), the stand-in mounts
    it at CPU_MOUNT, in the mount namespace it runs in (`ip netns exec` makes one per
    command): the cpu hierarchy of /proc/self/cgroup (cgroup v1, with its controllers as
    options, which mounts that same hierarchy again), or cgroup2."""
    found = _mounted_cpu_hierarchy()
    if found[0] is not None:
        return found
    try:
        return _mount_cpu_hierarchy()
    except OSError as e:
        return None, f"no cgroup hierarchy with the cpu controller is mounted, and mounting one failed: {rust_io(e)}"


# Twins of cbox.py's mounted_cpu_hierarchy and mount_cpu_hierarchy (VmCpuGroups): each stays
# standalone, as Cloud Hypervisor and cbox.py are.
def _mounted_cpu_hierarchy():
    try:
        with open("/proc/self/mounts") as f:
            entries = [line.split()[:4] for line in f]
    except OSError as e:
        return None, f"/proc/self/mounts: {e.strerror}"
    for _, point, fstype, options in entries:
        if fstype == "cgroup" and "cpu" in options.split(",") and os.path.isdir(point):
            return Path(point), 1
    for _, point, fstype, _ in entries:
        if fstype == "cgroup2":
            try:
                if "cpu" in Path(point, "cgroup.controllers").read_text().split():
                    return Path(point), 2
            except OSError:
                continue
    return None, "no cgroup hierarchy with the cpu controller is mounted"


def _mount_cpu_hierarchy():
    controllers = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, _ = line.rstrip("\n").split(":", 2)
            if "cpu" in names.split(","):
                controllers = names
    CPU_MOUNT.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(CPU_MOUNT):
        fstype, options = ("cgroup", controllers) if controllers else ("cgroup2", "")
        if _libc.mount(fstype.encode(), str(CPU_MOUNT).encode(), fstype.encode(), 0, options.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(CPU_MOUNT))
    if controllers:
        return CPU_MOUNT, 1
    if "cpu" in (CPU_MOUNT / "cgroup.controllers").read_text().split():
        return CPU_MOUNT, 2
    return None, "cgroup2 has no cpu controller here"


def guest_cgroup_parent(point, version, pid="self"):
    """Where the guest's cgroup (GuestCpus) of the stand-in `pid` goes: below the stand-in's
    own cpu cgroup, as a VM's vCPU threads are threads of its hypervisor and so in its cgroup
    (cbox.py gives each hypervisor one: VmCpuGroups). cgroup v2 lets only leaves hold
    processes, and the stand-in's own holds it, so there the guest's goes beside it."""
    relative = "/"
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if "cpu" in names.split(",") if version == 1 else names == "":
                relative = path
    parent = point / relative.lstrip("/")
    return parent.parent if version == 2 and relative != "/" else parent


def remove_orphan_cpu_cgroups():
    """Remove the vCPU cgroups (GuestCpus) of stand-ins that are gone, wherever they are in the
    hierarchy, and the empty VM cgroups of cbox.py instances (cbox-<hash>, VmCpuGroups): at the
    end of a test run, where the last stand-ins and cbox.py killed with SIGKILL left theirs."""
    point, _ = _mounted_cpu_hierarchy()
    deadline = time.monotonic() + 5.0           # processes killed at the end of the run may still be exiting
    while point is not None:
        for dirpath, _, _ in os.walk(point):
            with contextlib.suppress(OSError):         # gone meanwhile
                GuestCpus.remove_orphans(Path(dirpath))
        parents = [e for e in point.glob("cbox-*") if re.fullmatch(r"cbox-[0-9a-f]{12}", e.name)]
        for parent in parents:
            for dirpath, _, _ in sorted(os.walk(parent), key=lambda e: -e[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        if not any(p.exists() for p in parents) or time.monotonic() > deadline:
            return
        time.sleep(0.1)


class GuestCpus:
    """A process guest held to its boot_vcpus, as a VM's processes are held to its vCPU threads.

    A real guest's processes, however many, run on boot_vcpus vCPU threads, each of which
    the host schedules like any other thread.  A process guest's are host processes, so
    without this a guest could take every host CPU and each of its processes would count
    as a thread of its own (a shell it starts competes with every busy process of every
    other guest, where a VM's vCPU that wakes from idle is one thread).  So the guest gets
    a cpu cgroup of its own, below the stand-in's (guest_cgroup_parent: where its vCPU
    threads would be, in the hypervisor's cgroup, which is cbox.py's VmCpuGroups' or, with
    those off, the one cbox.py runs in): quota boot_vcpus CPUs per CPU_PERIOD_US, weight that
    of boot_vcpus threads (v1 cpu.shares 1024 each, v2 cpu.weight 100 each).  Its init
    joins it (writes 0 to cgroup.procs) before it starts the agent; the guest VMM (relay,
    vsock proxy) stays outside, as CHV's device threads run beside the vCPUs.  The
    directory is removed once the guest is gone; ones whose stand-in died (kill -9) are
    removed by the next guest that starts beside them, with their hypervisor's by cbox.py,
    and at the end of a test run (conftest.py).
    Where no hierarchy has the cpu controller, or with CBOX_STANDIN_VCPU_LIMIT=0, the guest
    is not held and its console says so."""

    def __init__(self, vcpus):
        self.vcpus = max(1, int(vcpus))
        self.path = None             # the cgroup directory once made
        self.why_not = None

    def create(self):
        if (os.environ.get("CBOX_STANDIN_VCPU_LIMIT") or "1").strip() == "0":
            self.why_not = "CBOX_STANDIN_VCPU_LIMIT=0"
            return
        point, version = cpu_hierarchy()
        if point is None:
            self.why_not = version
            return
        parent = guest_cgroup_parent(point, version)
        path = parent / f"{CPU_CGROUP_PREFIX}{os.getpid()}"
        quota = self.vcpus * CPU_PERIOD_US
        try:
            self.remove_orphans(parent)
            if version == 2:
                self._enable_cpu_below(point)
            path.mkdir(exist_ok=True)
            if version == 1:
                (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
                (path / "cpu.shares").write_text(str(1024 * self.vcpus))
            else:
                (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
                (path / "cpu.weight").write_text(str(min(10000, 100 * self.vcpus)))
        except OSError as e:
            self.why_not = f"{e.filename}: {e.strerror}" if e.filename else str(e)
            with contextlib.suppress(OSError):
                path.rmdir()
            return
        self.path = path

    @staticmethod
    def _enable_cpu_below(point):
        """cgroup v2: the cpu controller in the top cgroup's subtree_control (the top cgroup may
        have processes of its own; any other may not)."""
        if "cpu" not in (point / "cgroup.subtree_control").read_text().split():
            (point / "cgroup.subtree_control").write_text("+cpu")

    @staticmethod
    def remove_orphans(point):
        for entry in point.iterdir():
            name = entry.name
            if name.startswith(CPU_CGROUP_PREFIX) and name[len(CPU_CGROUP_PREFIX):].isdigit():
                pid = int(name[len(CPU_CGROUP_PREFIX):])
                if pid != os.getpid() and proc_state(pid) in (None, "Z", "X"):    # its stand-in is gone
                    with contextlib.suppress(OSError):
                        entry.rmdir()           # EBUSY: something still runs in it

    def describe(self):
        if self.path is None:
            return (f"NOT held to {self.vcpus} vCPU(s) ({self.why_not}): the guest's processes may use "
                    "every host CPU")
        return f"{self.vcpus} vCPU(s): the guest's processes held to {self.vcpus} CPU(s) (cpu cgroup {self.path})"

    def join(self, console_fd):
        """In the guest's init: move this process (and so what it starts) into the cgroup."""
        if self.path is None:
            return
        try:
            (self.path / "cgroup.procs").write_text("0")
        except OSError as e:
            _console_write(console_fd, f"cbox-standin: cpus: init could not join {self.path}: {e.strerror}; "
                                       "the guest's processes may use every host CPU\n")

    def remove(self, timeout=2.0):
        """Remove the cgroup once the guest's processes are gone (they leave it as they exit)."""
        if self.path is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                return                          # left for the next guest's remove_orphans
            self.path = None
            return


# ---------------------------------------------------------------------------
# process engine: stand-in side

def default_agent():
    return os.environ.get("CBOX_GUEST_AGENT") or str(REPO / "guest_agent.py")


class ProcessEngine:
    """Runs the guest agent as a process in private net/UTS/pid namespaces."""

    def __init__(self, config, log=None):
        self.config = config
        self.log = log or (lambda msg: None)
        self.vsock_listener = None
        self.console_fd = None
        self.console_in_fd = None
        self.agent_argv = [os.environ.get("CBOX_STANDIN_PYTHON") or sys.executable, default_agent()]
        self.guest_env = {}
        self.pid = None              # guest VMM process (our child)
        self._vmm_pidfd = None       # readable once it exited
        self.init_pid = None         # guest init (pid 1 of the guest pid ns)
        self.cpus = None             # GuestCpus: the guest held to boot_vcpus
        self._init_pidfd = None
        self._code = None
        self._paused = False
        self.tap = None              # net[0].tap
        self.relay = None            # "kernel" | "python" | "none", as the guest VMM reports
        self.host_veth = None        # stand-in side of the guest's veth pair (kernel relay)
        self.grace_s = float(os.environ.get("CBOX_STANDIN_GUEST_GRACE_S") or 0)   # SIGTERM before a stop

    def start(self):
        if self.pid is not None:
            raise EngineError("engine already started")
        relay_mode = (os.environ.get("CBOX_STANDIN_RELAY") or "kernel").strip()
        if relay_mode not in ("kernel", "python"):
            raise EngineError(f"CBOX_STANDIN_RELAY={relay_mode!r}: expected kernel or python")
        nets = self.config.get("net") or []
        net = dict(nets[0]) if nets else {}
        tap_fd = -1
        if nets:
            if not net.get("tap"):
                raise EngineError("Error from device manager", "Cannot create virtio-net device",
                                  "net[0].tap is required by the CBox stand-in (it does not create taps)")
            multi = int(net.get("num_queues", 2)) > 2
            try:
                tap_fd = open_tap(net["tap"], multi_queue=multi)
            except OSError as e:
                raise EngineError("Error from device manager", "Cannot create virtio-net device",
                                  "Failed to open taps", f"Open tap device {net['tap']} failed",
                                  f"Unable to configure tap interface: {rust_io(e)}") from None
            self.tap = net["tap"]
        vsock_fd = self.vsock_listener.fileno() if self.vsock_listener is not None else -1
        console_fd = self.console_fd if self.console_fd is not None else -1
        cmdline = (self.config.get("payload") or {}).get("cmdline", "")
        self.cpus = GuestCpus((self.config.get("cpus") or {}).get("boot_vcpus", 1))
        self.cpus.create()
        self.log(f"cpus: {self.cpus.describe()}")
        rd, wr = os.pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(rd)
            os.close(wr)
            if tap_fd >= 0:
                os.close(tap_fd)
            self.cpus.remove()
            raise EngineError("Cannot fork the guest", rust_io(e)) from None
        if pid == 0:
            code = 70
            try:
                os.close(rd)
                code = _guest_vmm_main(parent, wr, tap_fd, vsock_fd, console_fd, net, relay_mode,
                                       self.agent_argv, self.guest_env, cmdline,
                                       self.console_in_fd if self.console_in_fd is not None else -1, self.cpus)
            except BaseException as e:
                msg = f"{e.strerror}: {e.filename or ''} (os error {e.errno})" if isinstance(e, OSError) and e.errno else repr(e)
                try:
                    os.write(wr, f"ERR guest setup failed: {msg}\n".encode())
                except BaseException:
                    pass
            finally:
                os._exit(code)
        self.pid = pid
        try:
            self._vmm_pidfd = os.pidfd_open(pid)
        except OSError:
            self._vmm_pidfd = None
        if self.tap and relay_mode == "kernel":
            self.host_veth = host_veth_name(pid)     # known now: cleaned up even if setup dies
        os.close(wr)
        if tap_fd >= 0:
            os.close(tap_fd)   # the guest VMM holds it now
        try:
            text = self._read_report(rd)
        finally:
            os.close(rd)
        if text.startswith("OK "):
            _, init_pid, self.relay, *veth = text.split()
            self.init_pid = int(init_pid)
            self.host_veth = veth[0] if veth else None
            try:
                self._init_pidfd = os.pidfd_open(self.init_pid)
            except OSError:
                self._init_pidfd = None
            net_text = f", net relay {self.relay}" + (f" (host veth {self.host_veth})" if self.host_veth else "")
            self.log(f"guest started: vmm pid {self.pid}, init pid {self.init_pid}, "
                     f"agent {self.agent_argv[-1]}{net_text}")
            return
        self._kill_and_reap()
        raise EngineError(text[4:] if text.startswith("ERR ") else "guest setup failed without a message")

    def _read_report(self, rd):
        """The guest VMM's last line ("OK <init pid> <relay> [<host veth>]" or "ERR <why>");
        "LOG <text>" lines before it go to the stand-in log."""
        buf = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace").strip()
                if not text.startswith("LOG "):
                    return text
                self.log(text[4:])
            if not _wait_readable(rd, deadline - time.monotonic()):
                continue
            chunk = os.read(rd, 512)
            if not chunk:
                break
            buf += chunk
        return buf.decode("utf-8", "replace").strip()

    def _kill_and_reap(self):
        if self.pid is None or self._code is not None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait_exit()

    def exit_reason(self):
        """After the guest ended: "reset" (reboot(2) RESTART in the guest) or "poweroff"."""
        return "reset" if self._code == GUEST_RESET_EXIT else "poweroff"

    def alive(self):
        if self.pid is None or self._code is not None:
            return False
        try:
            got, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self._reaped(0)
            return False
        if got == 0:
            return True
        self._reaped(os.waitstatus_to_exitcode(status))
        return False

    def wait_exit(self):
        if self._code is None and self.pid is not None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self._reaped(os.waitstatus_to_exitcode(status))
            except ChildProcessError:
                self._reaped(0)
        self._close_pidfd()
        return self._code

    def _reaped(self, code):
        self._code = code
        self._close_vmm_pidfd()
        if self.cpus is not None:
            self.cpus.remove()
        if code < 0 and self.host_veth:
            # the guest VMM was killed before it could undo its kernel relay
            remove_kernel_relay(self.tap, self.host_veth)
            self.log(f"net: guest VMM killed by signal {-code}: removed {self.host_veth} "
                     f"and the clsact qdisc of {self.tap}")

    def _close_pidfd(self):
        if self._init_pidfd is not None:
            os.close(self._init_pidfd)
            self._init_pidfd = None

    def _close_vmm_pidfd(self):
        if self._vmm_pidfd is not None:
            os.close(self._vmm_pidfd)
            self._vmm_pidfd = None

    def _vmm_gone(self, timeout):
        """Whether the guest VMM exited within `timeout` s (not yet reaped)."""
        if self._vmm_pidfd is None:
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.002)
            return not self.alive()
        return _wait_readable(self._vmm_pidfd, timeout)

    def _signal_init(self, sig):
        try:
            if self._init_pidfd is not None:
                signal.pidfd_send_signal(self._init_pidfd, sig)
            elif self.init_pid:
                os.kill(self.init_pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def _init_gone(self, timeout):
        if self._init_pidfd is None:
            return True
        return _wait_readable(self._init_pidfd, timeout)

    def stop(self, timeout=1.0):
        """Stop the guest as CHV's vm.shutdown does, without telling it (vmm/src/vm.rs
        Vm::shutdown: CpuManager::shutdown stops the vCPUs, no ACPI event): SIGKILL to its
        init, whose pid namespace the kernel then empties.  With CBOX_STANDIN_GUEST_GRACE_S
        the agent first gets SIGTERM and that long (unless `timeout` is 0: a panicked guest).
        Waits up to max(timeout, 2) s for the guest's processes to be gone."""
        if self.pid is None:
            return
        if self.alive():
            grace = self.grace_s if timeout > 0 else 0
            if grace <= 0:                            # pid-ns init: the kernel kills the whole guest,
                self._signal_init(signal.SIGKILL)     # paused or not: nothing of it runs again
            if self._paused:
                self.resume()                         # the guest VMM reaps it
            if grace > 0:
                self._signal_init(signal.SIGTERM)     # init forwards it to the agent
                if not self._init_gone(grace):
                    self.log(f"guest did not stop within {grace:g}s after SIGTERM: SIGKILL")
                self._signal_init(signal.SIGKILL)
            self._init_gone(max(timeout, 2.0))
            # the guest VMM then undoes its relay under the rtnl lock, which 250 guests
            # stopping together queue for: seconds on a loaded host
            if not self._vmm_gone(10.0):
                os.kill(self.pid, signal.SIGKILL)
        self.wait_exit()

    def _guest_pids(self):
        """Host pids of every process in the guest pid namespace, init first."""
        try:
            st = os.stat(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            return []
        key = (st.st_dev, st.st_ino)
        pids = [self.init_pid]
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == self.init_pid:
                continue
            try:
                s = os.stat(f"/proc/{name}/ns/pid")
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == key:
                pids.append(int(name))
        return pids

    def _signal_all(self, sig):
        for pid in [self.pid] + self._guest_pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def pause(self):
        self._signal_all(signal.SIGSTOP)
        self._signal_all(signal.SIGSTOP)   # catch children forked meanwhile
        self._wait_stopped()
        self._set_carrier(False)
        self._paused = True

    def _wait_stopped(self, timeout=5.0):
        """Until every process of the guest has stopped: a SIGSTOP takes effect when its
        target next runs, which on a loaded host is after kill() returned. CHV's pause
        answers only once each vCPU has parked (vmm/src/cpu.rs CpuManager::pause waits
        for every active vCPU's `paused` flag)."""
        deadline = time.monotonic() + timeout
        for pid in [self.pid] + self._guest_pids():
            while proc_state(pid) not in ("T", "t", "Z", "X", None) and time.monotonic() < deadline:
                time.sleep(0.001)

    def resume(self):
        self._set_carrier(True)
        self._signal_all(signal.SIGCONT)
        self._paused = False

    def _set_carrier(self, up):
        """Kernel relay: the host veth down while paused, so the guest's kernel
        (stopped processes or not) neither receives nor sends frames, as with
        the Python relay whose loop is stopped too."""
        if self.relay != "kernel":
            return
        try:
            rtnl = Rtnl()
            try:
                KernelRelay(rtnl, self.tap, self.host_veth).set_up(up)
            finally:
                rtnl.close()
        except OSError as e:
            self.log(f"net: cannot set {self.host_veth} {'up' if up else 'down'}: {e}")


def load_engine_class(name):
    if name == "process":
        return ProcessEngine
    if name == "qemu":
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        return importlib.import_module("qemu_engine").QemuEngine
    raise ValueError(f"CBOX_STANDIN_ENGINE={name!r}: expected process or qemu")


# ---------------------------------------------------------------------------
# serial Socket mode (vmm/src/serial_manager.rs, serial_buffer/src/lib.rs)

SERIAL_BUFFER_MAX = 1 << 20          # serial_buffer/src/lib.rs MAX_BUFFER_SIZE


class SerialBuffer:
    """CHV's SerialBuffer: while no client is attached the guest's output goes
    into a ring of SERIAL_BUFFER_MAX bytes (the oldest dropped); with a client
    attached, each write first flushes the ring, and what the (non-blocking)
    client cannot take now goes back into the ring (WouldBlock), so a slow
    reader never stalls the guest.  Like CHV the ring is only flushed when the
    guest writes again or a client attaches, never when the client becomes
    writable.  A write error other than WouldBlock loses those bytes."""

    def __init__(self):
        self.ring = bytearray()
        self.out = None              # attached client (non-blocking socket) or None

    def _fill(self, data):
        if len(data) >= SERIAL_BUFFER_MAX:
            self.ring = bytearray(data[-SERIAL_BUFFER_MAX:])
            return
        excess = len(self.ring) + len(data) - SERIAL_BUFFER_MAX
        if excess > 0:
            del self.ring[:excess]
        self.ring += data

    def flush(self):
        while self.out is not None and self.ring:
            try:
                n = self.out.send(self.ring)
            except OSError:          # WouldBlock or a broken client: keep the bytes
                return
            del self.ring[:n]

    def write(self, data):
        if self.out is None:
            self._fill(data)
            return
        self.flush()
        if self.ring:
            self._fill(data)
            return
        view, off = memoryview(data), 0
        while off < len(data):
            try:
                off += self.out.send(view[off:])
            except BlockingIOError:
                self._fill(data[off:])
                return
            except OSError:
                return

    def attach(self, client):
        self.out = client
        self.flush()

    def detach(self):
        self.out = None


class SocketSerial:
    """CHV's SerialManager for serial mode Socket: a thread that accepts clients
    on the listener bound at serial.socket (a new client replaces the previous
    one, which is shut down), replays the buffered output to it, passes the
    guest's output through a SerialBuffer, and turns bytes read from the client
    into serial input.  stop() is its Drop: the thread ends, the socket file is
    removed."""

    def __init__(self, listener, path, log):
        self.listener, self.path, self.log = listener, path, log
        self.buffer = SerialBuffer()
        self.client = None
        out_r, self.console_fd = os.pipe()           # the guest writes its console here
        self.in_fd, in_w = os.pipe()                 # and reads serial input here
        for fd in (out_r, in_w, self.console_fd, self.in_fd):
            os.set_inheritable(fd, False)
        self._out_r, self._in_w = out_r, in_w
        os.set_blocking(in_w, False)
        self._kill_r, self._kill_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="serial-manager", daemon=True)

    def start(self):
        self.listener.setblocking(False)
        self.thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._out_r, selectors.EVENT_READ, "output")
        sel.register(self._kill_r, selectors.EVENT_READ, "kill")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "kill":
                        self.log("serial: KILL_EVENT received, stopping epoll loop")
                        return
                    if key.data == "output":
                        self._on_output(sel)
                    elif key.data == "accept":
                        self._accept(sel)
                    elif key.data == "input":
                        self._on_input(sel)
        finally:
            sel.close()

    def _on_output(self, sel):
        try:
            data = os.read(self._out_r, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:                   # every writer closed (cannot happen while we hold one)
            sel.unregister(self._out_r)
            return
        self.buffer.write(data)

    def _accept(self, sel):
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.client is not None:    # "Shutdown the previous connection, if any"
            self._drop_client(sel)
        client.setblocking(False)      # a slow client cannot stall the guest
        self.client = client
        sel.register(client, selectors.EVENT_READ, "input")
        self.buffer.attach(client)

    def _drop_client(self, sel):
        sel.unregister(self.client)
        try:
            self.client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.client.close()
        self.client = None
        self.buffer.detach()

    def _on_input(self, sel):
        try:
            data = self.client.recv(64)  # CHV reads 64 bytes at a time
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.log("serial: Remote end closed serial socket")
            self._drop_client(sel)
            return
        if data == b"\n":              # CHV: a lone "\n" becomes "\r" (Windows SAC, #1170)
            data = b"\r"
        try:
            os.write(self._in_w, data)
        except OSError:
            pass                       # nobody reads the guest's input: dropped

    def stop(self):
        """The SerialManager's Drop: stop the thread, close, remove the socket file."""
        if self.thread.is_alive():
            os.write(self._kill_w, b"x")
            self.thread.join(5)
        if self.client is not None:
            self.client.close()
            self.client = None
        self.listener.close()
        for fd in (self._out_r, self._in_w, self._kill_r, self._kill_w, self.console_fd, self.in_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# event monitor (event_monitor/src/lib.rs, vmm/src/lib.rs start_event_monitor_thread)

class EventMonitor:
    """CHV's event monitor: every event is logged ("Event: source = ... event =
    ..."); with --event-monitor each one is also queued to a writer thread that
    writes it as pretty-printed JSON followed by "\n\n" to the non-blocking
    file, ignoring write errors (EAGAIN on a full FIFO, EPIPE with no reader):
    such an event is lost or cut short, as with CHV's write_all(..).ok()."""

    def __init__(self, fd, log):
        self.fd, self.log = fd, log
        self.start = time.monotonic_ns()
        self.queue = queue.SimpleQueue()
        self.thread = None
        if fd is not None:
            os.set_blocking(fd, False)
            self.thread = threading.Thread(target=self._run, name="event-monitor", daemon=True)
            self.thread.start()

    def emit(self, source, event, properties=None):
        props = ", ".join(f"{k} = {v}" for k, v in (properties or {}).items())
        self.log(f"Event: source = {source} event = {event} {props}")
        if self.thread is None:
            return
        elapsed = time.monotonic_ns() - self.start
        record = {"timestamp": {"secs": elapsed // 1_000_000_000, "nanos": elapsed % 1_000_000_000},
                  "source": source, "event": event, "properties": properties}
        self.queue.put(json.dumps(record, indent=2).encode())   # serde_json::to_string_pretty

    def _write_all(self, data):
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except InterruptedError:
                continue
            except OSError:
                return

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._write_all(item)
            self._write_all(b"\n\n")

    def close(self):
        """Write what is queued (the stand-in's exit waits for it), then stop."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(5)
            self.thread = None


def open_event_monitor(value):
    """--event-monitor path=FILE | fd=N (cloud-hypervisor/src/main.rs): the path is
    opened write+create+truncate (a FIFO blocks here until a reader opens it)
    before the API socket exists; mode 0600 (CHV's umask 077)."""
    opts = {}
    for item in value.split(","):
        key, eq, val = item.partition("=")
        if not eq or key not in ("path", "fd"):
            raise ValueError(f"Error parsing --event-monitor: unknown option: {item}")
        opts[key] = val
    if "fd" in opts:
        try:
            return int(opts["fd"])
        except ValueError:
            raise ValueError(f"Error parsing --event-monitor: fd={opts['fd']!r}") from None
    if "path" in opts:
        return os.open(opts["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    raise ValueError("Error parsing --event-monitor: path or fd required")


# ---------------------------------------------------------------------------
# API server

class ApiError(Exception):
    def __init__(self, status, *messages):
        super().__init__(*messages)
        self.status = status
        self.messages = list(messages)


class VmmPanic(Exception):
    """CHV's VMM thread would panic here (the process then exits 1)."""


def vm_error(status, action, *causes):
    return ApiError(status, "Error from API", action, *causes)


REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           500: "Internal Server Error"}
GET_ROUTES = {"vmm.ping", "vm.info", "vm.counters"}
BODYLESS_ACTIONS = {"vm.boot", "vm.delete", "vm.pause", "vm.resume", "vm.shutdown", "vm.reboot",
                    "vm.power-button", "vm.nmi"}
BODY_ACTIONS = {"vm.create", "vm.resize", "vm.resize-disk", "vm.resize-zone", "vm.add-device",
                "vm.add-user-device", "vm.add-disk", "vm.add-fs", "vm.add-generic-vhost-user",
                "vm.add-pmem", "vm.add-net", "vm.add-vsock", "vm.add-vdpa", "vm.remove-device",
                "vm.snapshot", "vm.coredump", "vm.restore", "vm.receive-migration",
                "vm.send-migration"}
PUT_ROUTES = BODYLESS_ACTIONS | BODY_ACTIONS | {"vmm.shutdown"}


class _Conn:
    __slots__ = ("sock", "buf", "continued")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.continued = False


class _HttpError(Exception):
    pass


class Standin:
    def __init__(self, api_path, api_fd, log, validator, schema_path, engine_cls):
        self.api_path = api_path
        self.api_fd = api_fd
        self.logger = log
        self.validator = validator
        self.schema_path = schema_path
        self.engine_cls = engine_cls
        self.events = EventMonitor(None, log.info)   # main() sets the one of --event-monitor
        self.config = None
        self.state = None               # None (not booted) | "Running" | "Paused"
        self.engine = None
        self.engine_watch = None        # (kind, obj) for the selector
        self.console_ready = False      # console devices made (CHV's console_info is Some)
        self.serial_listener = None     # Socket mode: bound, no serial manager yet
        self.serial_manager = None      # Socket mode: SocketSerial of the running VM
        self.vsock_sock = None
        self.vsock_path = None
        self.console_fd = None
        self.exit_code = None
        self.signal_received = None
        self.hooks = []                 # test hooks to run: (SIGUSR1 | SIGUSR2 | "panic-reset" | "vcpu-error", engine)
        self.sel = None
        self.listener = None
        self.lock_file = None
        self.stop_timeout = float(os.environ.get("CBOX_STANDIN_STOP_TIMEOUT") or 1.0)
        self.boot_fault = (os.environ.get("CBOX_STANDIN_BOOT_FAULT") or "").strip()
        self.fault_after = float(os.environ.get("CBOX_STANDIN_FAULT_AFTER_S") or 0.5)

    def log(self, msg, level=logging.INFO):
        self.logger.log(level, msg)

    # ---- socket setup -------------------------------------------------------

    def bind(self):
        if self.api_fd is not None:
            self.listener = socket.socket(fileno=self.api_fd)
            self.listener.listen(64)
            return
        path = self.api_path
        lock_path = path + ".lock"
        try:
            self.lock_file = open(lock_path, "a")
        except OSError as e:
            raise SystemExit(f"Error starting the HTTP API server: cannot create {lock_path}: {rust_io(e)}") from None
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"Error starting the HTTP API server: API socket {path} is in use "
                             f"(lock {lock_path} is held)") from None
        if os.path.lexists(path):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.settimeout(0.5)
                try:
                    probe.connect(path)
                    raise SystemExit(f"Error starting the HTTP API server: API socket {path} is in use")
                except OSError:
                    pass
                finally:
                    probe.close()
            if stat.S_ISDIR(st.st_mode):
                raise SystemExit(f"Error starting the HTTP API server: {path} is a directory")
            self.log(f"removing stale API socket {path}")
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
        except OSError as e:
            raise SystemExit(f"Error starting the HTTP API server: cannot bind {path}: {rust_io(e)}") from None
        self.listener.listen(64)

    # ---- main loop ----------------------------------------------------------

    def serve(self):
        self.bind()
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None))
        signal.set_wakeup_fd(wake_w)

        def on_signal(signum, frame):
            self.signal_received = signum

        def on_hook(signum, frame):
            self.hooks.append((signum, None))

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGUSR1, on_hook)
        signal.signal(signal.SIGUSR2, on_hook)
        self.log(f"API server listening on {self.api_path or 'fd ' + str(self.api_fd)} "
                 f"(cloud-hypervisor {VERSION} stand-in, pid {os.getpid()})")
        try:
            while self.exit_code is None:
                for key, mask in self.sel.select():
                    kind, obj = key.data
                    if kind == "listen":
                        self._accept()
                    elif kind == "conn":
                        self._on_readable(obj)
                    elif kind == "wake":
                        try:
                            while os.read(wake_r, 512):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    elif kind == "engine":
                        self._on_engine_exit(obj)
                    if self.exit_code is not None:
                        break
                while self.hooks and self.exit_code is None:
                    self._run_hook(*self.hooks.pop(0))
                if self.signal_received is not None and self.exit_code is None:
                    # CHV's signal handler writes exit_evt: the path of a vCPU error
                    self.log(f"received signal {signal.Signals(self.signal_received).name}: "
                             "stopping the VM and exiting")
                    self.log("VM exit event")
                    self.vmm_shutdown()
                    self.exit_code = 0
        finally:
            self._teardown()
        return self.exit_code

    def _teardown(self):
        try:
            self._stop_guest()
        except Exception:
            self.log("error while stopping the VM:\n" + traceback.format_exc(), logging.ERROR)
        if self.sel is not None:
            for key in list(self.sel.get_map().values()):
                if key.data[0] == "conn":
                    key.data[1].sock.close()
        if self.listener is not None:
            self.listener.close()
        if self.api_path:
            try:
                os.unlink(self.api_path)
            except OSError:
                pass
        if self.exit_code == 0:
            self.log("Cloud Hypervisor exited successfully")
        self.log(f"exiting with code {self.exit_code}")

    def _accept(self):
        for _ in range(32):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log(f"accept failed: {e}", logging.WARNING)
                return
            sock.settimeout(10.0)   # only sends ever wait; reads follow readiness
            conn = _Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _close_conn(self, conn):
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _on_readable(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            self._close_conn(conn)
            return
        conn.buf += data
        while conn.buf and self.exit_code is None:
            try:
                req = self._parse(conn)
            except _HttpError as e:
                self._respond(conn, 400, ["Bad Request", str(e)], close=True)
                self.log(f"API request with bad framing: {e} -> 400")
                self._close_conn(conn)
                return
            if req is None:
                return
            method, path, headers, body, close = req
            after = None
            try:
                status, payload, after = self._dispatch(method, path, headers, body)
            except ApiError as e:
                status, payload = e.status, e.messages
            except Exception:
                tb = traceback.format_exc()
                self.log(f"internal error handling {method} {path}:\n{tb}", logging.ERROR)
                status, payload = 500, ["Internal Server Error", tb.strip().splitlines()[-1]]
            self.log(f"API request {method} {path} -> {status}"
                     + (f": {' / '.join(payload)}" if status >= 400 and isinstance(payload, list) else ""))
            ok = self._respond(conn, status, payload, close)
            if after is not None:
                after()
            if close or not ok:
                self._close_conn(conn)
                return

    def _parse(self, conn):
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER:
                raise _HttpError("request header too large")
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HttpError(f"malformed request line {lines[0][:80]!r}")
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _HttpError(f"malformed header line {line[:80]!r}")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _HttpError("Transfer-Encoding is not supported: send Content-Length")
        length = 0
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _HttpError("invalid Content-Length") from None
            if length < 0 or length > MAX_BODY:
                raise _HttpError("invalid Content-Length")
        total = end + 4 + length
        if len(buf) < total:
            if headers.get("expect", "").lower() == "100-continue" and not conn.continued:
                conn.continued = True
                try:
                    conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
            return None
        body = bytes(buf[end + 4:total])
        del buf[:total]
        conn.continued = False
        conn_hdr = headers.get("connection", "").lower()
        close = conn_hdr == "close" or (version == "HTTP/1.0" and conn_hdr != "keep-alive")
        if target.startswith(("http://", "https://")):
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path = target.split("?", 1)[0]
        return method, path, headers, body, close

    def _respond(self, conn, status, payload, close):
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
                "Server: Cloud Hypervisor API",
                f"Connection: {'close' if close else 'keep-alive'}"]
        data = b""
        if status != 204:
            data = json.dumps(payload).encode() if payload is not None else b""
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        msg = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        try:
            conn.sock.sendall(msg)
            return True
        except OSError:
            return False

    # ---- request dispatch ---------------------------------------------------

    def _dispatch(self, method, path, headers, body):
        prefix = "/api/v1/"
        name = path[len(prefix):] if path.startswith(prefix) else None
        if name not in GET_ROUTES and name not in PUT_ROUTES:
            raise ApiError(404, "Not Found")
        if method == "GET" and name in GET_ROUTES:
            pass
        elif method == "PUT" and name in PUT_ROUTES:
            pass
        else:
            raise ApiError(400, "Bad Request", f"{method} is not allowed on {path}")
        if body:
            if name in BODYLESS_ACTIONS:
                raise ApiError(400, "Bad Request", f"{name} takes no request body")
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise ApiError(400, "Bad Request", "a request body needs Content-Type: application/json")
        handler = getattr(self, "api_" + name.replace(".", "_").replace("-", "_"), None)
        if handler is None:
            raise vm_error(500, f"{name} failed", f"{name} is not supported by the CBox stand-in")
        result = handler(body) if name in BODY_ACTIONS else handler()
        if isinstance(result, tuple):
            return result
        if result is None:
            return 204, None, None
        return 200, result, None

    def api_vmm_ping(self):
        return {"build_version": BUILD_VERSION, "version": VERSION, "pid": os.getpid(), "features": []}

    def api_vm_info(self):
        if self.config is None:
            raise vm_error(404, "The VM info is not available", "VM is not created")
        mem = (self.config.get("memory") or {}).get("size", DEFAULT_MEMORY)
        return {"config": self.config, "state": self.state or "Created", "memory_actual_size": mem}

    def api_vm_counters(self):
        if self.state is None:
            raise vm_error(500, "The VM info is not available", "VM is not running")
        return {}

    def api_vm_create(self, body):
        if not body:
            raise ApiError(400, "Bad Request", "vm.create needs a VmConfig body")
        try:
            config = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "Failed to deserialize JSON", str(e)) from None
        if not isinstance(config, dict):
            raise ApiError(400, "Failed to deserialize JSON", "invalid type: expected struct VmConfig")
        problems = []
        if self.validator is not None:
            problems = self.validator.validate(config, "VmConfig")
        if not problems:
            problems = extra_create_checks(config)
        if problems:
            raise ApiError(400, "Failed to deserialize JSON",
                           f"VmConfig does not match {self.schema_path.name if self.schema_path else 'the schema'} "
                           f"({len(problems)} problem{'s' if len(problems) > 1 else ''}; the CBox stand-in "
                           "rejects unknown fields, Cloud Hypervisor ignores them)", *problems)
        if self.config is not None:
            raise vm_error(500, "The VM could not be created", "VM is already created")
        self.config = config
        self.state = None
        self.log(f"VM created (serial: {(config.get('serial') or {}).get('mode', 'Null')})")
        try:
            self._create_serial("The VM could not be created")
        except VmmPanic as e:
            self.log(str(e), logging.ERROR)

            def crash():                     # the VMM thread is gone: the process exits 1
                self.exit_code = 1

            return 500, ["Error from API", "API response receive error", "receiving on a closed channel"], crash
        return None

    def _serial(self):
        serial = (self.config or {}).get("serial") or {}
        return serial.get("mode", "Null"), serial.get("socket" if serial.get("mode") == "Socket" else "file")

    def _create_serial(self, action):
        """CHV's pre_create_console_devices (vmm/src/console_devices.rs), run by
        vm.create, by vm.boot after a shutdown, and by every reboot: File mode
        File::create()s (truncates) the file; Socket mode binds a Unix listener at
        serial.socket without unlinking first, so an existing file (a leftover,
        or the listener of a vm.create followed by vm.delete without a boot,
        which CHV keeps bound) fails with EADDRINUSE.  On failure the previous
        console state is kept, and vm.create keeps the config anyway."""
        mode, path = self._serial()
        if mode not in ("File", "Socket"):
            self.console_ready = True
            return
        if not path and mode == "Socket":
            raise VmmPanic("thread 'vmm' panicked at vmm/src/console_devices.rs:259:90: "
                           "called `Option::unwrap()` on a `None` value (serial mode Socket without serial.socket)")
        if not path:
            raise vm_error(500, action, "Error creating console devices", "Error creating console device",
                           f"serial mode {mode} needs serial.{mode.lower()}")
        try:
            if mode == "File":
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640))
            else:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    listener.bind(path)
                    listener.listen(128)
                except OSError:
                    listener.close()
                    raise
                self._close_serial_listener()
                self.serial_listener = listener
        except OSError as e:
            raise vm_error(500, action, "Error creating console devices", "Error creating console device",
                           rust_io(e)) from None
        self.console_ready = True

    def _close_serial_listener(self):
        """Drop an unused Socket-mode listener (its file stays, as in CHV)."""
        if self.serial_listener is not None:
            self.serial_listener.close()
            self.serial_listener = None

    def _open_console(self):
        """The guest's console fd; Socket mode starts the serial manager thread."""
        mode, path = self._serial()
        if mode == "File":
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if mode == "Tty":
            return os.dup(1)
        if mode == "Socket":
            self.serial_manager = SocketSerial(self.serial_listener, path, self.log)
            self.serial_listener = None
            self.serial_manager.start()
            return os.dup(self.serial_manager.console_fd)
        if mode == "Pty":
            self.log("serial mode Pty is not supported by the stand-in: output discarded", logging.WARNING)
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def api_vm_boot(self):
        if self.state is not None:
            raise vm_error(500, "The VM could not boot", "VM is already created")
        self.events.emit("vm", "booting")           # Vmm::vm_boot: before the config check
        if self.config is None:
            raise vm_error(404, "The VM could not boot", "VM config is missing")
        self._boot("The VM could not boot")
        self.events.emit("vm", "booted")
        return None

    def _boot(self, action):
        config = self.config
        problems = semantic_errors(config)
        if problems:
            raise vm_error(500, action, "Failed to validate config", *problems)   # VmError::ConfigValidation
        payload = config.get("payload") or {}
        for key, what in (("firmware", "firmware"), ("kernel", "kernel"), ("initramfs", "initramfs")):
            p = payload.get(key)
            if p:
                try:
                    with open(p, "rb"):
                        pass
                except OSError as e:
                    raise vm_error(500, action, f"Cannot open {what} file", f"{p}: {rust_io(e)}") from None
        if self.boot_fault == "load-kernel" and payload.get("kernel"):
            self.log("Loading kernel")
            causes = kernel_load_error(payload["kernel"])
            if causes:
                raise vm_error(500, action, *causes)
        nets = config.get("net") or []
        if len(nets) > 1:
            raise vm_error(500, action, "Error from device manager",
                           "the CBox stand-in supports a single net device")
        if nets and nets[0].get("vhost_user"):
            raise vm_error(500, action, "Error from device manager", "vhost-user net is not supported by the stand-in")
        for i, disk in enumerate(config.get("disks") or []):
            p = disk.get("path")
            if disk.get("vhost_user"):
                raise vm_error(500, action, "Error from device manager", "vhost-user disks are not supported by the stand-in")
            if not p:
                raise vm_error(500, action, "Error from device manager", f"disks[{i}]: path is required")
            try:
                flags = os.O_RDONLY if disk.get("readonly") else os.O_RDWR
                os.close(os.open(p, flags | os.O_CLOEXEC))
                sector0_warning = disk_image_checks(disk, self.log)
            except OSError as e:
                raise vm_error(500, action, "Error from device manager", "Cannot create virtio-blk device",
                               f"Failed to open disk image {p}", rust_io(e)) from None
            except EngineError as e:
                raise vm_error(500, action, *e.args) from None
            if sector0_warning and not getattr(self.engine_cls, "models_sector0_writes", False):
                # CHV boots such a disk and the guest finds it read-only at sector 0;
                # processes have no disks to refuse writes on, so refuse the boot instead
                raise vm_error(500, action, "Error from device manager",
                               f"disks[{i}] ({p}) is writable and has no \"image_type\": \"Raw\": Cloud "
                               f"Hypervisor would say \"{sector0_warning}\" and refuse the guest's writes "
                               "at sector 0 (the CBox stand-in's process engine refuses the boot)")
        # console devices: made by vm.create, re-made after a shutdown or reboot
        if not self.console_ready:
            self._create_serial(action)
        vsock = config.get("vsock")
        vsock_sock = None
        if vsock:
            vpath = vsock["socket"]
            vsock_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                vsock_sock.bind(vpath)   # never unlinks first: a stale file fails, like CHV
                vsock_sock.listen(128)
            except OSError as e:
                vsock_sock.close()
                raise vm_error(500, action, "Error from device manager", "Cannot create virtio-vsock device",
                               f"Error binding vsock socket {vpath}", rust_io(e)) from None
            self.vsock_sock, self.vsock_path = vsock_sock, vpath
            self.log(f"vsock socket bound at {vpath}")
        try:
            self.console_fd = self._open_console()
        except OSError as e:
            self._release_boot_resources()
            raise vm_error(500, action, "Error creating console devices", rust_io(e)) from None
        cmdline = payload.get("cmdline", "")
        env = {"PATH": GUEST_PATH, "HOME": "/", "TERM": "linux", "LANG": "C.UTF-8",
               "PYTHONUNBUFFERED": "1", "CBOX_CMDLINE": cmdline}
        if vsock:
            port = cmdline_value(cmdline, "cbox.callback_port") or "4032"
            env["CBOX_CALLBACK_SOCKET"] = f"{vsock['socket']}_{port}"
            # The guest's temporary files (the agent's shim directory) live beside the
            # vsock socket, in the VM's runtime directory cbox removes on destroy, so a
            # guest killed with SIGKILL leaves nothing behind in the host's /tmp.
            guest_tmp = os.path.join(os.path.dirname(vsock["socket"]) or ".", "guest-tmp")
            os.makedirs(guest_tmp, exist_ok=True)
            env["TMPDIR"] = guest_tmp
        for name in (os.environ.get("CBOX_STANDIN_PASS_ENV") or "").split(","):
            name = name.strip()
            if name and name in os.environ:
                env[name] = os.environ[name]
        try:
            engine = self.engine_cls(copy.deepcopy(config), self.log)
            engine.vsock_listener = vsock_sock
            engine.console_fd = self.console_fd
            engine.console_in_fd = self.serial_manager.in_fd if self.serial_manager is not None else None
            engine.on_event = self._guest_event
            engine.agent_argv = [os.environ.get("CBOX_STANDIN_PYTHON") or sys.executable, default_agent()]
            engine.guest_env = env
            if self.boot_fault in ("hang", "vcpu-error") and isinstance(engine, ProcessEngine):
                engine.agent_argv = [engine.agent_argv[0], "-c", STUCK_KERNEL]
                env["CBOX_STANDIN_BOOT_FAULT"] = self.boot_fault
            if isinstance(engine, ProcessEngine) and engine.agent_argv[1] != "-c" and not os.path.exists(engine.agent_argv[-1]):
                raise EngineError(f"guest agent {engine.agent_argv[-1]} not found (set CBOX_GUEST_AGENT)")
            engine.start()
        except Exception as e:
            self._release_boot_resources()
            causes = [str(a) for a in e.args] if isinstance(e, EngineError) and e.args else [str(e) or repr(e)]
            self.log(f"boot failed: {' / '.join(causes)}", logging.ERROR)
            raise vm_error(500, action, *causes) from None
        self.engine = engine
        self.state = "Running"
        self._watch_engine(engine)
        self.log(f"VM booted (engine {type(engine).__name__}, pid {getattr(engine, 'pid', None)})")
        if self.boot_fault == "vcpu-error":
            self._hook_later(self.fault_after, "vcpu-error", engine)

    def _hook_later(self, delay, hook, engine):
        """Run test hook `hook` for `engine` in the main loop after `delay` seconds."""
        def later():
            self.hooks.append((hook, engine))
            os.write(self._wake_w, b"h")

        timer = threading.Timer(delay, later)
        timer.daemon = True
        timer.start()

    def _guest_event(self, source, event, properties):
        """An engine reports a device event (QEMU: pvpanic's GUEST_PANICKED); any thread."""
        if (source, event) == ("guest", "panic"):
            self.log(f"pvpanic got guest event {properties.get('event')}")
        self.events.emit(source, event, properties)

    def _watch_engine(self, engine):
        pid = getattr(engine, "pid", None)
        if isinstance(pid, int) and pid > 0:
            try:
                fd = os.pidfd_open(pid)
                self.sel.register(fd, selectors.EVENT_READ, ("engine", engine))
                self.engine_watch = ("pidfd", fd)
                return
            except OSError:
                pass
        r, w = os.pipe()

        def waiter():
            try:
                engine.wait_exit()
            finally:
                try:
                    os.write(w, b"x")
                except OSError:
                    pass

        self.sel.register(r, selectors.EVENT_READ, ("engine", engine))
        self.engine_watch = ("pipe", (r, w))
        threading.Thread(target=waiter, daemon=True, name="engine-wait").start()

    def _unwatch_engine(self):
        if self.engine_watch is None:
            return
        kind, obj = self.engine_watch
        fds = [obj] if kind == "pidfd" else list(obj)
        try:
            self.sel.unregister(fds[0])
        except (KeyError, ValueError):
            pass
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.engine_watch = None

    def _release_boot_resources(self):
        if self.vsock_sock is not None:
            self.vsock_sock.close()
            self.vsock_sock = None
            try:
                os.unlink(self.vsock_path)
            except OSError:
                pass
            self.vsock_path = None
        if self.console_fd is not None:
            os.close(self.console_fd)
            self.console_fd = None
        if self.serial_manager is not None:
            self.serial_manager.stop()
            self.serial_manager = None
        if self.serial_listener is None:
            self.console_ready = False  # the next boot makes them again (File: truncated)

    def _on_engine_exit(self, engine):
        """The guest is gone by itself: CHV's control loop (vmm/src/lib.rs)."""
        if engine is not self.engine:
            return
        self._unwatch_engine()
        code = engine.wait_exit()
        reason = engine.exit_reason() if hasattr(engine, "exit_reason") else "poweroff"
        if reason == "reset":
            self.log(f"guest reset (engine exit status {code}): rebooting inside this process")
            self._guest_reset()
            return
        self.log(f"guest ended (engine exit status {code}): powered off")
        self.log("VM guest exit event")
        self.vmm_shutdown()
        self.exit_code = 0

    def _guest_reset(self, stop_timeout=None):
        """CHV's control loop on reset_evt: vm_reboot; if that fails the loop ends
        with Error::VmReboot and the process exits 1."""
        self.log("VM reset event")
        try:
            self.vm_reboot(stop_timeout)
        except ApiError as e:
            self.log(f"Error rebooting VM: {' / '.join(e.messages[1:])}", logging.ERROR)
            self.exit_code = 1

    # ---- test hooks (module docstring, "Test hooks") ---------------------------

    def _run_hook(self, hook, engine):
        if hook == signal.SIGUSR1:
            self._vcpu_error_hook("cbox stand-in test hook SIGUSR1: simulated KVM_RUN failure")
        elif hook == "vcpu-error" and engine is self.engine and engine is not None:
            self._vcpu_error_hook("Unexpected exit reason on vcpu run: InternalError")
        elif hook == signal.SIGUSR2:
            self._guest_panic_hook()
        elif hook == "panic-reset" and engine is self.engine and engine is not None:
            self._guest_reset(stop_timeout=0)

    def _vcpu_error_hook(self, cause):
        """A vCPU thread's KVM_RUN fails (vmm/src/cpu.rs): it writes exit_evt, the
        same event SIGTERM uses, and the control loop runs vmm_shutdown: the
        process exits 0, as after a guest power-off; only the log tells them apart.
        The record is `error!("VCPU generated error: {:?}", Error::VcpuRun(e.into()))`:
        anyhow's Debug of HypervisorCpuError::RunVcpu ("Failed to run vcpu",
        hypervisor/src/cpu.rs) and its cause (hypervisor/src/kvm/mod.rs run(): "Unexpected
        exit reason on vcpu run: {r:?}", "VCPU error {e:?}") on lines of their own."""
        if self.engine is None:
            self.log("test hook SIGUSR1 (vCPU error): no VM is running, ignored", logging.WARNING)
            return
        self.log(f"VCPU generated error: VcpuRun(Failed to run vcpu\n\nCaused by:\n    {cause})", logging.ERROR)
        self.log("VM exit event")
        self.vmm_shutdown()
        self.exit_code = 0

    def _guest_panic_hook(self):
        """The guest kernel panics (process engine): the panic text on the console,
        the pvpanic event when the VmConfig has "pvpanic": true (the panic notifier
        runs before the kernel restarts), then what the guest's panic=N says:
        N < 0 reset now, N > 0 "Rebooting in N seconds.." and reset after N s,
        0 or absent: "---[ end Kernel panic ... ]---" and the guest hangs (its
        processes stopped, the VM still Running)."""
        if self.engine is None or self.state != "Running" or not isinstance(self.engine, ProcessEngine):
            self.log("test hook SIGUSR2 (guest panic): no running process-engine guest, ignored",
                     logging.WARNING)
            return
        why = "cbox-standin: guest panic (test hook SIGUSR2)"
        engine = self.engine
        engine.pause()                 # the panicking kernel runs no process of the guest any more
        _console_write(self.console_fd, f"Kernel panic - not syncing: {why}\n")
        if self.config.get("pvpanic") is True:
            self.log("pvpanic got guest event panic")      # devices/src/pvpanic.rs
            self.events.emit("guest", "panic", {"event": "panic"})
        try:
            timeout = int(cmdline_value((self.config.get("payload") or {}).get("cmdline"), "panic") or 0)
        except ValueError:
            timeout = 0
        if timeout < 0:
            self._guest_reset(stop_timeout=0)
        elif timeout > 0:
            _console_write(self.console_fd, f"Rebooting in {timeout} seconds..\n")
            self._hook_later(timeout, "panic-reset", engine)
        else:
            _console_write(self.console_fd, f"---[ end Kernel panic - not syncing: {why} ]---\n")

    def _stop_guest(self, stop_timeout=None):
        """Stop the guest if any (also one that already ended) and free its
        resources; the config is kept.  Returns whether a guest was there."""
        if self.engine is None:
            self._release_boot_resources()
            return False
        engine, self.engine = self.engine, None
        self._unwatch_engine()
        try:
            engine.stop(self.stop_timeout if stop_timeout is None else stop_timeout)
        finally:
            self.state = None
            self._release_boot_resources()
        self.log("VM shut down")
        return True

    # CHV's Vmm::vm_shutdown, vm_reboot, vm_delete, vmm_shutdown (vmm/src/lib.rs),
    # with the events they emit and in their order

    def vm_shutdown(self):
        if self.engine is None:
            raise vm_error(500, "The VM could not shutdown", "VM is not running")
        self._stop_guest()
        self.events.emit("vm", "shutdown")

    def vm_reboot(self, stop_timeout=None):
        """A guest reset or PUT vm.reboot: the VM is rebuilt inside this process;
        its console devices are made again (File: truncated, Socket: bound again),
        the vsock socket too."""
        self.events.emit("vm", "rebooting")
        if self.engine is None:
            raise vm_error(404, "The VM could not reboot", "VM is not created")
        self._stop_guest(stop_timeout)
        self._boot("The VM could not reboot")
        self.events.emit("vm", "rebooted")

    def vm_delete(self):
        if self.config is None:
            return
        if self.engine is not None:
            self.vm_shutdown()
        else:
            self._release_boot_resources()
        self.config = None
        self.log("VM deleted")
        self.events.emit("vm", "deleted")

    def vmm_shutdown(self):
        self.vm_delete()
        self.events.emit("vmm", "shutdown")

    def api_vm_shutdown(self):
        self.vm_shutdown()
        return None

    def api_vm_reboot(self):
        self.vm_reboot()
        return None

    def api_vm_delete(self):
        self.vm_delete()
        return None

    def api_vmm_shutdown(self):
        """200 with an empty body (Content-Length: 0), not 204: vmm/src/api/http/
        http_endpoint.rs VmmShutdown answers StatusCode::OK."""
        self.vmm_shutdown()

        def finish():
            self.exit_code = 0

        return 200, None, finish

    def api_vm_pause(self):
        if self.state is None:
            raise vm_error(500, "The VM could not be paused", "VM is not running")
        self.events.emit("vm", "pausing")            # vm.rs Vm::pause: before the state check
        if self.state == "Paused":
            raise vm_error(500, "The VM could not be paused", "Cannot pause VM",
                           "invalid VM state transition: Paused to Paused")
        self.engine.pause()
        self.state = "Paused"
        self.log("VM paused")
        self.events.emit("vm", "paused")
        return None

    def api_vm_resume(self):
        if self.state is None:
            raise vm_error(500, "The VM could not resume", "VM is not running")
        self.events.emit("vm", "resuming")
        if self.state != "Paused":
            raise vm_error(500, "The VM could not resume", "Cannot resume VM",
                           "invalid VM state transition: Running to Running")
        self.engine.resume()
        self.state = "Running"
        self.log("VM resumed")
        self.events.emit("vm", "resumed")
        return None

    def api_vm_power_button(self):
        if self.state is None:
            raise vm_error(500, "Error triggering power button", "VM is not running")
        pid = getattr(self.engine, "init_pid", None) or getattr(self.engine, "pid", None)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        return None


# ---------------------------------------------------------------------------
# command line

USAGE = """Usage: fake_chv.py --api-socket <path=PATH|PATH|fd=N> [--log-file PATH]
                   [--event-monitor <path=PATH|fd=N>] [-v]...
CBox's stand-in for cloud-hypervisor (v53 API subset). See the module docstring."""


def parse_args(argv):
    opts = {"api": None, "log_file": None, "verbose": 0, "event_monitor": None}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in ("--api-socket", "--log-file", "--event-monitor"):
            if eq:
                value = inline
            else:
                i += 1
                if i >= len(argv):
                    raise ValueError(f"option {name} needs a value")
                value = argv[i]
            opts[{"--api-socket": "api", "--log-file": "log_file"}.get(name, "event_monitor")] = value
        elif re.fullmatch(r"-v+", arg):
            opts["verbose"] += len(arg) - 1
        elif arg in ("--version", "-V"):
            opts["version"] = True
        elif arg in ("--help", "-h"):
            opts["help"] = True
        else:
            raise ValueError(f"unexpected argument {arg!r}")
        i += 1
    return opts


def parse_api_socket(value):
    """'path=/x', '/x', 'fd=3' (CHV splits on ',' and '=')."""
    path = fd = None
    if "=" not in value:
        return value, None
    for item in value.split(","):
        key, _, val = item.partition("=")
        if key == "path":
            path = val
        elif key == "fd":
            fd = int(val)
        else:
            raise ValueError(f"unknown --api-socket option {key!r}")
    if (path is None) == (fd is None):
        raise ValueError("--api-socket needs exactly one of path= or fd=")
    return path, fd


class _Formatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.t0 = time.monotonic()

    def format(self, record):
        ms = (time.monotonic() - self.t0) * 1000
        return f"cloud-hypervisor: {ms:.6f}ms: <fake_chv> {record.levelname}:fake_chv.py -- {record.getMessage()}"


def setup_logging(log_file, verbose):
    logger = logging.getLogger("fake_chv")
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    if log_file:
        handler = logging.FileHandler(log_file)
        level = logging.DEBUG if verbose >= 2 else logging.INFO
    else:
        handler = logging.StreamHandler(sys.stderr)
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler.setFormatter(_Formatter())
    handler.terminator = "\r\n"      # each record ends in CRLF, as CHV's (cloud-hypervisor/src/logger.rs)
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def exit_now(code):
    """Exit as a Rust program does, once its logs are out: without the interpreter's teardown
    (a collection over every module and object), which made 250 stand-ins stopping together
    a second or more of CPU that a real VMM does not spend."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)


def no_hypervisor(logger):
    """CHV's start without /dev/kvm (cloud-hypervisor/src/main.rs start_vmm: hypervisor::new()
    comes before the event monitor and the API socket; hypervisor/src/lib.rs new() finds no
    hypervisor): cli_print_error_chain (cloud-hypervisor/src/lib.rs) logs the error's Debug
    and prints the chain on stderr; exit code 1."""
    logger.error("Fatal error: CreateHypervisor(HypervisorCreate(no supported hypervisor))")
    print("Error: Cloud Hypervisor exited with the following chain of errors:\n"
          "  0: Failed to open hypervisor interface (is hypervisor interface available?)\n"
          "  1: Failed to create the hypervisor\n"
          "  2: no supported hypervisor", file=sys.stderr)
    return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    os.umask(0o077)         # as cloud-hypervisor/src/main.rs: its files and sockets are owner-only
    try:
        opts = parse_args(argv)
        if opts.get("help"):
            print(USAGE)
            return 0
        if opts.get("version"):
            print(f"cloud-hypervisor {BUILD_VERSION}")
            return 0
        if not opts["api"]:
            raise ValueError("--api-socket is required by the stand-in")
        api_path, api_fd = parse_api_socket(opts["api"])
    except ValueError as e:
        print(f"Error parsing command line: {e}\n{USAGE}", file=sys.stderr)
        return 1
    logger = setup_logging(opts["log_file"], opts["verbose"])
    fault = (os.environ.get("CBOX_STANDIN_BOOT_FAULT") or "").strip()
    if fault not in BOOT_FAULTS:
        print(f"fake_chv: CBOX_STANDIN_BOOT_FAULT={fault!r}: expected one of {', '.join(BOOT_FAULTS[1:])}",
              file=sys.stderr)
        return 1
    if fault == "no-kvm":
        return no_hypervisor(logger)
    try:
        monitor_fd = open_event_monitor(opts["event_monitor"]) if opts["event_monitor"] else None
    except (ValueError, OSError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"Error doing event monitor I/O: {rust_io(e)}"
        logger.error(msg)
        print(f"fake_chv: {msg}", file=sys.stderr)
        return 1
    events = EventMonitor(monitor_fd, logger.info)
    events.emit("vmm", "starting")

    schema_path = Path(os.environ.get("CBOX_CHV_SCHEMA") or DEFAULT_SCHEMA)
    validator = None
    try:
        validator = SchemaValidator.load(schema_path)
        logger.info(f"validating VmConfigs against {schema_path}")
    except (OSError, ValueError) as e:
        msg = (f"!!!!! WARNING: cannot load the Cloud Hypervisor schema {schema_path} ({e}): "
               "VmConfig schema validation is DISABLED !!!!!")
        logger.error(msg)
        if opts["log_file"]:
            print(f"fake_chv: {msg}", file=sys.stderr)
    engine_name = os.environ.get("CBOX_STANDIN_ENGINE") or "process"
    try:
        engine_cls = load_engine_class(engine_name)
    except Exception as e:
        logger.error(f"cannot load engine {engine_name}: {e}")
        print(f"fake_chv: cannot load engine {engine_name}: {e}", file=sys.stderr)
        return 1
    server = Standin(api_path, api_fd, logger, validator, schema_path if validator else None, engine_cls)
    server.events = events
    try:
        return server.serve()
    except SystemExit as e:
        if isinstance(e.code, str):
            logger.error(e.code)
            print(f"fake_chv: {e.code}", file=sys.stderr)
            return 1
        raise
    finally:
        events.close()


if __name__ == "__main__":
    # let an engine module `import fake_chv` and get this very module (same EngineError)
    sys.modules.setdefault("fake_chv", sys.modules[__name__])
    exit_now(main())

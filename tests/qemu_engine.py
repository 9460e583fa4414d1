"""QEMU engine for the stand-in hypervisor: boots a Cloud Hypervisor VmConfig
for real with `qemu-system-x86_64 -M microvm` (virtio over PCI, as Cloud
Hypervisor gives it, or over MMIO).

The stand-in (tests/fake_chv.py) uses it when CBOX_STANDIN_ENGINE=qemu:

    eng = QemuEngine(vm_config, log)   # log: callable(str)
    eng.start()                        # raises EngineError on failure
    eng.pid, eng.alive(), eng.wait_exit(), eng.pause(), eng.resume()
    eng.stop(timeout)                  # like CHV vm.shutdown: the VM goes away

Mapping of the VmConfig:
  payload.kernel/initramfs/cmdline -> -kernel/-initrd/-append (the cmdline is
      passed as is: cbox.py already puts console=ttyS0 in it)
  cpus.boot_vcpus -> -smp, memory.size (bytes) -> -m
  disks[i] -> virtio-blk (readonly honoured), in order: vda, vdb, ...; serial
      -> the device's serial (/sys/block/vdX/serial in the guest).  No
      image_type on a writable disk: like CHV v51+ (vmm/src/device_manager.rs
      make_virtio_block_device, "Autodetected Raw image type. Disabling sector
      0 writes.") every write starting at sector 0 fails with an I/O error
      (a blkdebug inject-error rule); image_type other than Raw is refused
  rate_limit_groups + disks[i].rate_limit_group / rate_limiter_config -> a
      QEMU throttle group (-object throttle-group, a throttle filter node over
      the disk): the disks of one rate_limit_group share one group, so one
      budget, as CHV's device manager shares the group's buckets; a disk's
      own rate_limiter_config gets a group of its own.  bandwidth -> bps-total,
      ops -> iops-total, each size * 1000 / refill_time per second; a bucket
      with size or refill_time 0 is off (CHV's TokenBucket::new) and gives no
      limit.  Deviation: QEMU's leaky bucket allows a burst of a tenth of a
      second where CHV's bucket starts full (a whole size) and honours
      one_time_burst; the steady rate is the same
  net[0].tap/mac -> -netdev tap,ifname=TAP,script=no,downscript=no +
      virtio-net (the tap must exist; create it persistent, as for CHV);
      net[0].rate_limiter_config is not enforced by this engine (QEMU's tap
      netdev has no rate limiter; the process engine's Python relay has CHV's)
  serial File -> the console goes to engine.console_fd when the stand-in set
      it (it opened the file), else to serial.file; Null/Off -> discarded;
      Socket -> QEMU's serial is a stdio chardev on the pipes of the stand-in's
      serial manager (engine.console_fd, engine.console_in_fd), which gives
      serial.socket Cloud Hypervisor's semantics (tests/fake_chv.py SocketSerial)
  rng.src -> virtio-rng fed from that file
  pvpanic: true -> -device pvpanic-pci (PCI transport only) and -action
      panic=none: QMP GUEST_PANICKED becomes the stand-in's event source guest,
      event panic (engine.on_event), and the guest goes on to its own panic=N
      reset as under Cloud Hypervisor
  vsock.cid/socket -> a real virtio-vsock: one vhost-device-vsock process
      (rust-vmm, `cargo install --locked vhost-device-vsock`, 0.3.0) per VM,
      started before QEMU with --guest-cid CID --uds-path <vsock.socket> and
      ended with it.  Its host side is Cloud Hypervisor's hybrid vsock
      (virtio-devices/src/vsock/unix/muxer.rs): a guest connect to CID 2, port
      P reaches the listener at `<vsock.socket>_P`; a host connect to
      vsock.socket sends `CONNECT P\n`.  QEMU attaches it as vhost-user
      (vhost-user-vsock-pci, or -device on MMIO) over a control socket in the
      engine's private directory, which needs the guest memory shared
      (memory-backend-memfd,share=on).  The device binds vsock.socket itself
      (it unlinks the stand-in's socket there first; the stand-in has already
      refused a stale file as CHV does), and a guest reset, which ends this
      QEMU, ends the device too: the next engine binds vsock.socket again, as
      CHV re-creates it on reboot.  The device and QEMU die with the stand-in
      (PR_SET_PDEATHSIG), as a guest dies with its VMM.  Found via
      CBOX_VHOST_VSOCK_BIN, PATH, then ~/.cargo/bin; absent: the engine logs
      so (one line per boot) and boots without vsock (guest callbacks fail).

Transport: CBOX_QEMU_TRANSPORT=pci (default: microvm,pcie=on with
virtio-*-pci devices, the transport Cloud Hypervisor uses, so the guest's
virtio_pci path is what boots) or mmio (virtio-*-device on virtio-mmio).

Acceleration: software emulation (TCG) unless CBOX_QEMU_ACCEL=kvm.  Nested
KVM on the development machines fails on real guest kernels ("KVM internal
error ... emulation failure"), so KVM is opt-in.  Under TCG the engine adds
tsc_early_khz=<host TSC kHz> to the kernel command line (see tcg_cmdline():
without it about one boot in three hangs silently in TSC calibration).  CBOX_QEMU_BIN overrides the
binary.  A guest power-off ends QEMU (-no-reboot also turns a guest reboot,
e.g. panic=-1, into an exit), so alive() turns false.  A second QMP monitor
is followed for events: exit_reason() is "reset" when QEMU's SHUTDOWN event
said guest-reset, and the stand-in then rebuilds the VM (starts QEMU again),
as Cloud Hypervisor reboots inside its process.

Pause/resume use QMP (stop/cont) over a Unix socket in a private temporary
directory, with SIGSTOP/SIGCONT as the fallback.
"""
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

MIB = 1 << 20
VIRTIO_DEVICE_SUFFIX = {"pci": "-pci", "mmio": "-device"}   # QEMU's virtio device models by transport


class EngineError(Exception):
    """The VM could not be started (bad config, QEMU missing or failing)."""


PR_SET_PDEATHSIG = 1
VHOST_VSOCK = "vhost-device-vsock"
VSOCK_START_TIMEOUT = 10.0
VSOCK_LOG_LINES = 200        # of the device's stderr passed to the log per VM (a guest can provoke warnings)


def die_with_parent():
    """A preexec_fn: the child gets SIGKILL when the thread that started it ends, as a
    guest ends with its VMM (kill -9 of the stand-in leaves no QEMU or device behind).
    Start children from a thread that lives as long as they should (the stand-in's main
    thread does)."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:       # the parent ended before prctl took effect
            os._exit(1)
    return preexec


def vhost_vsock_binary():
    """vhost-device-vsock's path: CBOX_VHOST_VSOCK_BIN, else PATH, else the bin/ of
    cargo's home (CARGO_HOME or ~/.cargo), where `cargo install` puts it; None if absent."""
    explicit = os.environ.get("CBOX_VHOST_VSOCK_BIN")
    if explicit:
        return shutil.which(explicit)
    cargo_bin = os.path.join(os.environ.get("CARGO_HOME") or os.path.expanduser("~/.cargo"), "bin")
    return shutil.which(VHOST_VSOCK) or shutil.which(VHOST_VSOCK, path=cargo_bin)


class VsockDevice:
    """A VM's virtio-vsock: one vhost-device-vsock process serving QEMU on `control`,
    its host side Cloud Hypervisor's hybrid vsock at `uds_path` (the VmConfig's
    vsock.socket; guest connects to port P arrive at `<uds_path>_P`)."""

    def __init__(self, binary, cid, uds_path, control, log):
        self.argv = [binary, "--guest-cid", str(cid), "--socket", control, "--uds-path", uds_path]
        self.control, self.log = control, log
        self.proc = None
        self.stderr = []

    def start(self, timeout=VSOCK_START_TIMEOUT):
        """Run the device; returns once it serves `control` (it binds uds_path before)."""
        self.log("qemu engine: vsock device: " + " ".join(self.argv))
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, preexec_fn=die_with_parent())
        except OSError as e:
            raise EngineError(f"cannot run {self.argv[0]}: {e}")
        reader = threading.Thread(target=self._read_stderr, daemon=True, name="vsock-stderr")
        reader.start()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.control):
            if self.proc.poll() is not None:
                reader.join(2)
                msg = " ".join(self.stderr[-5:]) or "no message"
                raise EngineError(f"{VHOST_VSOCK} exited with code {self.proc.returncode} while starting: {msg}")
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"{VHOST_VSOCK} did not serve {self.control} within {timeout:.0f}s")
            time.sleep(0.01)

    def _read_stderr(self):
        passed = 0
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.stderr = (self.stderr + [line])[-20:]
            passed += 1
            if passed <= VSOCK_LOG_LINES:
                self.log("vhost-device-vsock: " + line)
            elif passed == VSOCK_LOG_LINES + 1:
                self.log(f"vhost-device-vsock: more than {VSOCK_LOG_LINES} lines: the rest is not logged")

    def stop(self):
        """End the device (it has no handler: SIGTERM ends it at once, leaving its socket
        file at uds_path for its owner, the stand-in, to remove as CHV's would be)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def host_tsc_khz():
    """The host's TSC frequency in kHz (from /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def tcg_cmdline(cmdline):
    """The kernel command line with the TCG workaround added.

    Under TCG the guest reads the host's TSC, and the kernel's early TSC
    calibration against the emulated PIT fails now and then (timing jitter of
    software emulation); the kernel then waits in calibrate_delay() for timer
    ticks that never come, a silent hang before the first console line (seen
    here in 2 to 4 boots out of 10).  Telling it the TSC frequency skips the
    calibration.  An explicit tsc_early_khz= or lpj= in the cmdline wins.
    """
    words = cmdline.split()
    if any(w.startswith(("tsc_early_khz=", "lpj=")) for w in words):
        return cmdline
    khz = host_tsc_khz()
    if not khz:
        return cmdline
    # tsc=reliable: on a busy host the kernel would otherwise declare the TSC
    # unstable and fall back to a clock that loses seconds, skewing boot timings.
    extra = [] if any(w.startswith("tsc=") for w in words) else ["tsc=reliable"]
    return " ".join(words + [f"tsc_early_khz={khz}"] + extra)


def bucket_rate(bucket):
    """A TokenBucket's refill rate per second, or None when CHV disables it
    (rate_limiter/src/lib.rs TokenBucket::new: size 0 or refill_time 0)."""
    if not bucket or not bucket.get("size") or not bucket.get("refill_time"):
        return None
    return max(1, bucket["size"] * 1000 // bucket["refill_time"])


def throttle_limits(limiter):
    """QEMU throttle-group limits for a RateLimiterConfig: bandwidth -> bps-total,
    ops -> iops-total (a disabled bucket gives none); {} when nothing limits."""
    limits = {}
    for bucket, key in (("bandwidth", "bps-total"), ("ops", "iops-total")):
        rate = bucket_rate((limiter or {}).get(bucket))
        if rate is not None:
            limits[key] = rate
    return limits


def disk_throttle_groups(config):
    """{disk index: (QEMU throttle-group id, limits)} for the limited disks of a
    VmConfig.  As CHV's device manager (vmm/src/device_manager.rs) does, disks
    naming a rate_limit_group share that group's buckets (one QEMU throttle group:
    one budget for all of them) and a disk with its own rate_limiter_config gets
    a group of its own."""
    groups = {g.get("id"): g.get("rate_limiter_config") for g in config.get("rate_limit_groups") or []}
    throttled = {}
    for i, disk in enumerate(config.get("disks") or []):
        if disk.get("rate_limit_group") is not None:
            name, limiter = f"rlg-{disk['rate_limit_group']}", groups.get(disk["rate_limit_group"])
        else:
            name, limiter = f"rl-disk{i}", disk.get("rate_limiter_config")
        limits = throttle_limits(limiter)
        if limits:
            throttled[i] = (name, limits)
    return throttled


def throttle_group_objects(throttled):
    """-object throttle-group arguments, one per group the disks use."""
    args, seen = [], set()
    for name, limits in throttled.values():
        if name not in seen:
            seen.add(name)
            args += ["-object", ",".join([f"throttle-group,id={name}"] +
                                         [f"x-{key}={value}" for key, value in limits.items()])]
    return args


def disk_drive(i, disk, throttle_group=None):
    """QEMU's -drive/-blockdev arguments for VmConfig disk i, as CHV would give it;
    throttle_group: the -object throttle-group whose budget the disk's I/O takes
    from (a throttle filter node on top of the disk's node)."""
    path, ro = disk["path"], bool(disk.get("readonly"))
    image_type = disk.get("image_type", "Unknown")
    if image_type not in ("Raw", "Unknown"):
        raise EngineError(f"disk {disk.get('id') or i}: image_type {image_type}: this engine only opens raw images")
    if (image_type == "Raw" or ro) and throttle_group is None:
        # QEMU's -drive options are split on ','; a doubled ',,' is a literal comma
        return ["-drive", f"id=disk{i},file={path.replace(',', ',,')},format=raw,if=none,"
                          f"cache=writeback{',readonly=on' if ro else ''}"]
    image = {"driver": "file", "filename": path, "read-only": ro}
    if image_type == "Unknown" and not ro:
        # CHV autodetects raw and refuses writes at sector 0 (virtio-devices/src/block.rs
        # check_request -> VIRTIO_BLK_S_IOERR): blkdebug fails every write that covers
        # byte 0 (event "none" arms the rule when the node opens; errno 5 = EIO)
        image = {"driver": "blkdebug",
                 "inject-error": [{"event": "none", "iotype": "write", "sector": 0, "errno": 5}],
                 "image": image}
    node = {"node-name": f"disk{i}", "driver": "raw", "cache": {"direct": False}, "read-only": ro, "file": image}
    if throttle_group is not None:
        node = {"node-name": f"disk{i}", "driver": "throttle", "throttle-group": throttle_group, "read-only": ro,
                "file": dict(node, **{"node-name": f"disk{i}-raw"})}
    return ["-blockdev", json.dumps(node)]


class QemuEngine:
    # writes at sector 0 of a disk without image_type fail in the guest, as on CHV
    # (tests/fake_chv.py lets such a disk through to this engine)
    models_sector0_writes = True
    vsock_binary = staticmethod(vhost_vsock_binary)   # None: this host's VMs get no vsock

    def __init__(self, config, log=None, prefix=None, accel=None, qemu=None, start_timeout=15.0,
                 transport=None):
        """config: a Cloud Hypervisor VmConfig dict; log: callable(str).

        prefix: command prefix (e.g. ["ip", "netns", "exec", NS]) so that QEMU
        runs where the tap lives; it must exec (keep the pid).
        """
        self.config = config
        self.log = log or (lambda msg: None)
        self.prefix = list(prefix or [])
        self.accel = (accel or os.environ.get("CBOX_QEMU_ACCEL") or "tcg").lower()
        self.qemu = qemu or os.environ.get("CBOX_QEMU_BIN") or "qemu-system-x86_64"
        self.transport = (transport or os.environ.get("CBOX_QEMU_TRANSPORT") or "pci").lower()
        self.start_timeout = start_timeout
        self.proc = None
        self.pid = None
        self.returncode = None
        self._tmp = None
        self._qmp_path = None
        self._events_path = None
        self._stderr = []
        self._stderr_thread = None
        self._paused_by_signal = False
        self._lock = threading.Lock()
        self._events_thread = None
        self.shutdown_reason = None  # QMP SHUTDOWN's reason: guest-shutdown, guest-reset, ...
        self.on_event = None         # set by the stand-in: callable(source, event, properties)
        # set by the stand-in before start() (tests/fake_chv.py "Engine interface")
        self.console_fd = None       # fd for the guest console; else serial.file is opened
        self.console_in_fd = None    # Socket mode: serial input (QEMU's stdin), else none
        self.vsock_listener = None   # ignored: the vsock device binds vsock.socket itself
        self.vsock = None            # VsockDevice while the VM has one
        self.agent_argv = None       # ignored: the agent runs inside the guest image
        self.guest_env = None        # ignored

    # ---- command line -------------------------------------------------------

    def _args(self):
        c = self.config
        payload = c.get("payload") or {}
        kernel = payload.get("kernel")
        if not kernel:
            raise EngineError("payload.kernel is required")
        for what, path in (("kernel", kernel), ("initramfs", payload.get("initramfs"))):
            if path and not os.path.isfile(path):
                raise EngineError(f"{what} {path}: no such file")
        vcpus = int((c.get("cpus") or {}).get("boot_vcpus", 1))
        mem = int((c.get("memory") or {}).get("size", 512 * MIB))
        if mem < 64 * MIB:
            raise EngineError(f"memory.size {mem} is too small for a real guest")
        if self.transport not in VIRTIO_DEVICE_SUFFIX:
            raise EngineError(f"CBOX_QEMU_TRANSPORT={self.transport!r}: expected pci or mmio")
        virtio = VIRTIO_DEVICE_SUFFIX[self.transport]          # virtio-blk + virtio = a device model
        machine = "microvm,rtc=on" + (",pcie=on" if self.transport == "pci" else "")
        if self.vsock is not None:      # a vhost-user device reads the guest's memory: shared
            machine += ",memory-backend=mem"
        args = [self.qemu, "-M", machine, "-nodefaults", "-no-user-config",
                "-nographic", "-no-reboot", "-smp", str(vcpus), "-m", f"{mem // MIB}M"]
        if self.vsock is not None:
            args += ["-object", f"memory-backend-memfd,id=mem,size={mem // MIB}M,share=on",
                     "-chardev", f"socket,id=vsock0,path={self.vsock.control}",
                     "-device", f"vhost-user-vsock{virtio},chardev=vsock0"]
        if self.accel == "kvm":
            args += ["-accel", "kvm", "-cpu", "host"]
        else:
            args += ["-accel", "tcg", "-cpu", "max"]
        args += ["-kernel", kernel]
        if payload.get("initramfs"):
            args += ["-initrd", payload["initramfs"]]
        cmdline = payload.get("cmdline") or ""
        if self.accel != "kvm":
            cmdline = tcg_cmdline(cmdline)
        if cmdline:
            args += ["-append", cmdline]
        throttled = disk_throttle_groups(c)
        args += throttle_group_objects(throttled)
        for i, d in enumerate(c.get("disks") or []):
            path = d.get("path")
            if not path or not os.path.exists(path):
                raise EngineError(f"disk {d.get('id') or i}: {path}: no such file")
            if not d.get("readonly") and d.get("image_type", "Unknown") == "Unknown":
                self.log(f"qemu engine: disk {d.get('id') or i} has no image_type: Autodetected raw image "
                         "type. Disabling sector 0 writes. (as Cloud Hypervisor v51+)")
            dev = f"virtio-blk{virtio},drive=disk{i}"
            if d.get("serial"):
                dev += f",serial={d['serial'].replace(',', ',,')}"
            args += disk_drive(i, d, throttled.get(i, (None,))[0]) + ["-device", dev]
        for i, n in enumerate(c.get("net") or []):
            tap = n.get("tap")
            if not tap:
                raise EngineError(f"net {n.get('id') or i}: only tap networking is supported by this engine")
            dev = f"virtio-net{virtio},netdev=net{i}"
            if n.get("mac"):
                dev += f",mac={n['mac']}"
            args += ["-netdev", f"tap,id=net{i},ifname={tap},script=no,downscript=no",
                     "-device", dev]
        if c.get("pvpanic") is True:
            # Cloud Hypervisor's pvpanic is a PCI device (devices/src/pvpanic.rs); QEMU's
            # panic action "none" lets the guest go on to its own panic=N reset, as there
            if self.transport != "pci":
                raise EngineError("pvpanic needs CBOX_QEMU_TRANSPORT=pci (Cloud Hypervisor's is PCI)")
            args += ["-device", "pvpanic-pci", "-action", "panic=none"]
        rng = c.get("rng") or {}
        src = rng.get("src") or "/dev/urandom"
        args += ["-object", f"rng-random,id=rng0,filename={src}",
                 "-device", f"virtio-rng{virtio},rng=rng0"]
        serial = c.get("serial") or {}
        mode = (serial.get("mode") or "Null").lower()
        if mode in ("file", "tty", "socket") and self.console_fd is not None:
            # the stand-in opened (and truncated) the console file, or (Socket mode)
            # gave the pipe its serial manager relays to serial.socket: QEMU's stdio
            args += ["-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0"]
        elif mode == "file":
            if not serial.get("file"):
                raise EngineError("serial mode File needs serial.file")
            args += ["-chardev", f"file,id=ser0,path={serial['file'].replace(',', ',,')}",
                     "-serial", "chardev:ser0"]
        elif mode in ("tty",):
            args += ["-serial", "stdio"]
        else:          # Off / Null / Pty: not mapped, console discarded
            args += ["-serial", "null"]
        args += ["-qmp", f"unix:{self._qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{self._events_path},server=on,wait=off", "-monitor", "none"]
        return args

    # ---- lifecycle ----------------------------------------------------------

    def start(self):
        if self.proc is not None:
            raise EngineError("already started")
        if not shutil.which(self.qemu):
            raise EngineError(f"{self.qemu} not found: apt-get install -y qemu-system-x86")
        if self.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise EngineError("CBOX_QEMU_ACCEL=kvm but /dev/kvm is not usable")
        self._tmp = tempfile.mkdtemp(prefix="cbq")
        self._qmp_path = os.path.join(self._tmp, "qmp.sock")
        self._events_path = os.path.join(self._tmp, "qmp-events.sock")
        try:
            self.vsock = self._vsock_device()
            args = self._args()
            if self.vsock is not None:
                self.vsock.start()      # before QEMU, which connects to its control socket
        except EngineError:
            self._cleanup()
            raise
        self.log(f"qemu engine: accel={self.accel} transport={self.transport}: " + " ".join(args))
        try:
            stdout = self.console_fd if self.console_fd is not None else subprocess.DEVNULL
            stdin = self.console_in_fd if self.console_in_fd is not None else subprocess.DEVNULL
            self.proc = subprocess.Popen(self.prefix + args, stdin=stdin,
                                         stdout=stdout, stderr=subprocess.PIPE,
                                         start_new_session=True, preexec_fn=die_with_parent())
        except OSError as e:
            self._cleanup()
            raise EngineError(f"cannot run {self.qemu}: {e}")
        self.pid = self.proc.pid
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()
        # started = QMP answers query-status (devices, taps and disks are set up
        # by then); an early exit is a start failure with QEMU's own message
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self._stderr_thread.join(2)
                msg = " ".join(line.strip() for line in self._stderr[-5:]) or "no message"
                self.returncode = self.proc.returncode
                self._cleanup()
                raise EngineError(f"qemu exited with code {self.proc.returncode} while starting: {msg}")
            try:
                status = self.qmp("query-status", timeout=1.0)
                if status.get("running") or status.get("status") in ("running", "prelaunch"):
                    break
            except (OSError, ValueError, EngineError):
                pass
            if time.monotonic() > deadline:
                self._kill()
                raise EngineError(f"qemu did not come up within {self.start_timeout:.0f}s")
            time.sleep(0.02)
        self._watch_events()
        self.log(f"qemu engine: started pid {self.pid}")

    def _vsock_device(self):
        """The VmConfig's vsock as a VsockDevice (not started), or None: no vsock asked
        for, or no vhost-device-vsock on this host (logged, then booted without)."""
        vsock = self.config.get("vsock")
        if not vsock:
            return None
        binary = vhost_vsock_binary()
        if binary is None:
            self.log(f"qemu engine: no vsock: {VHOST_VSOCK} not found (CBOX_VHOST_VSOCK_BIN, PATH, "
                     "~/.cargo/bin; `cargo install --locked vhost-device-vsock`): guest callbacks "
                     "are unavailable with this engine")
            return None
        if not vsock.get("socket") or not isinstance(vsock.get("cid"), int):
            raise EngineError("vsock needs cid and socket")
        return VsockDevice(binary, vsock["cid"], vsock["socket"], os.path.join(self._tmp, "vsock-ctl.sock"),
                           self.log)

    def _watch_events(self):
        """Follow QMP events on the second monitor (the first one serves one
        command per connection): SHUTDOWN's reason tells a guest reset (which
        -no-reboot turns into an exit, like a triple fault) from a power-off."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self._events_path)
            f = s.makefile("rwb")
            if "QMP" not in json.loads(f.readline() or b"{}"):
                raise EngineError("no QMP greeting")
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            json.loads(f.readline() or b"{}")
        except (OSError, ValueError, EngineError) as e:
            s.close()
            self.log(f"qemu engine: cannot follow QMP events ({e}): a guest reset will look like a power-off")
            return
        s.settimeout(None)

        def follow():
            with s:
                for line in f:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    self._on_qmp_event(msg.get("event"), msg.get("data") or {})

        self._events_thread = threading.Thread(target=follow, daemon=True, name="qmp-events")
        self._events_thread.start()

    def _on_qmp_event(self, event, data):
        if event == "SHUTDOWN":
            self.shutdown_reason = data.get("reason")
            self.log(f"qemu engine: QMP SHUTDOWN (reason {self.shutdown_reason})")
        elif event == "GUEST_PANICKED":
            # the guest's pvpanic driver wrote PVPANIC_PANICKED: CHV logs it and emits
            # source guest, event panic, properties {"event": "panic"}
            self.log(f"qemu engine: QMP GUEST_PANICKED (action {data.get('action')})")
            if self.on_event is not None:
                self.on_event("guest", "panic", {"event": "panic"})

    def exit_reason(self):
        """After QEMU exited: "reset" (the guest reset; -no-reboot made QEMU exit)
        or "poweroff" (anything else)."""
        if self._events_thread is not None:
            self._events_thread.join(2)        # the SHUTDOWN event precedes QEMU's exit
        return "reset" if self.shutdown_reason == "guest-reset" else "poweroff"

    def _read_stderr(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                del self._stderr[:-50]
                self.log("qemu: " + line)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout=None):
        """Wait for QEMU to exit; its exit code (None if still running after timeout)."""
        if self.proc is None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._cleanup()
        return self.returncode

    def stop(self, timeout=5.0):
        """End the VM like CHV's vm.shutdown: no guest cooperation (a guest that
        should flush its disks must sync first).  SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self._paused_by_signal:
                self._signal(signal.SIGCONT)
            try:
                self.qmp("quit", timeout=min(1.0, timeout))
            except (OSError, ValueError, EngineError):
                self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self.wait_exit()

    def pause(self):
        try:
            self.qmp("stop")
        except (OSError, ValueError, EngineError) as e:
            self.log(f"qemu engine: QMP stop failed ({e}); using SIGSTOP")
            self._signal(signal.SIGSTOP)
            self._paused_by_signal = True

    def resume(self):
        if self._paused_by_signal:
            self._signal(signal.SIGCONT)
            self._paused_by_signal = False
            return
        self.qmp("cont")

    # ---- helpers ------------------------------------------------------------

    def _signal(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _kill(self):
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.returncode = self.proc.returncode
        self._cleanup()

    def _cleanup(self):
        if self.vsock is not None:
            self.vsock.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def qmp(self, command, arguments=None, timeout=5.0):
        """Run one QMP command on a fresh connection; its "return" value."""
        with self._lock:
            if not self._qmp_path or not os.path.exists(self._qmp_path):
                raise EngineError("QMP socket not available")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(self._qmp_path)
                f = s.makefile("rwb")

                def read_reply():
                    while True:
                        line = f.readline()
                        if not line:
                            raise EngineError("QMP connection closed")
                        msg = json.loads(line)
                        if "return" in msg:
                            return msg["return"]
                        if "error" in msg:
                            raise EngineError(f"QMP {command}: {msg['error'].get('desc', msg['error'])}")
                        # greeting or asynchronous event: keep reading

                greeting = json.loads(f.readline() or b"{}")
                if "QMP" not in greeting:
                    raise EngineError("no QMP greeting")
                f.write(b'{"execute": "qmp_capabilities"}\n')
                f.flush()
                read_reply()
                req = {"execute": command}
                if arguments:
                    req["arguments"] = arguments
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                if command == "quit":
                    try:
                        return read_reply()
                    except (EngineError, OSError, ValueError):
                        return {}
                return read_reply()
            finally:
                s.close()

    def __del__(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._kill()
            self._cleanup()
        except Exception:
            pass

#!/usr/bin/env python3
"""CBox: run shell commands in Cloud Hypervisor microVMs, with callbacks to the host.

One asyncio program, standard library only (Python 3.10+). Before section 1 come
the log and the helpers every section uses (within() deadlines, is_decimal,
fmt_seconds, small file helpers, build_commit: the commit this copy came from, the
metrics registry METRICS, the loop lag probe, StderrNoWait (`serve`'s log lines,
never waiting for stderr's reader), give_memory_back (the C heap's free memory
returned every 10 s, off the loop; a full garbage collection after a burst) and the
event log EVENTS); every log line's fields pass through one escape, log_text.
Sections, in order; each uses only what comes before it:

  1. Config          strict parser for the YAML subset config.yaml uses, typed keys
  2. HTTP            one small HTTP/1.1 implementation: message reading, a
                     keep-alive client (Unix or TCP, used for Cloud Hypervisor, the
                     guest agents and callback URLs), response building; the
                     sender of events to events_url; WebSocket framing (RFC 6455,
                     WebSocketFrames: the terminal's attach and `cbox.py shell`)
  3. Guest agent     GuestAgent: the guest agent's API (health, exec, status, kill,
                     list, signal, stdin, sync, stats), its answers bounded; AgentEvents:
                     an exec's event stream from it, checked line by line; the budgets of
                     the work guests make (TokenBucket, FairShare GUEST_WORK, StreamBudget)
  4. Hypervisor      CloudHypervisor: the REST API over the VMM's Unix socket; rate-bounded
                     readers of the VMM's serial socket and event FIFO; the VMM's process
                     (spawn, pidfd watch) and its bounded logs on disk (console, -v log)
  5. Host resources  network (bridge, persistent taps, port isolation, iptables
                     chains, each VM's egress chain), each VM's stateful disk
                     and the free space of state_dir, host memory and CPUs; the
                     VMs' cpu cgroups (VmCpuGroups VM_CPU: one per hypervisor, below
                     one parent that weighs as a thread a host CPU)
  6. Allocation      guest IPs, vsock CIDs, tap names, warm pool names
  7. Request         the schemas of request bodies, queries and path parameters (a
     validation      small JSON Schema vocabulary that check_schema runs and
                     /v1/openapi.json publishes), with lifetimes, labels, egress
                     and the label/status/image filter of /v1/vms; Images: the guest
                     images a start chooses (images_dir, image.json, the checks
                     before a VM starts from one)
  8. Callback bridge a VM's callback socket: the guest's JSON lines forwarded to
                     its callback URL, every cost budgeted per VM
  9. VMs             a VM's VmConfig (vm_create_config, its I/O rate limiters:
                     with_io_limits); how its VMM ended (vmm_exit_reason)
                     and why a start failed (start_failure), read from the VMM's exit and
                     logs (stopReason); VM: one VM's life: its record on disk, paths,
                     deadlines and activity, its background execs (BackgroundExecs), VMM
                     process and API, agent client, console and event readers
 10. Exec results    fields of the agent's exec results read without parsing them
                     whole; each exec counted finished once (metrics, exec.finished);
                     tombstones of VMs a deadline ended; the evidence of failed starts
 11. VM manager      one home per job, composed by VMManager: VmRegistry (the VMs by
                     name), Capacity, VmTeardown, DeadlineKeeper (the one task keeping
                     TTL and idle deadlines), VmBooter (the start steps and their waits),
                     WarmPool (idle VMs booted ahead per image, claimed by start requests),
                     VmStarter, Adoption (at start-up), EgressChanges, bound_vmm_logs,
                     ExecForwarding (the exec routes)
 12. REST server     ApiRoutes: the routes of README's "REST API" and their handlers (each
                     method an Operation: handler, request and answer schemas); the API
                     description made from them (openapi_document); RestServer: the
                     connections, auth before any body is read, limits (request head, query,
                     the host-wide body budget), dispatch (it checks every request's path
                     parameters, query and body against the Operation), request log; EventRelay:
                     exec event streams to the client (NDJSON or SSE, chunked);
                     TerminalAttach: a WebSocket attached to an exec's terminal
 13. Python client   Client: the REST API for programs (synchronous, keep-alive), VM
                     objects with every route under /v1/vms/{name}, ExecStream (events,
                     re-attached with `since` after a broken connection), ClientError;
                     CallbackServer: a threaded receiver of callbacks for a user's
                     program, checking signature, replay window and replayed ids;
                     TerminalSocket: an exec's terminal WebSocket (ClientVM.terminal)
 14. Serve           `serve`: preflight checks, systemd notifications, the server's life
 15. Selftest        `selftest`: a new host's end-to-end check
 16. CLI             the client commands on section 13's Client (CLIENT_COMMANDS, and
                     VM_COMMANDS for `vm start|ls|rm|logs|network|ttl|failures`): `health`,
                     `vm ...`, `exec`, `shell` (a terminal: TerminalClient), `image ls|rm`;
                     `openapi` prints the API description; `--version`

README.md is the contract users rely on (the REST API, config keys, behaviour, figures):
a change of what it says is a change of the contract.
"""
import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import math
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import statistics
import sys
import threading
import time
import urllib.parse
import uuid
import weakref
from datetime import datetime, timezone
from pathlib import Path

VERSION = "0.1.0"
AGENT_PROTOCOL = 2  # the guest agent generation this cbox.py needs (guest_agent.AGENT_PROTOCOL, in image.json)
COMMIT = ""          # `make dist` and `make install` stamp the commit into their copy (build_commit)
LOG_START = time.monotonic()


class SecondText:
    """Times as text, formatted by strftime once a second rather than once a call: at(when)
    gives the text of the second of `when` (epoch seconds) and the milliseconds past it."""

    def __init__(self, fmt, to_struct):
        self.fmt, self.to_struct = fmt, to_struct
        self.second, self.text = None, ""

    def at(self, when):
        if self.second != int(when):
            self.second = int(when)
            self.text = time.strftime(self.fmt, self.to_struct(when))
        return self.text, int((when - self.second) * 1000)


LOG_CLOCK = SecondText("%H:%M:%S", time.localtime)
MILLIS = tuple(f".{ms:03d}" for ms in range(1000))     # ".mmm" of SecondText's milliseconds, made once


def log_time():
    """Local time as HH:MM:SS.mmm."""
    text, ms = LOG_CLOCK.at(time.time())
    return text + MILLIS[ms]


def log_text(value):
    """A value as a log line shows it: printable text as it is, anything else (a line break, a
    control or format character, which a client or a guest may have sent) as a Python literal
    with those characters escaped, so nobody can forge or split a line of the log."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def log_word(value):
    """A value that must read as one field of a log line (a name a guest chose, such as a
    callback's method): as it is when printable and free of spaces and '=', else as a Python
    literal, so it cannot pass for more fields ("x ok=True") of the line it is in."""
    text = str(value)
    return text if text.isprintable() and " " not in text and "=" not in text else repr(text)


def log_line(msg, extra):
    """Write log()'s line of `msg` and its fields as text (" k=v ...", printable: as log() makes it)
    to sys.stderr (while `serve` runs, StderrText: never waiting for its reader)."""
    sys.stderr.write(f"{log_time()} cbox: {msg}{extra}\n")
    sys.stderr.flush()


# Twin of guest_agent.log: must agree on the shape of a line on stderr: "<program>: message".
def log(msg, **fields):
    """One line on stderr: 'cbox: msg k=v ...' (the request and lifecycle log); a line whose
    fields are not all printable has each field's value escaped by log_text."""
    extra = "".join([f" {k}={v}" for k, v in fields.items() if v is not None])
    if not extra.isprintable():        # one check for the whole line: the usual case costs no more
        extra = "".join([f" {k}={log_text(v)}" for k, v in fields.items() if v is not None])
    log_line(msg, extra)


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def utc_text(epoch):
    """An epoch time as RFC3339 UTC with milliseconds (deadlines: a second is too coarse)."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_epoch(text):
    """The epoch time of an RFC3339 UTC text (utc_text, utc_now); None stays None."""
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# =============================================================================
# Helpers every section uses: deadlines (within), number and file helpers
# =============================================================================

def is_decimal(text):
    """ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


# Twin of guest_agent.fmt_seconds: must agree on the text (timeouts in messages users read come from both).
def fmt_seconds(value):
    """5 -> '5s', 0.5 -> '0.5s', 1000000 -> '1000000s' (whole seconds never in e-notation)."""
    value = float(value)
    return f"{int(value)}s" if value.is_integer() else f"{value:g}s"


class Deadline:
    """One within() call's deadline: its task is cancelled at `when` unless it stopped waiting."""
    __slots__ = ("when", "task", "expired")

    def __init__(self, when, task):
        self.when, self.task, self.expired = when, task, False


class Deadlines:
    """The deadlines of one event loop's within() calls, behind a single loop timer.

    A loop.call_later per within() (three per exec) costs a TimerHandle compared in
    Python on every heap operation of the loop, and its cancelled entry lingers in
    that heap: a large share of cbox's CPU per exec. Here adding and dropping a
    deadline is a set operation. The loop timer is due at or before the earliest
    waiting deadline (it moves only when an earlier one arrives); when it fires it
    expires what is due and moves to the earliest deadline still waiting, so every
    deadline expires on time."""

    def __init__(self):
        self.waiting = set()
        self.timer = None              # weak reference to the loop timer (a strong one would keep
        self.due = math.inf            # the loop alive: LOOP_DEADLINES holds loops weakly); its time

    def schedule(self, loop, when):
        """The loop timer due at `when` (a deadline added to `waiting` is due before it was)."""
        timer = self.timer and self.timer()
        if timer is not None:
            timer.cancel()
        self.due = when
        self.timer = weakref.ref(loop.call_at(when, self._expire, loop))

    def _expire(self, loop):
        self.timer, self.due = None, math.inf
        now = loop.time()
        for deadline in [d for d in self.waiting if d.when <= now]:
            self.waiting.discard(deadline)
            deadline.expired = True
            deadline.task.cancel()
        if self.waiting:
            self.schedule(loop, min(d.when for d in self.waiting))


LOOP_DEADLINES = weakref.WeakKeyDictionary()     # event loop -> its Deadlines
_LAST_DEADLINES = (lambda: None, None)           # (weak reference to a loop, its Deadlines): the last used


def loop_deadlines(loop):
    """The Deadlines of `loop` (made at its first within()); the last loop's are kept at hand,
    as a WeakKeyDictionary lookup makes a weak reference each time."""
    global _LAST_DEADLINES
    deadlines = LOOP_DEADLINES.get(loop)
    if deadlines is None:
        deadlines = LOOP_DEADLINES[loop] = Deadlines()
    _LAST_DEADLINES = (weakref.ref(loop), deadlines)
    return deadlines


async def within(timeout, aw):
    """await aw, raising asyncio.TimeoutError after `timeout` seconds.

    Like asyncio.wait_for, without the extra task and the timer per call (this is on
    every request's path, several times; asyncio.timeout is 3.11+)."""
    loop = asyncio.get_running_loop()
    last, deadlines = _LAST_DEADLINES
    if last() is not loop:
        deadlines = loop_deadlines(loop)
    task = asyncio.current_task(loop)       # with the loop: one get_running_loop() (a getpid() before 3.12)
    deadline = Deadline(loop.time() + timeout, task)
    deadlines.waiting.add(deadline)         # added and dropped here, not by calls: several per request
    if deadline.when < deadlines.due:
        deadlines.schedule(loop, deadline.when)
    try:
        return await aw
    except asyncio.CancelledError:
        if not deadline.expired:
            raise
        if hasattr(task, "uncancel"):
            task.uncancel()
        raise asyncio.TimeoutError() from None
    finally:
        deadlines.waiting.discard(deadline)


def atomic_temporary(path):
    """The file write_atomically writes before renaming it to `path` (a kill -9 can leave it)."""
    return path.with_name(f".{path.name}.tmp")


# Twin of guest_agent.write_atomically: must agree that a reader sees the old file or the whole new one.
def write_atomically(path, data):
    tmp = atomic_temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:                     # a full disk must not leave the temporary file behind
            tmp.unlink()
        except OSError:
            pass
        raise


class RecordWrites:
    """Files rewritten often (a VM's record: its activity time and background execs change
    with every exec) written off the event loop: a rename on a busy disk can take hundreds
    of ms, and every VM's API waited with it (seen: health p99 234 ms while 156 exec streams
    started, each noting its exec in its VM's record, `bench.py --only hostile --hostile
    fair --attacks 'yes streams' --attackers 39`; 3-13 ms with this and smaller stream batches).

    later(path, data) queues the newest content for the one worker (a task handing each
    write to a thread); `await write(path, data)` writes in a thread and returns once it is
    on disk, for the steps of a VM's life the next relies on (a start, a claim, a destroy:
    DELETE /v1/vms renames 250 records at once); now(path, data) writes at once, where no
    await is possible; remove(path) unlinks. Whichever comes last wins, never older
    content: a queued write whose path was written or removed after it was queued is
    skipped (a lock per file orders the thread's write of it with the loop's). flush()
    writes what is queued, here and now (at shutdown, or with no loop running)."""

    def __init__(self):
        self.locks = {}                # path -> the lock of its writes (a file's own: others go on)
        self.numbers = itertools.count(1)
        self.newest = {}               # path -> the number of its newest queued write
        self.queued = {}               # path -> (number, data), oldest path first
        self.worker = None

    def later(self, path, data):
        self.queued[path] = (self._number(path), data)
        if self.worker is None:
            try:
                self.worker = asyncio.get_running_loop().create_task(self._work())
            except RuntimeError:       # no loop (a CLI command, a test): at once
                self.flush()

    async def write(self, path, data):
        """The content on disk before this returns, written in a thread: the loop goes on
        (a rename in a directory busy with other VMs' files can wait a long time)."""
        await asyncio.to_thread(self._write_if_newest, path, self._number(path), data)

    def now(self, path, data):
        with self._lock(path):
            self._supersede(path)
            write_atomically(path, data)

    def remove(self, path):
        with self._lock(path):
            self._supersede(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.locks.pop(path, None)     # a thread still holding it finds its write superseded

    def _number(self, path):
        """A new newest write of `path`: numbered, its lock made, what was queued for it dropped
        (a queued content moves to the end of the queue when replaced)."""
        number = self.newest[path] = next(self.numbers)
        self._lock(path)
        self.queued.pop(path, None)
        return number

    def _lock(self, path):
        return self.locks.setdefault(path, threading.Lock())

    def _supersede(self, path):
        self.queued.pop(path, None)
        self.newest.pop(path, None)    # a write in the thread now finds no number of its own

    def _write_if_newest(self, path, number, data):
        lock = self.locks.get(path)
        if lock is None:               # removed since
            return
        with lock:
            if self.newest.get(path) != number:
                return
            del self.newest[path]
            write_atomically(path, data)

    def _next(self):
        path = next(iter(self.queued))
        return (path, *self.queued.pop(path))

    async def _work(self):
        try:
            while self.queued:
                path, number, data = self._next()
                try:
                    await asyncio.to_thread(self._write_if_newest, path, number, data)
                except OSError as e:
                    log("cannot write", file=str(path), error=repr(str(e)))
        finally:
            self.worker = None

    def flush(self):
        while self.queued:
            path, number, data = self._next()
            try:
                self._write_if_newest(path, number, data)
            except OSError as e:
                log("cannot write", file=str(path), error=repr(str(e)))


RECORD_WRITES = RecordWrites()


def tail_bytes(path, limit):
    """The last `limit` bytes of a file (b"" when it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read()
    except OSError:
        return b""


def tail_file(path, limit=64 * 1024):
    return tail_bytes(path, limit).decode("utf-8", "replace")


def file_size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def remove_trees(*paths):
    for path in paths:
        remove_tree(path)


def git_head_commit(checkout):
    """The commit HEAD names in the git checkout `checkout`, read from its files (no git
    process: it works without git installed, and as root in another user's checkout);
    None when it is not one. A linked worktree's .git is a file naming its git dir,
    whose `commondir` holds the branches; a branch is a file or a line of packed-refs."""
    git = checkout / ".git"
    try:
        if git.is_file():
            git = checkout / git.read_text().removeprefix("gitdir:").strip()
        head = (git / "HEAD").read_text().strip()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").exists() else git
        if head.startswith("ref: "):
            branch = head[5:]
            paths = [base / branch for base in (git, common) if (base / branch).is_file()]
            if paths:
                head = paths[0].read_text().strip()
            else:
                packed = (common / "packed-refs").read_text().splitlines()
                head = next((line.split()[0] for line in packed if line.endswith(" " + branch)), "")
    except (OSError, IndexError):
        return None
    return head if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", head) else None


_BUILD_COMMIT = []


def build_commit():
    """The commit this cbox.py came from: stamped by `make dist`/`install`, else the HEAD of the git
    checkout it sits in (local changes are not seen), else 'unknown'. Read once."""
    if not _BUILD_COMMIT:
        _BUILD_COMMIT.append(COMMIT or git_head_commit(Path(__file__).resolve().parent) or "unknown")
    return _BUILD_COMMIT[0]


# =============================================================================
# Helpers every section uses: metrics (a small Prometheus registry), the log's
# stderr, the heap trim and events
# =============================================================================
#
# The hot paths (exec forwarding, callbacks, every REST request) hold their
# metric objects: counting is an int add, a histogram a bisect into its buckets.
# Values that exist anyway (VMs by status, the callback bridges' counters, the
# process's RSS) are read only when /v1/metrics is scraped (Registry.on_scrape).

class Counter:
    """A counter or gauge value (`value` may be set directly by a scrape hook)."""
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def inc(self, n=1):
        self.value += n


class Histogram:
    """Observations in fixed buckets (upper bounds, ascending); cumulated only when exposed."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1      # le: value <= bound
        self.sum += value


def metric_number(value):
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(value)


def metric_labels(names, values):
    """'{a="x",b="y"}' with values escaped as the text format asks (\\, ", newline)."""
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


class MetricFamily:
    """One metric name: HELP, TYPE and a child (Counter or Histogram) per label values."""

    def __init__(self, name, kind, help_text, labelnames=(), buckets=None):
        self.name, self.kind, self.help, self.labelnames = name, kind, help_text, tuple(labelnames)
        self.buckets = tuple(buckets) if buckets else None
        self.children = {}
        if not labelnames:
            self.labels()

    def labels(self, *values):
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self.children[values] = Histogram(self.buckets) if self.kind == "histogram" else Counter()
        return child

    def expose(self, out):
        out.append(f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for values, child in self.children.items():
            if self.kind != "histogram":
                out.append(f"{self.name}{metric_labels(self.labelnames, values)} {metric_number(child.value)}")
                continue
            names, running = self.labelnames + ("le",), 0
            for bound, count in zip(self.buckets + (math.inf,), child.counts):
                running += count
                out.append(f"{self.name}_bucket{metric_labels(names, values + (metric_number(float(bound)),))} {running}")
            labels = metric_labels(self.labelnames, values)
            out.append(f"{self.name}_sum{labels} {metric_number(child.sum)}")
            out.append(f"{self.name}_count{labels} {running}")


class Registry:
    """The process's metrics, exposed in the Prometheus text format 0.0.4 (GET /v1/metrics)."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self):
        self.families = {}
        self.hooks = {}            # name -> called before each exposition, to refresh read-on-scrape values

    def family(self, name, kind, help_text, labelnames=(), buckets=None):
        if name in self.families:
            raise ValueError(f"metric {name} registered twice")
        family = self.families[name] = MetricFamily(name, kind, help_text, labelnames, buckets)
        return family

    def counter(self, name, help_text, labelnames=()):
        family = self.family(name, "counter", help_text, labelnames)
        return family if labelnames else family.labels()

    def gauge(self, name, help_text, labelnames=()):
        family = self.family(name, "gauge", help_text, labelnames)
        return family if labelnames else family.labels()

    def histogram(self, name, help_text, buckets, labelnames=()):
        family = self.family(name, "histogram", help_text, labelnames, buckets)
        return family if labelnames else family.labels()

    def on_scrape(self, name, hook):
        self.hooks[name] = hook

    def expose(self):
        for hook in list(self.hooks.values()):
            hook()
        out = []
        for family in self.families.values():
            family.expose(out)
        return ("\n".join(out) + "\n").encode()


METRICS = Registry()
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
M_VMS = METRICS.gauge("cbox_vms", "VMs by status", ("status",))
M_VM_STARTS = METRICS.counter("cbox_vm_starts_total", "VM starts begun (a name and resources were taken)")
M_VM_START_FAILURES = METRICS.counter("cbox_vm_start_failures_total", "VM starts that failed and were torn down")
M_VM_BOOT = METRICS.histogram("cbox_vm_boot_seconds", "time from a start request to the guest agent's answer",
                              (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0))
M_VM_STOPS = METRICS.counter("cbox_vm_stops_total", "VMs that ended by themselves, by stopReason", ("reason",))
M_VM_DESTROYS = METRICS.counter("cbox_vm_destroys_total", "VMs destroyed through the API")
M_STATE_DIR_FREE = METRICS.gauge("cbox_state_dir_free_bytes", "free space in state_dir's file system (statvfs "
                                 "f_bavail), read when scraped")
M_DISKS_PROMISED = METRICS.gauge("cbox_stateful_disks_promised_bytes", "bytes the VMs' sparse stateful disks may "
                                 "still grow by (each its size less what it uses); starts are admitted against it")
M_VCPUS = METRICS.gauge("cbox_vcpus", "vCPUs of all VMs (the warm pool's included); with vcpu_overcommit set, "
                       "starts are admitted against cbox_host_cpus x it")
M_HOST_CPUS = METRICS.gauge("cbox_host_cpus", "CPUs cbox.py and the hypervisors it starts may run on (its affinity)")
M_VMS_BUSY = METRICS.gauge("cbox_vms_busy", "VMs whose vCPUs were all busy over the last second: they run "
                         "behind the quiet VMs, in a cpu cgroup with cpu.idle (busy_vms_yield)")
M_VM_CPU_MOVES = METRICS.counter("cbox_vm_cpu_moves_total", "VMs moved between the quiet and the busy cpu cgroups, "
                                 "by where they went (busy_vms_yield)", ("to",))
M_POOL_READY = METRICS.gauge("cbox_pool_ready", "warm pool VMs booted and idle, ready to be claimed")
M_POOL_BOOTING = METRICS.gauge("cbox_pool_booting", "warm pool VMs booting")
M_POOL_CLAIMS = METRICS.counter("cbox_pool_claims_total", "VM starts answered with a warm pool VM")
M_POOL_COLD = METRICS.counter("cbox_pool_cold_starts_total", "VM starts that booted a VM while a warm pool is "
                              "configured: shape (vcpus/memoryMb not the defaults), empty (no VM ready) or "
                              "failed (the claim failed)", ("reason",))
M_POOL_BOOT_FAILURES = METRICS.counter("cbox_pool_boot_failures_total", "warm pool VM boots that failed (torn "
                                       "down, retried with backoff)")
M_EXECS_STARTED = METRICS.counter("cbox_execs_started_total", "execs the guest agents accepted")
M_EXECS_FINISHED = METRICS.counter("cbox_execs_finished_total", "execs seen finished (blocking ones at their "
                                   "answer, background ones at the status or kill that shows them ended)")
M_EXECS_TIMED_OUT = METRICS.counter("cbox_execs_timed_out_total", "finished execs killed by their timeout")
M_EXECS_OOM = METRICS.counter("cbox_execs_oom_killed_total", "finished execs the guest reported OOM-killed")
M_EXEC_DURATION = METRICS.histogram("cbox_exec_duration_seconds", "duration of finished execs as the guest "
                                    "agent measured it", DURATION_BUCKETS)
M_CALLBACKS = METRICS.counter("cbox_callbacks_total", "guest callbacks by outcome: ok (the URL's result), error "
                              "(the URL's error answer or failure), refused (over a budget, or not in callbackMethods), bad_request, no_url",
                              ("outcome",))
M_CALLBACK_DURATION = METRICS.histogram("cbox_callback_duration_seconds", "callback URL round trips (ok and error)",
                                        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                         10.0, 30.0))
M_HTTP_REQUESTS = METRICS.counter("cbox_http_requests_total", "REST requests answered, by route pattern, method "
                                  "and status", ("route", "method", "status"))
M_HTTP_BODY_BYTES = METRICS.gauge("cbox_http_request_body_bytes", "bytes of REST request bodies being received "
                                  "or held, all connections together (request_body_buffer_bytes caps them)")
M_HTTP_ABANDONED = METRICS.counter("cbox_http_requests_abandoned_total", "REST requests whose client hung up "
                                   "before the answer (the work for them was cancelled)")
M_EVENTS = METRICS.counter("cbox_events_total", "lifecycle events published, by type", ("type",))
M_EVENTS_SUPPRESSED = METRICS.counter("cbox_events_suppressed_total", "callback.failed events not published: "
                                      "over a VM's events rate (the next one carries the count)")
M_EVENTS_DELIVERED = METRICS.counter("cbox_events_delivered_total", "events POSTed to events_url (2xx answer)")
M_EVENTS_FAILED = METRICS.counter("cbox_events_delivery_failures_total", "failed POSTs to events_url (retried)")
M_EVENTS_DROPPED = METRICS.counter("cbox_events_dropped_total", "events never delivered to events_url: its "
                                   "queue was full or the receiver was down longer than events_retry_s")
M_EVENTS_QUEUED = METRICS.gauge("cbox_events_queued", "events waiting for delivery to events_url")
M_CALLBACK_BRIDGE = METRICS.counter("cbox_callback_bridge_events_total", "what the VMs' callback bridges "
                                     "counted (connections, callbacks, budget hits: refused_*, *_timeouts, ...)",
                                     ("event",))
M_PROCESS_RSS = METRICS.gauge("cbox_process_resident_memory_bytes", "cbox.py's resident memory")
M_PROCESS_CPU = METRICS.counter("cbox_process_cpu_seconds_total", "cbox.py's CPU time, user and system")
M_PROCESS_FDS = METRICS.gauge("cbox_process_open_fds", "cbox.py's open file descriptors")
M_PROCESS_MAX_FDS = METRICS.gauge("cbox_process_max_fds", "cbox.py's file descriptor limit (soft RLIMIT_NOFILE)")
M_PROCESS_START = METRICS.gauge("cbox_process_start_time_seconds", "when cbox.py started, seconds since the epoch")
M_PROCESS_UPTIME = METRICS.gauge("cbox_process_uptime_seconds", "seconds since cbox.py started")
M_BUILD_INFO = METRICS.gauge("cbox_build_info", "always 1; the label names cbox.py's version", ("version",))
M_LOOP_LAG = METRICS.gauge("cbox_event_loop_lag_seconds", "how late cbox.py's event loop ran a 100 ms timer, "
                           "over the last minute: quantile 0.5, 0.99 and 1 (the maximum)", ("quantile",))
M_GUEST_WORK_WAITING = METRICS.gauge("cbox_guest_work_waiting", "requests of guest-caused work waiting for "
                                     "their VM's turn in the host-wide fair share (guest_work_cpu_share)")
M_GUEST_WORK_WAITS = METRICS.counter("cbox_guest_work_waits_total", "times guest-caused work waited for its VM's "
                                     "turn in the host-wide fair share (the budget was in use)")
M_GUEST_WORK_RATE = METRICS.gauge("cbox_guest_work_units_per_second", "the host-wide fair share's budget "
                                  "(guest_work_cpu_share over the unit's measured cost, or guest_work_units_per_s)")
M_GUEST_WORK_UNIT = METRICS.gauge("cbox_guest_work_unit_seconds", "what a unit of guest work costs cbox.py's loop "
                                  "on this host, measured at start")
CALLBACK_OUTCOMES = {outcome: M_CALLBACKS.labels(outcome)
                     for outcome in ("ok", "error", "refused", "bad_request", "no_url")}
HTTP_METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"))


class LoopLag:
    """The event loop's lag: a probe task sleeps INTERVAL and notes how much later than
    asked it woke up; p50, p99 and max of the newest WINDOW samples are what
    GET /v1/health and cbox_event_loop_lag_seconds show."""

    INTERVAL = 0.1
    WINDOW = 600                   # a minute of samples

    def __init__(self):
        self.samples = collections.deque(maxlen=self.WINDOW)

    async def probe(self):
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.INTERVAL)
            self.samples.append(max(0.0, loop.time() - t0 - self.INTERVAL))

    def summary(self):
        """{"p50", "p99", "max"} in seconds over the window (0 before the first sample)."""
        ordered = sorted(self.samples) or [0.0]
        return {"p50": ordered[len(ordered) // 2], "p99": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)],
                "max": ordered[-1]}

    def export(self):
        for quantile, value in zip(("0.5", "0.99", "1"), self.summary().values()):
            M_LOOP_LAG.labels(quantile).value = value


LOOP_LAG = LoopLag()
METRICS.on_scrape("loop_lag", LOOP_LAG.export)


# ---- the server's log: stderr, never waited for ----------------------------------

M_LOG_DROPPED = METRICS.counter("cbox_log_lines_dropped_total", "log lines dropped because stderr's reader "
                                "fell behind by more than 1 MiB, or writing to stderr failed")
LOG_BACKLOG_BYTES = 1 << 20


class StderrNoWait:
    """stderr for `serve`'s log lines, written without ever waiting for its reader: a log
    reader that stalls (a pipe nobody reads, a stuck journald or terminal) must not stall
    the event loop, and with it every VM. A line stderr cannot take now waits in a backlog
    (at most LOG_BACKLOG_BYTES; lines beyond are dropped and counted), written when the loop
    sees stderr writable again; once it is drained, a line says how many were dropped.

    stderr is written through a descriptor of its own that does not wait: a pipe, FIFO or
    terminal reopened with O_NONBLOCK (not fd 2's file description, which the parent may
    share), a socket (journald's stream) with MSG_DONTWAIT; a regular file as it is (a
    write to it never waits for a reader). Anything else keeps plain writes (`waits`). Where
    stderr cannot be watched (a file, plain writes) what a short write left is dropped.
    Safe from any thread: lines from worker threads take the same path."""

    def __init__(self, loop, fd=2, backlog_bytes=LOG_BACKLOG_BYTES):
        self.loop, self.limit = loop, backlog_bytes
        self.backlog = bytearray()
        self.dropped = 0
        self.watching = self.closed = False
        self.lock = threading.Lock()
        self.fd, self.send, self.closer, self.waits = self.open_no_wait(fd)
        self.watchable = self.closer is not None

    @staticmethod
    def open_no_wait(fd):
        """(fd, send(bytes) -> bytes written or BlockingIOError, close() or None (then the fd
        cannot be watched for writability), whether send may wait)."""
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd, functools.partial(os.write, fd), None, False
        if stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=os.dup(fd))
            return sock.fileno(), lambda data: sock.send(data, socket.MSG_DONTWAIT), sock.close, False
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return fd, functools.partial(os.write, fd), None, True
        return own, functools.partial(os.write, own), functools.partial(os.close, own), False

    def write(self, data):
        with self.lock:
            if self.backlog:
                self._keep(data)
                return
            if self.dropped:
                data = self._dropped_line() + data
            try:
                sent = self.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop()
                return
            if sent < len(data) and not self.watchable:
                self._drop()
            elif sent < len(data):
                self.backlog += data[sent:]        # even past the limit: the rest of a line begun
                self._watch()

    def _keep(self, data):
        if len(self.backlog) + len(data) > self.limit:
            self._drop()
        else:
            self.backlog += data

    def _drop(self):
        self.dropped += 1
        M_LOG_DROPPED.inc()

    def _dropped_line(self):
        text = f"{log_time()} cbox: log lines dropped count={self.dropped} why=stderr's reader fell behind\n"
        self.dropped = 0
        return text.encode()

    def _watch(self):
        if not self.watching:
            self.watching = True
            try:
                self.loop.call_soon_threadsafe(self._start_watching)
            except RuntimeError:          # the loop is closed: close() wrote what it could
                self.watching = False

    def _start_watching(self):
        with self.lock:
            if self.watching and not self.closed:      # (close() may have come first)
                self.loop.add_writer(self.fd, self._drain)

    def _drain(self):
        with self.lock:
            try:
                del self.backlog[:self.send(self.backlog)]
            except BlockingIOError:
                return
            except OSError:
                self.backlog.clear()
                self._drop()
            if not self.backlog and self.dropped:
                self.backlog += self._dropped_line()
            if not self.backlog:
                self.watching = False
                self.loop.remove_writer(self.fd)

    def close(self, timeout=1.0):
        """Stop watching; the backlog is written within `timeout` seconds if stderr takes it."""
        with self.lock:
            self.closed = True
            if self.watching:
                self.loop.remove_writer(self.fd)
                self.watching = False
            deadline = time.monotonic() + timeout
            while self.backlog and time.monotonic() < deadline:
                try:
                    del self.backlog[:self.send(self.backlog)]
                except BlockingIOError:
                    select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
                except OSError:
                    break
            if self.closer:
                self.closer()


class StderrText:
    """sys.stderr while `serve` runs: log lines and what Python itself writes there (a warning,
    the traceback the asyncio exception handler logs) go through StderrNoWait; anything else
    (fileno, encoding, isatty) is the original stream's."""

    def __init__(self, sink, original):
        self.sink, self.original = sink, original

    def write(self, text):
        self.sink.write(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def flush(self):
        pass

    def __getattr__(self, name):
        return getattr(self.original, name)


# ---- memory given back after an attack (glibc's malloc_trim, through ctypes) -------

HEAP_TRIM_INTERVAL_S = 10.0


def glibc_malloc_trim():
    """glibc's malloc_trim, or None under another C library."""
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid="self"):
    """A process's RSS (/proc/<pid>/statm); OSError when it is gone."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


class MemoryGiveBack:
    """What an attack made cbox.py hold, given back once it is over; round() every
    HEAP_TRIM_INTERVAL_S (give_memory_back).

    The free memory of the C heap goes back to the system (malloc_trim(0): its free top
    and every free whole page). glibc keeps what Python freed for later: after an attack
    cbox.py's RSS stayed where the attack took it (seen: 331 MB 30 s after 39 VMs each
    streamed `yes` to 4 readers, 113 MB before; 50 MB with the trim, `bench.py --only
    hostile --hostile fair --attacks "yes streams"`). The trim runs in a worker thread
    (ctypes lets go of the GIL): after an attack it walks a large heap, and the loop goes
    on meanwhile (its own mallocs wait only while the trim holds an arena's lock).

    A trim that gives back BURST_END or more says a burst of work is ending or has ended;
    the next COLLECT_ROUNDS rounds then first run a full garbage collection. A client that
    hangs up under an exec stream leaves a reference cycle: asyncio keeps the write's
    error in the connection's protocol, and the error's traceback keeps the frames that
    were writing (error -> traceback -> frame -> transport -> protocol -> future -> error),
    the relay's among them, with its guest stream and that stream's read buffer (up to
    768 KiB). Only a full collection frees such a cycle, and a quiet process seldom runs
    one: 30 s after the same attack cbox.py stayed 30-58 MB up in 5 runs of 29 (the
    collection after it frees about 4,000 objects). Two rounds, as the first may come
    while the broken streams are still ending. A collection holds the loop (9-31 ms with
    40 VMs), so it runs only then; during a long attack, at most once a round. (Asking
    also for half of the RSS back, to keep collections out of attacks, left 534 MB held
    after 39 VMs sent event lines at the 2 MiB bound: those trims gave back 5-30%.)"""

    BURST_END = 16 * 1024 * 1024
    COLLECT_ROUNDS = 2

    def __init__(self, malloc_trim, rss=None):
        self.malloc_trim, self.rss = malloc_trim, rss or self.own_rss
        self.collect = 0               # rounds left that collect first

    @staticmethod
    def own_rss():
        """cbox.py's RSS, 0 where /proc cannot tell it."""
        try:
            return resident_bytes()
        except (OSError, ValueError, IndexError):
            return 0

    async def round(self):
        if self.collect:
            self.collect -= 1
            gc.collect()
        before = self.rss()
        await asyncio.to_thread(self.malloc_trim, 0)
        if before - self.rss() >= self.BURST_END:
            self.collect = self.COLLECT_ROUNDS


def freeze_startup_objects():
    """Move what exists when the server starts (the objects of cbox.py's code and of the
    modules it imported, ~21,000) out of the garbage collector's way (gc.freeze): they
    live as long as the process, and a full collection no longer walks them -- 14-30 ms
    of the loop a full collection spent on them alone here (timed by hand)."""
    gc.collect()
    gc.freeze()


async def give_memory_back():
    """MemoryGiveBack's rounds, every HEAP_TRIM_INTERVAL_S (with glibc: its malloc_trim)."""
    malloc_trim = glibc_malloc_trim()
    if malloc_trim is None:
        return
    memory = MemoryGiveBack(malloc_trim)
    while True:
        await asyncio.sleep(HEAP_TRIM_INTERVAL_S)
        await memory.round()


# ---- events: numbered, kept in a ring (GET /v1/events), handed to sinks (events_url) ----

EVENT_CLOCK = SecondText("%Y-%m-%dT%H:%M:%S", time.gmtime)


def event_time(when):
    """An epoch time as UTC RFC 3339 with milliseconds."""
    text, ms = EVENT_CLOCK.at(when)
    return text + MILLIS[ms] + "Z"


def complete_event(event):
    """An event with its details read and its time as text (EventLog.publish), as readers get it."""
    details = event.pop(None, None)
    if details is not None:
        event.update(details[0](*details[1:]))
    when = event.get("time")
    if when.__class__ is float:
        event["time"] = event_time(when)
    return event


EVENT_SCHEMA = {     # one event of GET /v1/events and of events_url (response schemas: openapi_document)
    "type": "object", "required": ["id", "type", "vmName", "time"],
    "properties": {"id": {"type": "integer", "minimum": 1}, "type": {"type": "string"},
                   "vmName": {"type": ["string", "null"]}, "time": {"type": "string", "format": "date-time"}},
    "description": "vm.started, vm.stopped, vm.destroyed, exec.finished, callback.failed; more fields by type"}


class EventLog:
    """Lifecycle events (vm.started, vm.stopped, vm.destroyed, exec.finished, callback.failed):
    each gets the next id (from 1 at every start of cbox.py), stays in a ring of the newest
    `size` for long-polls, and goes to every sink (the events_url sender) at once."""

    MAX_ANSWER = 1000          # events in one answer; the consumer asks again from `next`

    def __init__(self, size=1000):
        self.ring = collections.deque(maxlen=size)
        self.last_id = 0
        self.waiters = []          # futures of long-polls waiting for the next event
        self.sinks = []

    def resize(self, size):
        self.ring = collections.deque(self.ring, maxlen=size)

    def publish(self, kind, vm_name, details=None, **fields):
        """Number and keep an event, wake the long-polls, hand it to the sinks. `details`,
        (function, *args), gives more fields when the event is first read (complete_event):
        an event per exec costs little when nobody reads them; so does its time, kept as a number
        until then."""
        self.last_id += 1
        event = {"id": self.last_id, "type": kind, "vmName": vm_name, "time": time.time(), **fields}
        if details is not None:
            event[None] = details
        self.ring.append(event)
        M_EVENTS.labels(kind).inc()
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        for sink in self.sinks:
            sink(event)
        return event

    def after(self, since):
        """(events with an id above `since`, missed, next): `missed` when events after `since`
        already left the ring, or `since` is no id of this run (cbox.py restarted): then the
        answer starts at the oldest event kept. `next` is the `since` of the next call."""
        oldest = self.ring[0]["id"] if self.ring else self.last_id + 1
        missed = since > self.last_id or since < oldest - 1
        start = 0 if missed else since + 1 - oldest
        events = [complete_event(e) for e in itertools.islice(self.ring, start, start + self.MAX_ANSWER)]
        nxt = events[-1]["id"] if events else min(since, self.last_id)
        return events, missed, nxt

    async def wait(self, timeout):
        """Until the next event is published, at most `timeout` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await within(timeout, waiter)
        except asyncio.TimeoutError:
            pass
        finally:
            waiter.cancel()
            with contextlib.suppress(ValueError):     # gone already when an event woke it
                self.waiters.remove(waiter)


EVENTS = EventLog()


# =============================================================================
# 1. Config
# =============================================================================

class ConfigError(Exception):
    pass


_KEY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(?:\s+(.*))?$")
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][-+]?[0-9]+)?$")


def _strip_comment(line):
    """Drop a '# comment' that is outside quotes and starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _parse_scalar(text, where):
    if text.startswith('"'):
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except ValueError as e:
            raise ConfigError(f"{where}: bad double-quoted string") from e
        if text[end:].strip():
            raise ConfigError(f"{where}: unexpected text after the string")
        return value
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise ConfigError(f"{where}: unterminated single-quoted string")
        return text[1:-1].replace("''", "'")
    if text in ("null", "~"):
        return None
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text[0] in "[]{}&*!|>%@`,?-" or ": " in text:
        raise ConfigError(f"{where}: unsupported YAML construct {text[:20]!r} "
                          "(only nested mappings of plain scalars are supported)")
    return text


def parse_yaml_subset(text, source="config"):
    """Parse nested mappings of scalars. Returns (tree, {dotted.key: line})."""
    root, lines = {}, {}
    stack = [(0, root, "")]           # (indent, mapping, dotted path)
    pending = None                     # (mapping, path) of a 'key:' awaiting children
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{source} line {lineno}"
        line = _strip_comment(raw)
        if not line.strip():
            continue
        body = line.lstrip(" ")
        if body.startswith("\t") or "\t" in line[: len(line) - len(body)]:
            raise ConfigError(f"{where}: tabs are not allowed for indentation")
        indent = len(line) - len(body)
        if body in ("---", "..."):
            raise ConfigError(f"{where}: multiple YAML documents are not supported")
        if body.startswith("- ") or body == "-":
            raise ConfigError(f"{where}: lists are not supported")
        m = _KEY_LINE.match(body)
        if not m:
            raise ConfigError(f"{where}: expected 'key: value', got {body[:40]!r}")
        if pending is not None:
            if indent > stack[-1][0]:
                stack.append((indent, pending[0][pending[1]], pending[2]))
            else:
                pending[0][pending[1]] = None     # 'key:' with nothing under it is null
            pending = None
        while indent < stack[-1][0]:
            stack.pop()
        if indent != stack[-1][0]:
            raise ConfigError(f"{where}: inconsistent indentation")
        key, value = m.group(1), m.group(2)
        mapping, path = stack[-1][1], stack[-1][2]
        dotted = f"{path}.{key}" if path else key
        if key in mapping:
            raise ConfigError(f"{where}: duplicate key '{dotted}'")
        lines[dotted] = lineno
        if value is None or value == "":
            mapping[key] = {}
            pending = (mapping, key, dotted)
        else:
            mapping[key] = _parse_scalar(value.strip(), where)
    if pending is not None:
        pending[0][pending[1]] = None
    return root, lines


VMM_LOG_TAIL = 1024 * 1024          # the most of a VMM's log cbox.py reads (reset_in_vmm_log)
FOREVER_S = 10 * 365 * 86400        # the longest TTL or idle timeout (a deadline beyond is no deadline)
EVENTS_BATCH_MAX = 1000             # events_batch: events in one POST to events_url at most


# key: (type, default, description). Types: str, int, float, bool.
CONFIG_KEYS = {
    "host": (str, "127.0.0.1", "address the REST API listens on"),
    "port": (int, 7000, "REST API port"),
    "api_token": (str, "", "bearer token required on every route but /v1/health; empty = none"),
    "state_dir": (str, "/var/lib/cbox", "VM records, stateful disks, console logs"),
    "run_dir": (str, "/run/cbox", "short directory for per-VM sockets (Unix paths hold 107 bytes)"),
    "bridge_name": (str, "cbox0", "Linux bridge the taps join"),
    "bridge_ip": (str, "10.20.1.1/24", "host address on the bridge (the guests' gateway)"),
    "bridge_subnet": (str, "10.20.1.0/24", "subnet guest IPs are allocated from"),
    "nat_interface": (str, "auto", "interface guest traffic is NATed out of: auto (default route), none, or a name"),
    "firewall": (bool, True, "install iptables rules (NAT, no guest-to-host traffic)"),
    "dns": (str, "auto", "guest resolvers, comma separated; auto = host's non-loopback resolvers"),
    "chv_bin": (str, "/usr/local/bin/cloud-hypervisor", "cloud-hypervisor binary"),
    "kernel": (str, "out/vmlinuz", "guest kernel (bzImage or PVH vmlinux)"),
    "initramfs": (str, "out/initramfs.cpio.gz", "guest initramfs; empty = none"),
    "rootfs": (str, "out/rootfs.ext4", "read-only root filesystem image (vda)"),
    "images_dir": (str, "out/images", "named guest images, a directory each (rootfs.ext4, image.json: make image); "
                                      "the image \"default\" is kernel, initramfs and rootfs above"),
    "cmdline_extra": (str, "", "extra kernel command line arguments"),
    "stateful_size_in_mb": (int, 2048, "size of each VM's sparse writable disk (vdb)"),
    "max_disk_mb": (int, 0, "largest diskMb (a VM's own stateful disk size) a request may ask for; "
                            "0 = stateful_size_in_mb"),
    "disk_overcommit": (float, 1.0, "a start is refused unless state_dir's free space x this holds what the VMs' "
                                    "sparse disks may still grow to, the new one's included; 0 = not checked"),
    "vm_disk_mb_per_s": (int, 200, "disk bandwidth of one VM, its disks together, in MiB a second (Cloud "
                                   "Hypervisor's rate limiter; bursts of up to a second's worth); 0 = no limit"),
    "vm_disk_ops_per_s": (int, 4000, "disk requests a second of one VM, its disks together; 0 = no limit"),
    "vm_net_mbit_per_s": (int, 1000, "network bandwidth of one VM, each direction, in Mbit a second; 0 = no limit"),
    "guest_mem_percentage": (int, 50, "all guests together may use at most this % of host memory"),
    "vm_cpu_cgroups": (bool, True, "each VM's hypervisor in a cpu cgroup of its own, weighted by its vCPUs, all "
                                   "below one parent that weighs as a thread a host CPU: busy guests cannot starve cbox.py"),
    "busy_vms_yield": (bool, True, "with vm_cpu_cgroups: a VM whose vCPUs were all busy over the last second runs "
                                   "behind the quiet ones (in a cgroup with cpu.idle) until it is quiet again"),
    "vcpu_overcommit": (float, 0.0, "a start is refused unless the VMs' vCPUs, the new one's included, fit in the "
                                    "host CPUs cbox.py may run on x this; 0 = not checked"),
    "default_vcpus": (int, 1, "vcpus of a VM when the request names none"),
    "max_vcpus": (int, 8, "largest vcpus a request may ask for"),
    "default_memory_mb": (int, 512, "memory of a VM when the request names none"),
    "max_memory_mb": (int, 16384, "largest memoryMb a request may ask for"),
    "max_vms": (int, 250, "most VMs at once"),
    "pool_size": (int, 0, "VMs kept booted and idle (default vcpus/memory) for instant starts; they count in "
                          "max_vms and the memory budget; 0 = no warm pool"),
    "pool_images": (str, "", "warm pool VMs of named images, besides pool_size of \"default\": "
                             "\"py=2,min=1\"; empty = none"),
    "boot_timeout_s": (float, 60.0, "time for the guest agent to answer after vm.boot"),
    "shutdown_timeout_s": (float, 5.0, "time for the VMM to exit before it is killed"),
    "exec_timeout_s": (float, 300.0, "default exec timeout"),
    "exec_max_timeout_s": (float, 86400.0, "largest exec timeout a request may ask for"),
    "exec_output_limit_bytes": (int, 4 * 1024 * 1024, "cap on captured stdout, stderr and output, each"),
    "stream_keepalive_s": (float, 15.0, "an exec stream's keepalive event after this much silence"),
    "callback_timeout_s": (float, 30.0, "time the callback URL has to answer"),
    "callback_secret": (str, "", "HMAC-SHA256 key signing every callback POST (X-CBox-Signature); empty = unsigned"),
    "callback_secret_file": (str, "", "file holding callback_secret (its first line), instead of the key itself"),
    "callback_port": (int, 4032, "guest vsock port for callbacks"),
    "agent_port": (int, 4031, "guest agent TCP port"),
    "max_request_bytes": (int, 8 * 1024 * 1024, "largest REST request body"),
    "request_body_buffer_bytes": (int, 64 * 1024 * 1024, "REST request bodies being received, all connections "
                                                         "together, at most (at least max_request_bytes); beyond: 503"),
    "http_head_timeout_s": (float, 30.0, "time a new REST connection has to send its first request head"),
    "http_body_timeout_s": (float, 60.0, "time a REST client has to send a request body (and to read an answer)"),
    "http_idle_timeout_s": (float, 120.0, "keep-alive REST connections idle longer are closed"),
    "console_max_bytes": (int, 1024 * 1024, "serial console output kept per VM (newest), besides its first 64 KiB"),
    "vmm_log_max_bytes": (int, 8 * 1024 * 1024, "disk space one hypervisor's -v log may take (its newest half is kept)"),
    "callback_max_connections": (int, 32, "open callback connections per VM; more are answered with an error and closed"),
    "callback_max_in_flight": (int, 16, "callbacks of one VM waiting on the callback URL; more get an error at once"),
    "callback_rate_per_s": (float, 500.0, "callbacks a second per VM (token bucket, burst of one second); more get an error"),
    "callback_bytes_per_s": (int, 4 * 1024 * 1024, "bytes a second read from one VM's callback connections; more wait"),
    "callback_idle_timeout_s": (float, 60.0, "a callback connection with no request for this long is closed"),
    "callback_read_timeout_s": (float, 10.0, "time a guest has to finish sending a callback line it started"),
    "callback_write_timeout_s": (float, 10.0, "time a guest has to read a callback reply before its connection is closed"),
    "callback_log_lines_per_s": (float, 20.0, "callback log lines a second per VM; the rest are counted and the count logged"),
    "fd_reserve": (int, 256, "file descriptors kept free for the API and other VMs: guest connections beyond are refused"),
    "guest_work_cpu_share": (float, 0.1, "share of one CPU core that the work all guests together make cbox.py's "
                                         "loop do may take, divided fairly among the VMs wanting it (what a unit "
                                         "of that work costs is measured at start); 0 = no host-wide budget"),
    "guest_work_units_per_s": (int, 0, "a fixed host-wide budget of guest work instead of guest_work_cpu_share's "
                                       "(a unit: a byte relayed; an event or read 1024 more, a callback line 6144 "
                                       "more); 0 = from guest_work_cpu_share"),
    "default_egress": (str, "nat", "egress policy of a VM whose request names none: nat (everything) or none"),
    "destroy_on_exit": (bool, False, "destroy all VMs when cbox.py stops (default: leave them for the next start)"),
    "default_ttl_s": (int, 0, "lifetime of a VM whose request has no ttlSeconds; 0 = none (max_ttl_s when that is set)"),
    "max_ttl_s": (int, 0, "largest ttlSeconds a request may ask for; 0 = no maximum (a VM may also live forever)"),
    "default_idle_timeout_s": (int, 0, "idle timeout of a VM whose request has no idleTimeoutSeconds; 0 = none "
                                       "(max_idle_timeout_s when that is set)"),
    "max_idle_timeout_s": (int, 0, "largest idleTimeoutSeconds a request may ask for; 0 = no maximum (and none allowed)"),
    "tombstone_minutes": (int, 10, "how long a VM its TTL or idle timeout destroyed answers 404 saying why; 0 = not at all"),
    "failed_starts_kept": (int, 10, "failed starts whose evidence (VmConfig, hypervisor log, console) is kept in "
                                    "state_dir/failed-starts, the newest; 0 = none"),
    "events_url": (str, "", "http(s) URL that receives a POST per lifecycle event; empty = none"),
    "events_batch": (int, 1, "events in one POST to events_url: 1 = a POST per event (its JSON object); "
                             "more = {\"events\": [...]} bodies of up to this many"),
    "events_ring_size": (int, 1000, "newest events kept for GET /v1/events"),
    "events_retry_s": (float, 300.0, "a failed POST to events_url is retried (with backoff) this long, then dropped"),
}


class Config:
    """Typed settings from hostservices.restserver; attribute per CONFIG_KEYS entry. Read-only
    once made (what is derived from it is kept elsewhere, not on it); replace() gives a copy
    with some values changed."""

    def __init__(self, values, base_dir):
        self.__dict__.update(values, base_dir=base_dir)

    def __setattr__(self, name, value):
        raise AttributeError(f"the config is read-only once loaded (cannot set {name}): use replace()")

    def __delattr__(self, name):
        raise AttributeError(f"the config is read-only once loaded (cannot delete {name})")

    def replace(self, **changes):
        values = dict(vars(self), **changes)
        return Config(values, values.pop("base_dir"))

    def path(self, value):
        """Resolve a path from config relative to the config file's directory."""
        return value if not value or os.path.isabs(value) else str(Path(self.base_dir, value))


def _quoted_number(text, typ):
    """A number key written in quotes, as the original CBox's config does (port: "7000"):
    unsigned ASCII digits, with a decimal fraction for float keys ("2.5"). Anything
    else is returned unchanged, so the type check reports it with its line."""
    whole, dot, fraction = text.partition(".") if typ is float else (text, "", "")
    if is_decimal(whole) and (not dot or is_decimal(fraction)):
        return typ(text)
    return text


def parse_pool_images(text):
    """pool_images ("py=2,min=1") -> {image name: VMs kept}; ValueError naming a bad item."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, count = (part.strip() for part in item.partition("="))
        # the VM-name rule of image names (section 5's VM_NAME_PATTERN, not yet defined here)
        if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name) or not is_decimal(count) \
                or name == "default":
            raise ValueError(f"pool_images: {item!r}: use NAME=COUNT, comma separated (the default image's is "
                             f"pool_size)")
        sizes[name] = int(count)
    return {name: count for name, count in sizes.items() if count}


def pool_sizes(cfg):
    """{image: VMs the warm pool keeps of it}: pool_size of "default", pool_images of the others."""
    return {**({"default": cfg.pool_size} if cfg.pool_size else {}), **parse_pool_images(cfg.pool_images)}


def check_config(cfg, source):
    def bad(msg):
        raise ConfigError(f"{source}: {msg}")
    try:
        subnet = ipaddress.ip_network(cfg.bridge_subnet, strict=True)
        bridge = ipaddress.ip_interface(cfg.bridge_ip)
    except ValueError as e:
        bad(f"bridge_subnet/bridge_ip: {e}")
    if subnet.version != 4 or bridge.ip not in subnet or bridge.network != subnet:
        bad(f"bridge_ip {cfg.bridge_ip} must be an IPv4 address inside bridge_subnet {cfg.bridge_subnet} with its prefix")
    if subnet.num_addresses < 4:
        bad("bridge_subnet is too small")
    if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", cfg.bridge_name):
        bad(f"bridge_name {cfg.bridge_name!r} is not a valid interface name")
    for key in ("port", "agent_port", "callback_port"):
        if not 0 < getattr(cfg, key) < 65536:
            bad(f"{key} must be a port number")
    for key in ("stateful_size_in_mb", "default_vcpus", "max_vcpus", "default_memory_mb",
                "max_memory_mb", "max_vms", "exec_output_limit_bytes", "max_request_bytes",
                "callback_max_connections", "callback_max_in_flight", "callback_bytes_per_s"):
        if getattr(cfg, key) <= 0:
            bad(f"{key} must be positive")
    if cfg.stream_keepalive_s > 3600:
        bad("stream_keepalive_s must be at most 3600")
    if cfg.console_max_bytes < 4096:
        bad("console_max_bytes must be at least 4096")
    if cfg.vmm_log_max_bytes < 2 * VMM_LOG_TAIL:
        bad(f"vmm_log_max_bytes must be at least {2 * VMM_LOG_TAIL}")
    if cfg.fd_reserve < 0:
        bad("fd_reserve must not be negative")
    if cfg.request_body_buffer_bytes < cfg.max_request_bytes:
        bad(f"request_body_buffer_bytes ({cfg.request_body_buffer_bytes}) must be at least max_request_bytes "
            f"({cfg.max_request_bytes}): a body that large could never be received")
    if not 0 <= cfg.disk_overcommit <= 1000:
        bad("disk_overcommit must be 0..1000")
    if not 0 <= cfg.vcpu_overcommit <= 1000:
        bad("vcpu_overcommit must be 0..1000")
    if cfg.guest_work_units_per_s < 0:
        bad("guest_work_units_per_s must not be negative")
    if not 0 <= cfg.guest_work_cpu_share <= 1:
        bad("guest_work_cpu_share must be 0..1 (cbox.py's loop runs on one core)")
    for key, most in (("vm_disk_mb_per_s", 1 << 20), ("vm_disk_ops_per_s", 1 << 30), ("vm_net_mbit_per_s", 1 << 23)):
        if not 0 <= getattr(cfg, key) <= most:
            bad(f"{key} must be 0 (no limit)..{most}")
    if not 0 <= cfg.pool_size <= cfg.max_vms:
        bad("pool_size must be 0..max_vms")
    if cfg.max_disk_mb and not cfg.stateful_size_in_mb <= cfg.max_disk_mb <= 16 * 1024 * 1024:
        bad(f"max_disk_mb must be 0 (stateful_size_in_mb) or {cfg.stateful_size_in_mb}..16777216")
    try:
        pooled = sum(parse_pool_images(cfg.pool_images).values())
    except ValueError as e:
        bad(str(e))
    if cfg.pool_size + pooled > cfg.max_vms:
        bad("pool_size and pool_images together must be at most max_vms")
    for default, maximum in (("default_ttl_s", "max_ttl_s"), ("default_idle_timeout_s", "max_idle_timeout_s")):
        if not 0 <= getattr(cfg, default) <= FOREVER_S or not 0 <= getattr(cfg, maximum) <= FOREVER_S:
            bad(f"{default} and {maximum} must be 0..{FOREVER_S} seconds")
        if getattr(cfg, maximum) and getattr(cfg, default) > getattr(cfg, maximum):
            bad(f"{default} must not be more than {maximum}")
    if cfg.tombstone_minutes < 0:
        bad("tombstone_minutes must not be negative")
    if not 0 <= cfg.failed_starts_kept <= 100:
        bad("failed_starts_kept must be 0..100")
    if not 0 < cfg.events_ring_size <= 100_000:
        bad("events_ring_size must be 1..100000")
    if not 1 <= cfg.events_batch <= EVENTS_BATCH_MAX:
        bad(f"events_batch must be 1..{EVENTS_BATCH_MAX}")
    if cfg.events_url:
        url = urllib.parse.urlsplit(cfg.events_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            bad(f"events_url {cfg.events_url!r} must be an http:// or https:// URL")
    if not 0 < cfg.guest_mem_percentage <= 100:
        bad("guest_mem_percentage must be 1..100")
    for key in ("boot_timeout_s", "shutdown_timeout_s", "exec_timeout_s", "exec_max_timeout_s", "callback_timeout_s",
                "http_head_timeout_s", "http_body_timeout_s", "http_idle_timeout_s", "callback_rate_per_s",
                "callback_idle_timeout_s", "callback_read_timeout_s", "callback_write_timeout_s",
                "callback_log_lines_per_s", "stream_keepalive_s", "events_retry_s"):
        if getattr(cfg, key) <= 0:
            bad(f"{key} must be positive")
    longest = os.path.join(cfg.path(cfg.run_dir), "4294967295", f"vsock.sock_{cfg.callback_port}")
    if len(longest.encode()) > 107:
        bad(f"run_dir {cfg.run_dir!r} is too long: socket paths such as {longest} must fit in 107 bytes")
    if cfg.default_egress not in ("nat", "none"):
        bad(f"default_egress must be nat or none, got {cfg.default_egress!r}")
    if cfg.default_egress != "nat" and not cfg.firewall:
        bad("default_egress: none needs firewall: true (the policy is enforced by iptables)")
    if "," in cfg.path(cfg.run_dir) or "=" in cfg.path(cfg.run_dir):
        bad("run_dir must not contain ',' or '=' (cloud-hypervisor splits its options on them)")


def read_callback_secret(cfg, source):
    """callback_secret_file -> the callback secret (its first line; None without the file), so
    the key need not sit in a config file others may read."""
    if not cfg.callback_secret_file:
        return None
    if cfg.callback_secret:
        raise ConfigError(f"{source}: set callback_secret or callback_secret_file, not both")
    secret_path = cfg.path(cfg.callback_secret_file)
    try:
        lines = Path(secret_path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: callback_secret_file {secret_path}: {e}") from e
    if not lines or not lines[0].strip():
        raise ConfigError(f"{source}: callback_secret_file {secret_path} is empty")
    return lines[0].strip()


def load_config(path, overrides=None):
    text = Path(path).read_text()
    tree, lines = parse_yaml_subset(text, str(path))
    for key in tree:
        if key != "hostservices":
            raise ConfigError(f"{path} line {lines[key]}: unknown top-level key '{key}' (expected hostservices)")
    hs = tree.get("hostservices") or {}
    if not isinstance(hs, dict):
        raise ConfigError(f"{path}: hostservices must be a mapping")
    for key in hs:
        if key != "restserver":
            raise ConfigError(f"{path} line {lines['hostservices.' + key]}: unknown key 'hostservices.{key}'")
    raw = hs.get("restserver") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: hostservices.restserver must be a mapping")
    raw = dict(raw, **(overrides or {}))
    values = {}
    for key, value in raw.items():
        where = f"{path} line {lines.get('hostservices.restserver.' + key, '?')}"
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' in hostservices.restserver")
        typ = CONFIG_KEYS[key][0]
        if typ in (int, float) and isinstance(value, str):
            value = _quoted_number(value, typ)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ is str and value is None:
            value = ""
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: '{key}' must be {typ.__name__}, got {value!r}")
        values[key] = value
    for key, (typ, default, _) in CONFIG_KEYS.items():
        values.setdefault(key, default)
    cfg = Config(values, str(Path(path).resolve().parent))
    check_config(cfg, str(path))
    secret = read_callback_secret(cfg, str(path))
    return cfg.replace(callback_secret=secret) if secret else cfg


# =============================================================================
# 2. HTTP
# =============================================================================

# Twin of guest_agent.py's REASONS (each file stays standalone).
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
           411: "Length Required", 413: "Payload Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}
MAX_HEAD = 64 * 1024            # a message head (start line and headers) in bytes
MAX_HEAD_LINES = 100            # header lines of a request (answers are bounded by MAX_HEAD alone)


class HttpError(Exception):
    """A failure to talk HTTP (connection, protocol, timeout)."""


class HeadTooLarge(HttpError):
    """A message head over MAX_HEAD bytes or over its count of header lines (a server answers 431)."""


async def read_head(reader, max_lines=None):
    """Read a start line and headers; returns (start_line, {lower-name: value}) or None on clean EOF.
    The head is at most the reader's limit (MAX_HEAD for cbox.py's server) and, with
    `max_lines`, that many header lines."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise HttpError("connection closed inside the message head") from e
    except asyncio.LimitOverrunError as e:
        raise HeadTooLarge("message head too large") from e
    lines = data[:-4].decode("latin-1").split("\r\n")      # [:-4]: without the blank line
    if max_lines is not None and len(lines) - 1 > max_lines:
        raise HeadTooLarge(f"more than {max_lines} header lines")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"malformed header line {line[:40]!r}")
        headers[name.lower()] = value.strip()
    return lines[0], headers


MAX_CHUNKS = 65536              # a chunked body in more pieces is refused (1-byte chunks cost CPU per byte)
MAX_TRAILER_LINES = 64
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")


async def read_chunked(reader, limit):
    """A chunked body into one buffer, bounded in bytes, chunks and trailer lines."""
    body = bytearray()
    for count in range(MAX_CHUNKS + 1):
        size_text = (await reader.readline()).split(b";")[0].strip()
        if not _CHUNK_SIZE.match(size_text):
            raise HttpError("bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise HttpError("body too large")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError("bad chunk framing")
        if count % 64 == 63:
            await asyncio.sleep(0)         # tiny chunks already buffered would otherwise hold the loop
    else:
        raise HttpError(f"chunked body in more than {MAX_CHUNKS} chunks")
    for _ in range(MAX_TRAILER_LINES):
        if (await reader.readline()) in (b"\r\n", b"\n", b""):
            return bytes(body)
    raise HttpError(f"more than {MAX_TRAILER_LINES} trailer lines")


async def read_body(reader, headers, limit):
    """Read a Content-Length or chunked body of at most `limit` bytes."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return await read_chunked(reader, limit)
    length = headers.get("content-length")
    if length is None:
        return b""
    if not is_decimal(length):
        raise HttpError("bad Content-Length")
    length = int(length)
    if length > limit:
        raise HttpError("body too large")
    return await reader.readexactly(length)


async def read_to_eof(reader, limit):
    """A body that ends when the connection does, into one buffer."""
    body = bytearray()
    while True:
        more = await reader.read(min(limit + 1 - len(body), 1 << 20))
        if not more:
            return bytes(body)
        body += more
        if len(body) > limit:
            raise HttpError("body too large")


def build_head(status, length, content_type="application/json", keep_alive=True, extra=None):
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Length: {length}\r\n"
    if length or content_type != "application/json":
        head += f"Content-Type: {content_type}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    if extra:
        head += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    return (head + "\r\n").encode("latin-1")


def build_response(status, body=b"", content_type="application/json", keep_alive=True, extra=None):
    """A whole response in one buffer: one send, so Nagle never delays a body behind its head."""
    return build_head(status, len(body), content_type, keep_alive, extra) + body


JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))   # json.dumps(obj, separators=...) builds one per call
try:    # the C encoder made once (JSONEncoder.encode makes one per call): a third cheaper
    _JSON_CHUNKS = json.encoder.c_make_encoder(None, JSON_ENCODER.default, json.encoder.encode_basestring_ascii,
                                               None, ":", ",", False, False, True)
except (AttributeError, TypeError):    # no C accelerator
    _JSON_CHUNKS = None


def json_bytes(obj):
    """Compact JSON, ASCII, as json.dumps(obj, separators=(",", ":")) (no check for cycles)."""
    if _JSON_CHUNKS is None:
        return JSON_ENCODER.encode(obj).encode()
    return "".join(_JSON_CHUNKS(obj, 0)).encode()


def set_nodelay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quick_ack(writer):
    """ACK the answer at once: a server that sends its head and body in separate writes
    (Python's http.server does) otherwise waits for our delayed ACK, 40 ms a request."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_QUICKACK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass


HTTP_FAILURES = {"body too large": "too_large", "answer without Content-Length": "no_length",
                 "timed out inside the body": "timeouts"}     # HttpClient.failures keys by error text


class BodyStream:
    """A large response body still on its connection, copied onward in chunks.

    `deadline` (loop time) is the request's: a peer dripping its body cannot stretch it.
    `then`, when given, is called with the body's first HEAD and last TAIL bytes once it was
    copied whole."""

    HEAD, TAIL = 512, 4096

    def __init__(self, client, reader, writer, length, reusable, deadline, then=None):
        self.client, self.reader, self.writer = client, reader, writer
        self.length, self.reusable, self.deadline = length, reusable, deadline
        self.then, self.head, self.tail = then, b"", b""

    async def pieces(self, timeout):
        """The body, piece by piece as it arrives (at most 1 MiB each); close it (aclosing)."""
        loop = asyncio.get_running_loop()
        remaining = self.length
        try:
            while remaining:
                left = self.deadline - loop.time()
                if left <= 0:
                    self.client.failures["timeouts"] += 1
                    raise HttpError("timed out inside the body")
                try:
                    chunk = await within(min(timeout, left), self.reader.read(min(remaining, 1 << 20)))
                except asyncio.TimeoutError as e:
                    self.client.failures["timeouts"] += 1
                    raise HttpError("timed out inside the body") from e
                if not chunk:
                    raise HttpError("connection closed inside the body")
                remaining -= len(chunk)
                if self.then and not self.head:
                    self.head = chunk[:self.HEAD]
                if self.then and remaining < self.TAIL:          # the chunk reaches into the last TAIL bytes
                    self.tail = (self.tail + chunk)[-self.TAIL:]
                yield chunk
        except BaseException:             # also GeneratorExit: a reader that stopped early
            self.client.drop(self.writer)
            raise
        self.client.release(self.reader, self.writer, self.reusable)
        if self.then:
            self.then(self.head, self.tail)

    async def copy_to(self, dest, timeout):
        async with contextlib.aclosing(self.pieces(timeout)) as pieces:
            async for chunk in pieces:
                dest.write(chunk)
                await within(timeout, dest.drain())

    async def read(self, limit):
        """The whole body as bytes (for error answers), at most `limit` bytes."""
        if self.length > limit:
            self.client.drop(self.writer)
            raise HttpError("body too large")
        try:
            data = await within(max(self.deadline - asyncio.get_running_loop().time(), 0.0),
                                self.reader.readexactly(self.length))
        except asyncio.TimeoutError as e:
            self.client.drop(self.writer)
            self.client.failures["timeouts"] += 1
            raise HttpError("timed out inside the body") from e
        except BaseException:
            self.client.drop(self.writer)
            raise
        self.client.release(self.reader, self.writer, self.reusable)
        return data


class HttpClient:
    """A keep-alive HTTP/1.1 client for one endpoint (a Unix socket or host:port).

    Bodies larger than `stream_over` bytes are not read: the response carries a
    BodyStream instead, to be copied onward without holding it in memory."""

    def __init__(self, *, unix_path=None, host=None, port=None, tls=False, pool_size=16,
                 max_body=256 * 1024 * 1024, stream_over=None, quick_ack=False, length_only=False):
        self.unix_path, self.host, self.port, self.tls = unix_path, host, port, tls
        self.length_only = length_only  # answers must carry Content-Length (chunked or to-EOF: refused)
        self.quick_ack = quick_ack      # for servers we do not control (see quick_ack())
        self.pool_size, self.max_body, self.stream_over = pool_size, max_body, stream_over
        self.idle = []
        self.busy = set()
        self.closed = False
        self.failures = dict.fromkeys(set(HTTP_FAILURES.values()) | {"timeouts", "other"}, 0)  # for metrics
        self.host_header = "localhost" if unix_path else (host if port in (80, 443) else f"{host}:{port}")

    async def _connect(self):
        if self.unix_path:
            return await asyncio.open_unix_connection(self.unix_path)
        ctx = ssl.create_default_context() if self.tls else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ctx,
                                                       server_hostname=self.host if ctx else None)
        set_nodelay(writer)
        return reader, writer

    async def request(self, method, target, body=None, timeout=30.0, headers=None, then=None):
        """Returns (status, headers, body bytes or BodyStream). Raises HttpError on any failure."""
        deadline = asyncio.get_running_loop().time() + timeout      # a streamed body must end by then too
        try:
            return await within(timeout, self._request(method, target, body, headers, deadline, then))
        except asyncio.TimeoutError as e:
            self.failures["timeouts"] += 1
            raise HttpError(f"timed out after {fmt_seconds(timeout)}") from e
        except HttpError as e:
            self.failures[HTTP_FAILURES.get(str(e), "other")] += 1
            raise

    async def _request(self, method, target, body, headers, deadline, then=None):
        payload = body if body is None or isinstance(body, bytes) else json_bytes(body)
        head = (f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n" if payload is None else
                f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n")
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        message = (head + "\r\n").encode("latin-1") + (payload or b"")
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await self._open()
            self.busy.add(writer)
            try:
                writer.write(message)
                if self.quick_ack:
                    quick_ack(writer)
                result = await self._read_response(reader, writer, method, deadline, then)
            except (HttpError, OSError, asyncio.IncompleteReadError, EOFError,
                    ValueError, asyncio.LimitOverrunError) as e:     # ValueError: StreamReader line limit
                self.drop(writer)
                # A reused connection the server already closed fails before any
                # answer; the request never ran, so try once more on a new one.
                if reused and not self.closed and isinstance(e, (ConnectionError, asyncio.IncompleteReadError, EOFError)):
                    continue
                raise HttpError(str(e) or type(e).__name__) from e
            except BaseException:
                self.drop(writer)
                raise
            status, rheaders, rbody = result
            if not isinstance(rbody, BodyStream):
                self.release(reader, writer, rheaders.get("connection", "").lower() != "close")
            return result

    async def post_pipelined(self, target, bodies, timeout, headers, settle_s=0.0):
        """POST each of `bodies` (with headers[i]) on one connection, all written at once,
        answers read in order (HTTP/1.1 pipelining, RFC 9112 section 9.3.2): one wake-up of
        the loop for many small POSTs. With `settle_s`, the answers are read only after that
        pause, so those of a nearby server arrive together and are read in one wake-up, not
        one each (a server writes each answer on its own). Returns the statuses of the answers read, in order,
        fewer than the bodies when the connection failed or closed midway; HttpError when
        none was read. Bodies without an answer may have been received (resend them)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        start = (f"POST {target} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-Type: application/json\r\n"
                 "Content-Length: ").encode("latin-1")
        message = b"".join(
            start + b"%d\r\n" % len(body) + "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items()).encode("latin-1")
            + b"\r\n" + body for body, extra in zip(bodies, headers))
        while True:
            reused, statuses, reusable = bool(self.idle), [], True
            try:
                reader, writer = self.idle.pop() if reused else await within(timeout, self._open())
            except asyncio.TimeoutError as e:
                raise HttpError(f"timed out after {fmt_seconds(timeout)}") from e
            self.busy.add(writer)
            async def read_answers():
                nonlocal reusable
                while len(statuses) < len(bodies) and reusable:
                    status, rheaders, _ = await self._read_response(reader, writer, "POST", deadline)
                    statuses.append(status)
                    reusable = rheaders.get("connection", "").lower() != "close"
            try:
                writer.write(message)
                if self.quick_ack:
                    quick_ack(writer)
                if settle_s and len(bodies) > 1:
                    await asyncio.sleep(settle_s)
                await within(max(deadline - loop.time(), 0.0), read_answers())
            except (HttpError, OSError, asyncio.IncompleteReadError, EOFError, ValueError,
                    asyncio.LimitOverrunError, asyncio.TimeoutError) as e:
                self.drop(writer)
                if statuses:
                    return statuses
                # a reused connection the server closed meanwhile: once more on a new one
                if reused and not self.closed and isinstance(e, (ConnectionError, asyncio.IncompleteReadError, EOFError)):
                    continue
                raise HttpError(f"timed out after {fmt_seconds(timeout)}" if isinstance(e, asyncio.TimeoutError)
                                else (str(e) or type(e).__name__)) from e
            except BaseException:
                self.drop(writer)
                raise
            self.release(reader, writer, reusable)
            return statuses

    def release(self, reader, writer, reusable):
        """A connection whose answer was read whole: back to the pool, or closed."""
        self.busy.discard(writer)
        if reusable and not self.closed and len(self.idle) < self.pool_size:
            self.idle.append((reader, writer))
        else:
            writer.close()

    def drop(self, writer):
        """Close a connection whose stream is out of step (a failed or abandoned answer)."""
        self.busy.discard(writer)
        writer.close()

    async def _open(self):
        if self.closed:
            raise HttpError("connection closed: the endpoint went away")
        try:
            return await self._connect()
        except OSError as e:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise HttpError(f"cannot connect to {where}: {os.strerror(e.errno) if e.errno else e}") from e

    async def _read_response(self, reader, writer, method, deadline, then=None):
        head = await read_head(reader)
        if head is None:
            raise EOFError("connection closed before a response")
        start, headers = head
        parts = start.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not is_decimal(parts[1]):
            raise HttpError(f"malformed status line {start[:40]!r}")
        status = int(parts[1])
        if status == 100:
            return await self._read_response(reader, writer, method, deadline, then)
        if method == "HEAD" or status in (204, 304):
            return status, headers, b""
        length = headers.get("content-length", "")
        size = int(length) if is_decimal(length) else None
        if self.length_only and size is None:
            raise HttpError("answer without Content-Length")
        if self.stream_over is not None and size is not None and size > self.stream_over and 200 <= status < 300:
            if size > self.max_body:
                raise HttpError("body too large")
            return status, headers, BodyStream(self, reader, writer, size,
                                               headers.get("connection", "").lower() != "close", deadline, then)
        if not length and headers.get("transfer-encoding", "").lower() != "chunked":
            headers["connection"] = "close"            # the body ends when the connection does
            return status, headers, await read_to_eof(reader, self.max_body)
        if size is not None and size <= self.max_body and "transfer-encoding" not in headers:
            return status, headers, await reader.readexactly(size)     # read_body's usual case, at once
        return status, headers, await read_body(reader, headers, self.max_body)

    def close(self):
        """Close idle connections; new requests may still open fresh ones."""
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    def abort(self):
        """The endpoint is gone: fail requests in flight now and refuse new ones."""
        self.closed = True
        self.close()
        for writer in list(self.busy):
            writer.transport.abort()
        self.busy.clear()


class ClientWatch:
    """Cancels a request's task when its client hangs up while the answer is being made.

    One loop timer polls the readers of the requests waiting (a task per request
    would cost more than the rare hang-up): a reader at EOF or with an error means
    the client is gone, and the work for it (an agent call) is abandoned."""
    INTERVAL = 0.5

    def __init__(self):
        self.waiting = {}              # task -> reader
        self.cancelled = weakref.WeakSet()
        self.timer = None
        self.abandoned = 0             # requests cancelled so far (for metrics)

    def add(self, reader):
        task = asyncio.current_task()
        self.waiting[task] = reader
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.INTERVAL, self._check)
        return task

    def remove(self, task):
        self.waiting.pop(task, None)

    def client_gone(self):
        """Whether the current task was cancelled by this watch (its client went away); if so
        the cancellation is taken back, so that the task can log the request and end."""
        task = asyncio.current_task()
        if task not in self.cancelled:
            return False
        self.cancelled.discard(task)
        if hasattr(task, "uncancel"):
            task.uncancel()
        return True

    def _check(self):
        self.timer = None
        for task, reader in list(self.waiting.items()):
            if reader.at_eof() or reader.exception() is not None:
                del self.waiting[task]
                self.cancelled.add(task)
                self.abandoned += 1
                task.cancel()
        if self.waiting:
            self.timer = asyncio.get_running_loop().call_later(self.INTERVAL, self._check)


# ---- cbox.py's own POSTs: to callback URLs and to events_url -----------------------

def callback_headers(secret, vm_name, body, callback_id=None, now=None):
    """Headers of one POST to a callback URL: X-CBox-VM and a unique X-CBox-Callback-Id
    always; with a secret, X-CBox-Timestamp (unix seconds) and X-CBox-Signature =
    "sha256=" + hex HMAC-SHA256(secret, timestamp + "." + body), so the receiver can
    check who sent it and when (README, "Callbacks": a verifier in a few lines)."""
    headers = {} if vm_name is None else {"X-CBox-VM": vm_name}     # None: events of several VMs
    headers["X-CBox-Callback-Id"] = callback_id or uuid.uuid4().hex
    if secret:
        timestamp = str(int(time.time() if now is None else now))
        digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, "sha256").hexdigest()
        headers["X-CBox-Timestamp"] = timestamp
        headers["X-CBox-Signature"] = f"sha256={digest}"
    return headers



EVENTS_QUEUE_MAX = 10000            # events waiting for events_url; more are dropped (counted)
EVENTS_PIPELINE = 64                # POSTs sent back to back before their answers are read
EVENTS_GATHER_S = 0.02              # a batch smaller than that waits this long for more events
EVENTS_SETTLE_S = 0.005             # pipelined POSTs' answers are read after this pause, together
EVENTS_BACKOFF_S = (0.5, 30.0)      # first and largest pause between attempts


class EventSender:
    """Delivers each event to events_url: one POST per event, body the event's JSON, headers
    as a callback's (callback_headers: signed with callback_secret), in order, by one task
    on a keep-alive connection; with events_batch > 1, a POST per up to that many events,
    body {"events": [...]}. The POSTs waiting (at most EVENTS_PIPELINE, gathered for
    EVENTS_GATHER_S) go out back to back, pipelined, so a busy host pays one wake-up of the
    loop for many. A failed POST (no 2xx answer) is retried, with the ones after it, with a
    doubling pause for events_retry_s; then its events and every other one waiting longer
    are dropped, as are events arriving while EVENTS_QUEUE_MAX wait. put() only appends:
    the API and the VMs never wait for the receiver. Delivery is at least once (a lost
    answer means a resend)."""

    def __init__(self, cfg):
        self.url, self.retry_s, self.timeout = cfg.events_url, cfg.events_retry_s, cfg.callback_timeout_s
        self.batch = cfg.events_batch
        self.secret, self.run_id = cfg.callback_secret, uuid.uuid4().hex[:12]     # run_id: X-CBox-Callback-Id
        parts = urllib.parse.urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.client = HttpClient(host=parts.hostname, port=port, tls=parts.scheme == "https", pool_size=1,
                                 max_body=64 * 1024, quick_ack=True)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.queue = collections.deque()        # (monotonic time queued, event)
        self.wake = asyncio.Event()
        self.failing = None                     # the error of the current run of failures
        self.task = asyncio.get_running_loop().create_task(self.run())

    def put(self, event):
        if len(self.queue) >= EVENTS_QUEUE_MAX:
            M_EVENTS_DROPPED.inc()
            return
        self.queue.append((time.monotonic(), event))
        M_EVENTS_QUEUED.value = len(self.queue)
        self.wake.set()

    async def run(self):
        pause = EVENTS_BACKOFF_S[0]
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
            if len(self.queue) < EVENTS_PIPELINE * self.batch:
                await asyncio.sleep(EVENTS_GATHER_S)    # a busy host's next events join this batch
            batch = [event for _, event in itertools.islice(self.queue, EVENTS_PIPELINE * self.batch)]
            delivered, error = await self.deliver(batch)
            for _ in range(delivered):
                self.queue.popleft()
            M_EVENTS_QUEUED.value = len(self.queue)
            if delivered:               # progress: whatever failed after it goes again at once
                pause = EVENTS_BACKOFF_S[0]
                if self.failing and not error:
                    log("events_url answers again", url=self.url)
                    self.failing = None
                continue
            M_EVENTS_FAILED.inc()
            if self.failing is None:    # one line per outage, not one per attempt
                log("events_url failed; retrying", url=self.url, error=repr(error), retry_s=f"{self.retry_s:g}")
            self.failing = error
            self.drop_expired()
            await asyncio.sleep(pause)
            pause = min(pause * 2, EVENTS_BACKOFF_S[1])

    def posts(self, events):
        """(bodies, headers, events in each body) of the POSTs that carry `events`."""
        if self.batch == 1:
            bodies = [json_bytes(complete_event(event)) for event in events]
            headers = [callback_headers(self.secret, event["vmName"], body, f"{self.run_id}-{event['id']}")
                       for body, event in zip(bodies, events)]
            return bodies, headers, [1] * len(events)
        groups = [events[i:i + self.batch] for i in range(0, len(events), self.batch)]
        bodies = [json_bytes({"events": [complete_event(event) for event in group]}) for group in groups]
        # a batch has no single VM; its id names its first and last event (the same on a resend)
        headers = [callback_headers(self.secret, None, body, f"{self.run_id}-{group[0]['id']}-{group[-1]['id']}")
                   for body, group in zip(bodies, groups)]
        return bodies, headers, [len(group) for group in groups]

    async def deliver(self, events):
        """(how many of `events`, from the first, were answered 2xx; the error after them or None)."""
        bodies, headers, sizes = self.posts(events)
        try:
            statuses = await self.client.post_pipelined(self.target, bodies, self.timeout, headers,
                                                        settle_s=EVENTS_SETTLE_S)
        except HttpError as e:
            return 0, str(e)
        posted = next((i for i, status in enumerate(statuses) if not 200 <= status < 300), len(statuses))
        delivered = sum(sizes[:posted])
        M_EVENTS_DELIVERED.inc(delivered)
        if posted < len(statuses):
            return delivered, f"HTTP {statuses[posted]}"
        return delivered, None if posted == len(bodies) else "connection closed before every answer"

    def drop_expired(self):
        horizon = time.monotonic() - self.retry_s
        dropped = 0
        while self.queue and self.queue[0][0] < horizon:
            self.queue.popleft()
            dropped += 1
        if dropped:
            M_EVENTS_DROPPED.inc(dropped)
            log("events dropped: events_url failed for longer than events_retry_s", url=self.url, dropped=dropped)

    async def finish(self, timeout):
        """cbox.py stops: the events still waiting get `timeout` seconds to go out (unless the
        receiver is failing), then the sender stops."""
        deadline = time.monotonic() + timeout
        while self.queue and not self.failing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.task.cancel()
        self.client.close()


# ---- WebSocket (RFC 6455): the framing both sides use (attach, `cbox.py shell`) --------------

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"      # RFC 6455 section 1.3


def websocket_accept(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode("ascii")


def websocket_request_problem(method, headers):
    """Why a request is no WebSocket opening handshake (RFC 6455 section 4.2.1), or None."""
    try:
        key_ok = len(base64.b64decode(headers.get("sec-websocket-key", "").encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        key_ok = False
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    if method != "GET" or headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in connection:
        return "this is a WebSocket: send GET with Upgrade: websocket and Connection: Upgrade"
    if headers.get("sec-websocket-version") != "13":
        return "Sec-WebSocket-Version must be 13"
    if not key_ok:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


WEBSOCKET_HEADERS = [          # the opening handshake's headers, as the API document states them
    {"name": name, "in": "header", "required": True, "schema": {"type": "string", **schema}}
    for name, schema in (("Upgrade", {"pattern": "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$"}),
                         ("Connection", {"pattern": "(^|,) *[Uu][Pp][Gg][Rr][Aa][Dd][Ee] *(,|$)"}),
                         ("Sec-WebSocket-Version", {"enum": ["13"]}),
                         ("Sec-WebSocket-Key", {"pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$",
                                                "description": "16 random bytes in base64"}))]


def websocket_mask(data, key):
    """The payload XORed with the 4-byte masking key (section 5.3), as one big-integer XOR."""
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


class WebSocketError(Exception):
    """The peer broke RFC 6455 or a bound: `code` is the close code to answer with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class WebSocketFrames:
    """RFC 6455 framing of one side of one connection, without I/O. frame() makes a frame
    (masked when this side is the client, section 5.3); feed() takes bytes as they arrive
    and returns the complete messages as [(opcode, payload)]: fragments of a text or
    binary message joined (5.4), control frames (close, ping, pong) as they come.

    Bounds, checked at a frame's head, before its payload is buffered: a data frame at most
    `max_frame` bytes, a message at most `max_message`, a control frame 125 (5.5).
    WebSocketError carries the close code: 1002 a frame masked the wrong way for its
    direction, reserved bits set, an unknown opcode, a fragmented or long control frame, a
    continuation out of place; 1009 too big; 1007 a text message that is not UTF-8."""

    CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
    OPCODES = (0, 1, 2, 8, 9, 10)

    def __init__(self, client, max_frame=64 * 1024, max_message=1024 * 1024):
        self.client = client             # True: what this side sends is masked, what it reads is not
        self.max_frame, self.max_message = max_frame, max_message
        self.buffer = bytearray()
        self.message = None              # (opcode, bytearray) of a fragmented message being read

    def frame(self, opcode, payload=b""):
        n = len(payload)
        mask_bit = 0x80 if self.client else 0
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([mask_bit | n])
        elif n < 1 << 16:
            head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
        if not self.client:
            return head + payload
        key = os.urandom(4)
        return head + key + websocket_mask(payload, key)

    def close_frame(self, code, reason=""):
        return self.frame(self.CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])

    def feed(self, data):
        self.buffer += data
        messages = []
        while (frame := self._next_frame()) is not None:
            fin, opcode, payload = frame
            if opcode >= self.CLOSE:
                messages.append((opcode, payload))
            else:
                message = self._join(fin, opcode, payload)
                if message:
                    messages.append(message)
        return messages

    def _next_frame(self):
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode, masked, n = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x80, buf[1] & 0x7F
        if buf[0] & 0x70:
            raise WebSocketError(1002, "reserved bits set (no extension was agreed)")
        if opcode not in self.OPCODES:
            raise WebSocketError(1002, f"unknown opcode {opcode}")
        if bool(masked) == self.client:
            raise WebSocketError(1002, "a masked frame from the server" if self.client else
                                 "an unmasked frame from the client")
        at = 2 + {126: 2, 127: 8}.get(n, 0)
        if len(buf) < at:
            return None
        if n >= 126:
            n = int.from_bytes(buf[2:at], "big")
        if opcode >= self.CLOSE and (n > 125 or not fin):
            raise WebSocketError(1002, "a control frame longer than 125 bytes or fragmented")
        if n > self.max_frame:
            raise WebSocketError(1009, f"a frame larger than {self.max_frame} bytes")
        end = at + (4 if masked else 0) + n
        if len(buf) < end:
            return None
        payload = bytes(buf[end - n:end])
        if masked:
            payload = websocket_mask(payload, bytes(buf[at:at + 4]))
        del buf[:end]
        return fin, opcode, payload

    def _join(self, fin, opcode, payload):
        """The message a data frame completes, or None."""
        if opcode == self.CONTINUATION:
            if self.message is None:
                raise WebSocketError(1002, "a continuation frame without a message to continue")
            opcode, parts = self.message
            parts += payload
        elif self.message is not None:
            raise WebSocketError(1002, "a new message inside a fragmented one")
        else:
            parts = bytearray(payload)
        if len(parts) > self.max_message:
            raise WebSocketError(1009, f"a message larger than {self.max_message} bytes")
        if not fin:
            self.message = (opcode, parts)
            return None
        self.message = None
        if opcode == self.TEXT:
            try:
                bytes(parts).decode("utf-8")
            except UnicodeDecodeError as e:
                raise WebSocketError(1007, "a text message that is not UTF-8") from e
        return opcode, bytes(parts)


# =============================================================================
# 3. Guest agent (its API, exec event streams, the budgets of guest work)
# =============================================================================

class AgentError(Exception):
    """A guest agent's refusal or no answer: `status` is the one to pass on to the API client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def guest_stats(data):
    """A guest agent's /stats answer as the API shows it: each field a number in range (else
    null), the disks {"totalBytes", "usedBytes"} (else null); nothing else is passed on."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        raise AgentError(502, "guest agent: stats answer is not JSON") from None
    if not isinstance(raw, dict):
        raise AgentError(502, "guest agent: stats answer is not an object")

    def number(obj, key, integer=True):
        value = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return None
        return value if 0 <= value < 2 ** 63 else None      # also refuses NaN and Infinity

    def disk(key):
        value = raw.get(key)
        return {k: number(value, k) for k in ("totalBytes", "usedBytes")} if isinstance(value, dict) else None

    return {"memTotalBytes": number(raw, "memTotalBytes"), "memAvailableBytes": number(raw, "memAvailableBytes"),
            "load1": number(raw, "load1", False), "load5": number(raw, "load5", False),
            "load15": number(raw, "load15", False), "rootDisk": disk("rootDisk"), "stateDisk": disk("stateDisk"),
            "uptimeS": number(raw, "uptimeS", False)}


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; charge() may overdraw (then wait())."""
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, time.monotonic()

    def _refill(self):
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n=1):
        self._refill()
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def charge(self, n):
        self._refill()
        self.tokens -= n

    def wait(self):
        """Seconds until the bucket is out of debt (0 when it is not)."""
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def spend(self, n):
        """charge(n), then the seconds until the bucket is out of debt (0: go on)."""
        self.charge(n)
        return self.wait()


class FairShare:
    """One host-wide budget for the work guests make cbox.py's event loop do (config keys
    guest_work_cpu_share, guest_work_units_per_s), divided max-min fairly among the VMs that
    want it, on top of each VM's own budgets (the per-VM caps).

    Work is counted in units (weights from bench/loop_capacity.py): a byte read, parsed or
    relayed is one, an item (a stream event, a console or event-FIFO read, a log line, an
    agent answer, a callback connection) ITEM more, a callback line (with its reply)
    CALLBACK more, work measured in CPU time a unit per `unit_s`: what a unit costs the
    loop on this host, measured at start (measure_unit_seconds; about 4 ns on the first
    development machine, 12-20 ns on a later one). The budget in units a second is
    guest_work_cpu_share / unit_s.

    spend(key, cost, wake) is the fast path: with nobody waiting and the budget not in
    debt the cost is charged at once (it may overdraw) and True comes back, without a task
    switch. Otherwise the request waits, and wake() is called once the budget can pay it;
    wake() returns False when its waiter is gone (nothing is charged then). Waiting requests
    are served by virtual finish tag (fair queueing): a VM's tags grow by what it spends,
    counted from the virtual time of the work served last, so an idle VM banks nothing. A
    lone VM may use the whole budget, greedy VMs get equal shares, and a VM wanting less
    than its share gets all it asks (its tags stay behind the greedy ones'); the rest goes
    to the others. `clock` and `call_later` can be replaced (tests run it on a fake clock)."""

    ITEM = 1024                    # units an item costs besides its bytes (README, "Fair share")
    CALLBACK = 6 * 1024            # units a callback line costs besides its bytes (and its parse: unit_s)
    UNIT_S = 1e-8                  # unit_s until configure() is given the measured one

    def __init__(self, rate, clock=time.monotonic, call_later=None):
        self.clock, self.call_later = clock, call_later
        self.virtual = 0.0             # the start tag of the work served last
        self.finish = {}               # key -> the finish tag of its last request (keys: VMs)
        self.waiting = []              # heap: (finish tag, seq, start tag, cost, wake)
        self.order = itertools.count()
        self.timer = None              # the loop's handle that calls serve()
        self.configure(rate)

    def configure(self, rate, unit_s=UNIT_S):
        """`rate` units a second (0: no host-wide budget), at most 50 ms of it saved up, a unit
        `unit_s` seconds of CPU; a fresh start (serve() calls it before any VM exists)."""
        self.rate, self.burst, self.unit_s = float(rate), rate / 20.0, unit_s
        self.tokens, self.stamp = self.burst, self.clock()
        self.waiting, self.timer, self.virtual, self.finish, self.tags = [], None, 0.0, {}, 0

    def _refill(self):
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def _tag(self, key, cost):
        start = max(self.virtual, self.finish.get(key, 0.0))
        self.finish[key] = start + cost
        self.tags += 1
        if self.tags % 1024 == 0 and len(self.finish) > 64:
            self._forget_idle()
        return start

    def _forget_idle(self):
        """Drop the keys (VMs, maybe gone) whose tag is behind the virtual time: they carry
        nothing (max(virtual, tag) is the virtual time). Once every 1024 tags: O(1) a tag."""
        self.finish = {k: v for k, v in self.finish.items() if v > self.virtual}

    def spend(self, key, cost, wake):
        """True: charged, go on. False: wake() comes when it is `key`'s turn."""
        if not self.rate:
            return True
        self._refill()
        if not self.waiting and self.tokens > 0:
            self.virtual = self._tag(key, cost)
            self.tokens -= cost
            return True
        start = self._tag(key, cost)
        heapq.heappush(self.waiting, (start + cost, next(self.order), start, cost, wake))
        M_GUEST_WORK_WAITS.inc()
        self._arm()
        return False

    def units(self, seconds):
        """Work measured in CPU time (a parse), in units."""
        return int(seconds / self.unit_s)

    def charge(self, key, cost):
        """Work done that must not wait (an agent's answer to a client): counted all the same."""
        if self.rate:
            self._refill()
            self.tokens -= cost
            self._tag(key, cost)

    def refund(self, key, cost):
        """Give back what a paid request did not use (paid for at most, used less)."""
        if self.rate:
            self.tokens = min(self.burst, self.tokens + cost)
            self.finish[key] = max(self.virtual, self.finish.get(key, 0.0) - cost)

    async def take(self, key, cost):
        """spend(), waiting for `key`'s turn when the budget is contended."""
        if not self.rate:
            return
        waiter = asyncio.get_running_loop().create_future()
        if not self.spend(key, cost, lambda: not waiter.done() and (waiter.set_result(None) or True)):
            await waiter

    def serve(self):
        """Wake the waiting requests the budget can pay now (smallest finish tag first)."""
        self.timer = None
        self._refill()
        while self.waiting and self.tokens > 0:
            _, _, start, cost, wake = heapq.heappop(self.waiting)
            if wake() is not False:
                self.virtual = max(self.virtual, start)
                self.tokens -= cost
        self._arm()

    def _arm(self):
        if self.timer is None and self.waiting:
            delay = (max(0.0, -self.tokens) + 1.0) / self.rate
            call_later = self.call_later or asyncio.get_running_loop().call_later
            self.timer = call_later(delay, self.serve)


GUEST_WORK = FairShare(0)          # configured by serve() (configure_guest_work)


def export_guest_work():
    """GUEST_WORK's budget, unit and waiting requests into their gauges (on scrape)."""
    M_GUEST_WORK_WAITING.value = len(GUEST_WORK.waiting)
    M_GUEST_WORK_RATE.value, M_GUEST_WORK_UNIT.value = GUEST_WORK.rate, GUEST_WORK.unit_s


METRICS.on_scrape("guest_work", export_guest_work)


AGENT_ERROR_MAX = 64 * 1024      # a guest agent's error answer is read whole, at most this much


class StreamBudget:
    """What one VM's exec streams (AgentEvents) may cost together: `event_rate` events and
    `byte_rate` bytes a second (the per-VM caps), and the VM's fair share of GUEST_WORK
    (`share_key`, its VM). Its GuestAgent makes one; each of its streams is given it."""

    def __init__(self, share_key, event_rate, byte_rate):
        self.share_key = share_key
        self.events = TokenBucket(event_rate, event_rate)
        self.bytes = TokenBucket(byte_rate, byte_rate)

    async def pay(self, events, size):
        """Charge a batch of `events` events of `size` bytes; waits while the budgets are in debt
        (at least a yield, so one stream never holds the loop)."""
        await asyncio.sleep(max(self.events.spend(events), self.bytes.spend(size)))
        await GUEST_WORK.take(self.share_key, FairShare.ITEM * events + size)

    async def pay_read(self, most):
        """Before a read of at most `most` bytes: its fair share, the most it may cost (an
        item and its bytes); read_done() gives back what the read did not use. Paying the
        most first means streams that all become readable at once wait their turns instead
        of all reading in one turn of the loop."""
        await GUEST_WORK.take(self.share_key, FairShare.ITEM + most)

    def read_done(self, most, size):
        GUEST_WORK.refund(self.share_key, most - size)


FLAT_SCALAR = re.compile(r'[ \t\r\n]*(?:(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?|(true|false|null))[ \t\r\n]*')
FLAT_PUNCT = re.compile(r'[ \t\r\n]*([{}\[\],:"])[ \t\r\n]*')
FLAT_CONSTANTS = {"true": True, "false": False, "null": None}
FLAT_PIECE = 16 * 1024             # characters of a string flat_json_steps scans between two yields


def add_string_part(parts, part):
    """Append `part` to `parts` (the pieces of one string so far): a high surrogate ending
    the last piece and a low one starting `part` become the one character they encode."""
    if parts and part and "\ud800" <= parts[-1][-1:] <= "\udbff" and "\udc00" <= part[0] <= "\udfff":
        pair = chr(0x10000 + ((ord(parts[-1][-1]) - 0xD800) << 10) + (ord(part[0]) - 0xDC00))
        parts[-1], part = parts[-1][:-1] + pair, part[1:]
    parts.append(part)


def scan_string_steps(text, pos, piece):
    """json.decoder.scanstring(text, pos) (`pos` just after the opening quote) as a
    generator that yields after each piece of at most `piece` characters: (the string,
    the index after its closing quote); ValueError when it is not a JSON string.

    A piece ends where no escape is cut in two: before the last backslash in its final 6
    characters when that backslash starts an escape (an odd run of backslashes ends
    there), else at its full length. A surrogate pair written as two escapes and cut
    between them is joined again, as scanstring joins it."""
    scan, parts = json.decoder.scanstring, []
    piece = max(piece, 8)              # a cut moved back before an escape still leaves a character
    while True:
        cut = pos + piece
        if cut >= len(text):
            tail, end = scan(text, pos)
            add_string_part(parts, tail)
            return "".join(parts), end
        last = text.rfind("\\", cut - 6, cut)
        if last >= 0:
            run = last + 1 - pos - len(text[pos:last + 1].rstrip("\\"))
            if run % 2:
                cut = last
        part, end = scan(text[pos:cut] + '"', 0)
        add_string_part(parts, part)
        if end < cut - pos + 1:            # its closing quote came within the piece
            return "".join(parts), pos + end
        pos = cut
        yield


def flat_json_steps(text, max_members=64, piece=FLAT_PIECE):
    """A JSON object whose values are strings, numbers, true/false/null or arrays of at most
    `max_members` strings -- the shape of every guest agent event -- parsed without
    recursion, strings by the json module's C scanner: nesting, long arrays and more than
    `max_members` members are refused (ValueError) after a few steps, not after parsing
    them, so a hostile line costs about a scan of its bytes.

    A generator: it yields between pieces of at most `piece` characters of a long string
    (an escape-heavy one takes ~20-40 ns a character to decode) and returns the object, so
    an event loop can run other work between the pieces (AgentEvents._parse_long)."""
    pos, obj = 0, {}

    def punct(expected):
        nonlocal pos
        m = FLAT_PUNCT.match(text, pos)
        if not m or m.group(1) not in expected:
            raise ValueError(f"expected one of {expected!r} at {pos}")
        pos = m.end()
        return m.group(1)

    def closing(bracket):
        """Whether `bracket` comes next (it is then passed)."""
        nonlocal pos
        m = FLAT_PUNCT.match(text, pos)
        if m and m.group(1) == bracket:
            pos = m.end()
            return True
        return False

    def string():
        nonlocal pos
        item, pos = yield from scan_string_steps(text, pos, piece)
        return item

    def value():
        nonlocal pos
        m = FLAT_SCALAR.match(text, pos)
        if m:
            pos = m.end()
            if m.group(4):
                return FLAT_CONSTANTS[m.group(4)]
            return int(m.group(1)) if not (m.group(2) or m.group(3)) else float(m.group(0))
        if punct('"[') == '"':
            return (yield from string())
        items = []
        if closing("]"):
            return items
        while len(items) < max_members:
            punct('"')
            items.append((yield from string()))
            if punct(",]") == "]":
                return items
        raise ValueError("an array too long")

    punct("{")
    if not closing("}"):
        while True:
            if len(obj) >= max_members:
                raise ValueError("too many members")
            punct('"')
            key = yield from string()
            punct(":")
            obj[key] = yield from value()
            if punct(",}") == "}":
                break
    if pos != len(text):
        raise ValueError("data after the object")
    return obj


class GatedConnection(asyncio.BufferedProtocol):
    """A connection to a guest whose bytes are read only when its reader asks, one recv at a
    time into a buffer of at most READ bytes: nothing is read ahead, so what a guest sends
    costs the loop only as fast as its reader pays for it (AgentEvents), and one read holds
    the loop for at most READ bytes. Heads are read HEAD_READ bytes at a time, so streams
    that all open at once cost little before they pay. The reader's side is a
    StreamReader's subset: read(n), readuntil(sep) (within LIMIT bytes), readexactly(n),
    readline(); write() and close() are the transport's. The buffer is made for each read
    and let go after it: an idle stream holds none (200 idle streams held 13 MB more)."""

    READ = 64 * 1024
    HEAD_READ = 4096
    LIMIT = 64 * 1024

    def __init__(self):
        self.transport, self.buffer = None, None
        self.want = self.HEAD_READ     # the size of the read asked for
        self.stash = bytearray()       # bytes read and not yet taken
        self.waiter = None             # the future of the read in progress
        self.ended = False             # the peer's end came (EOF or the connection's loss)
        self.error = None              # the OSError the connection was lost with

    def connection_made(self, transport):
        self.transport = transport
        transport.pause_reading()
        # Python 3.10's transport adds its reader in the callback after this one even when
        # paused here: pause it for real in the next (before our request goes out)
        asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self):
        if self.waiter is None and not self.transport.is_closing():
            self._pause()

    def get_buffer(self, sizehint):
        self.buffer = bytearray(self.want)
        return self.buffer

    def buffer_updated(self, nbytes):
        self._pause()                            # until the next read asks
        self.stash += memoryview(self.buffer)[:nbytes]
        self.buffer = None
        self._wake()

    def _pause(self):
        if not self.transport.is_reading():      # paused as the transport sees it, reading on 3.10:
            self.transport.resume_reading()      # resume and pause to remove its reader
        self.transport.pause_reading()

    def eof_received(self):
        self.ended, self.buffer = True, None
        self._wake()
        return False                             # the transport closes

    def connection_lost(self, exc):
        self.ended, self.error, self.buffer = True, exc if isinstance(exc, OSError) else None, None
        self._wake()

    def _wake(self):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _more(self, size):
        """Wait for one more read of at most `size` bytes (or the end): False at the end."""
        if self.ended:
            if self.error is not None:
                raise self.error
            return False
        self.want = max(1, min(size, self.READ))
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.resume_reading()
        try:
            await self.waiter
        finally:
            self.waiter = None
        return True

    def _take(self, n):
        data = bytes(self.stash[:n])
        del self.stash[:n]
        return data

    async def read(self, n):
        """Up to `n` bytes (at most one read's); b"" at the end."""
        if not self.stash:
            await self._more(n)
        return self._take(n)

    async def readuntil(self, separator):
        scanned = 0
        while (at := self.stash.find(separator, max(0, scanned - len(separator) + 1))) < 0:
            scanned = len(self.stash)
            if scanned > self.LIMIT:
                raise asyncio.LimitOverrunError("separator not found within the limit", scanned)
            if not await self._more(self.HEAD_READ) and len(self.stash) == scanned:
                raise asyncio.IncompleteReadError(self._take(scanned), None)
        return self._take(at + len(separator))

    async def readexactly(self, n):
        while len(self.stash) < n:
            have = len(self.stash)
            if not await self._more(n - have) and len(self.stash) == have:
                raise asyncio.IncompleteReadError(self._take(have), n)
        return self._take(n)

    async def readline(self):
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial
        except asyncio.LimitOverrunError as e:
            raise ValueError(str(e)) from e

    def write(self, data):
        self.transport.write(data)

    def get_extra_info(self, name, default=None):
        return self.transport.get_extra_info(name, default)

    def close(self):
        if self.transport is not None:
            self.transport.close()


class AgentEvents:
    """An exec's event stream as the guest agent sends it, read as a hostile peer's lines.

    next_events() gives the complete NDJSON lines that arrived (bytes, with their newline)
    with their parsed events, each checked: a JSON object whose "seq" follows the previous
    one (or, for a "dropped" event standing in for events a slow reader lost, is beyond
    it) and whose "type" is a string. Each line is bounded by what a legal one can be
    (GuestAgent: `line_max`, the exit event `exit_max`): a longer one breaks the stream as
    soon as that many bytes came without a newline, unparsed. A line over SMALL_LINE is
    parsed as the flat object every agent event is (flat_json_steps), so nesting or a long
    array costs no more than a scan, and a long string is decoded in pieces with other
    tasks running between them: a legal line as long as the bound (escapes decode at
    ~20-40 ns each) never holds the loop for long. A stream that sends no complete line
    for `stall_s` (the agent writes keepalives), or ends before its exit event, is broken: next_events()
    raises AgentError, and `next_seq` says where a re-attach would resume. Reads are
    batched (up to BATCH events of one read go onward in one write); the VM's streams
    together are held to EVENT_RATE events and BYTE_RATE bytes a second, and all VMs' to
    their fair share of GUEST_WORK (`budget`, a StreamBudget), so a guest flooding events
    costs the loop little and other VMs nothing. Each read of the agent's connection (a
    GatedConnection: no read-ahead) is paid for before it is made. Memory per stream: one
    read's buffer (READ) plus the line being read.

    Given when it is made: `fetch_result(timeout)` reads the exec's result (result()),
    `on_exit(line)` is called with the exit event's line when it is read, `on_close(self)`
    once when the stream closes."""

    READ = GatedConnection.READ    # bytes a read takes at most
    BATCH = 1024                   # events parsed per batch at most: the loop is not held long
    BATCH_BYTES = 64 * 1024        # and bytes: a batch ends with the line that passes this
    EVENT_RATE = 20000.0           # a VM's streams, events a second (an agent read is an event)
    BYTE_RATE = 256.0 * 1024 * 1024
    SMALL_LINE = 4096              # lines up to this are parsed by json.loads
    EXIT_START = re.compile(rb'\{"seq":[0-9]{1,18},"type":"exit",')     # how the agent starts its exit event
    clock = staticmethod(time.perf_counter)      # times a long line's parse (tests replace it)

    def __init__(self, exec_id, reader, writer, since, stall_s, line_max, exit_max=None, *, budget, vm_name,
                 fetch_result=None, on_exit=None, on_close=None):
        self.exec_id, self.reader, self.writer = exec_id, reader, writer
        self.next_seq, self.stall_s, self.line_max = since, stall_s, line_max
        self.exit_max = max(line_max, exit_max or 0)
        self.budget, self.vm_name = budget, vm_name
        self.fetch_result, self.on_exit, self.on_close = fetch_result, on_exit, on_close
        self.pending = bytearray()     # bytes read after the last complete line
        self.failure = None            # AgentError after the events of the last batch
        self.finished = False          # the exit event was read

    def broken(self, why):
        return AgentError(502, f"exec stream from the guest agent of VM '{self.vm_name}' broke: {why}")

    async def result(self, timeout):
        """The exec's result as the agent answers GET /exec/{id} (bytes or a BodyStream); AgentError."""
        return await self.fetch_result(timeout)

    async def read_head(self):
        try:
            head = await within(15.0, read_head(self.reader))
        except (asyncio.TimeoutError, HttpError, OSError) as e:
            raise self.broken(str(e) or "no answer") from e
        if head is None:
            raise self.broken("closed before an answer")
        start, headers = head
        parts = start.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and is_decimal(parts[1]) and len(parts[1]) == 3 else 502
        if status == 200:
            return
        try:
            data = await within(15.0, read_body(self.reader, headers, AGENT_ERROR_MAX))
            message = json.loads(data)["error"]
        except (asyncio.TimeoutError, HttpError, OSError, asyncio.IncompleteReadError,
                ValueError, KeyError, TypeError, RecursionError):
            message = None
        message = message if isinstance(message, str) else f"HTTP {status}"
        raise AgentError(status if status in (400, 404, 409) else 502, f"guest agent: {message[:500]}")

    async def _fill(self):
        """Read until `pending` holds a complete line."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stall_s
        scanned = 0
        while self.pending.find(b"\n", scanned) < 0:
            scanned = len(self.pending)
            self._check_length(self.pending, 0, scanned)
            try:
                turn = loop.time()
                await self.budget.pay_read(self.READ)
                deadline += loop.time() - turn     # waiting for its turn is not the guest's silence
                data = await within(max(deadline - loop.time(), 0.0), self.reader.read(self.READ))
                self.budget.read_done(self.READ, len(data))
            except asyncio.TimeoutError as e:
                raise self.broken(f"no event for {fmt_seconds(self.stall_s)}") from e
            except OSError as e:
                raise self.broken(str(e) or type(e).__name__) from e
            if not data:
                raise self.broken("it ended without an exit event")
            self.pending += data

    def _check_length(self, pending, start, length):
        """Refuse a line (or the start of one) longer than a legal line of its kind can be."""
        if length > self.line_max and (length > self.exit_max or not self.EXIT_START.match(pending, start)):
            bound = self.exit_max if self.EXIT_START.match(pending, start) else self.line_max
            raise self.broken(f"an event line longer than {bound} bytes")

    def _parse(self, line):
        """A line up to SMALL_LINE, parsed at once (json.loads)."""
        try:
            return self._accept(json.loads(line), line)
        except (ValueError, RecursionError) as e:
            raise self.broken("an event line that is not JSON, or not shaped like an event") from e

    async def _parse_long(self, line):
        """A longer line, parsed as the flat object every agent event is (flat_json_steps),
        other tasks running between its pieces. Its parse costs the VM's fair share the CPU
        time it took beyond the unit a byte next_events() paid before it (escapes cost more)."""
        spent, clock = 0.0, self.clock
        try:
            steps = flat_json_steps(line.decode())
            while True:
                began = clock()
                try:
                    next(steps)
                except StopIteration as done:
                    event = done.value
                    break
                finally:
                    spent += clock() - began
                await asyncio.sleep(0)
        except (ValueError, RecursionError) as e:
            raise self.broken("an event line that is not JSON, or not shaped like an event") from e
        finally:
            extra = GUEST_WORK.units(spent) - len(line)
            if extra > 0:
                GUEST_WORK.charge(self.budget.share_key, extra)
        return self._accept(event, line)

    def _accept(self, event, line):
        seq = event.get("seq") if isinstance(event, dict) else None
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(event.get("type"), str):
            raise self.broken("an event without seq or type")
        # a reader that fell behind gets a "dropped" event standing in for the events it lost
        if seq != self.next_seq and not (event["type"] == "dropped" and seq > self.next_seq):
            raise self.broken(f"event seq {seq} where {self.next_seq} was due")
        self.next_seq = seq + 1
        self.finished = event["type"] == "exit"
        if self.finished and self.on_exit:
            self.on_exit(line)
        return event

    async def next_events(self):
        """[(line bytes, event dict), ...], at least one, the exit event last when it came;
        AgentError when the stream broke. The batch's lines are paid for (budget) before
        they are parsed, so a guest's lines never cost the loop more than its share."""
        if self.failure or self.finished:
            raise self.failure or self.broken("read past its exit event")
        await self._fill()
        lines, start, pending, failure = [], 0, self.pending, None
        try:
            while (len(lines) < self.BATCH and start < self.BATCH_BYTES
                   and (end := pending.find(b"\n", start)) >= 0):
                self._check_length(pending, start, end - start)
                lines.append(bytes(memoryview(pending)[start:end + 1]))
                start = end + 1
        except AgentError as e:
            if not lines:
                raise
            failure = e                # the good events before it go first
        del pending[:start]
        await self.budget.pay(len(lines), sum([len(line) for line in lines]))
        batch = []
        for line in lines:
            try:
                event = self._parse(line) if len(line) <= self.SMALL_LINE else await self._parse_long(line)
            except AgentError as e:
                if not batch:
                    raise
                failure = e
                break
            batch.append((line, event))
            if self.finished:
                break                  # nothing comes after the exit event
        self.failure = failure
        return batch

    def close(self):
        self.pending = bytearray()     # a long line read in part is not kept while the relay ends
        self.writer.close()
        on_close, self.on_close = self.on_close, None
        if on_close:
            on_close(self)


class GuestAgent:
    """The HTTP API of one VM's guest agent (guest_agent.py), read as a hostile peer's answers.

    stdout, stderr and output are each capped at exec_output_limit_bytes; in JSON a byte
    takes at most 6 (\\u0000), so a longer answer is not the agent's. The agent always sends
    Content-Length: a chunked or to-EOF body (CPU per chunk, no end) is refused at its head.
    2xx bodies are passed through untouched (large ones as a BodyStream)."""

    STATS_MAX = 16 * 1024           # a /stats answer is a few hundred bytes

    # An agent's output event (AGENT_PROTOCOL 2) carries one read of at most its
    # OUTPUT_CHUNK (64 KiB, plus up to 3 bytes of a character split at the previous read) as
    # JSON text, a byte taking at most 6 (\u0000), and when the text had invalid UTF-8 the
    # same bytes in base64 (4 per 3): 470 KiB with its other fields; every other event but
    # the exit one is far smaller.
    EVENT_LINE_MAX = 512 * 1024
    # The exit event also carries the command as the request gave it (the agent's JSON of a
    # string is never longer than the client's), the rest of the result is small.
    EXIT_LINE_EXTRA = 64 * 1024

    def __init__(self, vm_name, address, port, output_limit, request_limit=8 * 1024 * 1024, share_key=None):
        self.vm_name = vm_name
        self.share_key = share_key if share_key is not None else self     # its VM in GUEST_WORK
        self.http = HttpClient(host=address, port=port, pool_size=32, stream_over=256 * 1024,
                               max_body=3 * 6 * output_limit + 1024 * 1024, length_only=True)
        self.streams = set()           # open AgentEvents
        self.stream_budget = StreamBudget(self.share_key, AgentEvents.EVENT_RATE, AgentEvents.BYTE_RATE)
        self.event_line_max = self.EVENT_LINE_MAX
        self.exit_line_max = request_limit + self.EXIT_LINE_EXTRA

    async def health(self, timeout):
        """The HTTP status of GET /health; AgentError when there is no answer."""
        try:
            status, _, _ = await self.http.request("GET", "/health", timeout=timeout)
        except HttpError as e:
            raise AgentError(502, str(e)) from e
        return status

    def exec(self, body, timeout, then=None):
        """POST /exec (to await); `then` is given a large answer's head and tail once it was passed on
        (BodyStream). The call itself is awaited: no coroutine of its own on every exec's path."""
        return self._call("POST", "/exec", body, timeout, then)

    async def status(self, exec_id, timeout=30.0, then=None):
        return await self._call("GET", f"/exec/{exec_id}", timeout=timeout, then=then)

    async def kill(self, exec_id, grace=0.0, then=None):
        return await self._call("DELETE", f"/exec/{exec_id}?grace={grace:g}", timeout=grace + 30.0, then=then)

    async def kill_all(self, grace=0.0):
        return await self._call("DELETE", f"/exec?grace={grace:g}", timeout=grace + 30.0)

    async def list(self):
        return await self._call("GET", "/exec", timeout=30.0)

    async def signal(self, exec_id, body):
        return await self._call("POST", f"/exec/{exec_id}/signal", body, timeout=30.0)

    async def stdin(self, exec_id, body):
        return await self._call("POST", f"/exec/{exec_id}/stdin", body, timeout=30.0)

    async def resize(self, exec_id, body):
        return await self._call("POST", f"/exec/{exec_id}/resize", body, timeout=30.0)

    async def events(self, exec_id, since, stall_s, on_exit=None, on_close=None):
        """The exec's event stream from seq `since` (GET /exec/{id}/stream), open: AgentEvents
        (on_exit: see there; on_close() is called once when it ends, also when it could not open).

        A connection of its own, outside the pool: it lives as long as the exec, and
        abort() closes it with the others when the guest goes away. It is a GatedConnection:
        the stream reads only when it has paid its turn (AgentEvents._fill)."""
        def closed(events):
            self.streams.discard(events)
            if on_close:
                on_close()
        try:
            _, connection = await within(15.0, asyncio.get_running_loop().create_connection(
                GatedConnection, self.http.host, self.http.port))
        except BaseException as e:
            if on_close:
                on_close()
            if isinstance(e, (OSError, asyncio.TimeoutError)):
                raise AgentError(502, f"guest agent of VM '{self.vm_name}' unreachable: {e or 'timed out'}") from e
            raise
        set_nodelay(connection)
        events = AgentEvents(exec_id, connection, connection, since, stall_s, self.event_line_max, self.exit_line_max,
                             budget=self.stream_budget, vm_name=self.vm_name,
                             fetch_result=lambda timeout: self.status(exec_id, timeout=timeout),
                             on_exit=on_exit, on_close=closed)
        self.streams.add(events)
        # HTTP/1.0: the agent writes the lines unframed and ends the body by closing
        connection.write(f"GET /exec/{exec_id}/stream?since={since} HTTP/1.0\r\nHost: agent\r\n\r\n".encode("latin-1"))
        try:
            await events.read_head()
        except BaseException:
            events.close()
            raise
        return events

    async def stats(self):
        """GET /stats of the agent, every field checked (guest_stats); at most STATS_MAX bytes."""
        try:
            data = await self._call("GET", "/stats", timeout=5.0)
        except AgentError as e:
            if e.status == 404:       # an agent older than /stats: its image wants a rebuild
                raise AgentError(502, f"{e} (the guest agent has no /stats: rebuild the images)") from e
            raise
        if isinstance(data, BodyStream) or len(data) > self.STATS_MAX:
            if isinstance(data, BodyStream):
                self.http.drop(data.writer)
            raise AgentError(502, f"guest agent: stats answer larger than {self.STATS_MAX} bytes")
        return guest_stats(data)

    IDENTITY_MAX = 4096             # an /identity answer is two names

    async def identity(self, name):
        """POST /identity: the guest takes `name` (hostname, CBOX_VM_NAME, its log). Its answer
        must name it back, within IDENTITY_MAX bytes and 5 s."""
        data = await within(5.0, self._call("POST", "/identity", {"vm": name}, timeout=5.0))
        if isinstance(data, BodyStream) or len(data) > self.IDENTITY_MAX:
            if isinstance(data, BodyStream):
                self.http.drop(data.writer)
            raise AgentError(502, f"guest agent: identity answer larger than {self.IDENTITY_MAX} bytes")
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict) or answer.get("vmName") != name:
            raise AgentError(502, "guest agent: its identity answer does not name the VM "
                                  "(an agent older than /identity? rebuild the images)")
        self.vm_name = name

    async def _call(self, method, target, body=None, timeout=15.0, then=None):
        """A 2xx body (bytes or BodyStream); else AgentError with the agent's status and message.

        When the VM's hypervisor exits, abort() fails the requests in flight at once
        instead of leaving them to their timeout."""
        try:
            status, _, data = await self.http.request(method, target, body, timeout=timeout, then=then)
            GUEST_WORK.charge(self.share_key, FairShare.ITEM + (data.length if isinstance(data, BodyStream)
                                                                else len(data)))
            if 200 <= status < 300:
                return data
            if isinstance(data, BodyStream):
                data = await data.read(AGENT_ERROR_MAX)
        except HttpError as e:
            raise AgentError(502, f"guest agent of VM '{self.vm_name}' unreachable: {e}") from e
        try:
            message = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError, RecursionError):
            message = None
        if not isinstance(message, str):
            message = data[:200].decode("utf-8", "replace")
        raise AgentError(status if status in (400, 404, 409, 413) else 502, f"guest agent: {message}")

    def close(self):
        self.http.close()

    def abort(self):
        """The guest is gone: fail requests in flight now and refuse new ones."""
        self.http.abort()
        for events in list(self.streams):
            events.close()


# =============================================================================
# 4. Hypervisor (its REST API, readers of its serial socket and event FIFO, its process and logs)
# =============================================================================

class HypervisorError(Exception):
    pass


class CloudHypervisor:
    """The API of one cloud-hypervisor process (see ../shared/cloud-hypervisor/NOTES.md)."""

    def __init__(self, api_socket):
        self.http = HttpClient(unix_path=api_socket, pool_size=1)

    async def call(self, method, endpoint, body=None, timeout=30.0):
        try:
            status, _, data = await self.http.request(method, f"/api/v1/{endpoint}", body, timeout)
        except HttpError as e:
            raise HypervisorError(f"{endpoint}: {e}") from e
        if status in (200, 204):
            return json.loads(data) if data.strip() else None
        raise HypervisorError(f"{endpoint}: HTTP {status}: {self.error_text(data)}")

    @staticmethod
    def error_text(data):
        """v47+ sends a JSON array of strings (outer first, root cause last); older ones plain text."""
        text = data.decode("utf-8", "replace").strip()
        try:
            parsed = json.loads(text)
        except ValueError:
            return text or "(no body)"
        if isinstance(parsed, list):
            return ": ".join(str(x) for x in parsed)
        return text

    async def ping(self, timeout=2.0):
        return await self.call("GET", "vmm.ping", timeout=timeout)

    async def info(self):
        return await self.call("GET", "vm.info", timeout=5.0)

    async def create(self, vm_config):
        await self.call("PUT", "vm.create", vm_config)

    async def boot(self):
        await self.call("PUT", "vm.boot", timeout=60.0)

    def close(self):
        self.http.close()


class BoundedReader:
    """Reads one non-blocking fd from the event loop, at most `rate` bytes a second.

    Past its budget, or when its VM's turn in GUEST_WORK (the host-wide fair share, key
    `share_key`) has not come, it stops reading for a while, so one guest's flood never
    starves the loop or other VMs. Safe for what Cloud Hypervisor writes: it never blocks
    on us (serial: vmm/src/serial_manager.rs keeps the newest 1 MiB and drops the oldest;
    events: event_monitor writes non-blocking and ignores EAGAIN)."""

    CHUNK = 64 * 1024

    def __init__(self, fd, rate, burst, share_key=None):
        self.fd = fd
        self.budget = TokenBucket(rate, burst)
        self.share_key = share_key if share_key is not None else self
        self.loop = asyncio.get_running_loop()
        self.resume_handle = None
        self.share_wait = False        # waiting for the fair share's wake
        self.holds = 0                 # reasons not to read now (the budget's timer, the fair share)
        self.ended = asyncio.Event()
        self.loop.add_reader(fd, self._readable)

    def _readable(self):
        try:
            data = os.read(self.fd, self.CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.received(data)
        if self.fd is None:
            return
        wait = self.budget.spend(len(data))
        if wait:
            self._hold()
            self.resume_handle = self.loop.call_later(wait, self._resume)
        if not GUEST_WORK.spend(self.share_key, FairShare.ITEM + len(data), self._share_granted):
            self._hold()
            self.share_wait = True

    def _hold(self):
        if self.holds == 0:
            self.loop.remove_reader(self.fd)
        self.holds += 1

    def _release(self):
        self.holds -= 1
        if self.holds == 0 and self.fd is not None:
            self.loop.add_reader(self.fd, self._readable)

    def _resume(self):
        self.resume_handle = None
        self._release()

    def _share_granted(self):
        if not self.share_wait:        # caught up meanwhile (wait_end) or closed
            return False
        self.share_wait = False
        self._release()
        return True

    def read_pending(self, limit=256 * 1024):
        """Read what is buffered now, ignoring the budget (bounded by `limit`)."""
        while self.fd is not None and limit > 0:
            try:
                data = os.read(self.fd, min(limit, self.CHUNK))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            limit -= len(data)
            self.received(data)

    async def wait_end(self, timeout):
        """Wait until the writer closed its end (everything it wrote has been read)."""
        if self.resume_handle:        # the deadline bounds this: catching up is fine now
            self.resume_handle.cancel()
            self._resume()
        if self.share_wait:
            self.share_wait = False
            self._release()
        with contextlib.suppress(asyncio.TimeoutError):
            await within(timeout, self.ended.wait())

    def received(self, data):
        raise NotImplementedError

    def close(self):
        if self.fd is None:
            return
        if self.resume_handle:
            self.resume_handle.cancel()
            self.resume_handle = None
        if self.holds == 0:
            self.loop.remove_reader(self.fd)
        self.share_wait = False
        os.close(self.fd)
        self.fd = None
        self.ended.set()


class SerialConsole(BoundedReader):
    """The guest's serial console: a client of the VMM's `Socket`-mode serial listener.

    Cloud Hypervisor binds the listener at vm.create (vmm/src/console_devices.rs
    pre_create_console_devices; an existing file there fails vm.create with
    EADDRINUSE), buffers the newest 1 MiB until a client connects and replays it
    then (serial_manager.rs SocketConsole), so cbox.py may connect after vm.create
    or again after a restart. It closes the connection when the VM's devices go
    (shutdown, reset) or when another client connects."""

    RATE = 256 * 1024          # bytes a second per VM, read and written to disk
    BURST = 2 * 1024 * 1024    # room for the VMM's 1 MiB replay after a (re)connect

    def __init__(self, path, sink, share_key=None):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise HypervisorError(f"serial console socket {path}: {e.strerror or e}") from e
        self.sink = sink
        super().__init__(sock.detach(), self.RATE, self.BURST, share_key)

    def received(self, data):
        self.sink(data)


class EventMonitor(BoundedReader):
    """The VMM's `--event-monitor path=FIFO` stream: pretty-printed JSON objects, each
    followed by a blank line (event_monitor/src/lib.rs, vmm/src/lib.rs
    start_event_monitor_thread).

    cbox.py makes the FIFO and opens it O_RDONLY|O_NONBLOCK before spawning the VMM:
    the VMM opens it for writing with create+truncate (cloud-hypervisor/src/main.rs),
    which on a FIFO blocks until a reader exists. It writes non-blocking and ignores
    EAGAIN, so an event can arrive cut short; such a piece is skipped. With no reader
    its writes fail with EPIPE (it ignores SIGPIPE), so a restarted cbox.py just opens
    the FIFO again. A guest can cause device events at will: bytes and events are
    bounded per VM, and device events are skipped unparsed."""

    RATE, BURST = 64 * 1024, 256 * 1024      # bytes a second
    EVENT_RATE, EVENT_BURST = 20, 100        # parsed events a second
    MAX_EVENT = 16 * 1024
    RELEVANT = (b'"source": "vm"', b'"source": "guest"', b'"source": "vmm"')

    def __init__(self, path, on_event, share_key=None):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.on_event = on_event
        self.pending = b""
        self.events = TokenBucket(self.EVENT_RATE, self.EVENT_BURST)
        super().__init__(fd, self.RATE, self.BURST, share_key)

    @staticmethod
    def make_fifo(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.mkfifo(path, 0o600)

    def received(self, data):
        pieces = (self.pending + data).split(b"\n\n")
        self.pending = pieces.pop()
        if len(self.pending) > self.MAX_EVENT:       # no separator for that long: not an event
            self.pending = b""
        for piece in pieces:
            if any(tag in piece for tag in self.RELEVANT):
                self.parse(piece)

    def parse(self, piece):
        if self.events.spend(1):
            return
        event = None
        # an event cut short (EAGAIN) runs into the next one: the last object start wins
        last = piece.rfind(b'{\n  "timestamp"')
        for start in (0, last) if last > 0 else (0,):
            try:
                event = json.loads(piece[start:])
                break
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
        if isinstance(event, dict) and isinstance(event.get("source"), str) and isinstance(event.get("event"), str):
            props = event.get("properties")
            self.on_event(event["source"], event["event"], props if isinstance(props, dict) else {})


# ---- the hypervisor's process -------------------------------------------------

# Twin of guest_agent.py's proc_start_time() (each file stays standalone).
def proc_start_time(pid):
    """The kernel's start time of pid (clock ticks since boot), None if it is gone.

    Recorded with each VMM pid so that a recycled pid is never mistaken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_usage(pid):
    """(resident bytes, CPU seconds user + system) of a process from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        rss = resident_bytes(pid)
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()       # fields[0] is proc(5)'s field 3, state
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime and stime, fields 14 and 15
    return rss, cpu


def find_vmm_pid(api_socket):
    """The pid of a hypervisor started with this API socket, found by its command line."""
    needle = f"path={api_socket}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        return int(entry)
            except OSError:
                continue
    return None


# Twin of guest_agent.signal_name: must agree on the name (exit reasons name signals in both).
def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def spawn_vmm(chv_bin, paths):
    """Start cloud-hypervisor in a session of its own (so killpg reaches all of it)."""
    out = os.open(paths.chv_out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        argv = [chv_bin, "--api-socket", f"path={paths.api_socket}", "--event-monitor", f"path={paths.events_fifo}",
                "--log-file", str(paths.chv_log), "-v"]
        spawn = os.posix_spawn if "/" in chv_bin else os.posix_spawnp
        return spawn(chv_bin, argv, dict(os.environ), setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, out, 2)])
    except OSError as e:
        raise HypervisorError(f"cannot run chv_bin {chv_bin}: {e.strerror}") from e
    finally:
        os.close(out)


class ProcessWatch:
    """Watches one VMM process through a pidfd (works for children and adopted processes);
    `exited` is set when it is gone, `exit_code` then holds its status when it was our child."""

    def __init__(self, pid, start_time):
        self.pid, self.start_time = pid, start_time
        self.exited = asyncio.Event()
        self.exit_code = None
        self.pidfd = None
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self._finish()
            return
        if proc_start_time(pid) != start_time:   # exited (or was replaced) before we looked
            self._finish()
            return
        asyncio.get_running_loop().add_reader(self.pidfd, self._finish)

    def _finish(self):
        if self.exited.is_set():
            return
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)   # reap it when it is our child
            self.exit_code = os.waitstatus_to_exitcode(status) if status else 0
        except ChildProcessError:
            pass
        self.exited.set()

    def close(self):
        """Stop watching without waiting for the exit (cbox.py stops, the VMM runs on)."""
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def alive(self):
        return not self.exited.is_set()

    def kill(self):
        """SIGKILL the VMM's process group (it runs in a session of its own)."""
        if self.alive():
            for sender, target in ((os.killpg, self.pid), (os.kill, self.pid)):
                try:
                    sender(target, signal.SIGKILL)
                except OSError:
                    pass

    async def wait(self, timeout):
        try:
            await within(timeout, self.exited.wait())
            return True
        except asyncio.TimeoutError:
            return False


def reset_of_event(source, event, props):
    """(stopReason, message) when an event of the VMM's event monitor is a guest reset or panic."""
    if (source, event) == ("guest", "panic") and props.get("event") == "panic":
        return "guest-panic", "the guest kernel panicked"
    if (source, event) == ("vm", "rebooting"):
        return "guest-reboot", "the guest reset itself (reboot)"
    return None


def reset_in_vmm_log(chv_log):
    """(stopReason, message) when the VMM's -v log shows a guest reset or panic: it mirrors
    every event ("Event: source = vm event = rebooting", event_monitor event_log), also
    those the FIFO dropped or nobody read while cbox.py was down."""
    text = tail_bytes(chv_log, VMM_LOG_TAIL)
    if b"Event: source = guest event = panic event = panic" in text:
        return "guest-panic", "the guest kernel panicked"
    if b"Event: source = vm event = rebooting" in text:
        return "guest-reboot", "the guest reset itself (reboot)"
    return None


def vmm_log_records(data):
    """The records of a VMM's -v log, each as one line of text. Each record ends in CRLF
    (cloud-hypervisor/src/logger.rs); a message of several lines (an anyhow error's
    "Caused by:") has bare LFs inside its record."""
    records = data.split(b"\r\n") if b"\r\n" in data else data.splitlines()
    return [" ".join(r.decode("utf-8", "replace").split()) for r in records if r.strip()]


# What a VMM's -v log says when a vCPU failed (vmm/src/cpu.rs: KVM_RUN failed, or the
# vCPU thread panicked); either ends the VMM through exit_evt with exit code 0.
VCPU_FAILURES = ("VCPU generated error: ", "vCPU thread panicked")


def vcpu_error_in_vmm_log(chv_log, limit=600):
    """The VMM's own words when its -v log says a vCPU failed, as one line; else None."""
    for record in vmm_log_records(tail_bytes(chv_log, VMM_LOG_TAIL)):
        for words in VCPU_FAILURES:
            if words in record:
                return record[record.index(words):][:limit]
    return None


def vmm_error_chain(chv_out, limit=600):
    """What cloud-hypervisor printed on stderr when it exited with an error, as one line
    (cloud-hypervisor/src/lib.rs cli_print_error_chain: "Error: Cloud Hypervisor exited with
    the following chain of errors:", then "  0: outer", "  1: its cause", ...); else None."""
    lines = tail_bytes(chv_out, 16 * 1024).decode("utf-8", "replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Error: Cloud Hypervisor exited with the following")]
    if not starts:
        return None
    chain = list(itertools.takewhile(lambda line: line.startswith("  "), lines[starts[-1] + 1:]))
    return ": ".join(re.sub(r"^\d+: ", "", line.strip()) for line in chain)[:limit] or None


# Cloud Hypervisor's words for why it could not run a VM, in its API errors and on stderr,
# and the stopReason of a start they end: KVM unusable (cloud-hypervisor/src/main.rs
# CreateHypervisor, hypervisor/src/hypervisor.rs, vmm/src/cpu.rs), a kernel or initramfs
# it cannot load (vmm/src/vm.rs KernelFile, KernelLoad, ...), a device it refused
# (vmm/src/vm.rs DeviceManager, CreateConsoleDevices).
HYPERVISOR_REASONS = (
    ("kvm", ("Failed to open hypervisor interface", "Failed to check availability of the hypervisor",
             "Failed to create the hypervisor", "Failed to create Vm", "Error creating vCPU",
             "Error configuring vCPU", "Error initialising vCPU")),
    ("kernel-load", ("Cannot open kernel file", "Cannot load the kernel into memory", "Cannot open initramfs file",
                     "Cannot load the initramfs into memory", "Cannot read initramfs into guest memory")),
    ("device-refused", ("Error from device manager", "Error creating console devices")),
)


def hypervisor_reason(text):
    """The stopReason Cloud Hypervisor's error text names (HYPERVISOR_REASONS), or None."""
    return next((reason for reason, words in HYPERVISOR_REASONS if any(w in text for w in words)), None)


# ---- bounded logs on disk (the serial console, the hypervisor's -v log) ------

VMM_LOG_CHECK_S = 2.0               # how often the VMM logs' disk use is checked
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_fallocate = None


def punch_out_head(path, keep):
    """Free the disk blocks of all but the last `keep` bytes of a file that another process
    writes at its own offset. Cloud Hypervisor opens its log with File::create, without
    O_APPEND (cloud-hypervisor/src/main.rs), so truncating it would only move its next
    write past a hole of the old size; a punched hole keeps the size and reads as zeros.
    Returns the bytes freed (0 when the file is within `keep` or missing)."""
    global _fallocate
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        st = os.fstat(fd)
        end = (st.st_size - keep) // 4096 * 4096       # whole blocks only
        if st.st_blocks * 512 <= keep or end <= 0:
            return 0
        if _fallocate is None:
            import ctypes
            _fallocate = ctypes.CDLL(None, use_errno=True).fallocate
            _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, end) != 0:
            return 0         # a file system without hole punching: nothing to do about it
        return max(0, st.st_blocks * 512 - os.fstat(fd).st_blocks * 512)
    finally:
        os.close(fd)


class ConsoleLog:
    """A VM's serial console output on disk, bounded, O(1) work per chunk.

    The first BOOT_BYTES stay for good (console.boot.log); after them the newest
    `max_bytes` are kept in two halves: console.log grows to half the budget, then
    becomes console.log.1 (the .1 before it is dropped and counted in
    console.dropped)."""

    BOOT_BYTES = 64 * 1024

    def __init__(self, vm_dir, max_bytes):
        self.boot_path = vm_dir / "console.boot.log"
        self.path = vm_dir / "console.log"
        self.old_path = vm_dir / "console.log.1"
        self.dropped_path = vm_dir / "console.dropped"
        self.half = max_bytes // 2
        self.boot_size = file_size(self.boot_path)
        self.size = file_size(self.path)
        self.fds = {}
        self.failed = False

    def append(self, data):
        try:
            if self.boot_size < self.BOOT_BYTES:
                head = data[:self.BOOT_BYTES - self.boot_size]
                self.write(self.boot_path, head)
                self.boot_size += len(head)
                data = data[len(head):]
            while data:
                if self.size >= self.half:
                    self.rotate()
                part = data[:self.half - self.size]
                self.write(self.path, part)
                self.size += len(part)
                data = data[len(part):]
        except OSError as e:       # a full disk: the console is lost, the VM is not
            if not self.failed:
                log("cannot write console log", path=self.path, error=repr(str(e)))
            self.failed = True

    def write(self, path, data):
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        os.write(fd, data)

    def rotate(self):
        dropped = self.dropped() + file_size(self.old_path)
        with contextlib.suppress(KeyError):
            os.close(self.fds.pop(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, self.old_path)
        if dropped:
            write_atomically(self.dropped_path, str(dropped).encode())
        self.size = 0

    def dropped(self):
        try:
            return int(self.dropped_path.read_bytes())
        except (OSError, ValueError):
            return 0

    def text(self):
        """What GET /logs shows: the boot lines, a marker for what was dropped, the newest part."""
        parts = [tail_bytes(self.boot_path, self.BOOT_BYTES)]
        dropped = self.dropped()
        if dropped:
            parts.append(f"\n[cbox: {dropped} bytes of console output dropped here (console_max_bytes)]\n".encode())
        parts += [tail_bytes(self.old_path, self.half), tail_bytes(self.path, self.half)]
        return b"".join(parts)

    def tail(self, limit=8192):
        data = b""
        for path in (self.path, self.old_path, self.boot_path):
            if len(data) < limit:
                data = tail_bytes(path, limit - len(data)) + data
        return data.decode("utf-8", "replace")

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def console_tail(console, lines=15):
    text = console.tail().strip().splitlines()[-lines:]
    return " | ".join(line.strip() for line in text if line.strip()) or "(console is empty)"


# =============================================================================
# 5. Host resources (network: bridge, taps, iptables; stateful disks; memory)
# =============================================================================

class CommandError(Exception):
    pass


async def run_cmd(*args, stdin=None, check=True):
    """Run a host tool; returns stdout. Raises CommandError naming the tool and its stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError as e:
        raise CommandError(f"{args[0]}: not installed (needed by cbox)") from e
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(args[:6])}: {err.decode(errors='replace').strip() or 'exit ' + str(proc.returncode)}")
    return out.decode(errors="replace")


def interface_exists(name):
    """In this process's network namespace. Never /sys/class/net: sysfs shows the
    namespace of whoever mounted it (cbox.py under `unshare --net` sees the host's)."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


async def link_details(name):
    """`ip -d -j link show` of one interface as a dict (address, linkinfo.info_kind, ...)."""
    return json.loads(await run_cmd("ip", "-d", "-j", "link", "show", "dev", name))[0]


TAP_NAME_RE = re.compile(r"^cbt[0-9]+\Z")


def default_route_interface():
    """Interface of the IPv4 default route, from /proc/net/route; None without one."""
    try:
        with open("/proc/net/route") as f:
            for line in list(f)[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000" and int(fields[3], 16) & 2:
                    return fields[0]
    except OSError:
        pass
    return None


def host_resolvers():
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if addr.version == 4 and not addr.is_loopback:
                out.append(str(addr))
    return out


def mac_for(ip):
    """A locally administered MAC derived from the guest IP (unique per VM)."""
    return "02:cb:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ip).packed)


FW_TAG = "cbox"
EGRESS_CHAIN = "CBOX-EGRESS"            # jumps to each VM's chain, matched on its tap
EGRESS_CHAIN_PREFIX = "CBOX-EG-"
EGRESS_MODES = ("nat", "none", "allowlist")


def egress_chain(tap):
    return EGRESS_CHAIN_PREFIX + tap       # at most 21 characters: iptables allows 28


def egress_rules(tap, ip, policy):
    """{chain: rules} of one VM's egress chain. A packet not from the VM's own address is
    dropped first (a guest cannot send as another VM to borrow its policy); what the
    policy refuses is rejected (TCP reset, else ICMP administratively prohibited), so
    a program in the guest fails at once instead of waiting for a timeout."""
    tag = ["-m", "comment", "--comment", FW_TAG]
    rules = [["!", "-s", ip, "-j", "DROP"]]
    if policy["egress"] == "nat":
        rules.append(["-j", "ACCEPT"])
    else:
        rules += [["-d", cidr, "-j", "ACCEPT"] for cidr in policy.get("allowOut") or ()]
        rules += [["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                  ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]]
    return {egress_chain(tap): [r + tag for r in rules]}


async def iptables_restore(table, chains, append=None, commands=()):
    """One atomic iptables-restore --noflush: each chain of `chains` created or flushed and
    given its rules; `append` adds rules to existing chains without flushing them;
    `commands` are further command lines ("-X CHAIN"). It all happens, or none of it."""
    lines = [f"*{table}"] + [f":{chain} - [0:0]" for chain in chains]
    for chain, rules in [*chains.items(), *(append or {}).items()]:
        lines += [" ".join(["-A", chain, *rule]) for rule in rules]     # every word is cbox's own, no spaces
    await run_cmd("iptables-restore", "-w", "--noflush", stdin="\n".join([*lines, *commands, "COMMIT", ""]))


class Batcher:
    """Runs many callers' requests of one kind as few batches: submit(item) waits until a
    batch holding the item has run. A request that finds no batch running starts one at
    once; those arriving while it runs go together into the next. Each caller gets the
    batch's exception, if any."""

    def __init__(self, run_batch):
        self.run_batch = run_batch         # async f(list of items)
        self.pending = []                  # [(item, future)] waiting for the next batch
        self.running = False

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if not self.running:
            self.running = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self):
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    await self.run_batch([item for item, _ in batch])
                except Exception as e:  # noqa: BLE001 (handed to every caller of the batch)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self.running = False
            for _, future in self.pending:      # cancelled with the loop: nobody is left waiting
                future.cancel()
            self.pending = []


class HostNetwork:
    """The bridge, per-VM taps and the iptables chains cbox owns (CBOX-*)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.bridge = cfg.bridge_name
        self.subnet = ipaddress.ip_network(cfg.bridge_subnet)
        self.bridge_if = ipaddress.ip_interface(cfg.bridge_ip)
        self.chains = {"filter": {"CBOX-INPUT": "INPUT", "CBOX-FORWARD": "FORWARD"},
                       "nat": {"CBOX-POSTROUTING": "POSTROUTING"}}
        # VMs going away together (DELETE /v1/vms, shutdown) share one iptables-restore
        # and one `ip -batch`: see drop_chains and remove_taps
        self.chain_drops = Batcher(self.drop_chains)
        self.tap_removals = Batcher(self.remove_taps)

    async def setup(self):
        await self.ensure_bridge()
        if self.cfg.firewall:
            await self.install_firewall()
        else:
            log("firewall disabled in config: guests can reach host services", level="WARNING")

    async def ensure_bridge(self):
        """The bridge, with a fixed MAC: without one a bridge takes the lowest MAC of its
        ports, so the guests' gateway MAC would change when that VM goes away (their
        ARP entries then point nowhere until the host next ARPs for them), the change
        would flush the guests' permanent neighbour entries, and a portless bridge has
        none. mac_for(bridge IP) cannot be a guest's: the allocator never hands it out."""
        mac = mac_for(self.bridge_if.ip)
        if not interface_exists(self.bridge):
            await run_cmd("ip", "link", "add", "name", self.bridge, "address", mac, "type", "bridge")
            log("bridge created", bridge=self.bridge, mac=mac)
        link = await link_details(self.bridge)
        if link.get("linkinfo", {}).get("info_kind") != "bridge":
            raise CommandError(f"interface {self.bridge} exists and is not a bridge; choose another bridge_name")
        # arp_notify: the kernel announces a new address (gratuitous ARP), so running
        # guests update their gateway entry at once instead of when it expires
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/arp_notify").write_text("1\n")
        # No IPv6 on the bridge: guests would otherwise reach every host service listening
        # on :: through the bridge's link-local address, past the IPv4 firewall
        with contextlib.suppress(FileNotFoundError):      # a kernel without IPv6
            Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1\n")
        if link.get("address") != mac:
            await self.fix_bridge_mac(link.get("address"), mac)
        addrs = await run_cmd("ip", "-o", "-4", "addr", "show", "dev", self.bridge)
        if f" {self.bridge_if.with_prefixlen} " not in addrs + " ":
            await run_cmd("ip", "addr", "add", self.bridge_if.with_prefixlen, "dev", self.bridge)
        await run_cmd("ip", "link", "set", "dev", self.bridge, "up")

    async def fix_bridge_mac(self, old, mac):
        """Give an existing bridge (made by an older cbox) the fixed MAC, unless it has
        ports that are not cbox taps: then it is someone else's bridge, left as it is.
        A new address flushes the bridge's neighbour entries, so the guests' permanent
        ones are put back in the same `ip -batch`."""
        ports = json.loads(await run_cmd("ip", "-j", "link", "show", "master", self.bridge))
        foreign = [port["ifname"] for port in ports if not TAP_NAME_RE.match(port["ifname"])]
        if foreign:
            log("bridge has ports that are not cbox taps: its MAC is left as it is, so the guests' gateway "
                "MAC changes when the port with the lowest MAC goes", level="WARNING", bridge=self.bridge,
                mac=old, ports=",".join(foreign))
            return
        neighbours = json.loads(await run_cmd("ip", "-4", "-j", "neigh", "show", "dev", self.bridge, "nud", "permanent"))
        keep = [f"neigh replace {n['dst']} lladdr {n['lladdr']} dev {self.bridge} nud permanent"
                for n in neighbours if n.get("lladdr")]
        await run_cmd("ip", "-batch", "-", stdin="\n".join([f"link set dev {self.bridge} address {mac}", *keep, ""]))
        log("bridge MAC fixed", bridge=self.bridge, old=old, mac=mac, neighbours_kept=len(keep))

    def _nat_interface(self):
        choice = self.cfg.nat_interface
        if choice == "none":
            return None
        if choice == "auto":
            return default_route_interface()
        return choice

    def firewall_rules(self):
        """The rules of cbox's own static chains, as iptables argument lists per (table, chain).
        Guest to guest and guest to host are dropped here, before any VM's egress policy
        (CBOX-EGRESS, section "egress policy" below) is consulted: no policy can open them."""
        br = self.bridge
        tag = ["-m", "comment", "--comment", FW_TAG]
        rules = {
            ("filter", "CBOX-INPUT"): [
                # Guests may answer connections the host opened (exec), nothing else.
                ["-i", br, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-i", br, "-j", "DROP"],
            ],
            ("filter", "CBOX-FORWARD"): [
                ["-i", br, "-o", br, "-j", "DROP"],
                ["-o", br, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-o", br, "-j", "DROP"],
                ["-i", br, "-j", EGRESS_CHAIN],       # the VM's own policy, by the tap it came in on
                ["-i", br, "-j", "DROP"],             # a tap without a policy: nothing out
            ],
            ("nat", "CBOX-POSTROUTING"): [],
        }
        nat_if = self._nat_interface()
        if nat_if:
            rules[("nat", "CBOX-POSTROUTING")].append(["-s", str(self.subnet), "-o", nat_if, "-j", "MASQUERADE"])
        return {k: [r + tag for r in v] for k, v in rules.items()}, nat_if

    async def install_firewall(self):
        """Each table's chains replaced in one iptables-restore transaction, so a restart
        never leaves a moment with an empty CBOX-FORWARD (the built-in policy, often
        ACCEPT, would then let guest to guest traffic through). CBOX-EGRESS and the
        per-VM chains are kept as they are: adoption re-applies them (prune_egress
        removes what no VM owns)."""
        await self.enable_bridge_netfilter()
        if not await self.iptables_ok("filter", "-n", "-L", EGRESS_CHAIN):
            await run_cmd("iptables", "-w", "-t", "filter", "-N", EGRESS_CHAIN)
        rules, nat_if = self.firewall_rules()
        for table in self.chains:
            await iptables_restore(table, {chain: chain_rules for (t, chain), chain_rules in rules.items()
                                           if t == table})
        for table, chains in self.chains.items():
            for chain, parent in chains.items():
                if not await self.iptables_ok(table, "-C", parent, "-j", chain):
                    await run_cmd("iptables", "-w", "-t", table, "-I", parent, "1", "-j", chain)
        if nat_if:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            log("NAT enabled", out=nat_if, subnet=self.subnet)
        else:
            log("no NAT: no default route interface (set nat_interface to choose one)", subnet=self.subnet)

    async def enable_bridge_netfilter(self):
        """Routed packets from the bridge carry their tap (iptables -m physdev) only when
        br_netfilter handles the bridge: asked for on this bridge alone (nf_call_iptables),
        not host-wide (the net.bridge.bridge-nf-call-iptables sysctl). Without the module
        no packet would match a VM's policy and every guest would be cut off.
        Loading the module turns the host-wide sysctls on for every bridge; when cbox.py
        is the one loading it, they go back to off, so the host's other bridges keep
        bypassing iptables as they did before."""
        sysctl_dir = Path("/proc/sys/net/bridge")
        if not sysctl_dir.exists():
            await run_cmd("modprobe", "br_netfilter", check=False)
            if sysctl_dir.exists():
                for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
                    with contextlib.suppress(OSError):
                        (sysctl_dir / name).write_text("0\n")
                log("loaded br_netfilter; its host-wide sysctls are off, on for the cbox bridge only",
                    bridge=self.bridge)
        if not sysctl_dir.exists():
            raise CommandError("the br_netfilter kernel module is not loaded (modprobe br_netfilter): egress "
                               "policies match each VM's tap through it (or set firewall: false)")
        await run_cmd("ip", "link", "set", "dev", self.bridge, "type", "bridge", "nf_call_iptables", "1")

    async def remove_firewall(self):
        """Remove cbox's chains and the jumps to them (used by tests and `cbox.py cleanup`)."""
        for table, chains in self.chains.items():
            for chain, parent in chains.items():
                while (await self.iptables_ok(table, "-D", parent, "-j", chain)):
                    pass
                await run_cmd("iptables", "-w", "-t", table, "-F", chain, check=False)
        await run_cmd("iptables", "-w", "-t", "filter", "-F", EGRESS_CHAIN, check=False)
        for chain in await self.egress_chains():
            await self.drop_chain(chain)
        for table, chains in self.chains.items():
            for chain in [*chains, *([EGRESS_CHAIN] if table == "filter" else [])]:
                await run_cmd("iptables", "-w", "-t", table, "-X", chain, check=False)

    @staticmethod
    async def iptables_ok(*args):
        proc = await asyncio.create_subprocess_exec(
            "iptables", "-w", "-t", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait() == 0

    # ---- egress policy: a chain per VM, jumped to by the tap its packets came in on ----

    def egress_jump(self, tap):
        return ["-i", self.bridge, "-m", "physdev", "--physdev-in", tap, "-j", egress_chain(tap),
                "-m", "comment", "--comment", FW_TAG]

    async def apply_egress(self, tap, ip, policy):
        """Put a VM's egress policy ({"egress", "allowOut"}, checked by check_network) in
        place: its chain is flushed and refilled, and jumped to when it was not, in one
        iptables-restore transaction, so a change has no moment with the old rules gone
        and the new ones missing. The rules see every packet the guest sends (no
        ESTABLISHED shortcut for outgoing packets), so a change applies to connections
        already open too."""
        if not self.cfg.firewall:
            return
        jump = self.egress_jump(tap)
        jumped = await self.iptables_ok("filter", "-C", EGRESS_CHAIN, *jump)
        await iptables_restore("filter", egress_rules(tap, ip, policy), append=None if jumped else {EGRESS_CHAIN: [jump]})

    async def remove_egress(self, tap):
        """Remove a VM's egress chain and its jump (no error when there is none)."""
        if self.cfg.firewall and tap:
            await self.chain_drops.submit(egress_chain(tap))

    def chain_drop_commands(self, chain):
        jump = self.egress_jump(chain[len(EGRESS_CHAIN_PREFIX):])
        return [" ".join(["-D", EGRESS_CHAIN, *jump]), f"-F {chain}", f"-X {chain}"]

    async def drop_chains(self, chains):
        """Per-VM chains with their jumps from CBOX-EGRESS, in one transaction when each jump
        is there once (the usual case): iptables-restore reads and writes the whole table
        each time, so one run per chain would cost the square of the VMs gone together.
        When the transaction fails (a jump missing or doubled), chain by chain."""
        with contextlib.suppress(CommandError):
            return await iptables_restore("filter", {}, commands=[
                command for chain in dict.fromkeys(chains) for command in self.chain_drop_commands(chain)])
        for chain in dict.fromkeys(chains):
            await self.drop_chain(chain)

    async def drop_chain(self, chain):
        """A per-VM chain: its jump from CBOX-EGRESS, then the chain; in one transaction when
        the jump is there once (the usual case), else step by step."""
        jump = self.egress_jump(chain[len(EGRESS_CHAIN_PREFIX):])
        with contextlib.suppress(CommandError):
            return await iptables_restore("filter", {}, commands=self.chain_drop_commands(chain))
        while await self.iptables_ok("filter", "-D", EGRESS_CHAIN, *jump):
            pass
        await run_cmd("iptables", "-w", "-t", "filter", "-F", chain, check=False)
        await run_cmd("iptables", "-w", "-t", "filter", "-X", chain, check=False)

    async def egress_chains(self):
        """Names of the per-VM egress chains that exist."""
        out = await run_cmd("iptables", "-w", "-t", "filter", "-S", check=False)
        return [line.split()[1] for line in out.splitlines()
                if line.startswith("-N " + EGRESS_CHAIN_PREFIX)]

    async def prune_egress(self, taps):
        """Remove the egress chains of taps no VM owns (left by a crash between a VM's
        policy and its record going away)."""
        if not self.cfg.firewall:
            return
        keep = {egress_chain(tap) for tap in taps}
        for chain in await self.egress_chains():
            if chain not in keep:
                log("removing egress chain no VM owns", chain=chain)
                await self.drop_chain(chain)

    async def create_tap(self, tap, ip, mac):
        """A persistent tap on the bridge, isolated from the other ports, up; and a
        permanent neighbour entry for the guest, so the first packet to a booting
        guest does not wait a second for an ARP retry (and no guest can claim its IP)."""
        if interface_exists(tap):
            raise CommandError(f"interface {tap} already exists")
        await run_cmd("ip", "-batch", "-", stdin="\n".join([
            f"tuntap add dev {tap} mode tap",
            f"link set dev {tap} master {self.bridge}",
            f"link set dev {tap} type bridge_slave isolated on",
            f"link set dev {tap} up",
            f"neigh replace {ip} lladdr {mac} dev {self.bridge} nud permanent", ""]))

    async def remove_tap(self, tap, ip):
        if tap and interface_exists(tap):
            await self.tap_removals.submit((tap, ip))

    async def remove_taps(self, taps):
        """Taps and their neighbour entries, in one `ip -batch`. Each unregistered device costs
        the kernel an RCU grace period under the rtnl lock (~16 ms here, whatever else
        runs), so 250 taps deleted one by one take 4 s; the devices of one `link del group`
        are unregistered together, with one. The group is a random one of cbox's (never 0,
        every interface's default), set on these taps only, just before."""
        group = uuid.uuid4().int % (2 ** 31 - 2 ** 20) + 2 ** 20
        lines = [f"link set dev {tap} group {group}" for tap, _ in taps]
        lines += [f"link del group {group}"] + [f"neigh del {ip} dev {self.bridge}" for _, ip in taps]
        await run_cmd("ip", "-force", "-batch", "-", check=False, stdin="\n".join([*lines, ""]))


# ---- stateful disks and memory --------------------------------------------------

def host_cpus():
    """The CPUs cbox.py may run on (its affinity, which the hypervisors it starts inherit)."""
    return len(os.sched_getaffinity(0))


def host_memory_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def copy_sparse(src, dest):
    """Copy a file's data extents only (SEEK_DATA/SEEK_HOLE), keeping it sparse."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:     # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            offset = start
            while offset < end:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset, offset, offset)
                if copied == 0:
                    raise OSError(f"short copy of {src}")
                offset += copied
            pos = end


def free_bytes(directory):
    """Bytes an unprivileged writer may still write to the file system of `directory` (statvfs
    f_bavail), or of its nearest existing parent."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def growth_left(disk, size):
    """What a sparse disk may still take from its file system: its size less the blocks it
    already has; `size` for a disk not made yet."""
    try:
        st = os.stat(disk)
    except OSError:
        return size
    return max(st.st_size - st.st_blocks * 512, 0)


class StatefulDisks:
    """Each VM's sparse ext4 disk (vdb), copied from one formatted template per size:
    one mke2fs per size instead of one per VM. Each copy then gets a filesystem UUID
    of its own; the template has metadata_csum_seed, so that only rewrites the
    superblocks (tune2fs, ~2 ms) instead of every metadata checksum."""

    TEMPLATE_VERSION = 2      # 1: no metadata_csum_seed (a new UUID would need a full fsck)

    def __init__(self, directory):
        self.dir = Path(directory)
        self.lock = asyncio.Lock()

    async def template(self, size_mb):
        path = self.dir / f"stateful-{size_mb}mb.v{self.TEMPLATE_VERSION}.ext4"
        async with self.lock:
            if not path.exists():
                self.dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                try:
                    with open(tmp, "wb") as f:
                        f.truncate(size_mb * 1024 * 1024)
                    await run_cmd("mke2fs", "-q", "-F", "-t", "ext4", "-O", "metadata_csum_seed", "-E",
                                  "lazy_itable_init=1,lazy_journal_init=1", "-L", "cbox-state", str(tmp))
                    os.replace(tmp, path)
                finally:
                    if tmp.exists():
                        tmp.unlink()
                with contextlib.suppress(FileNotFoundError):   # the version 1 template of this size
                    (self.dir / f"stateful-{size_mb}mb.ext4").unlink()
        return path

    async def create(self, dest, size_mb, cached=True):
        """A VM's disk: a copy of the template of its size (cached: the usual size), else an
        mke2fs of its own (a diskMb of a request: one template per size asked would let
        requests fill state_dir with templates)."""
        if not cached:
            with open(dest, "wb") as f:
                f.truncate(size_mb * 1024 * 1024)
            await run_cmd("mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                          "-L", "cbox-state", str(dest))
            return
        await asyncio.to_thread(copy_sparse, await self.template(size_mb), dest)
        await run_cmd("tune2fs", "-U", str(uuid.uuid4()), str(dest))


# ---- the VMs' cpu cgroups: however many vCPUs spin, cbox.py keeps its share --------

CPU_CGROUP_MOUNT = Path("/run/cbox/cgroup-cpu")   # where cbox.py mounts the cpu hierarchy it cannot see


# Twins of tests/fake_chv.py's _mounted_cpu_hierarchy and _mount_cpu_hierarchy: the stand-in
# hypervisor stays independent of cbox.py, as Cloud Hypervisor is.
def mounted_cpu_hierarchy():
    """(directory, 1 or 2) of the mounted cgroup hierarchy with the cpu controller, or (None, why not)."""
    with open("/proc/self/mounts") as f:
        entries = [line.split()[:4] for line in f]
    for _, point, fstype, options in entries:
        if fstype == "cgroup" and "cpu" in options.split(",") and os.path.isdir(point):
            return Path(point), 1
    for _, point, fstype, _ in entries:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                if "cpu" in Path(point, "cgroup.controllers").read_text().split():
                    return Path(point), 2
    return None, "no cgroup hierarchy with the cpu controller is mounted"


def mount_cpu_hierarchy():
    """Mount the cpu hierarchy at CPU_CGROUP_MOUNT, where this process's mounts hide it
    (`ip netns exec` remounts /sys): in cbox.py's own mount namespace, so the hypervisors it
    starts see it too. cgroup v1: the controllers of this process's cpu line (mounting them
    mounts that same hierarchy again); else cgroup2."""
    import ctypes
    controllers = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, _ = line.rstrip("\n").split(":", 2)
            if "cpu" in names.split(","):
                controllers = names
    CPU_CGROUP_MOUNT.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(CPU_CGROUP_MOUNT):
        fstype, options = ("cgroup", controllers) if controllers else ("cgroup2", "")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(fstype.encode(), str(CPU_CGROUP_MOUNT).encode(), fstype.encode(), 0, options.encode()):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(CPU_CGROUP_MOUNT))
    if controllers:
        return CPU_CGROUP_MOUNT, 1
    if "cpu" in (CPU_CGROUP_MOUNT / "cgroup.controllers").read_text().split():
        return CPU_CGROUP_MOUNT, 2
    return None, "cgroup2 has no cpu controller here"


def remove_empty_cgroups(top, keep_top=True):
    """rmdir every cgroup below `top` (and top itself unless keep_top), deepest first: the
    kernel removes only those without processes or children, so a running VM's stays."""
    for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
        if keep_top and dirpath == str(top):
            continue
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


CPU_LIMIT_FILES = {1: ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"), 2: ("cpu.weight", "cpu.max")}


def move_cgroup_tree(src, dest, version):
    """Move a cgroup, the groups below it (the stand-in's guest has one) and their processes
    to `dest`, their cpu weights and quotas with them; src goes. Processes forked meanwhile
    start in the old groups: they are moved in the next pass."""
    pairs = []
    for dirpath, _, _ in os.walk(src):             # top-down: a parent is made before its children
        there = dest / os.path.relpath(dirpath, src)
        there.mkdir(exist_ok=True)
        for name in CPU_LIMIT_FILES[version]:
            with contextlib.suppress(OSError):
                (there / name).write_text((Path(dirpath) / name).read_text())
        pairs.append((Path(dirpath), there))
    for _ in range(3):
        moved = 0
        for here, there in pairs:
            with contextlib.suppress(OSError):
                for pid in (here / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):        # gone meanwhile
                        (there / "cgroup.procs").write_text(pid)
                        moved += 1
        if not moved:
            break
    remove_empty_cgroups(src, keep_top=False)


def read_small(path, limit=4096):
    """The first `limit` bytes of a small kernel file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


class VmCpuDemand:
    """One VM's group and CPU demand: the time its threads (those of the groups below too: the
    stand-in's guest) ran or waited to run (/proc/<tid>/schedstat's first two fields) over the
    wall time between two readings, in vCPUs' worth. A vCPU thread sleeps when its guest is
    idle (HLT), so a VM whose vCPUs never sleep demands 1 a vCPU however little CPU it is
    given, and one that waits for work demands less however long it queues once woken. The
    kernel adds a wait when the thread gets to run, so a starved thread's shows up late: a
    busy VM is quiet again only after two readings in a row below QUIET with none of its
    threads runnable."""

    MAX_THREADS = 256      # read of each group: a hypervisor has its vCPUs' and devices' threads, some 30

    def __init__(self, group, vcpus, busy=False):
        self.group, self.vcpus, self.busy = group, max(1, vcpus), busy
        self.seen, self.at = {}, None        # tid -> run + wait ns at the last reading, and when
        self.since = time.monotonic()
        self.calm = 0                        # readings in a row a busy VM looked quiet
        self.readings, self.lists = 0, []

    def thread_lists(self):
        """The files listing the threads of the group and of those below it: found again every
        tenth reading (the stand-in's guest makes its group at boot)."""
        if self.readings % 10 == 0:
            self.lists = [os.path.join(dirpath, "tasks" if "tasks" in files else "cgroup.threads")
                          for dirpath, _, files in os.walk(self.group)]
        self.readings += 1
        return self.lists

    def read(self):
        """(demand since the last reading, whether a thread is runnable now); demand is None
        the first time and when the group is gone. Some 10 small files a VM each second:
        os.open/os.read, without open()'s file objects (bench/cpu_groups.py times it)."""
        now, seen, runnable = time.monotonic(), {}, False
        try:
            for listing in self.thread_lists():
                for tid in read_small(listing, 65536).split()[:self.MAX_THREADS]:
                    with contextlib.suppress(OSError, ValueError):
                        run, wait = read_small(b"/proc/" + tid + b"/schedstat").split()[:2]
                        seen[tid] = int(run) + int(wait)
                        if self.busy and not runnable:
                            runnable = read_small(b"/proc/" + tid + b"/stat").rpartition(b")")[2].split()[0] == b"R"
        except OSError:
            self.readings = 0
            return None, False
        last, at = self.seen, self.at
        self.seen, self.at = seen, now
        if at is None:
            return None, runnable
        used = sum(ns - last.get(tid, 0) for tid, ns in seen.items())
        return used / 1e9 / (now - at) / self.vcpus, runnable

    def verdict(self, busy_at, quiet_below, settle_s):
        """True: it became busy; False: quiet again; None: no change. A VM's first settle_s
        (its boot) is not judged."""
        demand, runnable = self.read()
        if demand is None or time.monotonic() - self.since < settle_s:
            return None
        if not self.busy:
            return True if demand >= busy_at else None
        self.calm = self.calm + 1 if demand < quiet_below and not runnable else 0
        return False if self.calm >= 2 else None


class VmCpuGroups:
    """Each VM's hypervisor in a cpu cgroup of its own, below one parent for all VMs.

    Without it, each vCPU thread competes with cbox.py's loop as an equal: 39 spinning
    1-vCPU VMs on 2 CPUs left cbox.py 1/41 of them (bench.py's unpinned busy vCPUs row,
    2026-12-08: health p99 152 ms, the healthy VM's exec p50 69x idle). Below one parent,
    all the guests together weigh as much as one busy thread a host CPU (v1 cpu.shares
    1024, v2 cpu.weight 100 each; the kernel splits a group's weight among the CPUs it
    runs on), so on each CPU cbox.py's loop, or any other host thread, gets half of it
    whenever it wants it, and the guests keep the other half however many host threads
    want more; among themselves each VM weighs its vCPUs (1024 or 100 each), the share
    its threads had before.

    Layout: <hierarchy>/cbox-<hash of state_dir>/{quiet,busy}/vmm-<pid>. One parent per
    state_dir (an instance restarted finds its adopted VMs there); groups named by the
    hypervisor's pid, not the VM's name (a warm pool VM keeps its hypervisor when a start
    renames it). The hypervisor joins right after it is spawned, before vm.boot makes its
    vCPU threads, which start in their process's cgroup (CHV vmm/src/cpu.rs
    CpuManager::start_vcpu spawns each as a std::thread, "vcpu<N>"). `busy` has cpu.idle:
    with busy_vms_yield, a VM whose vCPUs were all busy over the last second is moved
    there (watch_busy), and back once quiet, so that a quiet VM's vCPU runs first whenever
    it wakes, and busy VMs still get every CPU the quiet ones leave, fairly among
    themselves. It takes the subtree: cpu.idle on each busy VM's own group, among quiet
    siblings, left a quiet task 32 ms behind 39 groups of 4 spinning tasks on 2 CPUs,
    against 1.8 ms with them in a subtree of their own, as on a quiet machine
    (bench/cpu_groups.py, 2026-12-08). A VM's group goes when its
    hypervisor exits; empty ones left by a stop go at the next start. Where no hierarchy
    has the cpu controller, or with vm_cpu_cgroups false, VMs run beside cbox.py as before
    and the log says why."""

    PERIOD_S = 1.0         # how often the VMs' CPU demand is read
    BUSY = 0.9             # demand over the last period, in vCPUs' worth, at or above which a VM is busy
    QUIET = 0.5            # ... and below which (twice in a row, nothing runnable) a busy one is quiet again
    SETTLE_S = 5.0         # a VM's first seconds (its boot) are not judged

    def __init__(self):
        self.parent, self.version, self.why_not = None, None, "not configured"
        self.removing = set()                # remove_group tasks
        self.groups = {}                     # hypervisor pid -> VmCpuDemand
        self.yield_busy = False

    def configure(self, cfg):
        self.parent = None
        if not cfg.vm_cpu_cgroups:
            self.why_not = "vm_cpu_cgroups is false"
        else:
            try:
                self.parent, self.version = self.make_parent(Path(cfg.state_dir))
            except OSError as e:
                self.why_not = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        if self.parent is None:
            log("VMs' cpu cgroups off: a busy guest's vCPUs compete with cbox.py as equals", why=self.why_not,
                level="WARNING" if cfg.vm_cpu_cgroups else "INFO")
            return
        remove_empty_cgroups(self.parent / "quiet")
        remove_empty_cgroups(self.parent / "busy")
        self.yield_busy = cfg.busy_vms_yield and self.can_idle()
        log("VMs' cpu cgroups", parent=self.parent, version=self.version,
            busy_vms_yield=self.yield_busy if cfg.busy_vms_yield else "off")

    def make_parent(self, state_dir):
        point, version = mounted_cpu_hierarchy()
        if point is None:
            point, version = mount_cpu_hierarchy()
        if point is None:
            raise OSError(version)
        parent = point / ("cbox-" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12])
        if version == 2:                    # the top cgroup may have processes beside children with controllers
            self.enable_cpu_below(point)
        for group in (parent, parent / "quiet", parent / "busy"):
            group.mkdir(exist_ok=True)
            if group.name != "busy":        # busy's is cpu.idle's (can_idle); the kernel refuses a weight then
                self.set_weight(group, host_cpus(), version)
            if version == 2:
                self.enable_cpu_below(group)
        return parent, version

    def can_idle(self):
        """Whether this kernel has cpu.idle (Linux 5.15+): `busy` gets it."""
        try:
            (self.parent / "busy" / "cpu.idle").write_text("1")
            return True
        except OSError as e:
            log("busy VMs cannot yield: this kernel's cpu cgroups have no cpu.idle (Linux 5.15+)",
                error=e.strerror, level="WARNING")
            return False

    @staticmethod
    def enable_cpu_below(group):
        if "cpu" not in (group / "cgroup.subtree_control").read_text().split():
            (group / "cgroup.subtree_control").write_text("+cpu")

    @staticmethod
    def set_weight(group, threads, version):
        if version == 1:
            (group / "cpu.shares").write_text(str(1024 * threads))
        else:
            (group / "cpu.weight").write_text(str(min(10000, 100 * threads)))

    def place(self, pid, vcpus):
        """Move a hypervisor just spawned (all its threads) into a group of its own."""
        if self.parent is None:
            return
        group = self.parent / "quiet" / f"vmm-{pid}"
        try:
            group.mkdir(exist_ok=True)
            self.set_weight(group, vcpus, self.version)
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            log("hypervisor left outside its cpu cgroup", pid=pid, group=group, error=e.strerror or str(e),
                level="WARNING")
            remove_empty_cgroups(group, keep_top=False)
            return
        self.groups[pid] = VmCpuDemand(group, vcpus)

    def adopt(self, pid, vcpus):
        """A hypervisor an earlier cbox.py placed: its demand is watched again (a busy one goes
        back to `quiet` when busy VMs no longer yield)."""
        for side in ("quiet", "busy") if self.parent is not None else ():
            group = self.parent / side / f"vmm-{pid}"
            if group.is_dir():
                if side == "busy" and not self.yield_busy:
                    move_cgroup_tree(group, self.parent / "quiet" / group.name, self.version)
                    group, side = self.parent / "quiet" / group.name, "quiet"
                self.groups[pid] = VmCpuDemand(group, vcpus, busy=side == "busy")

    def forget(self, pid):
        """Remove a hypervisor's group once it exited: in a task of its own, which the VM's
        teardown does not cancel with the VM's tasks."""
        self.groups.pop(pid, None)
        if self.parent is not None and pid:
            task = asyncio.get_running_loop().create_task(self.remove_group(pid))
            self.removing.add(task)
            task.add_done_callback(self.removing.discard)

    async def remove_group(self, pid, tries=8):
        """Under the stand-in, the guest's processes leave the group nested in it as they die
        with the hypervisor: until then the kernel refuses (EBUSY). A few rmdirs on the loop
        (some 50 us), tried again after 10 ms, 20 ms, ... (2.5 s in all): not in threads,
        where a DELETE of 250 VMs queued its file removals behind theirs."""
        groups, wait = [self.parent / side / f"vmm-{pid}" for side in ("quiet", "busy")], 0.01
        for _ in range(tries):
            for group in groups:
                remove_empty_cgroups(group, keep_top=False)
            if not any(g.exists() for g in groups):
                return
            await asyncio.sleep(wait)
            wait *= 2

    async def watch_busy(self):
        """Every PERIOD_S: each VM's CPU demand (VmCpuDemand); a busy one moves to `busy`
        (cpu.idle), a quiet again one back to `quiet`. Reading and moving run in a thread
        (some 20 small files a second per 10 VMs)."""
        if not self.yield_busy:
            return
        while True:
            await asyncio.sleep(self.PERIOD_S)
            try:
                await asyncio.to_thread(self.judge_all, list(self.groups.values()))
            except Exception as e:          # a bug here must not end the watch, nor go unsaid
                log("judging the VMs' CPU demand failed", error=repr(e), level="ERROR")
            M_VMS_BUSY.value = sum(d.busy for d in self.groups.values())

    def judge_all(self, demands):
        for d in demands:
            verdict = d.verdict(self.BUSY, self.QUIET, self.SETTLE_S)
            if verdict is not None:
                dest = self.parent / ("busy" if verdict else "quiet") / d.group.name
                try:
                    move_cgroup_tree(d.group, dest, self.version)
                except OSError:                              # gone meanwhile
                    continue
                M_VM_CPU_MOVES.labels(dest.parent.name).inc()
                d.group, d.busy, d.seen, d.at, d.calm, d.readings = dest, verdict, {}, None, 0, 0

    def close(self):
        """At shutdown: the parent goes when no VM is left in it."""
        if self.parent is not None:
            remove_empty_cgroups(self.parent, keep_top=False)


VM_CPU = VmCpuGroups()


# =============================================================================
# 6. Allocation (guest IPs, vsock CIDs, tap and warm pool names)
# =============================================================================

MAX_CID = 0xFFFFFFFE


class ApiError(Exception):
    """An error with an HTTP status for the REST API; `fields` go into the body beside "error"."""

    def __init__(self, status, message, **fields):
        super().__init__(message)
        self.status = status
        self.fields = fields

    def body(self):
        return {"error": str(self), **self.fields}


class Allocator:
    """Guest IPs (lowest free host address of the subnet) and vsock CIDs (lowest free >= 3)."""

    def __init__(self, subnet, bridge_ip):
        self.subnet = ipaddress.ip_network(subnet)
        self.reserved = {ipaddress.ip_address(bridge_ip)}
        self.ips, self.cids = set(), set()

    def take_ip(self):
        for addr in self.subnet.hosts():
            if addr not in self.ips and addr not in self.reserved:
                self.ips.add(addr)
                return addr
        raise ApiError(503, f"no free guest IP left in {self.subnet}")

    def take_cid(self):
        cid = 3
        while cid in self.cids:
            cid += 1
        if cid > MAX_CID:
            raise ApiError(503, "no free vsock CID left")
        self.cids.add(cid)
        return cid

    def take(self):
        """A free (IP, CID) pair, both taken, or ApiError 503 with neither taken."""
        ip = self.take_ip()
        try:
            return ip, self.take_cid()
        except ApiError:
            self.release(ip, None)
            raise

    def claim(self, ip, cid):
        """Mark an IP and CID of an existing VM as used (adoption)."""
        addr = ipaddress.ip_address(ip)
        if addr in self.ips or cid in self.cids or addr not in self.subnet:
            raise ValueError(f"IP {ip} or CID {cid} is already in use or outside the subnet")
        self.ips.add(addr)
        self.cids.add(cid)

    def release(self, ip, cid):
        self.ips.discard(ipaddress.ip_address(ip))
        self.cids.discard(cid)


def tap_name(cid):
    return f"cbt{cid}"                    # at most 13 characters, below IFNAMSIZ


# The internal name of a warm pool VM until a start request claims it; never a VM name
# (check_vm_name: those start with a letter or digit), so no request can name one.
POOL_NAME_RE = re.compile(r"^_pool-[0-9a-f]{12}\Z")


def pool_name():
    return f"_pool-{uuid.uuid4().hex[:12]}"


def is_pool_name(name):
    return isinstance(name, str) and bool(POOL_NAME_RE.match(name))


# =============================================================================
# 7. Request validation (schemas of request bodies, queries and path parameters)
# =============================================================================

# ---- request schemas: a small JSON Schema vocabulary --------------------------------------
# Every request body, query and path parameter is described by a schema (a Python dict in a
# subset of JSON Schema 2020-12). check_schema runs it (compiled once by SchemaCompiler);
# /v1/openapi.json publishes it (openapi_schema drops what is ours), so the document and
# the server cannot disagree.
# Keywords: type (a name or a list), enum, minimum, maximum, exclusiveMinimum, minLength,
# maxLength, pattern (ECMA-262 syntax in the common subset: searched, not anchored),
# items, prefixItems, minItems, maxItems, properties, required, additionalProperties
# (false or a schema), propertyNames, maxProperties, anyOf, oneOf, allOf, default (for an
# absent or null value). Ours: "x-errors" {keyword or "*": message} (message templates with
# {name}, {key}, {value} and the schema's keywords) and "x-check": a function for what a
# schema cannot say (its docstring goes into the document's description); it gets the value
# and its name, raises ApiError and returns the value as used.

REGEXES = {}


def schema_regex(pattern):
    """A schema's pattern as a Python regex: a final '$' becomes '\\Z' (Python's '$' also
    matches before a final newline; JSON Schema's does not)."""
    regex = REGEXES.get(pattern)
    if regex is None:
        regex = REGEXES[pattern] = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)
    return regex


TYPE_WORDS = {"null": "null", "boolean": "a boolean", "integer": "an integer", "number": "a number",
              "string": "a string", "array": "a list", "object": "an object"}


def shown(value):
    return repr(str(value)[:64]) if not isinstance(value, (dict, list)) else type(value).__name__


def schema_error(schema, keyword, name, value, default):
    """ApiError 400: the schema's own message for `keyword` (x-errors), else `default`."""
    messages = schema.get("x-errors", {})
    template = messages.get(keyword) or messages.get("*")
    if template is None:
        return ApiError(400, default)
    fields = {k: v for k, v in schema.items() if isinstance(v, (int, float, str))}
    key = name.partition(".")[2] or name          # labels.a.b -> a.b: a label key may hold dots
    return ApiError(400, template.format(name=name, key=key, value=shown(value), **fields))


def child_name(name, key):
    return f"{name}.{key}" if name else key


NO_FIT = object()       # a value no branch of an anyOf / oneOf fits


class SchemaCompiler:
    """A schema turned once into the checks its keywords ask for: compile() gives a function
    (value, name) -> the value as used (check_schema's work; a request is checked often)."""

    @classmethod
    def compile(cls, schema):
        steps = [step for step in (cls.types(schema), cls.combinators(schema), cls.dependents(schema),
                                   cls.enum(schema), cls.number(schema),
                                   cls.string(schema), cls.array(schema), cls.object(schema), cls.check(schema)) if step]
        has_default, default = "default" in schema, schema.get("default")

        def run(value, name):
            if value is None and has_default:
                if fixed_default:
                    return default
                if fresh_empty:
                    return fresh_empty()
                value = default
            for step in steps:
                value = step(value, name)
            return value
        fixed_default = False          # a valid scalar default needs no checks each time
        fresh_empty = None             # nor does a valid empty {} or []: a new empty one each time
        if has_default and not isinstance(default, (dict, list)):
            try:
                fixed_default = run(default, "") == default
            except ApiError:
                pass
        elif has_default and not default:
            try:
                checked = run(default, "")
            except ApiError:
                checked = None
            if type(checked) is type(default) and checked == default and checked is not default:
                fresh_empty = type(default)
        if not has_default and len(steps) == 1:
            run = steps[0]                 # no call around the one step (checks run per request)
        run.fixed_default, run.fresh_empty = fixed_default, fresh_empty
        return run

    @classmethod
    def types(cls, schema):
        if "type" not in schema:
            return None
        names = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        words = " or ".join(TYPE_WORDS[t] for t in names if t != "null")
        classes = {bool} if "boolean" in names else set()       # exact classes: JSON true is no number
        classes |= {type(None)} if "null" in names else set()
        classes |= {str} if "string" in names else set()
        classes |= {list} if "array" in names else set()
        classes |= {dict} if "object" in names else set()
        classes |= {int} if "integer" in names or "number" in names else set()
        finite = "number" in names           # json.loads reads NaN and Infinity
        integral = "integer" in names and not finite

        def step(value, name):
            if value.__class__ not in classes and not (finite and value.__class__ is float and math.isfinite(value)):
                if integral and value.__class__ is float and value.is_integer():
                    return int(value)          # 430.0 is an integer in JSON Schema 2020-12: used as 430
                raise schema_error(schema, "type", name, value, f"'{name}' must be {words}")
            return value
        return step

    @classmethod
    def combinators(cls, schema):
        fits = {"anyOf": lambda n, of: n > 0, "oneOf": lambda n, of: n == 1, "allOf": lambda n, of: n == len(of)}
        parts = [(keyword, fits[keyword], [tuple(s["required"]) if set(s) == {"required"} else cls.compile(s)
                                           for s in schema[keyword]]) for keyword in fits if keyword in schema]
        if not parts:
            return None

        def fitting(check, value, name):
            """The value as the branch uses it, or NO_FIT."""
            if isinstance(check, tuple):           # a branch that only requires fields
                return value if isinstance(value, dict) and all(k in value for k in check) else NO_FIT
            try:
                return check(value, name)
            except ApiError:
                return NO_FIT

        def step(value, name):
            for keyword, fit, checks in parts:
                fits = [used for used in (fitting(check, value, name) for check in checks) if used is not NO_FIT]
                if not fit(len(fits), checks):
                    raise schema_error(schema, keyword, name, value, f"'{name}' does not have an allowed form")
                if keyword != "allOf":
                    value = fits[0]        # anyOf, oneOf: as the (first) branch that fits uses it
            return value

        if len(parts) == 1 and parts[0][0] == "oneOf" and all(isinstance(c, tuple) for c in parts[0][2]):
            required = parts[0][2]      # "exactly one of these fields" (cmd or argv): counted directly

            def step(value, name):     # noqa: F811 (the common case, several times cheaper)
                if isinstance(value, dict):
                    count = 0          # loops, not generators: on every exec's path
                    for keys in required:
                        for k in keys:
                            if k not in value:
                                break
                        else:
                            count += 1
                    if count == 1:
                        return value
                raise schema_error(schema, "oneOf", name, value, f"'{name}' does not have an allowed form")
        return step

    @classmethod
    def dependents(cls, schema):
        """dependentSchemas: an object that has the key must also fit the key's schema."""
        if "dependentSchemas" not in schema:
            return None
        checks = [(key, cls.compile(sub)) for key, sub in schema["dependentSchemas"].items()]

        def step(value, name):
            if isinstance(value, dict):
                for key, check in checks:
                    if key in value:
                        check(value, name)
            return value
        return step

    @classmethod
    def enum(cls, schema):
        if "enum" not in schema:
            return None
        allowed = schema["enum"]

        def step(value, name):
            if value not in allowed:
                raise schema_error(schema, "enum", name, value,
                                   f"'{name}' must be one of {', '.join(map(str, allowed))}, got {shown(value)}")
            return value
        return step

    @classmethod
    def number(cls, schema):
        bounds = [(keyword, bad, schema[keyword]) for keyword, bad in (
            ("minimum", lambda v, b: v < b), ("exclusiveMinimum", lambda v, b: v <= b), ("maximum", lambda v, b: v > b))
            if keyword in schema]
        if not bounds:
            return None
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        span = (f"{low:g}..{high:g}" if low is not None and high is not None
                else f"at most {high:g}" if high is not None else f"more than {low:g}")

        def step(value, name):
            if value.__class__ in (int, float):           # not bool
                for keyword, bad, bound in bounds:
                    if bad(value, bound):
                        raise schema_error(schema, keyword, name, value, f"'{name}' must be {span}")
            return value
        return step

    @classmethod
    def string(cls, schema):
        if not {"minLength", "maxLength", "pattern"} & set(schema):
            return None
        shortest, longest = schema.get("minLength", 0), schema.get("maxLength")
        regex = schema_regex(schema["pattern"]) if "pattern" in schema else None

        def step(value, name):
            if isinstance(value, str):
                if len(value) < shortest:
                    raise schema_error(schema, "minLength", name, value, f"'{name}' must not be empty")
                if longest is not None and len(value) > longest:
                    raise schema_error(schema, "maxLength", name, value, f"'{name}' is longer than {longest} characters")
                if regex and not regex.search(value):
                    raise schema_error(schema, "pattern", name, value, f"'{name}' must match {schema['pattern']}")
            return value
        return step

    @classmethod
    def array(cls, schema):
        if not {"items", "prefixItems", "minItems", "maxItems"} & set(schema):
            return None
        fewest, most = schema.get("minItems", 0), schema.get("maxItems")
        prefix = [cls.compile(s) for s in schema.get("prefixItems", [])]
        items = cls.compile(schema.get("items", {}))

        def step(value, name):
            if not isinstance(value, list):
                return value
            if len(value) < fewest:
                raise schema_error(schema, "minItems", name, value, f"'{name}' needs at least {fewest} item(s)")
            if most is not None and len(value) > most:
                raise schema_error(schema, "maxItems", name, value, f"'{name}' has more than {most} items")
            return [(prefix[i] if i < len(prefix) else items)(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return step

    @classmethod
    def object(cls, schema):
        keys = {"properties", "required", "additionalProperties", "propertyNames", "maxProperties"}
        if not keys & set(schema):
            return None
        checks = {key: cls.compile(sub) for key, sub in schema.get("properties", {}).items()}
        known = checks.keys()
        fixed = {key: sub["default"] for key, sub in schema.get("properties", {}).items() if checks[key].fixed_default}
        computed = [(key, checks[key], checks[key].fresh_empty)     # defaults to check, or a new empty one
                    for key, sub in schema.get("properties", {}).items() if "default" in sub and key not in fixed]
        required, most = schema.get("required", ()), schema.get("maxProperties")
        names = cls.compile(schema["propertyNames"]) if "propertyNames" in schema else None
        extra = schema.get("additionalProperties", True)
        extra = cls.compile(extra) if isinstance(extra, dict) else extra

        def step(value, name):
            if not isinstance(value, dict):
                return value
            if most is not None and len(value) > most:
                raise schema_error(schema, "maxProperties", name, value, f"'{name}' has more than {most} entries")
            if names:
                for key in value:
                    names(key, child_name(name, key))
            prefix = f"{name}: " if name else ""
            # the lists made only when there is something in them (every exec's body is checked here)
            unknown = [k for k in value if k not in checks] if not known >= value.keys() else ()
            if unknown and extra is False:
                raise schema_error(schema, "additionalProperties", name, value,
                                   f"{prefix}unknown field(s): {', '.join(sorted(unknown))}")
            missing = [k for k in required if k not in value] if required else ()
            if missing:
                raise schema_error(schema, "required", name, value, f"{prefix}missing required field(s): {', '.join(missing)}")
            out = dict(fixed)
            for key, given in value.items():
                check = checks.get(key)
                if check:
                    out[key] = check(given, f"{name}.{key}" if name else key)
            for key, check, fresh_empty in computed:
                if key not in value:
                    out[key] = fresh_empty() if fresh_empty else check(None, f"{name}.{key}" if name else key)
            for key in unknown:
                out[key] = extra(value[key], child_name(name, key)) if callable(extra) else value[key]
            return out
        return step

    @classmethod
    def check(cls, schema):
        check = schema.get("x-check")
        if check is None:
            return None

        def step(value, name):
            if value is None:
                return value
            try:
                return check(value, name)
            except ApiError as e:      # the schema's own message, if it has one
                raise schema_error(schema, "x-check", name, value, str(e)) from None
        return step


COMPILED_SCHEMAS = {}      # id(schema) -> (schema, its check): the schemas are made once (request_schemas)


def check_schema(value, schema, name=""):
    """`value` checked against `schema` -> the value as used (defaults filled in, x-check's
    result), else ApiError 400 saying what is wrong. `name` is the value's place in the
    request ("vcpus", "network.allowOut[2]"; "" for the whole body)."""
    entry = COMPILED_SCHEMAS.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = COMPILED_SCHEMAS[id(schema)] = (schema, SchemaCompiler.compile(schema))
    return entry[1](value, name)


JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def query_value(key, text, schema):
    """A query parameter's text as the JSON value its schema's type wants: an integer or a
    number written as JSON writes one (1.29e-69, 5.0), else 400; other types: the text."""
    kind = schema.get("type")
    if kind not in ("integer", "number"):
        return text
    number = JSON_NUMBER.fullmatch(text)
    if number is None:
        raise ApiError(400, f"'{key}' must be a{'n' if kind == 'integer' else ''} {kind} (as JSON writes it), "
                            f"not {text[:40]!r}")
    return float(text) if number.group(1) or number.group(2) or len(text) > 20 else int(text)


def check_query(query, params):
    """A query string (parse_qs: name -> [values]) checked against its parameters' schemas
    -> {name: value as used}; an array parameter may repeat, any other is given once."""
    if not query and not params:
        return {}
    unknown = sorted(set(query) - set(params))
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}"
                            + (f" (use {', '.join(params)})" if params else " (this route takes none)"))
    out = {}
    for key, schema in params.items():
        values = query.get(key)
        if values is None:
            if "default" in schema:
                out[key] = schema["default"]
            continue
        if schema.get("type") != "array" and len(values) > 1:
            raise ApiError(400, f"'{key}' may be given once")
        given = values if schema.get("type") == "array" else query_value(key, values[0], schema)
        out[key] = check_schema(given, schema, key)
    return out


def openapi_schema(schema):
    """A schema as the document shows it: x-errors dropped, an x-check named and its docstring
    added to the description."""
    if isinstance(schema, list):
        return [openapi_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "x-errors":
            continue
        if key == "x-check":
            out["x-check"] = value.__name__
            doc = " ".join((value.__doc__ or "").split())
            given = schema.get("description", "")
            out["description"] = f"{given}{'' if given.endswith('.') else '.'} {doc}" if given else doc
        elif key == "description" and "x-check" in schema:
            continue
        elif key in ("properties", "$defs", "dependentSchemas"):
            out[key] = {k: openapi_schema(v) for k, v in value.items()}
        else:
            out[key] = openapi_schema(value)
    return out


# ---- the checks a schema cannot say, and the patterns ----------------------------------------

NO_NUL = "^[^\\u0000]*$"
# the characters of Python's \s (str.isspace) written out: ECMA-262's \s lacks \x1c-\x1f and \x85, has \ufeff
BLANK = "\\t\\n\\v\\f\\r\\x1c-\\x1f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
VM_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
EXEC_TAG_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
EXEC_REF_PATTERN = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"     # an execId or a tag
USER_NAME_PATTERN = "^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}$"
LABEL_KEY_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$"
EXEC_REF_RE = schema_regex(EXEC_REF_PATTERN)
MAX_ARGV = 65536              # arguments of one argv (the kernel's own limit is near 2^21 bytes anyway)
MAX_PIDS_LIMIT = 4194304      # the kernel's largest pid_max
MAX_GRACE_S = 3600.0
MAX_LABELS, MAX_LABEL_VALUE = 32, 255
VM_STATUSES = ("CREATED", "RUNNING", "STOPPED", "FAILED")
MAX_ALLOW_OUT = 64
CALLBACK_METHODS_MAX = 64           # names in a VM's callbackMethods
CALLBACK_METHOD_MAX_CHARS = 128
SIGNAL_NAMES = sorted({n for n in signal.Signals.__members__} | {n[3:] for n in signal.Signals.__members__})


def printable(text, name):
    """Printable characters only (str.isprintable: no control, format or separator characters but space)."""
    if not text.isprintable():
        raise ApiError(400, f"'{name}' must be printable")
    return text


def http_url(url, name):
    """An http:// or https:// URL with a host: a valid IPv6 literal in brackets, and a port of
    at most 65535, if any; "" is none."""
    if url == "":
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port
    except ValueError as e:
        raise ApiError(400, f"{name} has a bad host or port") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{name} must be an http:// or https:// URL")
    return url


# an http(s) URL of RFC 3986's characters (stricter than the server: a client the document guides is never refused)
PORT_PATTERN = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
HTTP_URL_PATTERN = ("^([Hh][Tt][Tt][Pp][Ss]?://([-A-Za-z0-9._~%!\\$&'()*+,;=:]*@)?"
                    "([-A-Za-z0-9._~%!\\$&'()*+,;=]+|\\[[0-9A-Fa-f:.]+\\])"
                    f"(:{PORT_PATTERN}?)?([/?#][!-~]*)?)?$")


def without_duplicates(items, name):
    """Duplicates are dropped (the first of each kept)."""
    return list(dict.fromkeys(items))


OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_CIDR_PATTERN = f"^{OCTET}(\\.{OCTET}){{3}}(/(3[0-2]|[12]?[0-9]))?$"


def ipv4_networks(entries, name):
    """Each an IPv4 network or address in CIDR form, canonical (duplicates dropped). Strict:
    host bits set ("10.0.0.1/8") is an error, not silently the network, since the writer
    may have meant the one address."""
    out = []
    for i, entry in enumerate(entries):
        try:
            net = ipaddress.ip_network(entry if len(entry) <= 64 else "-", strict=True)
        except ValueError as e:
            raise ApiError(400, f"{name}[{i}]: {entry[:64]!r} is not an IPv4 CIDR or address ({e})") from e
        if str(net) not in out:
            out.append(str(net))
    return out


def signal_number(value, name):
    """A signal name (TERM, SIGTERM, term, sigterm) or number (15, "15") -> its number on this
    host's architecture (the guest's), 1..SIGRTMAX."""
    if isinstance(value, str) and not is_decimal(value):
        return int(getattr(signal.Signals, value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()))
    number = int(value)
    if not 1 <= number <= signal.SIGRTMAX:
        raise ApiError(400, f"signal {number} is out of range")
    return number


TERMINAL_SIZE_MAX = 4096
TERM_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"


TTY_RULES = {      # of an exec request: checked only when the field is there (dependentSchemas)
    **{key: {"required": ["tty"], "properties": {"tty": {"enum": [True]}},
             "x-errors": {"*": f"'{key}' needs \"tty\": true"}} for key in ("cols", "rows", "term")},
    "tty": {"anyOf": [{"properties": {"tty": {"enum": [False, None]}}},
                      {"properties": {"stdin": {"enum": ["pipe", None]}}}],
            "x-errors": {"anyOf": "with \"tty\": true the input comes through the attach (or POST .../stdin): "
                                  "'stdin' may only be omitted or \"pipe\""}}}


def decimal_pattern(low, high):
    """A pattern of the decimal numbers low..high (high < 1000), with up to two leading zeros."""
    return f"^0{{0,2}}({'|'.join(str(n) for n in range(high, low - 1, -1))})$"


# ---- the schemas -----------------------------------------------------------------------------

VM_NAME_SCHEMA = {"type": "string", "pattern": VM_NAME_PATTERN, "x-errors": {
    "*": "invalid vmName: use 1-63 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"}}
VM_NAME_RE = IMAGE_NAME_RE = schema_regex(VM_NAME_PATTERN)
IMAGE_NAME_SCHEMA = {"type": "string", "pattern": VM_NAME_PATTERN, "x-errors": {
    "*": "invalid image name: use 1-63 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"}}
EXEC_REF_SCHEMA = {"type": "string", "pattern": EXEC_REF_PATTERN,
                   "description": "an execId, or the tag of an exec (the running one, else the newest finished)"}
LABELS_SCHEMA = {
    "type": ["object", "null"], "default": {}, "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": LABEL_KEY_PATTERN, "x-errors": {
        "*": "bad label key {value}: use 1-63 characters of A-Z a-z 0-9 _ . / - starting with a letter or digit"}},
    "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE, "x-check": printable, "x-errors": {
        "*": "label '{key}' must be a string of at most 255 printable characters"}},
    "x-errors": {"type": "'labels' must be an object mapping keys to string values",
                 "maxProperties": f"too many labels: at most {MAX_LABELS}"}}
CALLBACK_METHODS_SCHEMA = {
    "type": ["array", "null"], "default": None, "maxItems": CALLBACK_METHODS_MAX, "x-check": without_duplicates,
    "description": "the callback methods the VM's guest may call (null: any; []: none)",
    "items": {"type": "string", "minLength": 1, "maxLength": CALLBACK_METHOD_MAX_CHARS, "x-check": printable,
              "x-errors": {"*": f"'callbackMethods' entries must be 1-{CALLBACK_METHOD_MAX_CHARS} printable characters"}},
    "x-errors": {"*": f"'callbackMethods' must be a list of at most {CALLBACK_METHODS_MAX} method names"}}
SIGNAL_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1, "maximum": int(signal.SIGRTMAX)},
              {"type": "string", "pattern": decimal_pattern(1, int(signal.SIGRTMAX))},
              {"type": "string", "enum": SIGNAL_NAMES + [n.lower() for n in SIGNAL_NAMES]}],
    "x-check": signal_number,
    "x-errors": {"*": "unknown signal {value}: use a name such as TERM, KILL, INT, HUP, USR1 "
                      f"or a number 1..{int(signal.SIGRTMAX)}"}}


REQUEST_BODY = {"type": "object", "additionalProperties": False,
                "x-errors": {"type": "request body must be a JSON object"}}
SIGNAL_REQUEST = {**REQUEST_BODY, "required": ["signal"], "properties": {"signal": SIGNAL_SCHEMA}}
STDIN_REQUEST = {
    **REQUEST_BODY, "properties": {
        "data": {"type": ["string", "null"], "default": ""}, "eof": {"type": ["boolean", "null"], "default": False}},
    "anyOf": [{"required": ["data"], "properties": {"data": {"type": "string", "minLength": 1}}},
              {"required": ["eof"], "properties": {"eof": {"enum": [True]}}}],
    "x-errors": {**REQUEST_BODY["x-errors"], "anyOf": "give 'data' to write, 'eof': true to close the input, or both"}}


def lifetime_schema(default, maximum):
    """ttlSeconds / idleTimeoutSeconds: whole seconds, 0 (or null: `default`) = none, within the
    config's maximum (0 = no maximum; with one, none is not allowed either)."""
    if maximum:
        message = "'{name}' must be 1..{maximum} seconds on this server"
        bounds = {"minimum": 1, "maximum": maximum, "x-errors": {"minimum": message, "maximum": message}}
    else:
        bounds = {"minimum": 0, "maximum": FOREVER_S, "x-errors": {
            "minimum": "'{name}' must be a whole number of seconds (0 or null: none)",
            "maximum": "'{name}' must be at most {maximum} seconds"}}
    if maximum and not default:       # none is not allowed, and null would mean none
        return {"type": "integer", **bounds, "description": "whole seconds"}
    return {"type": ["integer", "null"], "default": default, **bounds,
            "description": "whole seconds (0: none; null: the default shown)"}


def network_schema(cfg, require_egress=False):
    """The "network" of a start request or the body of PUT /network. allowOut may be non-empty
    only with allowlist (an empty list is accepted with any mode, so a VM object's network
    can be sent back as it is)."""
    list_error = "network.allowOut must be a list of IPv4 CIDR strings"
    if cfg.firewall:
        egress = {"enum": list(EGRESS_MODES), "x-errors": {
            "enum": f"network.egress must be one of {', '.join(EGRESS_MODES)}, got {{value}}"}}
    else:
        egress = {"enum": ["nat"], "description": "none and allowlist need firewall: true in cbox's config",
                  "x-errors": {"enum": "network.egress {value} needs firewall: true in cbox's config (nat is allowed)"}}
    return {
        "type": "object", "additionalProperties": False, **({"required": ["egress"]} if require_egress else {}),
        "properties": {
            "egress": egress if require_egress else {**egress, "default": cfg.default_egress},
            "allowOut": {"type": ["array", "null"], "default": [], "maxItems": MAX_ALLOW_OUT, "x-check": ipv4_networks,
                         "items": {"type": "string", "pattern": IPV4_CIDR_PATTERN,
                                   "x-errors": {"type": list_error,
                                              "pattern": "{name}: {value} is not an IPv4 CIDR or address "
                                                         "(guests have IPv4 only)"}},
                         "x-errors": {"type": list_error,
                                      "maxItems": f"network.allowOut: at most {MAX_ALLOW_OUT} entries are allowed"}}},
        "anyOf": [{"required": ["egress"], "properties": {"egress": {"enum": ["allowlist"]}}},
                  {"properties": {"allowOut": {"maxItems": 0}}}],
        "x-errors": {"anyOf": "network.allowOut is only allowed with egress 'allowlist' (nat lets everything out, "
                              "none lets nothing out)",
                     "required": "network: missing required field: egress",
                     "type": "network must be an object: {{\"egress\": \"nat\" | \"none\" | \"allowlist\", \"allowOut\": [CIDR]}}"}}


def exec_request_schema(cfg):
    command_error = "'cmd' must be a non-empty string without NUL"
    argv_error = f"'argv' must be a list of 1..{MAX_ARGV} strings without NUL, argv[0] not empty"
    env_error = {"*": "'env' must map variable names to strings without NUL"}
    return {
        "type": "object", "additionalProperties": False,
        "oneOf": [{"required": ["cmd"]}, {"required": ["argv"]}],
        "properties": {
            "cmd": {"type": "string", "pattern": f"^[{BLANK}]*[^{BLANK}\\u0000][^\\u0000]*$",  # not blank, no NUL
                    "description": "a shell command, run as /bin/sh -c cmd",
                    "x-errors": {"pattern": command_error}},
            "argv": {"type": "array", "minItems": 1, "maxItems": MAX_ARGV,
                     "prefixItems": [{"type": "string", "minLength": 1, "pattern": NO_NUL, "x-errors": {"*": argv_error}}],
                     "items": {"type": "string", "pattern": NO_NUL, "x-errors": {"*": argv_error}},
                     "description": "a program and its arguments, run without a shell", "x-errors": {"*": argv_error}},
            "blocking": {"type": ["boolean", "null"], "default": True},
            "stream": {"type": ["boolean", "null"], "default": False,
                       "description": "answer with the exec's events (application/x-ndjson or text/event-stream)"},
            "timeout": {"type": ["number", "null"], "default": cfg.exec_timeout_s, "exclusiveMinimum": 0,
                        "maximum": cfg.exec_max_timeout_s, "description": "seconds",
                        "x-errors": {"*": "'timeout' must be more than 0 and at most {maximum:g} seconds",
                                     "type": "'timeout' must be a number"}},
            "env": {"type": ["object", "null"], "default": {},
                    "propertyNames": {"minLength": 1, "pattern": "^[^=\\u0000]*$", "x-errors": env_error},
                    "additionalProperties": {"type": "string", "pattern": NO_NUL, "x-errors": env_error}},
            "cwd": {"type": ["string", "null"], "pattern": NO_NUL, "x-errors": {"pattern": "'cwd' must not contain NUL"}},
            "stdin": {"type": ["string", "null"],
                      "description": "the input (written, then closed), or exactly \"pipe\": kept open for POST .../stdin"},
            "user": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2 ** 32 - 2},
                               {"type": "string", "pattern": USER_NAME_PATTERN}, {"type": "null"}],
                     "description": "a user name or uid of the guest (unknown to the guest: 400)",
                     "x-errors": {"*": "'user' must be a user name (up to 64 of A-Z a-z 0-9 _ . -) or a uid 0..4294967294"}},
            "tag": {"type": ["string", "null"], "pattern": EXEC_TAG_PATTERN, "x-errors": {
                "pattern": "'tag' must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"}},
            "memoryLimitMb": {"type": ["integer", "null"], "minimum": 1, "maximum": cfg.max_memory_mb},
            "pidsLimit": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_PIDS_LIMIT},
            "tty": {"type": ["boolean", "null"], "default": False,
                    "description": "run the command on a pseudo-terminal of its own (GET .../attach: a WebSocket to it)"},
            "cols": {"type": ["integer", "null"], "minimum": 1, "maximum": TERMINAL_SIZE_MAX,
                     "description": "the terminal's width (with tty; default 80)"},
            "rows": {"type": ["integer", "null"], "minimum": 1, "maximum": TERMINAL_SIZE_MAX,
                     "description": "the terminal's height (with tty; default 24)"},
            "term": {"type": ["string", "null"], "pattern": TERM_PATTERN, "x-errors": {
                "pattern": "'term' must be 1-64 characters of A-Z a-z 0-9 _ . + - starting with a letter or digit"},
                "description": "TERM of the command (with tty; default xterm-256color)"}},
        "dependentSchemas": TTY_RULES,
        "x-errors": {"type": "request body must be a JSON object",
                     "oneOf": "give exactly one of 'cmd' (a shell command) and 'argv' (a list of strings)"}}


def build_request_schemas(cfg):
    size_error = "{name} must be {minimum}..{maximum}"
    return {
        "StartRequest": {**REQUEST_BODY, "required": ["vmName"], "properties": {
            "vmName": VM_NAME_SCHEMA,
            "callbackUrl": {"type": ["string", "null"], "default": None, "maxLength": 2048,
                            "pattern": HTTP_URL_PATTERN, "x-check": http_url, "x-errors": {
                                "maxLength": "callbackUrl must be an http:// or https:// URL",
                                "pattern": "callbackUrl must be an http:// or https:// URL"}},
            "callbackMethods": CALLBACK_METHODS_SCHEMA,
            "vcpus": {"type": ["integer", "null"], "default": cfg.default_vcpus, "minimum": 1, "maximum": cfg.max_vcpus,
                      "x-errors": {"minimum": size_error, "maximum": size_error}},
            "memoryMb": {"type": ["integer", "null"], "default": cfg.default_memory_mb, "minimum": 64,
                         "maximum": cfg.max_memory_mb, "x-errors": {"minimum": size_error, "maximum": size_error}},
            "network": {**network_schema(cfg), "type": ["object", "null"], "default": {}},
            "image": {**IMAGE_NAME_SCHEMA, "type": ["string", "null"], "default": "default",
                      "description": "the guest image (GET /v1/images)"},
            "diskMb": {"type": ["integer", "null"], "default": cfg.stateful_size_in_mb,
                       "minimum": min(64, cfg.stateful_size_in_mb),
                       "maximum": cfg.max_disk_mb or cfg.stateful_size_in_mb,
                       "description": "the VM's stateful disk (its writable layer), MiB",
                       "x-errors": {"minimum": size_error, "maximum": size_error}},
            "ttlSeconds": lifetime_schema(cfg.default_ttl_s or cfg.max_ttl_s, cfg.max_ttl_s),
            "idleTimeoutSeconds": lifetime_schema(cfg.default_idle_timeout_s or cfg.max_idle_timeout_s,
                                                  cfg.max_idle_timeout_s),
            "labels": LABELS_SCHEMA}},
        "ExecRequest": exec_request_schema(cfg),
        "SignalRequest": SIGNAL_REQUEST,
        "StdinRequest": STDIN_REQUEST,
        "TtlRequest": {**REQUEST_BODY, "required": ["ttlSeconds"], "properties": {
            "ttlSeconds": lifetime_schema(0, cfg.max_ttl_s)}},
        "NetworkRequest": network_schema(cfg, require_egress=True),
    }


REQUEST_SCHEMAS = weakref.WeakKeyDictionary()      # Config -> its request schemas (request_schemas)


def request_schemas(cfg):
    """The request bodies' schemas for this config (its bounds and defaults in them), made once."""
    schemas = REQUEST_SCHEMAS.get(cfg)
    if schemas is None:
        schemas = REQUEST_SCHEMAS[cfg] = build_request_schemas(cfg)
    return schemas


# the query parameters of the routes that take some
VM_FILTER_QUERY = {
    "label": {"type": "array", "items": {"type": "string", "pattern": LABEL_KEY_PATTERN[:-1] + "(=[\\s\\S]*)?$",
                                         "x-errors": {"*": "bad label filter {value}: use label=KEY=VALUE or label=KEY"}},
              "description": "KEY=VALUE (the label has that value) or KEY (the VM has the label); all must match"},
    "status": {"type": "array", "items": {"enum": list(VM_STATUSES) + [s.lower() for s in VM_STATUSES],
                                          "x-errors": {"*": f"bad status filter: use one of {', '.join(VM_STATUSES)}"}},
               "description": "VMs in any of these statuses"},
    "image": {"type": "array", "items": IMAGE_NAME_SCHEMA, "description": "VMs of any of these images"}}
EVENTS_MAX_WAIT_S = 60.0       # longest ?wait= of GET /v1/events
EVENTS_QUERY = {
    "since": {"type": "integer", "minimum": 0, "maximum": 2 ** 53, "default": 0,
              "description": "the events after this id (the `next` of the previous answer)"},
    "wait": {"type": "number", "minimum": 0, "maximum": EVENTS_MAX_WAIT_S, "default": 0.0,
             "description": "seconds to wait for an event when there is none yet"}}
STREAM_QUERY = {"since": {"type": "integer", "minimum": 0, "maximum": 2 ** 53,
                          "description": "the first event's seq (default 0, or Last-Event-ID + 1)"}}
KILL_QUERY = {"grace": {"type": "number", "minimum": 0, "maximum": MAX_GRACE_S, "default": 0.0,
                        "description": "seconds between SIGTERM and SIGKILL (0: SIGKILL at once)"}}


# ---- the validators the REST handlers call -----------------------------------------------------

def check_vm_name(name):
    if name.__class__ is str and VM_NAME_RE.search(name):    # VM_NAME_SCHEMA's whole check, at once
        return name                                               # (one per request naming a VM)
    return check_schema(name, VM_NAME_SCHEMA, "vmName")


def check_exec_id(exec_id):
    """An exec named in a path: its execId or its tag."""
    if not EXEC_REF_RE.search(exec_id):
        raise ApiError(404, f"exec '{exec_id}' not found")
    return exec_id


LIFETIME_SCHEMAS = {}        # maximum -> the schema of lifetime_seconds


def lifetime_seconds(value, key, maximum):
    """A ttlSeconds / idleTimeoutSeconds value (lifetime_schema) within `maximum` (0: none)."""
    schema = LIFETIME_SCHEMAS.setdefault(maximum, {**lifetime_schema(None, maximum), "type": "integer"})
    return check_schema(value, schema, key)


def expires_at(ttl_seconds):
    """The expiresAt of a VM whose TTL (0: none) starts now."""
    return utc_text(time.time() + ttl_seconds) if ttl_seconds else None


def check_labels(labels):
    return check_schema(labels, LABELS_SCHEMA, "labels")


def check_callback_methods(value):
    """A VM's callbackMethods: None (every method may be called) or a list of method names,
    without duplicates; [] allows none."""
    return check_schema(value, CALLBACK_METHODS_SCHEMA, "callbackMethods")


def check_network(network, cfg, require_egress=False):
    """The "network" object of a start request or PUT /network -> the policy as stored and
    shown, {"egress", "allowOut"} (network_schema)."""
    schemas = request_schemas(cfg)
    schema = schemas["NetworkRequest"] if require_egress else schemas["StartRequest"]["properties"]["network"]
    return check_schema(network, schema, "network")


def start_spec(request):
    """A checked start request (StartRequest) -> the spec VMManager.start takes: its deadline as expiresAt."""
    spec = {k: v for k, v in request.items() if k not in ("ttlSeconds", "idleTimeoutSeconds")}
    return {**spec, "expiresAt": expires_at(request["ttlSeconds"]),
            "idleTimeoutSeconds": request["idleTimeoutSeconds"] or None}


def validate_start_request(body, cfg):
    return start_spec(check_schema(body, request_schemas(cfg)["StartRequest"]))


def parse_vm_filter(query):
    """The filter of GET / DELETE /v1/vms (VM_FILTER_QUERY): label=K=V (or label=K: has the key)
    any number of times (at most QUERY_PARAMS_MAX parameters in all; repeats count once) and
    status=S and image=I (any number of each: any of them), all of which must match. Returns a
    predicate on VMs."""
    args = check_query(query, VM_FILTER_QUERY)
    wanted = list(dict.fromkeys((key, value if eq else None)
                                for key, eq, value in (i.partition("=") for i in args.get("label", []))))
    statuses = {s.upper() for s in args.get("status", [])}
    images = set(args.get("image", []))

    def matches(vm):
        return (not statuses or vm.status in statuses) and (not images or vm.image in images) and all(
            key in vm.labels and (value is None or vm.labels[key] == value) for key, value in wanted)
    return matches


def exec_parts(request, cfg):
    """A checked exec request (ExecRequest) -> (agent request body, blocking, timeout, stream)."""
    stream = request["stream"]
    blocking = request["blocking"] and not stream
    # the request's fields but null ones, in its order, then blocking, maxOutput (and keepaliveS)
    agent_body = dict(request)
    del agent_body["stream"], agent_body["blocking"]
    if None in agent_body.values():    # a field given as null (the usual request has none)
        agent_body = {k: v for k, v in agent_body.items() if v is not None}
    if not request["tty"]:
        agent_body.pop("tty", None)    # an agent older than terminals knows no tty
    if blocking is not None:
        agent_body["blocking"] = blocking
    agent_body["maxOutput"] = cfg.exec_output_limit_bytes
    if stream:
        agent_body["keepaliveS"] = cfg.stream_keepalive_s
    return agent_body, blocking, request["timeout"], stream


def usual_exec_check(schema):
    """ExecRequest's check (`schema`) for the usual exec body, {"cmd": "..."} alone: a function
    giving what check_schema gives for such a body, at a fraction of its cost (every exec's
    path), and None for any other body (check_schema's to check)."""
    command = schema_regex(schema["properties"]["cmd"]["pattern"])
    template = check_schema({"cmd": "true"}, schema)
    fresh = [(key, value.__class__) for key, value in template.items() if isinstance(value, (dict, list))]
    assert not any(template[key] for key, _ in fresh), "a default that is a non-empty dict or list"

    def check(value):
        if value.__class__ is dict and len(value) == 1:
            cmd = value.get("cmd")
            if cmd.__class__ is str and command.search(cmd):
                checked = dict(template)
                checked["cmd"] = cmd
                for key, empty in fresh:       # a new {} each time, as check_schema makes one
                    checked[key] = empty()
                return checked
        return None
    return check


def validate_exec_request(body, cfg):
    """Check an exec request; returns (agent request body, blocking, timeout, stream)."""
    return exec_parts(check_schema(body, request_schemas(cfg)["ExecRequest"]), cfg)


JSON_SCAN = json.JSONDecoder().scan_once     # json.loads's own scanner, without its Python wrappers


def parse_json_body(data):
    if not data:
        raise ApiError(400, "request body must be a JSON object")
    if data[:1] == b"{" and data[-1:] == b"}":    # the usual body: json.loads's result, on its fast path
        try:     # (no BOM, UTF-8 as json.detect_encoding finds, no whitespace around it; else as json.loads)
            text = data.decode("utf-8", "surrogatepass")
            value, end = JSON_SCAN(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError, RecursionError):
            pass         # json.loads below says what is wrong
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from e
    except RecursionError as e:
        raise ApiError(400, "malformed JSON: nested too deeply") from e


# ---- guest images: the named images a start chooses (images_dir) ----------------------------

IMAGE_JSON = "image.json"
IMAGE_JSON_MAX_BYTES = 64 * 1024
IMAGE_FILES = ("rootfs.ext4", "vmlinuz", "initramfs.cpio.gz")     # what rootfs/build.py publishes besides image.json
EXT4_MAGIC_OFFSET, EXT4_MAGIC = 1024 + 0x38, b"\x53\xef"         # the superblock's s_magic
DEFAULT_IMAGE = "default"


def read_image_json(directory):
    """An image directory's image.json as a dict, or None (missing, too big, not a JSON object)."""
    try:
        with open(Path(directory, IMAGE_JSON), "rb") as f:
            data = f.read(IMAGE_JSON_MAX_BYTES + 1)
        meta = json.loads(data) if len(data) <= IMAGE_JSON_MAX_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def is_ext4(path):
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            return f.read(2) == EXT4_MAGIC
    except OSError:
        return False


class Image:
    """One guest image: its boot files and its image.json (meta; None for a config rootfs made
    before image directories, which is then taken as it is)."""

    def __init__(self, name, rootfs, kernel, initramfs, meta):
        self.name, self.rootfs, self.kernel, self.initramfs, self.meta = name, rootfs, kernel, initramfs, meta

    def agent(self):
        agent = (self.meta or {}).get("agent")
        return agent if isinstance(agent, dict) else {}

    def problem(self):
        """Why a VM cannot start from this image, or None."""
        if self.meta is None:
            return None
        if not os.path.isfile(self.rootfs):
            return f"its rootfs {self.rootfs} is missing"
        if not is_ext4(self.rootfs):
            return f"its rootfs {self.rootfs} is not an ext4 file system"
        for path in (self.kernel, self.initramfs):
            if path and not os.path.isfile(path):
                return f"its {path} is missing"
        protocol = self.agent().get("protocol")
        if not isinstance(protocol, int) or protocol < AGENT_PROTOCOL:
            return (f"its guest agent (version {self.agent().get('version') or 'unknown'}, protocol "
                    f"{protocol if isinstance(protocol, int) else 'unknown'}) is older than this cbox.py "
                    f"needs (protocol {AGENT_PROTOCOL})")
        return None

    def stamp(self):
        """Which build of the image this is: image.json's builtAt, else (a rootfs of before
        images) its file's inode (a rebuild renames a new file in); None when it is missing."""
        if self.meta is not None:
            return str(self.meta.get("builtAt"))
        try:
            return f"inode {os.stat(self.rootfs).st_ino}"
        except OSError:
            return None

    def rebuild_hint(self):
        """The make command that builds this image again (with this checkout's guest_agent.py)."""
        source = (self.meta or {}).get("source")
        dockerfile = source.get("dockerfile") if isinstance(source, dict) else None
        return ("make images" if self.name == DEFAULT_IMAGE else f"make image NAME={self.name}") + \
            (f" DOCKERFILE={dockerfile}" if isinstance(dockerfile, str) else "")

    def api(self, vms, pooled):
        """The image as GET /v1/images shows it (IMAGE_SCHEMA)."""
        meta, agent = self.meta or {}, self.agent()
        problem = self.problem()
        try:
            size = os.stat(self.rootfs).st_size
        except OSError:
            size = None
        return {"name": self.name, "sizeBytes": size, "builtAt": meta.get("builtAt"),
                "source": meta.get("source"), "agentVersion": agent.get("version"),
                "agentProtocol": agent.get("protocol"), "rootfs": self.rootfs,
                "ownKernel": bool(meta.get("kernel") or meta.get("initramfs")),
                "usable": problem is None, "problem": problem and f"{problem}; rebuild it: {self.rebuild_hint()}",
                "vms": vms, "pooled": pooled}


class Images:
    """The guest images (issue 20): images_dir/NAME/ holding rootfs.ext4 and image.json, made by
    rootfs/build.py (`make image NAME=...`), and "default": the config's kernel, initramfs and
    rootfs (its image.json read beside the rootfs's real path: out/rootfs.ext4 links to
    out/images/default/rootfs.ext4). Read at each use, never cached: a rebuild replaces an
    image's files by renames while cbox.py runs (a VM on the old file keeps it)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = Path(cfg.path(cfg.images_dir))

    def names(self):
        found = {DEFAULT_IMAGE}
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dir):
                if IMAGE_NAME_RE.search(entry.name) and os.path.isfile(os.path.join(entry.path, IMAGE_JSON)):
                    found.add(entry.name)
        return sorted(found)

    def get(self, name):
        """The image of that name, or None."""
        cfg = self.cfg
        if name == DEFAULT_IMAGE:
            rootfs = cfg.path(cfg.rootfs)
            real = os.path.realpath(rootfs)
            meta = read_image_json(os.path.dirname(real)) if os.path.basename(real) == IMAGE_FILES[0] else None
            return Image(name, rootfs, cfg.path(cfg.kernel), cfg.path(cfg.initramfs) or None, meta)
        directory = self.dir / name
        meta = read_image_json(directory) if IMAGE_NAME_RE.search(name) else None
        if meta is None:
            return None
        return Image(name, str(directory / IMAGE_FILES[0]),
                     str(directory / IMAGE_FILES[1]) if meta.get("kernel") else cfg.path(cfg.kernel),
                     str(directory / IMAGE_FILES[2]) if meta.get("initramfs") else cfg.path(cfg.initramfs) or None,
                     meta)

    def for_start(self, name):
        """The image a start request names, checked: ApiError 400 for an unknown name (listing the
        known ones), 409 for an image a VM cannot start from (saying how to rebuild it)."""
        image = self.get(name)
        if image is None:
            known = self.names()
            raise ApiError(400, f"unknown image '{name}': the images are {', '.join(known)}", images=known)
        problem = image.problem()
        if problem:
            raise ApiError(409, f"image '{name}' cannot start a VM: {problem}; rebuild it: {image.rebuild_hint()}")
        return image

    def remove(self, name):
        """Remove an image's directory (the caller checked no VM uses it): its image.json first,
        so that it is gone for new starts at once. ApiError 409 while a build of it runs."""
        directory = self.dir / name
        fd = os.open(directory / ".build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ApiError(409, f"image '{name}' is being built (make image); remove it after") from None
            for file in (IMAGE_JSON, *IMAGE_FILES, ".build.lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / file)
            for leftover in directory.glob("*.tmp"):        # of a build that died
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            directory.rmdir()                    # files someone else put there stay, with it


# =============================================================================
# 8. Callback bridge (guest -> vsock socket -> cbox -> callbackUrl)
# =============================================================================

CALLBACK_LINE_MAX = 1024 * 1024
CALLBACK_PARSE_OFF_LOOP = 64 * 1024     # lines (and answers) above this are parsed in a thread
CALLBACK_REFUSAL_PAUSE = 0.1            # a connection refused a callback (rate, in flight) waits this long
CALLBACK_EVENTS_PER_S = 1.0             # callback.failed events a second per VM (burst of 10); more are counted
CALLBACK_COUNTERS = ("connections", "callbacks", "refused_connections", "refused_fd_reserve", "refused_in_flight",
                     "refused_rate", "refused_method", "throttled_bytes", "idle_timeouts", "read_timeouts",
                     "write_timeouts", "oversize_lines", "bad_requests", "accept_errors", "log_lines_suppressed")
CALLBACK_TOTALS = dict.fromkeys(CALLBACK_COUNTERS, 0)   # the same counts over all VMs since cbox.py started
CALLBACK_REQUEST_FIELDS = {"method", "params", "execId"}


def parse_callback_line(line, vm_name):
    """A guest's request line -> (method, body bytes for the callback URL) or (None, error text).

    Pure, so large lines can be parsed in a thread; every parse or encode failure
    (RecursionError included: params may nest deeper than the encoder recurses) is an answer.
    An "execId" (the calling command's CBOX_EXEC_ID, set by the guest agent) is passed on."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("method"), str) or not request["method"]:
            return None, "callback request must be an object with a non-empty string 'method'"
        if set(request) - CALLBACK_REQUEST_FIELDS:
            return None, f"unknown callback request field(s): {', '.join(sorted(set(request) - CALLBACK_REQUEST_FIELDS))}"
        body = {"vmName": vm_name, "method": request["method"], "params": request.get("params")}
        if "execId" in request:
            exec_id = request["execId"]
            if not isinstance(exec_id, str) or not EXEC_REF_RE.match(exec_id):
                return None, "callback request 'execId' must be 1-64 characters of A-Z a-z 0-9 _ . - (not a leading .)"
            body["execId"] = exec_id
        return request["method"], json_bytes(body)
    except RecursionError:
        return None, "callback request is nested too deeply"
    except (ValueError, UnicodeDecodeError):
        return None, "callback request is not valid JSON"


def answer_text(value):
    try:
        return json.dumps(value)
    except (RecursionError, ValueError):
        return "(error value nested too deeply)"


def callback_reply(url, status, data):
    """The callback URL's answer -> the guest's reply line (bytes, newline included)."""
    if not 200 <= status < 300:
        snippet = data[:200].decode("utf-8", "replace").strip()
        reply = {"error": f"callback URL {url} answered HTTP {status}" + (f": {snippet}" if snippet else "")}
    else:
        try:
            answer = json.loads(data)
        except RecursionError:
            reply = {"error": f"callback URL {url} answered JSON too deeply nested to parse"}
        except (ValueError, UnicodeDecodeError):
            reply = {"result": data.decode("utf-8", "replace")}
        else:
            if isinstance(answer, dict) and "result" in answer:
                reply = {"result": answer["result"]}
            elif isinstance(answer, dict) and "error" in answer:
                err = answer["error"]
                reply = {"error": err if isinstance(err, str) else answer_text(err)}
            else:
                reply = {"result": answer}
    try:
        return json_bytes(reply) + b"\n"
    except (RecursionError, ValueError):
        return json_bytes({"error": f"callback URL {url} answered JSON too deeply nested to pass on"}) + b"\n"


def error_line(message):
    return json_bytes({"error": message}) + b"\n"


def no_callback_url_line(vm_name):
    """The reply to a callback of a VM without a callbackUrl."""
    return error_line(f"VM '{vm_name}' has no callbackUrl")


def close_socket(loop, sock):
    """Close a socket used with loop.sock_*(): their cleanup (remove_reader of the fd) runs
    later, when the fd may already belong to a new transport, which makes asyncio raise
    RuntimeError there; removing the reader and writer now turns that cleanup into a no-op."""
    fd = sock.fileno()
    if fd >= 0:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
    sock.close()


FD_LIMIT = [None]


def raise_fd_limit():
    """Soft RLIMIT_NOFILE up to the hard limit: guests' connections must not run cbox.py out
    of descriptors at a distribution's default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log("cannot raise the file descriptor limit", soft=soft, hard=hard, error=repr(str(e)))
    FD_LIMIT[0] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FD_LIMIT[0]


def fd_limit():
    if FD_LIMIT[0] is None:
        FD_LIMIT[0] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FD_LIMIT[0]


def cpu_timed(fn, *args):
    """(fn(*args), the CPU seconds it took on this thread): what work a guest chose cost."""
    t0 = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - t0


async def off_loop_if_large(size, fn, *args):
    """fn(*args), in a thread when `size` bytes would keep the event loop busy for long."""
    if size > CALLBACK_PARSE_OFF_LOOP:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


class CallbackBridge:
    """One VM's callback socket: the guest's JSON lines in, the callback URL's answers out.

    The guest is hostile, so everything it can make cbox.py spend is budgeted per VM
    (config keys callback_*): open connections, callbacks in flight, callbacks and
    bytes a second, idle / read / write time per connection, log lines a second.
    Over a budget the guest gets an error line at once and nothing is forwarded. Each
    connection, line (with its reply) and log line also draws on the VM's fair share of
    GUEST_WORK: when all VMs together want more, a connection reads its next line only
    when its VM's turn comes (the guest's further lines wait in the kernel's buffer).
    The socket is accepted here rather than by asyncio's server, so a full fd table
    (EMFILE) backs off quietly instead of logging a traceback per attempt, and the
    last `fd_reserve` descriptors stay free for the API and the other VMs.
    `counters` counts every budget hit (logged at close), CALLBACK_TOTALS the same over
    all VMs (exported as cbox_callback_bridge_events_total). Failed callbacks are
    published as callback.failed events, at most CALLBACK_EVENTS_PER_S a second per VM: a
    guest calling a dead URL in a loop must not wash the other VMs' events out of the ring."""

    url_clients = {}       # (scheme, host, port) -> HttpClient, shared by every VM's bridge

    def __init__(self, cfg, vm):
        self.cfg, self.vm = cfg, vm
        self.counters = dict.fromkeys(CALLBACK_COUNTERS, 0)
        self.tasks = set()                 # one per open connection
        self.in_flight = 0
        self.calls = TokenBucket(cfg.callback_rate_per_s, max(1.0, cfg.callback_rate_per_s))
        self.bytes = TokenBucket(cfg.callback_bytes_per_s, max(cfg.callback_bytes_per_s, CALLBACK_LINE_MAX + 1))
        self.log_lines = TokenBucket(cfg.callback_log_lines_per_s, max(1.0, cfg.callback_log_lines_per_s))
        self.suppressed = 0
        self.failure_events = TokenBucket(CALLBACK_EVENTS_PER_S, 10.0)
        self.events_suppressed = 0
        self.listener = None
        self.accepting = None

    # ---- listening and admission ----------------------------------------------

    def listen(self, path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.listener = sock
        self.accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self):
        loop = asyncio.get_running_loop()
        backoff = 0.01
        while True:
            try:
                conn, _ = await loop.sock_accept(self.listener)
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN):
                    continue
                # EMFILE / ENFILE / ENOBUFS / ENOMEM: wait for descriptors or memory to come back
                self.count("accept_errors")
                self.note("callback socket cannot accept", error=repr(os.strerror(e.errno) if e.errno else str(e)),
                          retry_s=f"{backoff:g}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.01
            # sock_accept does not yield while connections are pending: yield here, and after a
            # refusal pause, so a guest reconnecting in a loop gets ~100 refusals a second and
            # never holds the loop. Its further connects wait in the backlog: Cloud Hypervisor
            # connects for the guest with a blocking connect() (virtio-devices/src/vsock/unix/
            # muxer.rs, handle_peer_request_pkt), so only that VM's own vsock device waits.
            await asyncio.sleep(0 if self._admit(conn) else 0.01)
            await GUEST_WORK.take(self.vm, FairShare.ITEM)

    def _admit(self, conn):
        """Start serving a new connection, or answer it with an error line and close it."""
        if conn.fileno() >= fd_limit() - self.cfg.fd_reserve:
            reason, counter = "cbox.py is short of file descriptors", "refused_fd_reserve"
        elif len(self.tasks) >= self.cfg.callback_max_connections:
            reason = f"too many open callback connections (at most {self.cfg.callback_max_connections} per VM)"
            counter = "refused_connections"
        else:
            self.count("connections")
            task = asyncio.get_running_loop().create_task(self._connection(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return True
        self.count(counter)
        self.note("callback connection refused", reason=repr(reason))
        with contextlib.suppress(OSError):
            conn.send(error_line(reason))          # a fresh socket's buffer takes one short line
        conn.close()
        return False

    def close(self):
        if self.accepting:
            self.accepting.cancel()
            self.accepting = None
        if self.listener:
            close_socket(asyncio.get_running_loop(), self.listener)
            self.listener = None
        for task in list(self.tasks):
            task.cancel()
        if any(self.counters[k] for k in CALLBACK_COUNTERS[2:]) or self.suppressed:
            log("callback budgets", vm=self.vm.vmName, suppressed=self.suppressed or None,
                **{k: v for k, v in self.counters.items() if v})

    def count(self, counter):
        self.counters[counter] += 1
        CALLBACK_TOTALS[counter] += 1

    @staticmethod
    def export_counters():
        """CALLBACK_TOTALS into cbox_callback_bridge_events_total (on scrape)."""
        for key, value in CALLBACK_TOTALS.items():
            M_CALLBACK_BRIDGE.labels(key).value = value

    def note(self, msg, **fields):
        """A log line, at most callback_log_lines_per_s a second per VM; the rest are counted."""
        if not self.log_lines.take():
            self.suppressed += 1
            self.count("log_lines_suppressed")
            return
        log(msg, vm=self.vm.vmName, suppressed=self.suppressed or None, **fields)
        GUEST_WORK.charge(self.vm, FairShare.ITEM)
        self.suppressed = 0

    # ---- one connection ---------------------------------------------------------

    async def _connection(self, sock):
        """JSON lines in, JSON lines out, in order, one callback at a time per connection."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            while True:
                line = await self._read_line(loop, sock, buf)
                if line is None:
                    return
                reply, refused, parse_s = await self._answer(line)
                try:
                    await within(self.cfg.callback_write_timeout_s, loop.sock_sendall(sock, reply))
                except asyncio.TimeoutError:
                    self.count("write_timeouts")
                    self.note("callback connection closed: the guest does not read its replies")
                    return
                # sock_recv and sock_sendall finish without yielding when they can: a guest
                # pipelining lines that are answered at once (errors) must not hold the loop;
                # after a refusal the connection waits, so refusing costs little too
                await asyncio.sleep(CALLBACK_REFUSAL_PAUSE if refused else 0)
                await GUEST_WORK.take(self.vm, FairShare.CALLBACK + len(line) + len(reply)
                                      + GUEST_WORK.units(parse_s))
        except OSError:
            pass
        finally:
            close_socket(loop, sock)

    async def _read_line(self, loop, sock, buf):
        """The next non-blank line (bytes), or None when the connection is to close.

        Reads only what a line may hold (so a guest pins at most CALLBACK_LINE_MAX
        bytes per connection; what it pipelines waits in the kernel's buffer), at the
        VM's byte rate, within the idle timeout before a line and the read timeout
        during one."""
        scanned, deadline = 0, None
        while True:
            end = buf.find(b"\n", scanned)
            if end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                if line.strip():
                    return line
                scanned, deadline = 0, None
                continue
            scanned = len(buf)
            if scanned > CALLBACK_LINE_MAX:
                self.count("oversize_lines")
                await self._send_final(loop, sock, error_line("callback request larger than 1 MiB"))
                return None
            if scanned and deadline is None:
                deadline = loop.time() + self.cfg.callback_read_timeout_s
            timeout = self.cfg.callback_idle_timeout_s if deadline is None else deadline - loop.time()
            pause = self.bytes.wait()
            if pause:
                self.count("throttled_bytes")
                await asyncio.sleep(pause)
            want = min(256 * 1024, CALLBACK_LINE_MAX + 1 - scanned)
            try:
                data = await within(max(timeout, 0.0), loop.sock_recv(sock, want))
            except asyncio.TimeoutError:
                what = "idle_timeouts" if deadline is None else "read_timeouts"
                self.count(what)
                if deadline is not None:
                    await self._send_final(loop, sock, error_line(
                        f"callback request not received within {fmt_seconds(self.cfg.callback_read_timeout_s)}"))
                return None
            if not data:
                return bytes(buf) if buf.strip() else None
            self.bytes.charge(len(data))
            buf += data

    async def _send_final(self, loop, sock, data):
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await within(self.cfg.callback_write_timeout_s, loop.sock_sendall(sock, data))

    async def _answer(self, line):
        """(reply line, refused, CPU seconds its parse took) for one request line, within the
        VM's rate and in-flight budgets (a line of dense JSON costs far more than its bytes)."""
        t0 = time.monotonic()
        if not self.calls.take():
            self.count("refused_rate")
            CALLBACK_OUTCOMES["refused"].inc()
            self.note("callback refused", reason="rate")
            return (error_line(f"too many callbacks (at most {self.cfg.callback_rate_per_s:g} a second per VM)"), True,
                    0.0)
        if self.in_flight >= self.cfg.callback_max_in_flight:
            self.count("refused_in_flight")
            CALLBACK_OUTCOMES["refused"].inc()
            self.note("callback refused", reason="in_flight")
            return (error_line(f"too many callbacks in flight (at most {self.cfg.callback_max_in_flight} per VM)"),
                    True, 0.0)
        self.in_flight += 1
        try:
            self.count("callbacks")
            (method, body), parse_s = await off_loop_if_large(len(line), cpu_timed, parse_callback_line, line,
                                                              self.vm.vmName)
            if method is None:
                self.count("bad_requests")
                CALLBACK_OUTCOMES["bad_request"].inc()
                return error_line(body), False, parse_s
            if not self.method_allowed(method):
                CALLBACK_OUTCOMES["refused"].inc()
                return (error_line(f"callback method {method[:60]!r} is not in this VM's callbackMethods"), False,
                        parse_s)
            callback_id = uuid.uuid4().hex
            t1 = time.monotonic()
            reply = await self.forward(body, callback_id)
        finally:
            self.in_flight -= 1
            self.vm.touch()              # a callback is activity (idleTimeoutSeconds)
        ok = not reply.startswith(b'{"error"')
        self.note("callback", method=log_word(method[:60]), id=callback_id, ok=ok,
                  ms=f"{(time.monotonic() - t0) * 1000:.1f}")
        if not self.vm.callbackUrl:
            CALLBACK_OUTCOMES["no_url"].inc()
        else:
            M_CALLBACK_DURATION.observe(time.monotonic() - t1)
            CALLBACK_OUTCOMES["ok" if ok else "error"].inc()
        if not ok:
            self.publish_failure(method, reply)
        return reply, False, parse_s

    def method_allowed(self, method):
        """Whether the VM's callbackMethods (None: all) allow the method; a refusal is counted."""
        allowed = self.vm.callbackMethods
        if allowed is None or method in allowed:
            return True
        self.count("refused_method")
        self.note("callback refused", reason="method", method=log_word(method[:60]))
        return False

    def publish_failure(self, method, reply):
        """A callback.failed event (within the VM's events budget) with the guest's error text."""
        if not self.failure_events.take():
            self.events_suppressed += 1
            M_EVENTS_SUPPRESSED.inc()
            return
        try:
            error = json.loads(reply)["error"] if len(reply) <= 64 * 1024 else "(error text over 64 KiB)"
        except (ValueError, KeyError, TypeError, RecursionError):
            error = "(unreadable error)"
        fields = {"suppressed": self.events_suppressed} if self.events_suppressed else {}
        self.events_suppressed = 0
        EVENTS.publish("callback.failed", self.vm.vmName, method=method[:200], error=str(error)[:1000], **fields)

    async def forward(self, body, callback_id):
        url = self.vm.callbackUrl
        if not url:
            return no_callback_url_line(self.vm.vmName)
        parts = urllib.parse.urlsplit(url)
        client = self.callback_client(parts)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = await off_loop_if_large(len(body), callback_headers, self.cfg.callback_secret,
                                          self.vm.vmName, body, callback_id)
        try:
            status, _, data = await client.request("POST", target, body, timeout=self.cfg.callback_timeout_s,
                                                   headers=headers)
        except HttpError as e:
            return error_line(f"callback URL {url} failed: {e}")
        return await off_loop_if_large(len(data), callback_reply, url, status, data)

    def callback_client(self, parts):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port)
        client = self.url_clients.get(key)
        if client is None:
            client = HttpClient(host=parts.hostname, port=port, tls=parts.scheme == "https",
                                max_body=16 * 1024 * 1024, quick_ack=True)
            self.url_clients[key] = client
        return client

    @classmethod
    def close_url_clients(cls):
        for client in cls.url_clients.values():
            client.close()
        cls.url_clients.clear()


METRICS.on_scrape("callback_bridges", CallbackBridge.export_counters)


# The fair share's yardstick: what a unit of guest work costs this host's loop. Hosts differ
# several fold (Python's speed, syscalls' cost), so a fixed number of units a second would
# be a tenth of a core on one host and a third on another.
YARDSTICK_LINE = b'{"method": "tiny", "params": {"i": 1}}\n'    # a flooding guest's line (tests/hostile.py)
YARDSTICK_UNITS = 1600     # what the loop's whole handling of one costs, in units (fit: bench/loop_capacity.py)


async def yardstick_round(loop, lines):
    """CPU seconds (this thread's) one line takes through the skeleton of a callback
    connection (CallbackBridge._connection): read pipelined lines, parse each, send its
    reply, yield to the loop."""
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        peer.sendall(YARDSTICK_LINE * lines)       # the lines and their replies fit the sockets' buffers
        buf, done = bytearray(), 0
        t0 = time.thread_time()
        while done < lines:
            buf += await loop.sock_recv(ours, 256 * 1024)
            end = buf.find(b"\n")
            while end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                parse_callback_line(line, "yardstick")
                await loop.sock_sendall(ours, no_callback_url_line("yardstick"))
                await asyncio.sleep(0)
                done += 1
                end = buf.find(b"\n")
        return (time.thread_time() - t0) / lines


def measure_unit_seconds(lines=100, rounds=10):
    """Seconds of CPU a unit of guest work costs cbox.py's loop on this host: the fastest of
    `rounds` yardstick rounds (~40 ms in all; the fastest, as a shared host's speed varies
    by up to 2x from one moment to the next), over YARDSTICK_UNITS. Runs its own event
    loop: call it in a thread."""
    loop = asyncio.new_event_loop()
    try:
        line_s = min(loop.run_until_complete(yardstick_round(loop, lines)) for _ in range(rounds))
    finally:
        loop.close()
    return min(max(line_s / YARDSTICK_UNITS, 1e-10), 1e-6)


async def configure_guest_work(cfg):
    """The host-wide fair share's budget: guest_work_units_per_s when set, else
    guest_work_cpu_share of a core at the unit's cost measured here."""
    unit_s = FairShare.UNIT_S
    if cfg.guest_work_units_per_s or cfg.guest_work_cpu_share:
        unit_s = await asyncio.to_thread(measure_unit_seconds)
    rate = cfg.guest_work_units_per_s or int(cfg.guest_work_cpu_share / unit_s)
    GUEST_WORK.configure(rate, unit_s)
    log("guest work budget", units_per_s=rate or "none", unit_ns=f"{unit_s * 1e9:.1f}",
        cpu_share=f"{rate * unit_s:.3f}")


# =============================================================================
# 9. VMs (one VM: its record, files, hypervisor, readers, and how it ends)
# =============================================================================

# Disk serials the guest's initramfs finds its disks by (/sys/block/vd*/serial; at
# most 20 bytes, VIRTIO_BLK_ID_BYTES, checked by CHV's DiskConfig::validate).
# cbox.state=<serial> on the kernel command line promises the state disk: a guest
# that cannot mount it writable powers off instead of running on a tmpfs.
ROOTFS_SERIAL = "cbox-rootfs"
STATE_SERIAL = "cbox-state"


class VmPaths:
    """Where a VM's files live: records and disks in state_dir, sockets in the short run_dir.
    The record is named by the VM's name; its directory too, except for a VM that came from
    the warm pool: that one keeps its pool directory (dir_name), whose files its hypervisor
    holds open and names in its config (a reset rebuilds the VM from that config and opens
    the disk by its path again: CHV vmm/src/lib.rs vm_reboot, device_manager.rs
    make_virtio_block_device; the -v log is opened once, cloud-hypervisor/src/main.rs)."""

    def __init__(self, cfg, vm_name, cid, dir_name=None):
        self.vm_dir = Path(cfg.path(cfg.state_dir), "vms", dir_name or vm_name)
        self.record = Path(cfg.path(cfg.state_dir), "vms", vm_name + ".json")
        self.run_dir = Path(cfg.path(cfg.run_dir), str(cid))
        self.api_socket = self.run_dir / "api.sock"
        self.vsock_socket = self.run_dir / "vsock.sock"
        self.callback_socket = Path(f"{self.vsock_socket}_{cfg.callback_port}")
        self.serial_socket = self.run_dir / "serial.sock"
        self.events_fifo = self.run_dir / "events.fifo"
        self.disk = self.vm_dir / "stateful.ext4"
        self.chv_log = self.vm_dir / "cloud-hypervisor.log"
        self.chv_out = self.vm_dir / "cloud-hypervisor.out"


class StepClock:
    """Logs the duration of each lifecycle step of one VM; `current` names the step under way.

    Each observer (empty unless `selftest` runs) is called as observer(clock, step, ms, ok)
    when a step ends, also when it fails: before start's error handling tears the VM down."""

    observers = []

    def __init__(self, vm_name, action):
        self.vm_name, self.action = vm_name, action
        self.t0 = time.monotonic()
        self.current = "validate"

    @contextlib.contextmanager
    def step(self, name):
        self.current, t0 = name, time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            ms = (time.monotonic() - t0) * 1000
            if ok:
                log(f"{self.action} step", vm=self.vm_name, step=name, ms=f"{ms:.1f}")
            for observer in self.observers:
                observer(self, name, ms, ok)

    def total_ms(self):
        return (time.monotonic() - self.t0) * 1000


TIME = {"type": "string", "format": "date-time"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
VM_SCHEMA = {        # the VM object (VM.api): its fields and their order
    "type": "object",
    "properties": {
        "vmName": {"type": "string"}, "status": {"enum": list(VM_STATUSES)},
        "ip": {"type": "string", "description": "a.b.c.d/prefix"}, "tapDeviceName": {"type": "string"},
        "callbackUrl": {"type": ["string", "null"]},
        "callbackMethods": {"type": ["array", "null"], "items": {"type": "string"}}, "cid": {"type": "integer"},
        "vcpus": {"type": "integer"}, "memoryMb": {"type": "integer"},
        "image": {"type": "string", "description": "its guest image (GET /v1/images)"},
        "diskMb": {"type": "integer", "description": "its stateful disk, MiB"}, "createdAt": TIME,
        "stopReason": {"type": ["string", "null"], "description": "why it stopped: ttl, idle, crash, ..."},
        "network": {"type": "object", "required": ["egress", "allowOut"], "properties": {
            "egress": {"enum": list(EGRESS_MODES)}, "allowOut": {"type": "array", "items": {"type": "string"}}}},
        "expiresAt": NULLABLE_TIME, "idleTimeoutSeconds": {"type": ["integer", "null"]},
        "lastActivityAt": NULLABLE_TIME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}
VM_SCHEMA["required"] = list(VM_SCHEMA["properties"])


class BackgroundExecs:
    """The background execs ("blocking": false) of one VM, each recorded once, when the
    agent's answer to its start names it (note; the id checked by EXEC_REF_RE, the one
    pattern of an execId). An exec has two reasons to be kept, each bounded:
    - idle: while it runs the VM is not idle; the newest IDLE_KEPT are saved in the VM's
      record (ids(), the record's backgroundExecs) and dropped once seen finished (forget_idle);
    - awaited: until a status or kill answer (or its stream's exit event) shows it finished,
      when exec.finished is published, once (seen_finished); at most AWAITED, not saved."""

    IDLE_KEPT = 64
    AWAITED = 1024

    def __init__(self, recorded=()):
        self.execs = collections.OrderedDict((exec_id, [True, False]) for exec_id in recorded)  # id -> [idle, awaited]
        self.idle, self.awaited = len(self.execs), 0

    def note(self, exec_id):
        for role in (0, 1):                 # an id seen again starts afresh, as the newest
            self._unset(exec_id, role)
        self.execs[exec_id] = [True, True]
        self.idle, self.awaited = self.idle + 1, self.awaited + 1
        for role, limit in ((0, self.IDLE_KEPT), (1, self.AWAITED)):
            if (self.idle, self.awaited)[role] > limit:
                self._unset(next(i for i, roles in self.execs.items() if roles[role]), role)

    def _unset(self, exec_id, role):
        roles = self.execs.get(exec_id)
        if not (roles and roles[role]):
            return
        roles[role] = False
        if role == 0:
            self.idle -= 1
        else:
            self.awaited -= 1
        if not any(roles):
            del self.execs[exec_id]

    def ids(self):
        """The ids kept for the idle check, oldest first (the record's backgroundExecs)."""
        return [exec_id for exec_id, (idle, _) in self.execs.items() if idle]

    def forget_idle(self, finished):
        """The execs in `finished` no longer keep the VM from being idle; whether any did."""
        kept = self.idle
        for exec_id in finished:
            self._unset(exec_id, 0)
        return self.idle != kept

    def is_awaited(self, exec_id):
        roles = self.execs.get(exec_id)
        return bool(roles and roles[1])

    def seen_finished(self, exec_id):
        """The exec was seen finished: True the first time (exec.finished is then due)."""
        if not self.is_awaited(exec_id):
            return False
        self._unset(exec_id, 1)
        return True


class StartFailed(HypervisorError):
    """A start that failed, and its stopReason (start_failure)."""

    def __init__(self, stop_reason, message):
        super().__init__(message)
        self.stop_reason = stop_reason


class VmActivity:
    """VM.activity()'s context manager: a class, not a generator (on every exec's path, where
    @contextmanager costs several calls)."""
    __slots__ = ("vm",)

    def __init__(self, vm):
        self.vm = vm

    def __enter__(self):
        self.vm.begin_activity()
        return self.vm

    def __exit__(self, kind, error, tb):
        self.vm.end_activity()
        return False


DISK_LIMIT_GROUP = "disks"      # the rate limit group a VM's disks share (not a device id of vm_create_config's)


def token_bucket(per_second):
    """Cloud Hypervisor's TokenBucketConfig for `per_second` (bytes or requests): a second's
    worth that refills in a second (rate_limiter/src/lib.rs: the bucket starts full, so a burst
    of up to a second's worth passes at once); None for 0, no limit."""
    return {"size": int(per_second), "refill_time": 1000} if per_second else None


def rate_limiter_config(bytes_per_s, ops_per_s=0):
    """A RateLimiterConfig with the buckets that limit something; None when neither does."""
    buckets = {"bandwidth": token_bucket(bytes_per_s), "ops": token_bucket(ops_per_s)}
    limits = {name: bucket for name, bucket in buckets.items() if bucket}
    return limits or None


def with_io_limits(config, cfg):
    """The VM's I/O budgets in its VmConfig, enforced by Cloud Hypervisor: its disks share one
    rate limit group (vm_disk_mb_per_s, vm_disk_ops_per_s: one budget whatever disk the guest
    uses), its net device a limiter that Cloud Hypervisor applies to each direction apart
    (virtio-devices/src/net.rs makes an rx and a tx limiter of the one config)."""
    disks = rate_limiter_config(cfg.vm_disk_mb_per_s * 1024 * 1024, cfg.vm_disk_ops_per_s)
    if disks:
        config["rate_limit_groups"] = [{"id": DISK_LIMIT_GROUP, "rate_limiter_config": disks}]
        for disk in config["disks"]:
            disk["rate_limit_group"] = DISK_LIMIT_GROUP
    net = rate_limiter_config(cfg.vm_net_mbit_per_s * 1_000_000 // 8)
    if net:
        for nic in config["net"]:
            nic["rate_limiter_config"] = net


def vm_create_config(vm, gateway, dns):
    """A VM's VmConfig for vm.create (validated against Cloud Hypervisor's OpenAPI in the tests)."""
    cfg = vm.cfg
    cmdline = " ".join(filter(None, [
        "console=ttyS0 reboot=k panic=-1", cfg.cmdline_extra,
        f"cbox.vm={vm.vmName}", f"cbox.ip={vm.ip}", f"cbox.gw={gateway}",
        f"cbox.dns={','.join(dns)}" if dns else "",
        f"cbox.callback_port={cfg.callback_port}", f"cbox.state={STATE_SERIAL}"]))
    image = vm.boot_image
    payload = {"kernel": image.kernel, "cmdline": cmdline}
    if image.initramfs:
        payload["initramfs"] = image.initramfs
    config = {
        "payload": payload,
        "cpus": {"boot_vcpus": vm.vcpus, "max_vcpus": vm.vcpus},
        "memory": {"size": vm.memoryMb * 1024 * 1024},
        # image_type Raw: an autodetected raw disk gets its sector-0 writes refused
        # (CHV v51+, vmm/src/device_manager.rs make_virtio_block_device), which
        # turns the stateful ext4 read-only (its superblock is in block 0)
        "disks": [{"path": image.rootfs, "readonly": True, "image_type": "Raw",
                   "serial": ROOTFS_SERIAL, "id": "rootfs"},
                  {"path": str(vm.paths.disk), "readonly": False, "image_type": "Raw",
                   "serial": STATE_SERIAL, "id": "stateful"}],
        "net": [{"tap": vm.tapDeviceName, "mac": vm.mac, "num_queues": 2, "id": "net0"}],
        "vsock": {"cid": vm.cid, "socket": str(vm.paths.vsock_socket), "id": "vsock0"},
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Socket", "socket": str(vm.paths.serial_socket)},
        "console": {"mode": "Off"},
        "pvpanic": True,
    }
    with_io_limits(config, cfg)
    return config


def vmm_exit_reason(paths, code):
    """(status, stopReason, message) for a VMM that exited by itself with `code` (None: not
    our child, its status unknown). Exit code 0 does not prove a power-off: a vCPU error or
    SIGTERM leave the same way (vmm/src/lib.rs control loop, EpollDispatch::Exit vs
    GuestExit); the -v log names the guest's power-off."""
    chv_log = tail_bytes(paths.chv_log, 64 * 1024)
    if code is None:        # adopted, not our child: its exit status is gone; the log tells
        if b"Cloud Hypervisor exited successfully" in chv_log:
            code = 0
        elif b"Fatal error" not in chv_log:
            return "FAILED", "killed", "cloud-hypervisor died without exiting (killed, or it crashed)"
    if code is not None and code < 0:
        return "FAILED", "killed", f"cloud-hypervisor was killed by signal {-code} ({signal_name(-code)})"
    if code == 0 and b"VM guest exit event" in chv_log:
        return "STOPPED", "guest-poweroff", "the guest powered off"
    vcpu_error = vcpu_error_in_vmm_log(paths.chv_log) if code == 0 else None
    if vcpu_error:
        return "FAILED", "vcpu-error", f"the guest's vCPU failed: {vcpu_error}"
    if code == 0:
        return "FAILED", "vmm-crash", ("cloud-hypervisor exited with code 0 without a guest power-off "
                                       f"(see {paths.chv_log})")
    chain = vmm_error_chain(paths.chv_out)
    return "FAILED", hypervisor_reason(chain or "") or "vmm-crash", (
        (f"cloud-hypervisor exited with code {code}" if code is not None else "cloud-hypervisor exited with an error")
        + (f": {chain}" if chain else "") + f" (see {paths.chv_out})")


def start_failure(error, paths, watch):
    """(stopReason, what went wrong) of a start that failed with `error`: the hypervisor's
    own words where it has them (its API error, its -v log, its stderr)."""
    if isinstance(error, StartFailed):
        return error.stop_reason, str(error)
    if watch and not watch.alive():      # it died under an API call
        _, reason, message = vmm_exit_reason(paths, watch.exit_code)
        return reason, f"{error} ({message})"
    if isinstance(error, HypervisorError):
        return hypervisor_reason(str(error)) or "vmm-error", str(error)
    return "start-failed", str(error)


class VM:
    """One VM: its public fields and record on disk, its files (VmPaths), and its live
    runtime: the VMM's process and API, the guest agent's client, the callback bridge,
    the console and event readers. It decides how it ended (stopReason: vmm_exit_reason,
    guest_reset) and sets `ended`; then `on_stopped(vm)`, given when it is made (VmTeardown.release_runtime), runs
    in a task of its own and frees what it holds on the host.

    phase: starting -> running -> dead (ended by itself) or destroying (DELETE)."""

    RECORD_FIELDS = ("vmName", "status", "ip", "tapDeviceName", "callbackUrl", "callbackMethods", "cid", "vcpus",
                     "memoryMb", "createdAt", "phase", "pid", "pidStart", "mac", "error", "stopReason", "network",
                     "expiresAt", "idleTimeoutSeconds", "lastActivityAt", "labels", "backgroundExecs", "dirName",
                     "image", "diskMb", "imageStamp")
    API_FIELDS = tuple(VM_SCHEMA["properties"])

    def __init__(self, cfg, on_stopped=None, **fields):
        for key in self.RECORD_FIELDS:
            setattr(self, key, fields.get(key))
        self.cfg, self.on_stopped = cfg, on_stopped
        self.paths = VmPaths(cfg, self.vmName, self.cid, self.dirName)
        self.lock = asyncio.Lock()
        self.ended = asyncio.Event()   # set once it stopped by itself (mark_stopped)
        self.watch = None              # ProcessWatch of the VMM
        self.chv = None                # CloudHypervisor client
        self.agent = None              # GuestAgent client
        self.callbacks = None          # CallbackBridge
        self.console = None            # ConsoleLog
        self.serial = None             # SerialConsole reading the VMM's serial socket
        self.events = None             # EventMonitor reading the VMM's event FIFO
        self.tasks = set()             # watching the VMM's exit and the serial connection
        self.reset = None              # (stopReason, message) of a reset seen while starting
        self.sent_config = None        # the VmConfig of vm.create (kept with a failed start's evidence)
        self.boot_image = None         # the Image it boots from (set by the manager before a start)
        self.image = self.image or DEFAULT_IMAGE                  # a record of before images: the default
        self.diskMb = self.diskMb or cfg.stateful_size_in_mb
        self.vmm_log_trimmed = 0       # disk bytes freed from the VMM's log (bound_vmm_log)
        self.labels = self.labels or {}
        self.activity_saved = time.monotonic()               # when touch() last wrote the record
        self.busy = 0                  # activities in progress (execs, streams): not idle meanwhile

    @property
    def address(self):
        return self.ip.split("/")[0]

    @property
    def backgroundExecs(self):
        return self.background.ids()

    @backgroundExecs.setter
    def backgroundExecs(self, ids):
        """From the record (or none): ValueError unless it is a list of exec ids."""
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise ValueError("backgroundExecs must be a list of exec ids")
        self.background = BackgroundExecs(ids or ())

    def api(self):
        return {k: getattr(self, k) for k in self.API_FIELDS}

    def record(self):
        return {k: getattr(self, k) for k in self.RECORD_FIELDS}

    # ---- the record on disk ------------------------------------------------------

    def save(self):
        """The record on disk now (a lifecycle step: the next step relies on it)."""
        RECORD_WRITES.now(self.paths.record, self.record_bytes())

    async def write_record(self):
        """The record on disk before this returns, written off the loop (a lifecycle step
        of an async path: the next step relies on it)."""
        await RECORD_WRITES.write(self.paths.record, self.record_bytes())

    def save_later(self):
        """The record on disk soon, written off the loop (activity, background execs)."""
        RECORD_WRITES.later(self.paths.record, self.record_bytes())

    def record_bytes(self):
        self.activity_saved = time.monotonic()
        return json.dumps(self.record(), indent=1).encode()

    def forget(self):
        """Remove the record (and the warm pool record of a VM claimed from the pool, should a
        restart have come between writing its new record and removing the old one)."""
        for name in {self.vmName, self.dirName or self.vmName}:
            RECORD_WRITES.remove(self.paths.record.with_name(name + ".json"))

    def rename(self, name):
        """The VM takes a new name (a warm pool VM claimed by a start request); its files stay."""
        self.dirName = self.dirName or self.vmName
        self.vmName = name
        self.paths = VmPaths(self.cfg, name, self.cid, self.dirName)
        if self.agent:
            self.agent.vm_name = name

    @classmethod
    def from_record(cls, cfg, path, on_stopped=None):
        """The VM a record file describes; ValueError (or TypeError, ApiError) when it is unusable."""
        vm = cls(cfg, on_stopped, **{k: v for k, v in json.loads(path.read_text()).items() if k in cls.RECORD_FIELDS})
        if not is_pool_name(vm.vmName):
            check_vm_name(vm.vmName)
        if vm.dirName is not None and not is_pool_name(vm.dirName):
            raise ValueError("dirName must be a warm pool name")
        if path.name != vm.vmName + ".json":
            raise ValueError("record name does not match its file")
        vm.network = vm.recorded_network()
        utc_epoch(vm.expiresAt)                    # ValueError when it is no time
        check_labels(vm.labels)
        if vm.idleTimeoutSeconds is not None:
            lifetime_seconds(vm.idleTimeoutSeconds, "idleTimeoutSeconds", 0)
        check_schema(vm.image, IMAGE_NAME_SCHEMA, "image")
        if not isinstance(vm.diskMb, int) or vm.diskMb <= 0:
            raise ValueError("diskMb must be a positive integer")
        return vm

    def recorded_network(self):
        """The egress policy in the record, checked again (its words become iptables rules):
        nat for a record of an older cbox.py, none (nothing out) for one that does not pass."""
        if self.network is None:
            return {"egress": "nat", "allowOut": []}
        try:
            return check_network(self.network, self.cfg)
        except ApiError as e:
            log("egress policy in the record is unusable: nothing out", vm=self.vmName, error=repr(str(e)))
            return {"egress": "none", "allowOut": []}

    # ---- deadlines and activity (ttlSeconds, idleTimeoutSeconds) -------------------

    ACTIVITY_SAVE_S = 5.0      # lastActivityAt on disk is at most this stale (the idle clock survives restarts)

    @property
    def lastActivityAt(self):
        return utc_text(self.active_at)       # formatted when shown, not on every touch (every exec)

    @lastActivityAt.setter
    def lastActivityAt(self, text):
        self.active_at = utc_epoch(text) if text else time.time()

    def touch(self):
        """The VM is in use now: an API call names it, an activity begins or ends."""
        self.active_at = time.time()
        if self.phase in ("running", "dead") and time.monotonic() - self.activity_saved >= self.ACTIVITY_SAVE_S:
            self.save_later()

    def begin_activity(self):
        """An activity (an exec, an open exec stream) started: the VM is not idle until the
        matching end_activity(). For code that cannot use `with vm.activity():`."""
        self.busy += 1
        self.touch()

    def end_activity(self):
        self.busy -= 1
        self.touch()

    def activity(self):
        """`with vm.activity():` begin_activity(), then end_activity() however the block ends."""
        return VmActivity(self)

    def busy_now(self):
        """An activity cbox.py sees is in progress: an exec or stream, a callback in flight."""
        return self.busy > 0 or bool(self.callbacks and self.callbacks.in_flight)

    def deadline(self):
        """(epoch time, "ttl" or "idle") of the VM's next deadline, or None. The idle one
        ignores activity in progress: at that time the manager checks it (busy_now,
        DeadlineKeeper.background_exec_running) and touches the VM instead of ending it."""
        due = []
        if self.expiresAt:
            due.append((utc_epoch(self.expiresAt), "ttl"))
        if self.idleTimeoutSeconds:
            due.append((self.active_at + self.idleTimeoutSeconds, "idle"))
        return min(due) if due else None

    def set_ttl(self, seconds):
        self.expiresAt = expires_at(seconds)
        self.save()

    def note_background_exec(self, exec_id):
        """A background exec started (its id checked: background_exec_id): while it runs, the
        VM is not idle; its exec.finished is awaited (BackgroundExecs)."""
        self.background.note(exec_id)
        self.save_later()

    # ---- the hypervisor ------------------------------------------------------------

    def spawn_vmm(self):
        self.follow_events()          # the VMM's open of the FIFO blocks without a reader
        pid = spawn_vmm(self.cfg.chv_bin, self.paths)
        self.pid, self.pidStart = pid, proc_start_time(pid)
        VM_CPU.place(pid, self.vcpus)
        self.watch_vmm()

    def attach_vmm(self):
        """Watch the VMM an earlier cbox.py started, when its recorded process still runs."""
        if not self.pid:     # killed between spawning the VMM and recording its pid
            self.pid = find_vmm_pid(self.paths.api_socket)
            self.pidStart = proc_start_time(self.pid) if self.pid else None
        if self.pid and self.pidStart and proc_start_time(self.pid) == self.pidStart:
            self.watch_vmm()
            VM_CPU.adopt(self.pid, self.vcpus)

    def watch_vmm(self):
        self.watch = ProcessWatch(self.pid, self.pidStart)
        self.chv = CloudHypervisor(str(self.paths.api_socket))
        self.run_task(self.on_vmm_exit())

    def run_task(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop_vmm(self, clock, calls):
        """Ask the VMM to stop with these API actions (vmm.shutdown answers 200 with an empty
        body, not 204), then kill its process group."""
        if self.watch and self.watch.alive() and self.chv:
            for name in calls:
                with clock.step(name):
                    try:
                        await within(self.cfg.shutdown_timeout_s, self.chv.call("PUT", name, timeout=10.0))
                    except (HypervisorError, asyncio.TimeoutError):
                        pass
            with clock.step("exit"):
                if not await self.watch.wait(self.cfg.shutdown_timeout_s):
                    log("hypervisor did not exit; killing it", vm=self.vmName, pid=self.pid)
        if self.watch:
            self.watch.kill()
            await self.watch.wait(5.0)

    def vmm_usage(self):
        """{"rssBytes", "cpuSeconds"} of the VMM's process (nulls when it is not running)."""
        usage = process_usage(self.pid) if self.watch and self.watch.alive() else None
        rss, cpu = usage or (None, None)
        return {"rssBytes": rss, "cpuSeconds": cpu}

    # ---- the guest agent and the callback bridge -------------------------------

    def connect_agent(self):
        self.agent = GuestAgent(self.vmName, self.address, self.cfg.agent_port, self.cfg.exec_output_limit_bytes,
                                self.cfg.max_request_bytes, share_key=self)

    def serve_callbacks(self):
        self.callbacks = CallbackBridge(self.cfg, self)
        self.callbacks.listen(self.paths.callback_socket)

    # ---- the console and the hypervisor's events ---------------------------------

    def console_log(self):
        if self.console is None:
            self.console = ConsoleLog(self.paths.vm_dir, self.cfg.console_max_bytes)
        return self.console

    def follow_events(self):
        self.events = EventMonitor(self.paths.events_fifo, self.on_vmm_event, share_key=self)

    def follow_serial(self):
        """Read the serial console (its socket exists from vm.create on) into the console log."""
        self.serial = SerialConsole(self.paths.serial_socket, self.console_log().append, share_key=self)
        self.run_task(self.watch_serial(self.serial))

    async def watch_serial(self, serial):
        """The VMM closes the serial connection when it rebuilds the VM's devices: a reset
        whose event may have been lost (the FIFO drops events under load). Its -v log has
        every event, so it decides; another client taking the socket over is no reset."""
        await serial.ended.wait()
        if self.serial is not serial or self.phase != "running":
            return
        await asyncio.sleep(0.5)     # the event itself usually follows
        if self.phase == "running" and self.watch.alive():
            reset = reset_in_vmm_log(self.paths.chv_log)
            if reset:
                self.guest_reset(*reset)
            else:
                log("serial console connection closed by the VMM (another client took it?)", vm=self.vmName)

    def close_clients(self):
        """Close every client, listener and reader of the VM and stop watching it."""
        if self.callbacks:
            self.callbacks.close()
            self.callbacks = None
        for client in (self.agent, self.chv):
            if client:
                client.close()
        for reader in (self.serial, self.events, self.console):
            if reader:
                reader.close()
        self.serial = self.events = self.console = None

    def stop_watching(self):
        """Close every client and reader and stop watching the VMM: the VM is gone, or
        cbox.py stops and leaves it running for the next start."""
        self.close_clients()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.watch:
            self.watch.close()

    # ---- how it ends --------------------------------------------------------------

    def on_vmm_event(self, source, event, props):
        reset = reset_of_event(source, event, props)
        if reset:
            self.guest_reset(*reset)

    def guest_reset(self, reason, message):
        """A reset ends the VM, as in Firecracker: Cloud Hypervisor would reboot it in place
        (vmm/src/lib.rs vm_reboot). A panic (pvpanic) ends it at once, before its reset."""
        if self.phase == "starting":
            self.reset = self.reset or (reason, message)      # wait_for_agent fails the start with it
        elif self.phase == "running":
            self.mark_stopped("FAILED" if reason == "guest-panic" else "STOPPED", reason, message)

    async def on_vmm_exit(self):
        await self.watch.exited.wait()
        VM_CPU.forget(self.pid)
        if self.agent:
            self.agent.abort()               # the guest is gone: fail requests in flight now
        if self.phase == "running" and self.events:
            self.events.read_pending()       # a panic event written just before the exit
        if self.phase == "running":          # start, destroy or a reset handle the others
            self.mark_stopped(*vmm_exit_reason(self.paths, self.watch.exit_code))

    def mark_stopped(self, status, reason, message):
        self.status, self.stopReason, self.error, self.phase = status, reason, message, "dead"
        if self.agent:
            self.agent.abort()
        log("VM stopped", vm=self.vmName, status=status, stopReason=reason, error=repr(message))
        self.save()
        self.ended.set()
        if self.on_stopped:
            self.run_task(self.on_stopped(self))
        if is_pool_name(self.vmName):          # not a VM of the API: the warm pool replaces it
            return
        M_VM_STOPS.labels(reason).inc()
        EVENTS.publish("vm.stopped", self.vmName, status=status, stopReason=reason, error=message)


# =============================================================================
# 10. Exec results and tombstones (what the manager keeps of execs and of ended VMs)
# =============================================================================

# What the guest agent answers about execs, passed on as it is (guest_agent.py's docstring has
# the details): the response schemas of the exec routes (openapi_document).
COMMAND_FIELDS = {"cmd": {"type": "string"}, "argv": {"type": "array", "items": {"type": "string"}}}
EXEC_RESULT_SCHEMA = {
    "type": "object",
    "required": ["execId", "running", "output", "stdout", "stderr", "exitCode", "error", "timedOut", "truncated",
                 "durationMs"],
    "properties": {
        "execId": {"type": "string"}, "tag": {"type": ["string", "null"]}, **COMMAND_FIELDS,
        "user": {"type": ["string", "null"]}, "running": {"type": "boolean"},
        "output": {"type": "string", "description": "stdout and stderr interleaved in arrival order"},
        "stdout": {"type": "string"}, "stderr": {"type": "string"},
        "exitCode": {"type": ["integer", "null"]}, "signal": {"type": ["integer", "null"]},
        "signalName": {"type": ["string", "null"]},
        "error": {"type": "string", "description": "\"\" on exit 0, else e.g. \"exit status 3\", \"timed out after 5s\""},
        "timedOut": {"type": "boolean"}, "truncated": {"type": "boolean"}, "oomKilled": {"type": "boolean"},
        "killScope": {"enum": ["cgroup", "process-group"]}, "limitsApplied": {"type": "boolean"},
        "startedAt": TIME, "durationMs": {"type": "number"}}}
EXEC_STARTED_SCHEMA = {      # a background exec's answer
    "type": "object", "required": ["execId", "output", "error", "running"],
    "properties": {"execId": {"type": "string"}, "tag": {"type": ["string", "null"]}, "output": {"const": ""},
                   "error": {"const": ""}, "running": {"const": True}}}
EXEC_LIST_SCHEMA = {
    "type": "object", "required": ["execs"],
    "properties": {"execs": {"type": "array", "items": {
        "type": "object", "required": ["execId", "running", "exitCode", "startedAt", "durationMs"],
        "properties": {"execId": {"type": "string"}, "tag": {"type": ["string", "null"]}, **COMMAND_FIELDS,
                       "running": {"type": "boolean"}, "exitCode": {"type": ["integer", "null"]},
                       "startedAt": TIME, "durationMs": {"type": "number"}}}}}}
STREAM_EVENT_SCHEMA = {      # one line of an exec's event stream (AgentEvents, EventRelay)
    "type": "object", "required": ["seq", "type"],
    "properties": {
        "seq": {"type": "integer", "minimum": 0, "description": "grows by 1 per event"},
        "type": {"enum": ["start", "stdout", "stderr", "keepalive", "exit", "error", "dropped"]},
        "execId": {"type": "string", "description": "start and exit"}, "pid": {"type": "integer"},
        "data": {"type": "string", "description": "stdout and stderr: the output, as UTF-8 text"},
        "dataBase64": {"type": "string", "description": "the exact bytes when they were no valid UTF-8"},
        "missed": {"type": "integer"}, "fromSeq": {"type": "integer"},
        "error": {"type": "string", "description": "exit: as in the exec result; error: why the stream broke"},
        **{k: v for k, v in EXEC_RESULT_SCHEMA["properties"].items() if k != "error"}},
    "description": "start: execId, tag, pid, startedAt; stdout/stderr: data; exit: the whole exec result; dropped: missed and fromSeq, standing in for events no longer kept; error: the "
                   "stream from the guest broke (re-attach from this seq)"}


EXEC_FIELD = re.compile(rb'"(execId|exitCode|signal)":[ ]?(true|false|null|-?[0-9][0-9.eE+-]{0,30}|"[^"\\]{0,128}")')
EXEC_KEYS = {k.encode(): k for k in ("execId", "exitCode", "signal")}
TIMED_OUT = (b'"timedOut":true', b'"timedOut": true')        # for has_field()
OOM_KILLED = (b'"oomKilled":true', b'"oomKilled": true')
NOT_RUNNING = (b'"running":false', b'"running": false')
EXEC_LITERALS = {b"true": True, b"false": False, b"null": None}


def exec_fields(text):
    """execId, exitCode and signal of an exec result, found in some of its JSON text: the
    agent writes its small fields after the output, so a large result's last bytes hold them
    (its first ones the execId). Inside a JSON string every '"' is escaped, so '"exitCode":'
    only matches a key; the last match of a key wins."""
    fields = {}
    for key, value in EXEC_FIELD.findall(text):     # values converted here: json.loads is 10x dearer
        if value in EXEC_LITERALS:
            fields[EXEC_KEYS[key]] = EXEC_LITERALS[value]
        elif value[0] == 0x22:
            fields[EXEC_KEYS[key]] = value[1:-1].decode()
        else:
            with contextlib.suppress(ValueError):
                fields[EXEC_KEYS[key]] = int(value) if value.lstrip(b"-").isdigit() else float(value)
    return fields


def answer_text_for_fields(answer, tail=BodyStream.TAIL):
    """What exec_fields() reads of an agent answer held in memory: all of a small one,
    the head and the last `tail` bytes of a large one."""
    if len(answer) <= BodyStream.HEAD + tail:
        return answer
    return answer[:BodyStream.HEAD] + b"\n" + answer[-tail:]


EXEC_NUMBER = re.compile(rb" ?(-?[0-9][0-9.eE+-]{0,30})")


def has_field(text, forms):
    """Whether an exec result's JSON text has a field with this value ('"timedOut":true'
    or with a space; as in exec_fields, it can only be the key itself)."""
    return forms[0] in text or forms[1] in text


def exec_duration_ms(text):
    """durationMs of an exec result's JSON text (see exec_fields), without parsing the rest."""
    at = text.rfind(b'"durationMs":')
    number = EXEC_NUMBER.match(text, at + 13) if at >= 0 else None
    try:
        value = float(number.group(1)) if number else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 1e10 else None


def exec_event_fields(text, exec_id, timed_out, oom_killed, duration_ms):
    """The fields of an exec.finished event, the rest read from the exec result's JSON text."""
    fields = exec_fields(text)
    exec_id = exec_id or fields.get("execId")
    code, sig = fields.get("exitCode"), fields.get("signal")
    return {"execId": exec_id if isinstance(exec_id, str) and EXEC_REF_RE.match(exec_id) else None,
            "exitCode": code if isinstance(code, int) and not isinstance(code, bool) else None,
            "signal": sig if isinstance(sig, (int, str)) and not isinstance(sig, bool) else None,
            "timedOut": timed_out, "oomKilled": oom_killed, "durationMs": duration_ms}


def exec_finished(vm, text, exec_id=None):
    """Count a finished exec from its result's JSON text and publish exec.finished, whose
    other fields are read from the text only when the event is (exec_event_fields)."""
    M_EXECS_FINISHED.inc()
    flagged = b"true" in text       # neither flag is true without it: one scan of the usual answer, not four
    timed_out = flagged and has_field(text, TIMED_OUT)
    oom_killed = flagged and has_field(text, OOM_KILLED)
    if timed_out:
        M_EXECS_TIMED_OUT.inc()
    if oom_killed:
        M_EXECS_OOM.inc()
    duration = exec_duration_ms(text)
    if duration is not None:
        M_EXEC_DURATION.observe(duration / 1000)
    EVENTS.publish("exec.finished", vm.vmName, (exec_event_fields, text, exec_id, timed_out, oom_killed, duration))


def on_exec_answer(vm, answer, background_id=None):
    """Count an exec result that shows its exec finished and publish exec.finished, once per
    exec: a blocking exec's answer (a large one is passed on whole first: its head and tail
    come through finished_later), a background exec's first status or kill answer with
    "running": false."""
    if isinstance(answer, BodyStream):
        return                          # its `then` (finished_later) comes once it was passed on
    text = answer_text_for_fields(answer, tail=1536)     # kept with the event: at most 2 KiB
    if background_id is not None:       # a status or kill answer: the exec may still run
        if not has_field(text, NOT_RUNNING) or not vm.background.seen_finished(background_id):
            return
    exec_finished(vm, text, background_id)


def output_bytes(event):
    """An output event's exact bytes: dataBase64 when the agent sent it (the output was no
    valid UTF-8), else data as UTF-8; b"" when neither is usable (the guest's word)."""
    if isinstance(event.get("dataBase64"), str):
        with contextlib.suppress(ValueError):
            return base64.b64decode(event["dataBase64"], validate=True)
    return event["data"].encode("utf-8", "replace") if isinstance(event.get("data"), str) else b""


def finished_later(vm, background_id=None):
    """The `then` of a large exec answer (BodyStream): on_exec_answer once it was passed on."""
    return lambda head, tail: on_exec_answer(vm, head + b"\n" + tail, background_id)


def background_exec_id(answer):
    """(the execId the agent's answer to a background exec's start gives, that id if it is a
    valid one (EXEC_REF_RE), else None)."""
    exec_id = exec_fields(answer_text_for_fields(answer)).get("execId")
    return exec_id, exec_id if isinstance(exec_id, str) and EXEC_REF_RE.match(exec_id) else None


class Tombstones:
    """What is left of the VMs a deadline destroyed (stopReason ttl or idle): name, reason, time,
    message and last console lines, kept tombstone_minutes so a client naming such a VM learns
    why it is gone. At most MAX entries (the oldest go first), in a small JSON file beside the
    records: they survive a restart of cbox.py. A new VM of the same name removes its tombstone."""

    MAX = 500                 # with CONSOLE_LINES of at most 300 characters: the file stays within ~2 MB
    CONSOLE_LINES = 15

    def __init__(self, path, minutes):
        self.path, self.keep_s = path, minutes * 60
        self.entries = {}             # name -> entry, oldest first
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
            self.entries = {e["vmName"]: e for e in json.loads(path.read_text())
                            if all(isinstance(e[k], str) for k in ("vmName", "stopReason", "destroyedAt", "error"))
                            and isinstance(e["console"], list) and isinstance(e["until"], (int, float))}

    def add(self, name, reason, message, console):
        if not self.keep_s:
            return
        lines = [line for line in console.strip().splitlines() if line.strip()][-self.CONSOLE_LINES:]
        self.entries.pop(name, None)
        self.entries[name] = {"vmName": name, "stopReason": reason, "destroyedAt": utc_now(), "error": message,
                              "console": [line[:300] for line in lines], "until": time.time() + self.keep_s}
        while len(self.entries) > self.MAX:
            del self.entries[next(iter(self.entries))]
        self.save()

    def get(self, name):
        entry = self.entries.get(name)
        if entry and entry.get("until", 0) < time.time():
            self.discard(name)
            return None
        return entry

    def discard(self, name):
        if self.entries.pop(name, None):
            self.save()

    def save(self):
        now = time.time()
        self.entries = {n: e for n, e in self.entries.items() if e.get("until", 0) >= now}
        try:
            write_atomically(self.path, json.dumps(list(self.entries.values())).encode())
        except OSError as e:
            log("cannot write tombstones", file=self.path, error=repr(str(e)))


FAILED_START_FIELDS = ("vmName", "failedAt", "step", "stopReason", "error")


class FailedStarts:
    """The evidence of the newest `keep` failed starts (failed_starts_kept), one directory each
    in state_dir/failed-starts/, named TIME_VMNAME (UTC: names sort by age); the oldest go
    first. Each holds failure.json (vmName, failedAt, step, stopReason, error), vmconfig.json
    (the VmConfig sent, once the start got to vm.create) and the newest TAIL_BYTES of the
    hypervisor's -v log, of its stdout/stderr and of the serial console: a guest can make the
    -v log and the console grow, this stays bounded."""

    TAIL_BYTES = 64 * 1024
    ERROR_BYTES = 8 * 1024
    LINES = 20                # of the -v log and the console in the listing (GET /v1/failed-starts)

    def __init__(self, directory, keep):
        self.directory, self.keep = directory, keep

    def add(self, vm, step, reason, error):
        """Keep the evidence of vm's failed start; its directory, or None (none kept, or the disk failed)."""
        if not self.keep:
            return None
        path = self.directory / f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}_{vm.vmName}"
        files = {"failure.json": json_bytes({"vmName": vm.vmName, "failedAt": utc_now(), "step": step,
                                             "stopReason": reason, "error": error[:self.ERROR_BYTES]}),
                 "cloud-hypervisor.log": tail_bytes(vm.paths.chv_log, self.TAIL_BYTES),
                 "cloud-hypervisor.out": tail_bytes(vm.paths.chv_out, self.TAIL_BYTES),
                 "console.log": vm.console_log().tail(self.TAIL_BYTES).encode()[-self.TAIL_BYTES:]}
        if vm.sent_config:
            files["vmconfig.json"] = json.dumps(vm.sent_config, indent=1).encode()
        try:
            path.mkdir(parents=True)
            for name, data in files.items():
                (path / name).write_bytes(data)
        except OSError as e:
            log("cannot keep the evidence of a failed start", dir=path, error=repr(str(e)))
            remove_tree(path)
            return None
        kept = self.entries()
        for old in kept[:max(0, len(kept) - self.keep)]:
            remove_tree(old)
        return path

    def entries(self):
        """The kept directories, oldest first."""
        try:
            return sorted(p for p in self.directory.iterdir() if p.is_dir())
        except OSError:
            return []

    def listing(self):
        """The kept failed starts, newest first: failure.json's fields, the directory, its files
        and sizes, the last LINES of the -v log and of the console."""
        listed = []
        for path in reversed(self.entries()):
            try:
                failure = json.loads((path / "failure.json").read_bytes())
                files = {f.name: f.stat().st_size for f in sorted(path.iterdir())}
            except (OSError, ValueError, RecursionError):
                continue
            if not isinstance(failure, dict):
                continue
            console = tail_file(path / "console.log", 16 * 1024).splitlines()
            listed.append({**{k: failure.get(k) for k in FAILED_START_FIELDS}, "directory": str(path), "files": files,
                           "vmmLog": [r[:300] for r in vmm_log_records(tail_bytes(path / "cloud-hypervisor.log",
                                                                                  16 * 1024))[-self.LINES:]],
                           "console": [line.strip()[:300] for line in console if line.strip()][-self.LINES:]})
        return listed


# =============================================================================
# 11. VM manager (all VMs: start, destroy, adopt at start-up, exec forwarding)
# =============================================================================

class agent_errors:
    """A guest agent's refusal or silence as the API's answer (`with agent_errors():`; a class,
    not a generator: on every exec's path, where @contextmanager costs several calls)."""
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, AgentError):
            raise ApiError(error.status, str(error)) from error
        return False


class WarmPool:
    """VMs booted with the default vcpus and memory and left idle, per image (pool_size of
    "default", pool_images of the others: pool_sizes), under internal
    names (pool_name) outside the manager's VMs: GET /v1/vms, label filters, DELETE /v1/vms
    and deadlines never see them; capacity (max_vms, memory) counts them. A start request of
    the default shape claims a ready one (take, claim): the guest takes the request's name
    (the agent's POST /identity: hostname, CBOX_VM_NAME), the VM takes the request's
    callbackUrl, callbackMethods, labels, deadlines and egress policy, and its record moves to
    the new name; its directory keeps the pool name (VM.dirName: the hypervisor holds those
    files open and names them in its config). One task refills the pool, one boot at a time,
    retrying a failed boot with backoff (lastError in GET /v1/health).

    Nothing runs in a pool VM before its claim: cbox.py only polls the agent's GET /health
    while it boots, so the claimed VM has a clean stateful disk and no processes of anyone.

    Restarts: a pool VM's record is vms/<pool name>.json. A claim writes the claimed VM's
    record (vms/<name>.json, dirName = the pool name) before removing the pool record, so a
    restart sees either the pool VM, or the claimed VM (and a pool record to drop); Adoption
    takes the pool VMs back (offer).

    A ready VM booted from an earlier build of its image (imageStamp) is not handed out: the
    start that finds it removes it, and the pool refills from the new build.

    What it needs is given when it is made: fits(vcpus, memory_mb, disk_mb, pool VMs) (Capacity.check:
    ApiError when one more VM does not fit), image_for(name) (Images.for_start: the checked
    image), make_vm(spec, image) and boot(vm, clock) (VmBooter), teardown(vm)
    (VmTeardown), apply_egress(vm) (EgressChanges.apply: its policy in force), and
    `wake`, the Event set whenever capacity is freed (VmTeardown sets it, and so does a claim)."""

    RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0

    def __init__(self, cfg, *, fits, image_for, make_vm, boot, teardown, apply_egress, wake):
        self.cfg = cfg
        self.fits, self.make_vm, self.boot, self.teardown, self.apply_egress = fits, make_vm, boot, teardown, apply_egress
        self.image_for = image_for
        self.sizes = pool_sizes(cfg)              # image -> VMs kept ready
        self.size = sum(self.sizes.values())
        self.ready = collections.OrderedDict()    # pool name -> VM, oldest first
        self.booting = {}                         # pool name -> VM
        self.leaving = set()                      # VMs being torn down (still holding capacity)
        self.last_error = None
        self.failures = 0                         # failed boots in a row (backoff)
        self.wake = wake                          # a claim, a VM gone, or capacity freed
        self.task = None

    def vms(self):
        return [*self.ready.values(), *self.booting.values(), *self.leaving]

    def state(self):
        """The pool as GET /v1/health shows it."""
        images = {name: {"size": size, "ready": 0, "booting": 0} for name, size in self.sizes.items()}
        for where, vms in (("ready", self.ready.values()), ("booting", self.booting.values())):
            for vm in vms:
                images.setdefault(vm.image, {"size": 0, "ready": 0, "booting": 0})[where] += 1
        return {"size": self.size, "ready": len(self.ready), "booting": len(self.booting),
                "lastError": self.last_error, "images": images}

    def export_metrics(self):
        M_POOL_READY.value, M_POOL_BOOTING.value = len(self.ready), len(self.booting)

    def spec(self, image):
        """A pool VM's start request: the default shape and policy, no callbacks, no deadline."""
        name = pool_name()
        return {"vmName": name, "dirName": name, "callbackUrl": None, "callbackMethods": [], "image": image,
                "vcpus": self.cfg.default_vcpus, "memoryMb": self.cfg.default_memory_mb,
                "diskMb": self.cfg.stateful_size_in_mb,
                "network": check_network(None, self.cfg), "expiresAt": None, "idleTimeoutSeconds": None,
                "labels": {}}

    # ---- claims ---------------------------------------------------------------------

    def take(self, spec, image):
        """A ready VM for this validated start request, out of the pool, or None: the request
        asks another vcpus/memoryMb/diskMb than the defaults, or none of its image is ready. Every
        other field of the request is applied at the claim."""
        if not self.sizes.get(spec["image"]):
            return None
        if (spec["vcpus"], spec["memoryMb"], spec["diskMb"]) != (self.cfg.default_vcpus, self.cfg.default_memory_mb,
                                                                 self.cfg.stateful_size_in_mb):
            M_POOL_COLD.labels("shape").inc()
            return None
        stamp = image.stamp()
        for vm in list(self.ready.values()):      # oldest first; one ending by itself stays for watch_end
            if vm.image == spec["image"] and vm.imageStamp != stamp:
                del self.ready[vm.vmName]         # booted before `make image` rebuilt it: new starts get the new one
                vm.run_task(self.remove(vm, "its image was rebuilt"))
                continue
            if vm.image == spec["image"] and vm.phase == "running" and vm.watch and vm.watch.alive():
                del self.ready[vm.vmName]
                self.wake.set()
                return vm
        M_POOL_COLD.labels("empty").inc()
        return None

    async def claim(self, vm, spec):
        """Make a pool VM the VM of this start request (see the class). The caller holds vm.lock
        and has put the VM under its new name in the manager's VMs; on failure it tears it down."""
        pool_record = vm.paths.record
        vm.rename(spec["vmName"])
        for key in ("callbackUrl", "callbackMethods", "expiresAt", "idleTimeoutSeconds", "labels"):
            setattr(vm, key, spec[key])
        booted_with, vm.network = vm.network, spec["network"]
        vm.createdAt, vm.phase, vm.status = utc_now(), "starting", "CREATED"
        await vm.agent.identity(vm.vmName)
        if vm.network != booted_with:
            await self.apply_egress(vm)
        if not vm.watch.alive():
            raise HypervisorError("the VM stopped while it was claimed")
        vm.phase, vm.status = "running", "RUNNING"
        vm.lastActivityAt = None          # now: the idle clock starts at the claim
        await vm.write_record()           # the claimed VM's record first, then the pool's goes
        RECORD_WRITES.remove(pool_record)

    # ---- refilling ----------------------------------------------------------------

    async def keep_filled(self):
        """The one task that boots pool VMs, one at a time, while the pool is short and
        capacity allows (the pool never makes room for itself); failures back off."""
        while True:
            self.wake.clear()
            short = self.short_image()
            if short and self.has_room():
                try:
                    booted = await self.boot_one(short)
                except Exception as e:       # a task of its own: nobody else would see it
                    log("warm pool boot failed", error=repr(f"{type(e).__name__}: {e}"))
                    self.last_error, booted = f"{utc_now()} {type(e).__name__}: {e}"[:2000], False
                if booted:
                    self.failures, self.last_error = 0, None
                else:
                    self.failures += 1
                    await asyncio.sleep(min(self.RETRY_MAX_S, self.RETRY_MIN_S * 2 ** (self.failures - 1)))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await within(5.0, self.wake.wait())

    def kept(self, image, vms):
        return sum(1 for vm in vms if vm.image == image)

    def short_image(self):
        """The image the pool lacks most VMs of (ready or booting), or None."""
        vms = [*self.ready.values(), *self.booting.values()]
        lacking = {image: size - self.kept(image, vms) for image, size in self.sizes.items()}
        image = max(lacking, key=lacking.get, default=None)
        return image if image and lacking[image] > 0 else None

    def has_room(self):
        """Whether one more pool VM fits; when not, lastError says why the pool stays short."""
        try:
            self.fits(self.cfg.default_vcpus, self.cfg.default_memory_mb, self.cfg.stateful_size_in_mb, self.vms())
        except ApiError as e:
            self.last_error = f"no room for a pool VM: {e}"
            return False
        if self.last_error and self.last_error.startswith("no room"):
            self.last_error = None
        return True

    async def boot_one(self, image):
        """Boot one pool VM of that image; False when it failed (torn down, the error kept for health)."""
        try:
            vm = self.make_vm(self.spec(image), self.image_for(image))
        except ApiError as e:
            self.last_error = str(e)
            return False
        self.booting[vm.vmName] = vm
        clock = StepClock(vm.vmName, "pool boot")
        try:
            await self.boot(vm, clock)
        except ApiError as e:
            M_POOL_BOOT_FAILURES.inc()
            self.last_error = f"{utc_now()} {e}"[:2000]
            return False
        except asyncio.CancelledError:         # cbox.py stops: nothing half booted stays
            vm.phase = "destroying"
            await self.teardown(vm)
            raise
        finally:
            self.booting.pop(vm.vmName, None)
        log("pool VM ready", vm=vm.vmName, ip=vm.ip, cid=vm.cid, ms=f"{clock.total_ms():.1f}")
        self.add_ready(vm)
        return True

    def add_ready(self, vm):
        self.ready[vm.vmName] = vm
        vm.run_task(self.watch_end(vm))

    async def watch_end(self, vm):
        """A pool VM that ends by itself (its VMM exits, the guest resets) is torn down whole."""
        await vm.ended.wait()
        if self.ready.get(vm.vmName) is not vm:
            return                             # claimed meanwhile: the manager keeps it
        del self.ready[vm.vmName]
        await self.remove(vm, "it ended by itself")

    async def remove(self, vm, why):
        self.leaving.add(vm)
        try:
            async with vm.lock:
                vm.phase = "destroying"
                await self.teardown(vm)
        finally:
            self.leaving.discard(vm)
        log("pool VM removed", vm=vm.vmName, why=why)
        self.wake.set()

    async def give_up_one(self):
        """Destroy one ready pool VM to make room for a start that cannot use it; False when
        none is ready."""
        if not self.ready:
            return False
        _, vm = self.ready.popitem(last=False)
        await self.remove(vm, "its capacity is needed by a start of another shape")
        return True

    # ---- restarts and shutdown ----------------------------------------------------

    def full(self, image):
        return self.kept(image, self.ready.values()) >= self.sizes.get(image, 0)

    def offer(self, vm):
        """At start-up: take back a re-adopted pool VM (Adoption) while the pool of its image is
        not full."""
        if self.full(vm.image):
            return False
        self.add_ready(vm)
        return True

    def start(self):
        if self.size:
            self.task = asyncio.get_running_loop().create_task(self.keep_filled())

    async def stop(self, destroy):
        """cbox.py stops: no more boots (one under way is torn down); the ready VMs are
        destroyed (destroy_on_exit) or left running for the next start to re-adopt."""
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for vm in list(self.ready.values()):
            if destroy:
                del self.ready[vm.vmName]
                await self.remove(vm, "cbox.py stops (destroy_on_exit)")
            else:
                vm.stop_watching()


class VmRegistry:
    """The VMs of the API by name (the warm pool's are not among them), where their records
    live, and the tombstones of those a deadline destroyed: looking a VM up, filtering."""

    def __init__(self, cfg):
        self.vms = {}
        self.starting_images = collections.Counter()   # image -> starts not yet among vms (VmStarter)
        self.records_dir = Path(cfg.path(cfg.state_dir), "vms")
        self.tombstones = Tombstones(Path(cfg.path(cfg.state_dir), "tombstones.json"), cfg.tombstone_minutes)

    def get(self, name):
        """The VM of that name (a checked one: check_vm_name), else ApiError 404 (saying why it
        is gone when a deadline destroyed it). Naming a VM is activity (idleTimeoutSeconds)."""
        vm = self.vms.get(name)
        tomb = self.tombstones.get(name) if vm is None or self.past_deadline(vm) else None
        if tomb:
            raise ApiError(404, tomb["error"], stopReason=tomb["stopReason"], destroyedAt=tomb["destroyedAt"],
                           console=tomb["console"])
        if vm is None:
            raise ApiError(404, f"VM '{name}' not found")
        vm.touch()
        return vm

    def past_deadline(self, vm):
        """A VM its deadline is destroying: gone from the API at once, while its teardown runs."""
        return vm.phase == "destroying" and vm.vmName in self.tombstones.entries

    def select(self, matches):
        """The VMs a filter (parse_vm_filter) matches."""
        return [vm for vm in self.vms.values() if matches(vm) and not self.past_deadline(vm)]

    def running(self, name):
        """The VM of that name when its guest agent can take requests, else ApiError 409."""
        vm = self.get(name)
        if vm.status != "RUNNING" or vm.agent is None:
            raise ApiError(409, f"VM '{name}' is not running (status {vm.status})")
        return vm


class Capacity:
    """Whether one more VM fits on the host: max_vms, the host's CPUs (vcpu_overcommit),
    guest_mem_percentage of the host's memory and state_dir's free space (disk_overcommit),
    counting the API's VMs (`vms`, the registry's) and the warm pool's (`pool`, given by the
    caller: the pool asks too). `freed` is set whenever a VM's resources are freed (the warm
    pool waits on it)."""

    def __init__(self, cfg, vms):
        self.cfg, self.vms = cfg, vms
        self.freed = asyncio.Event()

    def disk_promised(self, pool):
        """Bytes the stateful disks of all VMs (the warm pool's included) may still take from
        state_dir: sparse files, each its size (diskMb) less what it already uses."""
        return sum(growth_left(vm.paths.disk, vm.diskMb * 1024 * 1024) for vm in [*self.vms.values(), *pool])

    def check_disk_room(self, disk_mb, pool):
        """ApiError 503 unless state_dir's free space, times disk_overcommit, holds what the VMs'
        stateful disks may still grow to and one more disk of disk_mb (disk_overcommit 0: no check)."""
        if not self.cfg.disk_overcommit:
            return
        size = disk_mb * 1024 * 1024
        promised, free = self.disk_promised(pool), free_bytes(self.cfg.path(self.cfg.state_dir))
        if promised + size > free * self.cfg.disk_overcommit:
            mib = 1024 * 1024
            raise ApiError(503, f"not enough disk space in state_dir: {free // mib} MiB free "
                                f"(x disk_overcommit={self.cfg.disk_overcommit:g}) cannot hold the {promised // mib} MiB "
                                f"the VMs' stateful disks may still grow by and this VM's {size // mib} MiB")

    def check_cpus(self, vcpus, vms):
        """ApiError 503 unless the VMs' vCPUs and `vcpus` more fit in the host's CPUs x
        vcpu_overcommit (0: no check)."""
        if not self.cfg.vcpu_overcommit:
            return
        used, cpus = sum(vm.vcpus for vm in vms), host_cpus()
        if used + vcpus > cpus * self.cfg.vcpu_overcommit:
            raise ApiError(503, f"not enough CPU: the VMs have {used} vCPUs, {vcpus} more do not fit in "
                                f"{cpus} host CPUs x vcpu_overcommit={self.cfg.vcpu_overcommit:g}")

    def export_capacity_metrics(self, pool):
        M_VCPUS.value = sum(vm.vcpus for vm in [*self.vms.values(), *pool])
        M_HOST_CPUS.value = host_cpus()
        M_STATE_DIR_FREE.value = free_bytes(self.cfg.path(self.cfg.state_dir))
        M_DISKS_PROMISED.value = self.disk_promised(pool)

    def check(self, vcpus, memory_mb, disk_mb, pool):
        """ApiError 503 unless one more VM of vcpus, memory_mb and disk_mb fits (max_vms,
        vcpu_overcommit, guest_mem_percentage, state_dir's free space: check_disk_room)."""
        vms = [*self.vms.values(), *pool]
        if len(vms) >= self.cfg.max_vms:
            raise ApiError(503, f"max_vms ({self.cfg.max_vms}) VMs are running"
                                + (f" ({len(pool)} of them in the warm pool)" if pool else ""))
        self.check_cpus(vcpus, vms)
        budget = host_memory_mb() * self.cfg.guest_mem_percentage // 100
        used = sum(vm.memoryMb for vm in vms)
        if used + memory_mb > budget:
            raise ApiError(503, f"not enough memory: {used} MB of {budget} MB "
                                f"(guest_mem_percentage={self.cfg.guest_mem_percentage}) in use, {memory_mb} MB asked")
        self.check_disk_room(disk_mb, pool)


class VmTeardown:
    """How VMs end on the host: freeing the runtime of one that stopped by itself (its record,
    console log, IP and CID stay until DELETE), tearing one down whole, DELETE of one or many
    (a deadline's end leaves a tombstone). Sets `freed` whenever capacity is freed."""

    def __init__(self, registry, net, alloc, freed):
        self.registry, self.net, self.alloc, self.freed = registry, net, alloc, freed

    async def release_runtime(self, vm):
        """Free what a dead VM no longer needs; its record, console log, IP and CID stay until DELETE.
        Each VM is given it when it is made (VM.on_stopped): it runs once the VM stopped by itself."""
        async with vm.lock:
            if vm.phase != "dead":
                return
            await vm.stop_vmm(StepClock(vm.vmName, "stop"), ("vmm.shutdown",))
            if vm.serial:
                await vm.serial.wait_end(1.0)      # the console's last bytes
            vm.close_clients()
            await self.net.remove_egress(vm.tapDeviceName)
            await self.net.remove_tap(vm.tapDeviceName, vm.address)
            remove_tree(vm.paths.run_dir)

    async def teardown(self, vm, clock=None):
        """Undo everything a VM holds: process, listener, tap, files, record, IP and CID.
        The guest is not asked to flush its disks first: its stateful disk goes with it."""
        clock = clock or StepClock(vm.vmName, "cleanup")
        paths = vm.paths
        await vm.stop_vmm(clock, ("vmm.shutdown",))     # CHV: vmm_shutdown -> vm_delete -> vm_shutdown
        vm.stop_watching()
        with clock.step("tap"):
            await self.net.remove_egress(vm.tapDeviceName)
            await self.net.remove_tap(vm.tapDeviceName, vm.address)
        with clock.step("files"):      # in a thread: unlinking a VM's disk takes 10-30 ms, which a
            await asyncio.to_thread(remove_trees, paths.run_dir, paths.vm_dir)   # DELETE of many would
            vm.forget()                                                         # spend on the loop in turn
        self.alloc.release(vm.address, vm.cid)
        vms = self.registry.vms
        if vms.get(vm.vmName) is vm:
            del vms[vm.vmName]
        self.freed.set()                 # capacity freed: the pool may refill

    async def destroy(self, name, reason="destroyed", message=None):
        """Stop a VM and remove everything it holds, its record too.
        A deadline's end (reason ttl or idle, with its message) leaves a tombstone."""
        vm = self.registry.get(name)
        async with vm.lock:
            if self.registry.vms.get(name) is not vm:
                raise ApiError(404, f"VM '{name}' not found")
            clock = StepClock(name, "destroy")
            vm.phase = "destroying"
            vm.stopReason = vm.stopReason or reason
            await vm.write_record()
            if message:
                self.registry.tombstones.add(name, reason, message, vm.console_log().tail())
            await self.teardown(vm, clock)
        log("VM destroyed", vm=name, stopReason=reason, ms=f"{clock.total_ms():.1f}")
        M_VM_DESTROYS.inc()
        EVENTS.publish("vm.destroyed", name, stopReason=vm.stopReason)

    async def destroy_all(self, matches=None):
        """Destroy every VM (or those a filter matches: parse_vm_filter); returns the names of
        those destroyed."""
        names = [vm.vmName for vm in self.registry.select(matches or (lambda vm: True))]
        results = await asyncio.gather(*(self.destroy(n) for n in names), return_exceptions=True)
        return [n for n, r in zip(names, results) if r is None]


class DeadlineKeeper:
    """The one task that ends VMs at their deadlines (ttlSeconds, idleTimeoutSeconds), as
    DELETE would (`destroy`, VmTeardown.destroy, with a reason and message), and PUT /ttl.
    `changed` is set when a deadline is set or a VM starts."""

    def __init__(self, registry, destroy):
        self.registry, self.destroy = registry, destroy
        self.changed = asyncio.Event()               # wakes run()
        self.ending = set()                          # VMs being ended at their deadline
        self.tasks = set()                           # their tasks (shutdown lets them finish)

    def set_ttl(self, name, seconds):
        """PUT /ttl: the VM's deadline `seconds` from now (0: none); checked: lifetime_seconds."""
        vm = self.registry.get(name)
        if vm.phase not in ("running", "dead"):
            raise ApiError(409, f"VM '{name}' is {vm.phase}")
        vm.set_ttl(seconds)
        self.changed.set()
        return vm

    def due(self, now):
        """(VMs whose deadline has come with the reason, the earliest deadline still ahead)."""
        due, wake = [], math.inf
        for vm in self.registry.vms.values():
            deadline = vm.deadline() if vm.phase in ("running", "dead") and vm not in self.ending else None
            if deadline and deadline[0] <= now:
                due.append((vm, deadline[1]))
            elif deadline:
                wake = min(wake, deadline[0])
        return due, wake

    async def run(self):
        """Sleep until the earliest deadline (or until one is set or a VM starts) and end each
        due VM in a task of its own."""
        while True:
            self.changed.clear()
            due, wake = self.due(time.time())
            for vm, reason in due:
                self.ending.add(vm)
                task = asyncio.get_running_loop().create_task(self.end_at_deadline(vm, reason))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            with contextlib.suppress(asyncio.TimeoutError):
                await within(min(max(wake - time.time(), 0.0), 3600.0), self.changed.wait())

    async def end_overdue(self):
        """At start-up: end the adopted VMs whose deadline passed while cbox.py was down."""
        due, _ = self.due(time.time())
        self.ending.update(vm for vm, _ in due)
        await asyncio.gather(*(self.end_at_deadline(vm, reason) for vm, reason in due))

    @staticmethod
    async def background_exec_running(vm):
        """Whether the agent says one of the VM's background execs runs; an agent that does not
        answer within 15 s in all has none (a guest must not keep its VM alive by stalling)."""
        try:
            return await within(15.0, DeadlineKeeper.ask_background_execs(vm))
        except asyncio.TimeoutError:
            return False

    @staticmethod
    async def ask_background_execs(vm):
        """Whether one of the VM's background execs still runs (asking its agent); the
        finished ones are forgotten (VM.background)."""
        running, checked = [], vm.backgroundExecs
        for exec_id in checked:
            try:
                answer = await within(10.0, vm.agent.status(exec_id))
                if isinstance(answer, BodyStream):       # a large output so far
                    answer = await answer.read(answer.length)
                state = await off_loop_if_large(len(answer), json.loads, answer)
            except (AgentError, HttpError, ValueError, TypeError, asyncio.TimeoutError, RecursionError):
                continue
            if isinstance(state, dict) and state.get("running") is True:
                running.append(exec_id)
        if vm.background.forget_idle([i for i in checked if i not in running]):
            vm.save()
        return bool(running)

    async def end_at_deadline(self, vm, reason):
        """Destroy a VM whose deadline came, as DELETE would, unless it turns out to be busy
        (idle: an exec, stream or callback in progress; then its idle clock starts again)."""
        try:
            if reason == "idle" and vm.phase == "running" and (vm.busy_now() or await self.background_exec_running(vm)):
                vm.touch()
                return
            deadline = vm.deadline()      # PUT /ttl or an API call may have moved it meanwhile
            if not deadline or deadline[0] > time.time() or self.registry.vms.get(vm.vmName) is not vm:
                return
            reason = deadline[1]
            if reason == "ttl":
                message = f"VM '{vm.vmName}' was destroyed: ttl expired at {vm.expiresAt}"
            else:
                message = (f"VM '{vm.vmName}' was destroyed: idle for {vm.idleTimeoutSeconds}s "
                           f"(idleTimeoutSeconds) since {vm.lastActivityAt}")
            log("VM deadline", vm=vm.vmName, stopReason=reason)
            with contextlib.suppress(ApiError):
                await self.destroy(vm.vmName, reason, message)
        except Exception as e:       # a task of its own: nobody else would see it
            log("ending a VM at its deadline failed", vm=vm.vmName, error=repr(f"{type(e).__name__}: {e}"))
        finally:
            self.ending.discard(vm)
            self.changed.set()

    async def finish(self, timeout):
        """cbox.py stops: let the VMs half torn down at a deadline finish (else the next start would)."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)


class VmBooter:
    """Boots one VM from a start request (the API's or the warm pool's): its IP and CID, record,
    files, disk, tap, egress, the VMM, vm.create, callbacks, vm.boot and the agent; on any
    failure the VM is torn down (`teardown`), its evidence kept (`failed_starts`) and
    ApiError says at which step."""

    def __init__(self, cfg, net, alloc, disks, failed_starts, teardown):
        self.cfg, self.net, self.alloc, self.disks = cfg, net, alloc, disks
        self.failed_starts, self.teardown = failed_starts, teardown
        self.records_dir = Path(cfg.path(cfg.state_dir), "vms")
        self.prefix = ipaddress.ip_network(cfg.bridge_subnet).prefixlen
        self.gateway = str(ipaddress.ip_interface(cfg.bridge_ip).ip)
        self.dns = host_resolvers() if cfg.dns == "auto" else [d.strip() for d in cfg.dns.split(",") if d.strip()]

    def new_vm(self, spec, image):
        """A VM for a start request (or the warm pool's) booting from image (Images.for_start),
        its IP and CID taken; not started."""
        ip, cid = self.alloc.take()
        vm = VM(self.cfg, self.teardown.release_runtime, **spec, status="CREATED", ip=f"{ip}/{self.prefix}",
                tapDeviceName=tap_name(cid), cid=cid, createdAt=utc_now(), phase="starting", mac=mac_for(ip))
        vm.boot_image, vm.imageStamp = image, image.stamp()
        return vm

    async def boot(self, vm, clock, failures=None):
        """Run a new VM's start steps; on any failure tear it down and raise ApiError saying at
        which step (`failures`, a counter, counts it)."""
        async with vm.lock:
            try:
                await self._start_steps(vm, clock)
            except Exception as e:
                if vm.serial:
                    vm.serial.read_pending()
                if isinstance(e.__cause__, HttpError) and vm.watch:
                    await vm.watch.wait(1.0)     # the API connection broke: if the VMM died, its exit says why
                reason, why = start_failure(e, vm.paths, vm.watch)
                evidence = self.failed_starts.add(vm, clock.current, reason, why)
                message = (f"starting VM '{vm.vmName}' failed at step {clock.current}: {why} (stopReason {reason}); "
                           f"console: {console_tail(vm.console_log())}"
                           + (f"; evidence kept in {evidence}" if evidence else ""))
                log("start failed", vm=vm.vmName, step=clock.current, stopReason=reason, error=repr(why),
                    evidence=evidence)
                if failures:
                    failures.inc()
                await self.teardown.teardown(vm)
                raise ApiError(e.status if isinstance(e, ApiError) else 500, message, stopReason=reason,
                               evidence=evidence and str(evidence)) from e

    async def _start_steps(self, vm, clock):
        paths = vm.paths
        with clock.step("record"):
            self.records_dir.mkdir(parents=True, exist_ok=True)
            await vm.write_record()     # written first: a crash from here on is cleaned up at restart
        with clock.step("files"):
            remove_tree(paths.vm_dir)     # only a crash can have left one without a record
            paths.vm_dir.mkdir(parents=True)
            remove_tree(paths.run_dir)    # stale sockets would make cloud-hypervisor fail
            paths.run_dir.mkdir(parents=True)
            EventMonitor.make_fifo(paths.events_fifo)
        with clock.step("disk"):
            await self.disks.create(paths.disk, vm.diskMb, cached=vm.diskMb == self.cfg.stateful_size_in_mb)
        with clock.step("tap"):
            await self.net.create_tap(vm.tapDeviceName, vm.address, vm.mac)
        with clock.step("egress"):
            await self.net.apply_egress(vm.tapDeviceName, vm.address, vm.network)
        with clock.step("spawn"):
            vm.spawn_vmm()
            await vm.write_record()
            await self.wait_for_api(vm)
        with clock.step("vm.create"):
            vm.sent_config = vm_create_config(vm, self.gateway, self.dns)
            await vm.chv.create(vm.sent_config)
            vm.follow_serial()
        with clock.step("callbacks"):
            vm.serve_callbacks()
        with clock.step("vm.boot"):
            await vm.chv.boot()
        with clock.step("agent"):
            vm.connect_agent()
            await self.wait_for_agent(vm)
        vm.status, vm.phase = "RUNNING", "running"
        vm.touch()                      # the idle clock starts when the VM can be used
        await vm.write_record()

    @staticmethod
    async def wait_for_api(vm, timeout=10.0):
        """Until the new VMM's API answers; StartFailed when the VMM exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if not vm.watch.alive():
                _, reason, message = vmm_exit_reason(vm.paths, vm.watch.exit_code)
                raise StartFailed(reason, f"before its API answered, {message}")
            try:
                return await vm.chv.ping(timeout=1.0)
            except HypervisorError as e:
                if time.monotonic() > deadline:
                    raise HypervisorError(f"API socket did not answer within {fmt_seconds(timeout)}") from e
                await asyncio.sleep(0.005)

    async def wait_for_agent(self, vm):
        """Until the booting guest's agent answers; StartFailed when the VMM exits, the guest
        resets or boot_timeout_s passes first."""
        started = time.monotonic()
        deadline = started + self.cfg.boot_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if not vm.watch.alive():
                _, reason, message = vmm_exit_reason(vm.paths, vm.watch.exit_code)
                raise StartFailed(reason, f"the VM stopped while booting: {message}")
            if vm.reset:       # checked again below: the rebooted guest may answer
                raise StartFailed(vm.reset[0], f"{vm.reset[1]} while booting")
            # A SYN sent before the guest is up is retransmitted only after 1 s: short
            # attempts notice the agent sooner; after 10 s, longer ones suit a slow guest.
            attempt_timeout = 0.3 if time.monotonic() - started < 10 else 2.0
            try:
                status = await vm.agent.health(timeout=attempt_timeout)
                if status == 200 and not vm.reset:
                    return
                last = f"HTTP {status}"
            except AgentError as e:
                last = str(e)
            await asyncio.sleep(0.01)
        raise StartFailed("boot-timeout", f"guest agent did not answer within {fmt_seconds(self.cfg.boot_timeout_s)} "
                                          f"({last})")


class VmStarter:
    """POST /v1/vms: a VM from a validated start request, claimed from the warm pool when one
    fits, else booted now (VmBooter) once there is room (ready pool VMs give way to it)."""

    def __init__(self, registry, capacity, images, pool, booter, teardown, deadlines_changed):
        self.registry, self.capacity, self.images, self.pool, self.booter = registry, capacity, images, pool, booter
        self.teardown, self.deadlines_changed = teardown, deadlines_changed

    async def start(self, spec):
        """Start a VM from a validated start request (validate_start_request: vmName, callbackUrl,
        callbackMethods, vcpus, memoryMb, image, diskMb, network, deadlines, labels) and return it
        RUNNING: a warm pool VM of its image when one fits (WarmPool.take), else a VM booted now;
        on any failure it is torn down and ApiError says at which step (400 for an unknown
        image, 409 for one it cannot start from: Images.for_start)."""
        name, vms = spec["vmName"], self.registry.vms
        if name in vms:
            raise ApiError(409, f"VM '{name}' " + ("is still being destroyed (its deadline came); try again shortly"
                                                  if self.registry.past_deadline(vms[name]) else "already exists"))
        self.registry.tombstones.discard(name)
        image = self.images.for_start(spec["image"])
        starting = self.registry.starting_images
        starting[image.name] += 1          # until the VM is among vms: DELETE /v1/images refuses
        try:
            pooled = self.pool.take(spec, image)
            if pooled and await self.claim(pooled, spec):
                return pooled
            if name in vms:       # taken while a failed claim was torn down
                raise ApiError(409, f"VM '{name}' already exists")
            await self.make_room(spec["vcpus"], spec["memoryMb"], spec["diskMb"])
            M_VM_STARTS.inc()
            vm = self.booter.new_vm(spec, image)
            vms[name] = vm
        finally:
            starting[image.name] -= 1
            if not starting[image.name]:
                del starting[image.name]
        clock = StepClock(name, "start")
        await self.booter.boot(vm, clock, M_VM_START_FAILURES)
        log("VM running", vm=name, ip=vm.ip, cid=vm.cid, ms=f"{clock.total_ms():.1f}")
        self.deadlines_changed.set()
        M_VM_BOOT.observe(clock.total_ms() / 1000)
        EVENTS.publish("vm.started", name, ip=vm.ip, cid=vm.cid, bootMs=round(clock.total_ms(), 1))
        return vm

    async def make_room(self, vcpus, memory_mb, disk_mb):
        """Capacity.check, destroying ready warm pool VMs while they are what stands in the way."""
        while True:
            try:
                return self.capacity.check(vcpus, memory_mb, disk_mb, self.pool.vms())
            except ApiError:
                if not await self.pool.give_up_one():
                    raise

    async def claim(self, vm, spec):
        """Start the request's VM from a warm pool VM (WarmPool.claim); False when that failed
        (the pool VM is torn down and the caller boots one)."""
        name = spec["vmName"]
        self.registry.vms[name] = vm
        clock = StepClock(name, "claim")
        async with vm.lock:
            try:
                with clock.step("claim"):
                    await self.pool.claim(vm, spec)
            except Exception as e:      # whatever it was, the VM goes and the start boots one
                log("claiming a pool VM failed; booting one", vm=name, pool_vm=vm.dirName, error=repr(str(e)))
                M_POOL_COLD.labels("failed").inc()
                vm.phase = "destroying"
                await self.teardown.teardown(vm)
                return False
        M_VM_STARTS.inc()
        M_POOL_CLAIMS.inc()
        log("VM running", vm=name, ip=vm.ip, cid=vm.cid, pool_vm=vm.dirName, ms=f"{clock.total_ms():.1f}")
        self.deadlines_changed.set()
        EVENTS.publish("vm.started", name, ip=vm.ip, cid=vm.cid, bootMs=round(clock.total_ms(), 1), pooled=True)
        return True


class Adoption:
    """At start-up: take over the VMs an earlier cbox.py left, from their records: those whose
    hypervisor still runs them are served again (the warm pool's go back to it), the records
    of those that ended are kept, everything else is torn down, egress chains of VMs that
    are gone included."""

    def __init__(self, cfg, registry, net, alloc, pool, teardown):
        self.cfg, self.registry, self.net, self.alloc = cfg, registry, net, alloc
        self.pool, self.teardown = pool, teardown

    async def adopt_all(self):
        """Re-adopt VMs whose hypervisor still answers; clean up everything else, egress
        chains of VMs that are gone included."""
        records_dir, vms = self.registry.records_dir, self.registry.vms
        records_dir.mkdir(parents=True, exist_ok=True)
        for leftover in records_dir.glob(atomic_temporary(records_dir / "*.json").name):   # cut short: kill -9
            with contextlib.suppress(OSError):
                leftover.unlink()
                log("removed a record write cut short", file=leftover)
        pool = []
        for path in sorted(records_dir.glob("*.json")):
            try:
                vm = VM.from_record(self.cfg, path, self.teardown.release_runtime)
                if is_pool_name(vm.vmName):
                    pool.append(vm)       # after the VMs: a claim may have left their record twice
                    continue
                self.alloc.claim(vm.address, vm.cid)
            except (ValueError, TypeError, ApiError, AttributeError, OSError) as e:
                log("ignoring unreadable VM record", file=path, error=repr(str(e)))
                continue
            vms[vm.vmName] = vm
            await self.adopt(vm)
        await self.adopt_pool(pool)
        await self.net.prune_egress([vm.tapDeviceName for vm in [*vms.values(), *self.pool.vms()]
                                     if vm.phase == "running"])

    async def adopt(self, vm):
        """Take over a VM from its record: watch it again when its VMM still runs it, keep the
        record of one that ended (freeing the rest), tear down anything half started."""
        vm.attach_vmm()
        if vm.phase == "running" and vm.watch and vm.watch.alive():
            try:
                await self.reattach(vm)
                log("VM re-adopted", vm=vm.vmName, pid=vm.pid, ip=vm.ip)
                reset = reset_in_vmm_log(vm.paths.chv_log)      # while nobody read the events
                if reset:
                    vm.guest_reset(*reset)
                return
            except (HypervisorError, CommandError, OSError) as e:
                log("cannot re-adopt VM; cleaning it up", vm=vm.vmName, error=repr(str(e)))
        elif vm.phase == "dead":
            await self.teardown.release_runtime(vm)
            log("VM record kept", vm=vm.vmName, status=vm.status)
            return
        else:
            log("cleaning up VM left behind", vm=vm.vmName, phase=vm.phase)
        vm.phase = "destroying"
        await self.teardown.teardown(vm)

    async def reattach(self, vm):
        """Serve a VM whose hypervisor still runs it (found at start-up): its egress policy as
        recorded, its agent, callbacks and readers, its end watched. HypervisorError,
        CommandError or OSError when it cannot be."""
        info = await vm.chv.info()
        if info.get("state") != "Running":
            raise HypervisorError(f"VM state is {info.get('state')}")
        await self.net.apply_egress(vm.tapDeviceName, vm.address, vm.network)
        vm.connect_agent()
        vm.serve_callbacks()
        self.follow_again(vm)

    @staticmethod
    def follow_again(vm):
        """Re-open the event FIFO (the VMM still holds its write end) and reconnect to the
        serial socket (the VMM replays what it buffered meanwhile). A VM without them (started
        by an older cbox.py) keeps running without events or console."""
        for what, follow in (("events", vm.follow_events), ("serial console", vm.follow_serial)):
            try:
                follow()
            except (HypervisorError, OSError) as e:
                log(f"re-adopted VM has no {what}", vm=vm.vmName, error=repr(str(e)))

    async def adopt_pool(self, vms):
        """Take back the warm pool VMs of the records (at most the pool's size of their image,
        those whose VMM still runs them); tear down the others; drop the pool record of a VM a claim had already
        taken (its new record names this pool directory)."""
        claimed = {vm.dirName for vm in self.registry.vms.values() if vm.dirName}
        for vm in vms:
            if vm.vmName in claimed:
                log("dropping the pool record of a claimed VM", vm=vm.vmName)
                with contextlib.suppress(FileNotFoundError):
                    vm.paths.record.unlink()
                continue
            try:
                self.alloc.claim(vm.address, vm.cid)
            except ValueError as e:
                log("ignoring unusable pool VM record", vm=vm.vmName, error=repr(str(e)))
                continue
            vm.attach_vmm()                  # watched, so that a teardown stops its VMM
            if self.pool.full(vm.image) or not await self.readopt_pool_vm(vm):
                log("cleaning up pool VM", vm=vm.vmName, phase=vm.phase)
                vm.phase = "destroying"
                await self.teardown.teardown(vm)

    async def readopt_pool_vm(self, vm):
        if vm.phase != "running" or not (vm.watch and vm.watch.alive()):
            return False
        try:
            if reset_in_vmm_log(vm.paths.chv_log):
                raise HypervisorError("the guest reset while nobody watched")
            await self.reattach(vm)
        except (HypervisorError, CommandError, OSError) as e:
            log("cannot re-adopt pool VM", vm=vm.vmName, error=repr(str(e)))
            return False
        log("pool VM re-adopted", vm=vm.vmName, pid=vm.pid, ip=vm.ip)
        return self.pool.offer(vm)


class ImageKeeper:
    """GET and DELETE /v1/images: the guest images (Images) with the VMs (the registry's) and
    warm pool VMs of each; an image is removed only when nothing uses it."""

    def __init__(self, images, registry, pool):
        self.images, self.registry, self.pool = images, registry, pool

    def users(self, name):
        """(names of the VMs of that image, how many pool VMs of it)."""
        vms = sorted(vm.vmName for vm in self.registry.vms.values() if vm.image == name)
        return vms, sum(1 for vm in self.pool.vms() if vm.image == name)

    def list(self):
        return [image.api(*self.users(image.name)) for image in map(self.images.get, self.images.names()) if image]

    def get(self, name):
        """GET /v1/images/{image}: the image, else ApiError 404."""
        image = self.images.get(name)
        if image is None:
            raise ApiError(404, f"image '{name}' not found (the images are {', '.join(self.images.names())})")
        return image.api(*self.users(name))

    async def remove(self, name):
        """DELETE /v1/images/{image}: 409 for "default", while a VM (or a start of one) or the
        warm pool uses it, or while it is being built; nothing changes then."""
        self.get(name)
        if name == DEFAULT_IMAGE:
            raise ApiError(409, "the image 'default' is the config's kernel, initramfs and rootfs: it is never removed")
        vms, pooled = self.users(name)
        if vms:
            raise ApiError(409, f"image '{name}' is used by VM(s) {', '.join(vms[:20])}"
                                + (f" and {len(vms) - 20} more" if len(vms) > 20 else "") + ": destroy them first")
        if self.registry.starting_images.get(name):
            raise ApiError(409, f"image '{name}' is used by {self.registry.starting_images[name]} VM start(s) "
                                "in progress: try again once they are over")
        if pooled or self.pool.sizes.get(name):
            raise ApiError(409, f"image '{name}' is kept in the warm pool (pool_images): take it out of the config "
                                f"and restart cbox.py first")
        await asyncio.to_thread(self.images.remove, name)
        log("image removed", image=name)


class EgressChanges:
    """PUT /v1/vms/{name}/network: a running VM's egress policy changed; apply(vm): the VM's
    recorded policy put in force (a warm pool VM's claim)."""

    def __init__(self, registry, net):
        self.registry, self.net = registry, net

    async def apply(self, vm):
        await self.net.apply_egress(vm.tapDeviceName, vm.address, vm.network)

    async def set(self, name, policy):
        """Change a running VM's egress policy (checked by check_network): in force, then
        recorded; when putting it in force fails, the old one stays in force and recorded."""
        vm = self.registry.running(name)
        async with vm.lock:
            if self.registry.vms.get(name) is not vm or vm.phase != "running":
                raise ApiError(409, f"VM '{name}' is not running (status {vm.status})")
            await self.net.apply_egress(vm.tapDeviceName, vm.address, policy)
            vm.network = policy
            vm.save()
        log("egress policy changed", vm=name, egress=policy["egress"], allowOut=",".join(policy["allowOut"]) or None)
        return vm


def bound_vmm_log(vm):
    """Keep a VM's VMM -v log within vmm_log_max_bytes of disk (see bound_vmm_logs)."""
    freed = punch_out_head(vm.paths.chv_log, vm.cfg.vmm_log_max_bytes // 2)
    if freed:
        vm.vmm_log_trimmed += freed
        if vm.vmm_log_trimmed == freed:     # once per VM: the guest may do it all day
            log("hypervisor log over vmm_log_max_bytes: its oldest part is dropped", vm=vm.vmName,
                freed=freed)


async def bound_vmm_logs(all_vms):
    """Keep each hypervisor's -v log within vmm_log_max_bytes of disk, for as long as cbox.py
    runs (`all_vms()`: the VMs to check): a guest can make its VMM log at will (every pvpanic
    write and virtio device reset is an info line), and the log's tail is what cbox.py reads."""
    while True:
        await asyncio.sleep(VMM_LOG_CHECK_S)
        for vm in all_vms():
            bound_vmm_log(vm)


class ExecForwarding:
    """The exec routes, the stats and the console of a VM, forwarded to its guest agent (or
    read on the host), each exec counted finished once (on_exec_answer)."""

    def __init__(self, registry, stream_keepalive_s):
        self.registry, self.stream_keepalive_s = registry, stream_keepalive_s

    async def exec(self, name, agent_body, blocking, timeout, stream=False):
        """Run a command in the VM (POST /exec of the guest agent) from a validated exec request
        (validate_exec_request): the agent's answer, bytes or a BodyStream; with `stream`, the
        command starts in the background and its open event stream (AgentEvents) is returned."""
        vm = self.registry.running(name)
        exec_id = given = None
        with vm.activity(), agent_errors():
            answer = await vm.agent.exec(agent_body, timeout=(timeout + 15.0) if blocking else 15.0,
                                         then=finished_later(vm) if blocking else None)
            M_EXECS_STARTED.inc()
            if blocking:
                on_exec_answer(vm, answer)
            elif not isinstance(answer, BodyStream):
                given, exec_id = background_exec_id(answer)
                if exec_id:
                    vm.note_background_exec(exec_id)
            if not stream:
                return answer
            if isinstance(answer, BodyStream):        # a background answer is small: not the agent's
                answer.client.drop(answer.writer)
                raise AgentError(502, "guest agent: an oversized background exec answer")
            if given is None:
                raise AgentError(502, "guest agent: a background exec answer without execId")
            if exec_id is None:
                raise AgentError(502, "guest agent: a background exec answer with a bad execId")
        return await self.events(name, exec_id, 0)

    async def events(self, name, exec_id, since):
        """An exec's open event stream from seq `since` (AgentEvents): silent for more than two
        keepalive periods (and 10 s), it is broken. The VM is busy (not idle) while it is open;
        a background exec whose finish is awaited is counted finished by its exit event (once,
        by whoever sees it end first)."""
        vm = self.registry.running(name)
        on_exit = (lambda line: on_exec_answer(vm, line, exec_id)) if vm.background.is_awaited(exec_id) else None
        vm.begin_activity()
        with agent_errors():
            return await vm.agent.events(exec_id, since, 2 * self.stream_keepalive_s + 10.0,
                                         on_exit=on_exit, on_close=vm.end_activity)

    def finished_then(self, vm, exec_id):
        """The `then` of a status or kill answer: a large one shows the exec finished once passed on."""
        return finished_later(vm, exec_id) if vm.background.is_awaited(exec_id) else None

    async def status(self, name, exec_id):
        """The state of a background exec (exec_id checked: check_exec_id)."""
        vm = self.registry.running(name)
        with agent_errors():
            answer = await vm.agent.status(exec_id, then=self.finished_then(vm, exec_id))
        if vm.background.is_awaited(exec_id):
            on_exec_answer(vm, answer, exec_id)
        return answer

    async def kill(self, name, exec_id, grace=0.0):
        """End an exec (exec_id checked: check_exec_id): TERM, `grace` seconds, KILL."""
        vm = self.registry.running(name)
        with agent_errors():
            answer = await vm.agent.kill(exec_id, grace, then=self.finished_then(vm, exec_id))
        if vm.background.is_awaited(exec_id):
            on_exec_answer(vm, answer, exec_id)
        return answer

    async def kill_all(self, name, grace=0.0):
        vm = self.registry.running(name)
        with agent_errors():
            return await vm.agent.kill_all(grace)

    async def list(self, name):
        vm = self.registry.running(name)
        with agent_errors():
            return await vm.agent.list()

    async def signal(self, name, exec_id, body):
        vm = self.registry.running(name)
        with agent_errors():
            return await vm.agent.signal(exec_id, body)

    async def stdin(self, name, exec_id, body):
        vm = self.registry.running(name)
        with agent_errors():
            return await vm.agent.stdin(exec_id, body)

    async def resize(self, name, exec_id, body):
        """A terminal's new size ({"cols", "rows"}, checked: terminal_control)."""
        vm = self.registry.running(name)
        with agent_errors():
            return await vm.agent.resize(exec_id, body)

    async def stats(self, name):
        """GET /v1/vms/{name}/stats: the guest's view (its agent) and the VMM process's."""
        vm = self.registry.running(name)
        with agent_errors():
            guest = await vm.agent.stats()
        return {"guest": guest, "vmm": vm.vmm_usage()}

    def console_text(self, name):
        """What GET /logs shows of a VM's serial console (see ConsoleLog.text)."""
        return self.registry.get(name).console_log().text()


class VMManager:
    """All VMs: composes each job's home into a VM's life. registry (VmRegistry: the VMs by
    name), capacity (Capacity), teardown (VmTeardown), deadlines (DeadlineKeeper), booter
    (VmBooter), images (ImageKeeper: the guest images, GET/DELETE /v1/images), pool (WarmPool),
    starter (VmStarter), adoption (Adoption), egress (EgressChanges), execs (ExecForwarding);
    failed_starts keeps the evidence of failed starts."""

    def __init__(self, cfg, network):
        self.cfg = cfg
        self.registry = VmRegistry(cfg)
        self.vms = self.registry.vms
        alloc = Allocator(cfg.bridge_subnet, ipaddress.ip_interface(cfg.bridge_ip).ip)
        self.failed_starts = FailedStarts(Path(cfg.path(cfg.state_dir), "failed-starts"), cfg.failed_starts_kept)
        self.capacity = Capacity(cfg, self.vms)
        self.teardown = VmTeardown(self.registry, network, alloc, self.capacity.freed)
        self.deadlines = DeadlineKeeper(self.registry, self.teardown.destroy)
        self.booter = VmBooter(cfg, network, alloc, StatefulDisks(Path(cfg.path(cfg.state_dir), "templates")),
                               self.failed_starts, self.teardown)
        self.egress = EgressChanges(self.registry, network)
        images = Images(cfg)
        self.pool = WarmPool(cfg, fits=self.capacity.check, image_for=images.for_start, make_vm=self.booter.new_vm,
                             boot=self.booter.boot, teardown=self.teardown.teardown, apply_egress=self.egress.apply,
                             wake=self.capacity.freed)          # idle VMs per image, outside the registry
        self.images = ImageKeeper(images, self.registry, self.pool)
        self.starter = VmStarter(self.registry, self.capacity, images, self.pool, self.booter, self.teardown,
                                 self.deadlines.changed)
        self.adoption = Adoption(cfg, self.registry, network, alloc, self.pool, self.teardown)
        self.execs = ExecForwarding(self.registry, cfg.stream_keepalive_s)

    def all_vms(self):
        """The API's VMs and the warm pool's."""
        return [*self.vms.values(), *self.pool.vms()]

    def export_capacity_metrics(self):
        self.capacity.export_capacity_metrics(self.pool.vms())

    async def shutdown(self):
        """cbox.py is stopping: destroy VMs if configured, else leave them running for the next start."""
        await self.deadlines.finish(3 * self.cfg.shutdown_timeout_s + 15)
        await self.pool.stop(destroy=self.cfg.destroy_on_exit)
        if self.cfg.destroy_on_exit:
            await self.teardown.destroy_all()
        for vm in list(self.vms.values()):
            vm.stop_watching()
        CallbackBridge.close_url_clients()


# =============================================================================
# 12. REST server
# =============================================================================

def log_request(method, target, status, t0, vm_name=None):
    """The request log line: 'request method=.. path=.. vm=.. status=.. ms=..'; `vm_name` is
    the VM a request body named (a start), else the VM the path names. What the client sent
    is cut short here and escaped by log()."""
    path = target.split("?", 1)[0][:200]
    if not vm_name and path.startswith("/v1/vms/"):
        vm_name = path[len("/v1/vms/"):].split("/", 1)[0]
    method, vm_name, ms = method[:32], vm_name[:64] if vm_name else None, f"{(time.monotonic() - t0) * 1000:.1f}"
    # the line log() writes, made here at a third of its cost (one per request); log() escapes it when
    # not printable
    extra = f" method={method} path={path}{f' vm={vm_name}' if vm_name else ''} status={status} ms={ms}"
    if extra.isprintable():
        log_line("request", extra)
    else:
        log("request", method=method, path=path, vm=vm_name, status=status, ms=ms)


REQUEST_LINE_MAX = 8 * 1024      # a longer request line (its URL, mostly) is answered 414
QUERY_PARAMS_MAX = 64            # query parameters of a request (label filters included); more: 400
# method: RFC 9110's token, bounded; target: visible ASCII (no space, control or 8-bit character)
REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}) ([\x21-\x7e]+) (HTTP/1\.[0-9])")


def parse_request_line(line):
    """'METHOD TARGET HTTP/1.x' -> (method, target, version); ApiError 414 over
    REQUEST_LINE_MAX, 400 when malformed (a method that is no token, a target of anything
    but visible ASCII)."""
    if len(line) > REQUEST_LINE_MAX:
        raise ApiError(414, f"request line longer than {REQUEST_LINE_MAX} bytes")
    m = REQUEST_LINE.fullmatch(line)
    if m is None:
        raise ApiError(400, "malformed request line")
    return m.groups()


def parse_query(query):
    """A request's query string -> parse_qs's {name: [values]}; ApiError 400 beyond
    QUERY_PARAMS_MAX parameters (their cost must stay small: each is checked, and a label
    filter is matched against every VM)."""
    if query.count("&") >= QUERY_PARAMS_MAX:
        raise ApiError(400, f"more than {QUERY_PARAMS_MAX} query parameters")
    return urllib.parse.parse_qs(query, keep_blank_values=True)


class BodyBudget:
    """The bytes of REST request bodies being received or held, over all connections, capped at
    request_body_buffer_bytes: a body's Content-Length is taken from the budget before a byte of
    it is read (ApiError 503 when it does not fit) and given back once its request is answered."""

    def __init__(self, limit):
        self.limit, self.held = limit, 0

    def take(self, size):
        if size and self.held + size > self.limit:
            raise ApiError(503, f"too many request bodies are being received at once ({self.held} of "
                                f"request_body_buffer_bytes={self.limit} bytes taken, {size} asked); try again shortly")
        self.held += size
        return size

    def give_back(self, size):
        self.held -= size


def route_name(pattern):
    """A route's name for the metrics: its regex as a template, '/v1/vms/{name}/exec'."""
    return re.sub(r"\\(.)", r"\1", re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern.strip("^$")))


def count_request(route, method, status):
    M_HTTP_REQUESTS.labels(route, method if method in HTTP_METHODS else "other", status).inc()


def refresh_process_metrics():
    """cbox.py's own process, read when /v1/metrics is scraped."""
    usage = process_usage("self")
    if usage:
        M_PROCESS_RSS.value, M_PROCESS_CPU.value = usage
    with contextlib.suppress(OSError):
        M_PROCESS_FDS.value = len(os.listdir("/proc/self/fd"))
    M_PROCESS_MAX_FDS.value = fd_limit()
    M_PROCESS_UPTIME.value = round(time.monotonic() - LOG_START, 3)
    M_PROCESS_START.value = round(time.time() - (time.monotonic() - LOG_START), 3)
    M_BUILD_INFO.labels(VERSION).value = 1


class EventRelay:
    """An exec's events (AgentEvents) relayed to a REST client as they arrive.

    The answer is chunked, one event per chunk, written as soon as it is read (TCP_NODELAY
    on both sides, no buffering): NDJSON lines, or Server-Sent Events (`id: SEQ`, `data:
    JSON`) for a client that accepts text/event-stream. A stream from the agent that breaks
    ends with an "error" event whose seq is where a re-attach resumes, instead of the exit
    event. A client that reads too slowly (its socket buffer stays full for
    http_body_timeout_s) is dropped; nothing the client does ends the exec."""

    HIGH_WATER = 256 * 1024     # unsent bytes that make the relay wait for the client
    RESULT_TIMEOUT = 60.0       # the exit event's result, read from the agent
    LINE_BREAKS_TO_SPACES = bytes.maketrans(b"\r\n", b"  ")

    def __init__(self, events, sse, chunked=True):
        self.events, self.sse = events, sse
        self.chunked = chunked       # an HTTP/1.0 client gets the events unframed, until the close
        self.content_type = "text/event-stream" if sse else "application/x-ndjson"
        self.end = b"0\r\n\r\n" if chunked else b""

    def head(self, keep_alive):
        return (f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\n"
                + ("Transfer-Encoding: chunked\r\n" if self.chunked else "")
                + "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
                + ("" if keep_alive and self.chunked else "Connection: close\r\n") + "\r\n").encode("latin-1")

    def chunk(self, line, event):
        if self.sse:
            line = b"id: %d\ndata: %s\n\n" % (event["seq"], line.rstrip(b"\r\n"))
        return b"%x\r\n%s\r\n" % (len(line), line) if self.chunked else line

    async def write_exit(self, writer, line, event, drain_timeout):
        """The exit event with the exec's whole result, output, stdout and stderr included.

        The agent's exit event leaves those three out (they were streamed), so the result
        comes from its GET /exec/{id}, bounded like any exec result. A large one is copied
        through, never whole in memory: its leading "{" becomes a space after the event's seq
        and type, and raw line breaks (never in valid JSON; they would end an NDJSON line or
        an SSE field) become spaces. Without a result (the agent forgot the exec, or sent no
        JSON object) the agent's exit event goes out as it came."""
        try:
            answer = await self.events.result(self.RESULT_TIMEOUT)
        except AgentError as e:
            answer, problem = None, str(e)
        else:
            problem = "the result is not a JSON object"
        if isinstance(answer, BodyStream) and await self.copy_exit(writer, event["seq"], answer, drain_timeout):
            return
        try:
            result = json.loads(answer) if isinstance(answer, bytes) else None
        except (ValueError, RecursionError):
            result = None
        if not isinstance(result, dict):
            log("exit event without the exec's output", vm=self.events.vm_name, execId=self.events.exec_id,
                error=repr(problem))
            writer.write(self.chunk(line, event))
            return
        full = {"seq": event["seq"], "type": "exit"}
        full.update((k, v) for k, v in result.items() if k not in full)
        writer.write(self.chunk(json_bytes(full) + b"\n", full))

    async def copy_exit(self, writer, seq, body, drain_timeout):
        """A large result (BodyStream) as the exit event's line (see write_exit); False when
        it is not a JSON object (nothing written). A result that breaks off ends the answer:
        its chunk was announced whole, so the client sees a stream that broke."""
        start = b'{"seq":%d,"type":"exit",' % seq
        end = b"\n"
        if self.sse:
            start, end = b"id: %d\ndata: " % seq + start, b"\n\n"
        if self.chunked:
            start = b"%x\r\n" % (len(start) + body.length + len(end)) + start
            end += b"\r\n"
        transport = writer.transport
        try:
            async with contextlib.aclosing(body.pieces(self.RESULT_TIMEOUT)) as pieces:
                first = True
                async for piece in pieces:
                    if first:
                        if piece[:1] != b"{":
                            return False
                        writer.write(start)
                        piece, first = b" " + piece[1:], False
                    writer.write(piece.translate(self.LINE_BREAKS_TO_SPACES))
                    if transport.get_write_buffer_size() > self.HIGH_WATER:
                        await within(drain_timeout, writer.drain())
        except HttpError as e:
            log("exec stream broke inside its exit event", vm=self.events.vm_name,
                execId=self.events.exec_id, error=repr(str(e)))
            raise ConnectionResetError("the exec result from the guest agent broke off") from e
        writer.write(end)
        return True

    async def send(self, writer, keep_alive, drain_timeout):
        """Relay until the exit event (or an error event); returns whether the connection may
        be kept. Raises OSError or asyncio.TimeoutError when the client went away or stalled."""
        transport = writer.transport
        try:
            writer.write(self.head(keep_alive))
            while True:
                try:
                    batch = await self.events.next_events()
                except AgentError as e:
                    log("exec stream broke", vm=self.events.vm_name, error=repr(str(e)))
                    seq = self.events.next_seq
                    event = {"seq": seq, "type": "error", "error": str(e)}
                    writer.write(self.chunk(json_bytes(event) + b"\n", event) + self.end)
                    return False
                if transport.is_closing():
                    raise ConnectionResetError("the client went away")
                finished = self.events.finished
                if finished:
                    *batch, (exit_line, exit_event) = batch
                if len(batch) == 1:
                    writer.write(self.chunk(*batch[0]))
                elif batch:
                    writer.write(b"".join([self.chunk(line, event) for line, event in batch]))
                if finished:
                    await self.write_exit(writer, exit_line, exit_event, drain_timeout)
                    writer.write(self.end)
                    return keep_alive and self.chunked
                if transport.get_write_buffer_size() > self.HIGH_WATER:
                    await within(drain_timeout, writer.drain())
        finally:
            self.events.close()


class Terminals:
    """The WebSockets attached to execs (TerminalAttach): at most PER_VM a VM, and which one is
    each exec's writer: the first attach while no other of that exec (named the same way, its
    execId or its tag) holds the role; the others read only."""

    PER_VM = 16

    def __init__(self):
        self.attaches = set()          # open TerminalAttach
        self.writers = set()           # (VM name, exec reference) of the execs whose writer is attached
        self.per_vm = collections.Counter()

    def admit(self, name, exec_ref):
        """Room for one more attach of this VM (else ApiError 409); whether it is the writer."""
        if self.per_vm[name] >= self.PER_VM:
            raise ApiError(409, f"VM '{name}' has {self.PER_VM} terminals attached already")
        self.per_vm[name] += 1
        writer = (name, exec_ref) not in self.writers
        if writer:
            self.writers.add((name, exec_ref))
        return writer

    def release(self, name, exec_ref, writer):
        """Undo admit()."""
        self.per_vm[name] -= 1
        if not self.per_vm[name]:
            del self.per_vm[name]
        if writer:
            self.writers.discard((name, exec_ref))

    def end(self, attach):
        """An attach ended (TerminalAttach.on_end)."""
        self.attaches.discard(attach)
        self.release(attach.name, attach.exec_ref, attach.writer_role)


def terminal_control(payload):
    """A client's control message -> (type, the agent's request body); ValueError says what is wrong."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        message = None
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "resize":
        size = {k: message.get(k) for k in ("cols", "rows")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= TERMINAL_SIZE_MAX
                   for v in size.values()):
            raise ValueError(f"resize needs cols and rows, each 1..{TERMINAL_SIZE_MAX}")
        return "resize", size
    if kind == "signal":
        try:
            return "signal", {"signal": signal_number(message.get("signal"), "signal"), "to": "foreground"}
        except (ApiError, AttributeError, TypeError, ValueError, OverflowError):
            raise ValueError("signal needs a signal name (INT, SIGINT) or number") from None
    if kind == "eof":
        return "eof", None
    raise ValueError('a control message is {"type": "resize", "cols", "rows"}, {"type": "signal", "signal"} '
                     'or {"type": "eof"}')


class TerminalAttach:
    """One WebSocket attached to an exec (GET /v1/vms/{name}/exec/{id}/attach), once the 101
    answer is sent. To the client: the terminal's bytes (stdout and stderr events) as binary
    frames, the start, dropped and error events and last the exit event (the exec result
    without the output the frames carried) as JSON text frames, then a close (1000). The events
    are read from seq 0: the agent's kept events (at most max(exec_output_limit_bytes, 64 KiB)
    of them) are the replay of the screen, then they go on live. From the writer (Terminals):
    binary frames are typed input, passed to the agent's stdin one request at a time, in
    order; text frames are control messages {"type": "resize", "cols", "rows"}, {"type":
    "signal", "signal"} (to the terminal's foreground process group, as a key would) and
    {"type": "eof"}, taken in order with the input. A read-only attach's input is refused
    with an "error" text message. A detach (the client's close, or its connection ending)
    leaves the command running.

    Bounds: a client's frame MAX_FRAME bytes, its message MAX_MESSAGE, input waiting for the
    agent INPUT_MAX (the client's frames are not read meanwhile); a client whose unsent bytes
    stay above HIGH_WATER for drain_timeout is dropped, so is one that answers none of
    MISSED_PINGS pings (one every PING_S). What a client sends reaches the log only through
    log()'s escape."""

    MAX_FRAME = 64 * 1024
    MAX_MESSAGE = 1024 * 1024
    INPUT_MAX = 1024 * 1024
    STDIN_MAX = 1024 * 1024        # the agent's bound of one stdin request
    HIGH_WATER = 256 * 1024
    OUTPUT_FRAME = 64 * 1024       # terminal bytes per binary frame at most
    PING_S = 20.0
    MISSED_PINGS = 3

    def __init__(self, execs, name, exec_ref, events, key, writer_role, on_end, drain_timeout):
        self.execs, self.name, self.exec_ref, self.events = execs, name, exec_ref, events
        self.key, self.writer_role, self.on_end, self.drain_timeout = key, writer_role, on_end, drain_timeout
        self.frames = WebSocketFrames(client=False, max_frame=self.MAX_FRAME, max_message=self.MAX_MESSAGE)
        self.writer = None
        self.input = collections.deque()     # ("data", bytes) or (control type, agent body), in order
        self.input_bytes = 0
        self.input_ready, self.input_room = asyncio.Event(), asyncio.Event()
        self.unanswered = 0                  # pings sent since the client last sent a frame
        self.told_read_only = False

    def head(self):
        return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {websocket_accept(self.key)}\r\n\r\n").encode("latin-1")

    async def run(self, reader, writer):
        """The session, until the exec's exit, a detach or a failure; the connection is closed then."""
        self.writer = writer
        writer.write(self.head())
        loop = asyncio.get_running_loop()
        ends = [loop.create_task(self.relay_output()), loop.create_task(self.read_client(reader)),
                loop.create_task(self.keep_alive())]
        sender = loop.create_task(self.send_input())
        try:
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            code, why = next(iter(done)).result()
        except (OSError, asyncio.TimeoutError) as e:
            code, why = None, f"the client went away or stalled: {type(e).__name__}"
        except Exception as e:      # never a traceback to the client; the connection goes
            log("terminal failed", vm=self.name, execId=self.exec_ref, error=repr(f"{type(e).__name__}: {e}"))
            code, why = 1011, "internal error"
        finally:
            for task in (*ends, sender):
                task.cancel()
            self.events.close()
            self.on_end(self)
        log("terminal closed", vm=self.name, execId=self.exec_ref, code=code, why=why)
        if code is not None and not writer.transport.is_closing():
            writer.write(self.frames.close_frame(code, why))
            with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
                await within(1.0, writer.drain())
        if code is None:
            writer.transport.abort()
        else:
            writer.close()

    # ---- to the client ----------------------------------------------------------------

    async def send(self, opcode, payload):
        self.writer.write(self.frames.frame(opcode, payload))
        if self.writer.transport.get_write_buffer_size() > self.HIGH_WATER:
            await within(self.drain_timeout, self.writer.drain())

    async def relay_output(self):
        """Events to the client until the exit event; (close code, reason)."""
        while True:
            try:
                batch = await self.events.next_events()
            except AgentError as e:
                await self.send(WebSocketFrames.TEXT, json_bytes({"type": "error", "seq": self.events.next_seq,
                                                                 "error": str(e)}))
                return 1011, "the exec's stream from the guest broke"
            output = bytearray()
            for _, event in batch:
                if event["type"] in ("stdout", "stderr"):
                    output += output_bytes(event)
                    if len(output) >= self.OUTPUT_FRAME:
                        await self.send_output(output)
                elif event["type"] != "keepalive":
                    await self.send_output(output)
                    await self.send(WebSocketFrames.TEXT, json_bytes(event))
            await self.send_output(output)
            if self.events.finished:
                return 1000, "the command exited"

    async def send_output(self, output):
        while output:
            await self.send(WebSocketFrames.BINARY, bytes(output[:self.OUTPUT_FRAME]))
            del output[:self.OUTPUT_FRAME]

    async def keep_alive(self):
        """A ping every PING_S (proxies keep an idle connection); a client that answers none of
        MISSED_PINGS in a row is gone."""
        while True:
            await asyncio.sleep(self.PING_S)
            if self.unanswered >= self.MISSED_PINGS:
                return None, f"no answer to {self.MISSED_PINGS} pings"
            self.unanswered += 1
            self.writer.write(self.frames.frame(WebSocketFrames.PING, b"cbox"))

    # ---- from the client ------------------------------------------------------------

    async def read_client(self, reader):
        """The client's frames until it closes or breaks the protocol; (close code, reason)."""
        while True:
            while self.input_bytes > self.INPUT_MAX:      # the agent is behind: the client waits
                self.input_room.clear()
                await self.input_room.wait()
            data = await reader.read(self.MAX_FRAME)
            if not data:
                return None, "the client closed the connection"
            try:
                messages = self.frames.feed(data)
            except WebSocketError as e:
                return e.code, str(e)
            for opcode, payload in messages:
                self.unanswered = 0
                if opcode == WebSocketFrames.CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
                    return (code if 1000 <= code < 5000 and code not in (1004, 1005, 1006, 1015) else 1002,
                            "the client detached")
                if opcode == WebSocketFrames.PING:
                    self.writer.write(self.frames.frame(WebSocketFrames.PONG, payload))
                elif opcode == WebSocketFrames.BINARY:
                    self.take_input(("data", payload), len(payload))
                elif opcode == WebSocketFrames.TEXT:
                    self.control(payload)

    def tell(self, error):
        """An "error" text frame (not drained: only the output relay waits for the client)."""
        self.writer.write(self.frames.frame(WebSocketFrames.TEXT, json_bytes({"type": "error", "error": error})))

    def control(self, payload):
        try:
            self.take_input(terminal_control(payload), 0)
        except ValueError as e:
            self.tell(str(e))

    def take_input(self, item, size):
        if not self.writer_role:
            if not self.told_read_only:
                self.told_read_only = True
                self.tell("this attach reads only: another one of this exec is its writer")
            return
        kind, value = item
        if kind == "data" and self.input and self.input[-1][0] == "data" \
                and len(self.input[-1][1]) + size <= self.STDIN_MAX:
            self.input[-1][1].extend(value)          # keystrokes joined: fewer requests
        else:
            self.input.append((kind, bytearray(value) if kind == "data" else value))
        self.input_bytes += size
        self.input_ready.set()

    async def send_input(self):
        """The writer's input and control messages to the agent, one request at a time, in order."""
        while True:
            await self.input_ready.wait()
            self.input_ready.clear()
            while self.input:
                kind, value = self.input.popleft()
                try:
                    if kind == "data":
                        await self.write_stdin(value)
                    elif kind == "resize":
                        await self.execs.resize(self.name, self.exec_ref, value)
                    elif kind == "signal":
                        await self.execs.signal(self.name, self.exec_ref, value)
                    else:
                        await self.execs.stdin(self.name, self.exec_ref, {"data": "", "eof": True})
                except ApiError as e:
                    self.tell(str(e))
                finally:
                    self.input_bytes -= len(value) if kind == "data" else 0
                    self.input_room.set()

    async def write_stdin(self, data):
        """Typed bytes to the agent; what it did not take within its wait is sent again."""
        while data:
            answer = await self.execs.stdin(self.name, self.exec_ref,
                                            {"dataBase64": base64.b64encode(data).decode("ascii")})
            try:
                written = json.loads(answer).get("written")
            except (ValueError, TypeError, AttributeError, RecursionError):
                return                 # not the agent's answer: nothing to go on with
            if not isinstance(written, int) or isinstance(written, bool) or not 0 < written <= len(data):
                return
            del data[:written]


class Request:
    """One request; dispatch() fills in path, query, args, params and the checked body, a handler
    may name its VM."""
    # set on a request when known (class attributes until then: one request per exec)
    path = None
    body = None                # bytes once read (after the token was checked)
    json = None                # the body as its route's schema checked it (Operation.body)
    vm_name = None             # the VM a request body names, for the request log
    allow = ""                 # a 405's Allow header: the methods of the path
    route = "unmatched"        # the route's name (route_name), for the metrics

    def __init__(self, method, target, headers, version="HTTP/1.1", t0=None):
        self.method, self.target, self.headers, self.version = method, target, headers, version
        self.t0 = time.monotonic() if t0 is None else t0      # its head was read (the request log's ms)
        self.keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        self.query, self.params = {}, {}
        self.args = {}             # the query checked against the route's parameters (check_query)


# ---- the API description: GET /v1/openapi.json, made from the route table -------------------

def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


JSON, NDJSON, SSE = "application/json", "application/x-ndjson", "text/event-stream"
SUCCESS_SCHEMA = {"type": "object", "required": ["success"], "properties": {"success": {"const": True}}}
IMAGE_SCHEMA = {       # an image (Image.api): GET /v1/images
    "type": "object", "properties": {
        "name": {"type": "string"},
        "sizeBytes": {"type": ["integer", "null"], "description": "its rootfs.ext4 (null: missing)"},
        "builtAt": NULLABLE_TIME,
        "source": {"type": ["object", "null"], "description": "what it was built from (image.json's source): "
                                                              "type debootstrap or dockerfile, and their inputs"},
        "agentVersion": {"type": ["string", "null"]}, "agentProtocol": {"type": ["integer", "null"]},
        "rootfs": {"type": "string", "description": "its root file system on the host"},
        "ownKernel": {"type": "boolean", "description": "it brings its own kernel or initramfs"},
        "usable": {"type": "boolean"},
        "problem": {"type": ["string", "null"], "description": "why a VM cannot start from it, and how to rebuild it"},
        "vms": {"type": "array", "items": {"type": "string"}, "description": "the VMs of this image"},
        "pooled": {"type": "integer", "description": "warm pool VMs of this image"}}}
IMAGE_SCHEMA["required"] = list(IMAGE_SCHEMA["properties"])
RESPONSE_SCHEMAS = {      # the answers' schemas, by name (the VM's and the exec's live beside their code)
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"},
        "stopReason": {"type": "string", "description": "a VM a deadline ended (404 while its tombstone lasts), "
                                                        "or why a start failed (500)"},
        "evidence": {"type": ["string", "null"], "description": "a failed start: the directory its evidence is "
                                                                "kept in (GET /v1/failed-starts)"},
        "destroyedAt": TIME}},
    "Health": {"type": "object", "required": ["status", "timestamp", "version", "commit", "vms", "pool", "loopLagMs"],
               "properties": {
        "status": {"const": "healthy"}, "timestamp": TIME, "version": {"type": "string"},
        "commit": {"type": "string", "description": "the commit cbox.py was built from, or 'unknown'"},
        "vms": {"type": "integer", "minimum": 0},
        "pool": {"type": "object", "description": "the warm pool (pool_size)",
                 "required": ["size", "ready", "booting", "lastError"], "properties": {
            "size": {"type": "integer"}, "ready": {"type": "integer"}, "booting": {"type": "integer"},
            "lastError": {"type": ["string", "null"]},
            "images": {"type": "object", "description": "per image (pool_size, pool_images)", "additionalProperties": {
                "type": "object", "required": ["size", "ready", "booting"], "properties": {
                    k: {"type": "integer"} for k in ("size", "ready", "booting")}}}}},
        "loopLagMs": {"type": "object", "description": "how late the event loop ran a 100 ms timer over the last "
                                                       "minute, in milliseconds", "required": ["p50", "p99", "max"],
                      "properties": {q: {"type": "number", "minimum": 0} for q in ("p50", "p99", "max")}}}},
    "VM": VM_SCHEMA,
    "VmList": {"type": "object", "required": ["vms"], "properties": {"vms": {"type": "array", "items": ref("VM")}}},
    "Image": IMAGE_SCHEMA,
    "ImageList": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": ref("Image")}}},
    "Success": SUCCESS_SCHEMA,
    "Destroyed": {**SUCCESS_SCHEMA, "required": ["success", "destroyed"], "properties": {
        **SUCCESS_SCHEMA["properties"], "destroyed": {"type": "array", "items": {"type": "string"}}}},
    "ExecResult": EXEC_RESULT_SCHEMA,
    "ExecStarted": EXEC_STARTED_SCHEMA,
    "ExecList": EXEC_LIST_SCHEMA,
    "ExecsKilled": {"type": "object", "required": ["killed"], "properties": {
        "killed": {"type": "array", "items": {"type": "string"}}}},
    "SignalSent": {"type": "object", "required": ["execId", "signal"], "properties": {
        "execId": {"type": "string"}, "signal": {"type": "integer"}}},
    "StdinWritten": {"type": "object", "required": ["written"], "properties": {
        "written": {"type": "integer", "minimum": 0, "description": "bytes"}}},
    "StreamEvent": STREAM_EVENT_SCHEMA,
    "Stats": {"type": "object", "required": ["guest", "vmm"], "properties": {
        "guest": {"type": "object", "properties": {
            **{k: {"type": ["integer", "null"]} for k in ("memTotalBytes", "memAvailableBytes")},
            **{k: {"type": ["number", "null"]} for k in ("load1", "load5", "load15", "uptimeS")},
            **{k: {"type": ["object", "null"], "properties": {
                "totalBytes": {"type": ["integer", "null"]}, "usedBytes": {"type": ["integer", "null"]}}}
               for k in ("rootDisk", "stateDisk")}}},
        "vmm": {"type": "object", "required": ["rssBytes", "cpuSeconds"], "properties": {
            "rssBytes": {"type": ["integer", "null"]}, "cpuSeconds": {"type": ["number", "null"]}}}}},
    "Events": {"type": "object", "required": ["events", "next", "missed"], "properties": {
        "events": {"type": "array", "items": EVENT_SCHEMA},
        "next": {"type": "integer", "description": "the `since` of the next call"},
        "missed": {"type": "boolean", "description": "events after `since` are no longer kept"}}},
    "OpenApi": {"type": "object", "required": ["openapi", "info", "paths"]},
    "FailedStarts": {"type": "object", "required": ["failedStarts"], "properties": {"failedStarts": {
        "type": "array", "description": "newest first (failed_starts_kept of them)", "items": {
            "type": "object", "required": [*FAILED_START_FIELDS, "directory", "files", "vmmLog", "console"],
            "properties": {
                "vmName": {"type": "string"}, "failedAt": TIME, "step": {"type": "string"},
                "stopReason": {"type": "string"}, "error": {"type": "string"},
                "directory": {"type": "string", "description": "where its files are, on the host"},
                "files": {"type": "object", "additionalProperties": {"type": "integer"},
                          "description": "file name: bytes"},
                "vmmLog": {"type": "array", "items": {"type": "string"},
                           "description": "the last lines of the hypervisor's -v log"},
                "console": {"type": "array", "items": {"type": "string"},
                            "description": "the last lines of the serial console"}}}}}},
}
ERROR_STATUSES = {400: "bad input", 401: "missing or wrong API token", 404: "unknown VM, exec, image or route",
                  409: "conflict: name or tag taken, VM not running, exec finished, image in use or unusable", 413: "request body too large",
                  500: "internal error", 502: "the guest agent is unreachable or misbehaved",
                  503: "no capacity (guest IPs, vsock CIDs)"}
PATH_PARAMS = {"name": VM_NAME_SCHEMA, "exec_id": EXEC_REF_SCHEMA, "image": IMAGE_NAME_SCHEMA}
BODY_NAMES = {"NetworkRequest": "network"}     # errors name its fields as a start request's: network.allowOut


class Operation:
    """One method of a route: its handler and what the API description says of it. `ok`: the
    200 answer, {media type: schema name, list of names (any of them) or None (text)};
    `body`: the request body's schema (a name in request_schemas); `query`: the query
    parameters' schemas (dispatch checks them: check_query, and the body: check_schema);
    `errors`: the statuses it answers besides those every route may (400 for bad parameters,
    401, 404 for an unknown VM, 500); `public`: no API token needed; `abandonable`: a client
    that goes away cancels the handler (agent calls only: abandoning them leaves nothing half
    done, a VM start would); `switches`: it answers 101 Switching Protocols (a WebSocket)
    instead of 200. The summary is the handler's docstring."""

    def __init__(self, handler, ok, body=None, query=None, errors=(), public=False, abandonable=False,
                 switches=False):
        self.handler, self.ok, self.body, self.query = handler, ok, body, query or {}
        self.errors, self.public, self.abandonable, self.switches = errors, public, abandonable, switches
        self.body_name = BODY_NAMES.get(body, "")

    def describe(self, path_params, cfg):
        """This operation as an OpenAPI Operation Object."""
        name = self.handler.__name__
        doc = {"operationId": re.sub(r"_(\w)", lambda m: m.group(1).upper(), name),
               "summary": (self.handler.__doc__ or name).strip().splitlines()[0]}
        parameters = [{"name": key, "in": "path", "required": True, "schema": openapi_schema(PATH_PARAMS[key])}
                      for key in path_params]
        for key, schema in self.query.items():
            param = {"name": key, "in": "query", "required": False, "schema": openapi_schema(schema)}
            if schema.get("type") == "array":
                param.update(style="form", explode=True)
            if "description" in schema:
                param["description"] = schema["description"]
            parameters.append(param)
        if self.switches:
            parameters += WEBSOCKET_HEADERS
        if parameters:
            doc["parameters"] = parameters
        if self.body:
            doc["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(self.body)}}}
        statuses = set(self.errors) | {500}
        statuses |= {400} if parameters or self.body else set()
        statuses |= {413} if self.body else set()
        statuses |= {404} if "name" in path_params or "image" in path_params else set()
        statuses |= {401} if cfg.api_token and not self.public else set()
        doc["responses"] = {"101": {"description": "a WebSocket (RFC 6455): README, Terminal"}} if self.switches else {
            "200": {"description": "success", "content": {
                media: {"schema": {"type": "string"} if names is None else ref(names) if isinstance(names, str)
                        else {"anyOf": [ref(n) for n in names]}} for media, names in self.ok.items()}}}
        for status in sorted(statuses):
            doc["responses"][str(status)] = {"description": ERROR_STATUSES[status],
                                             "content": {JSON: {"schema": ref("Error")}}}
        if cfg.api_token and self.public:
            doc["security"] = []
        return doc


def openapi_document(cfg, routes):
    """The OpenAPI 3.1 description of the REST API: paths from the route table (ApiRoutes.routes),
    schemas from the tables the server checks requests with and the answers' schemas."""
    paths = {}
    for pattern, methods in routes:
        item = paths.setdefault(route_name(pattern), {})
        for method, operation in methods.items():
            item[method.lower()] = operation.describe(list(pattern.groupindex), cfg)
    schemas = {name: openapi_schema(schema) for name, schema in {**request_schemas(cfg), **RESPONSE_SCHEMAS}.items()}
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    document = {
        "openapi": "3.1.0",
        "info": {"title": "CBox", "version": VERSION,
                 "description": "Run shell commands in Cloud Hypervisor microVMs, with callbacks to the host. "
                                "Every error is {\"error\": message}; unknown request fields and query "
                                "parameters are rejected (400). Every route: a request line of at most "
                                f"{REQUEST_LINE_MAX} bytes (414), a head of at most {MAX_HEAD} bytes and "
                                f"{MAX_HEAD_LINES} header lines (431), at most {QUERY_PARAMS_MAX} query "
                                f"parameters (400), a body of at most {cfg.max_request_bytes} bytes (413)."},
        "servers": [{"url": f"http://{host}:{cfg.port}"}],
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if cfg.api_token:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                                "description": "the api_token of cbox's config"}}
        document["security"] = [{"bearer": []}]
    return document


class ApiRoutes:
    """The routes of README's "REST API": the route table (each method an Operation, the
    busiest first) and its handlers, given what they use when made: the VM manager (None for
    `cbox.py openapi`, which only describes them) and the terminals attached (Terminals).
    RestServer finds a request's Operation here and runs its handler."""

    def __init__(self, cfg, manager, terminals):
        self.cfg, self.manager, self.terminals = cfg, manager, terminals
        op = Operation
        # an agent call: 409 (the VM not running), 502 (its agent failing); a client leaving cancels
        # it (never the exec: a stream's relay runs after its handler returned)
        agent = {"errors": (409, 502), "abandonable": True}
        stream = {NDJSON: "StreamEvent", SSE: "StreamEvent"}
        self.routes = [      # no path matches two patterns: the busiest routes come first
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/exec$"), {
                "POST": op(self.exec, {JSON: ["ExecResult", "ExecStarted"], **stream}, body="ExecRequest", **agent),
                "GET": op(self.exec_list, {JSON: "ExecList"}, **agent),
                "DELETE": op(self.exec_kill_all, {JSON: "ExecsKilled"}, query=KILL_QUERY, **agent)}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/exec/(?P<exec_id>[^/]+)$"), {
                "GET": op(self.exec_status, {JSON: "ExecResult"}, **agent),
                "DELETE": op(self.exec_kill, {JSON: "ExecResult"}, query=KILL_QUERY, **agent)}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/exec/(?P<exec_id>[^/]+)/stream$"), {
                "GET": op(self.exec_stream, stream, query=STREAM_QUERY, **agent)}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/exec/(?P<exec_id>[^/]+)/signal$"), {
                "POST": op(self.exec_signal, {JSON: "SignalSent"}, body="SignalRequest", **agent)}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/exec/(?P<exec_id>[^/]+)/stdin$"), {
                "POST": op(self.exec_stdin, {JSON: "StdinWritten"}, body="StdinRequest", **agent)}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/exec/(?P<exec_id>[^/]+)/attach$"), {
                "GET": op(self.exec_attach, {}, switches=True, **agent)}),
            (re.compile(r"^/v1/health$"), {"GET": op(self.health, {JSON: "Health"}, public=True)}),
            (re.compile(r"^/v1/vms$"), {
                "GET": op(self.list_vms, {JSON: "VmList"}, query=VM_FILTER_QUERY),
                "POST": op(self.start_vm, {JSON: "VM"}, body="StartRequest", errors=(409, 503)),
                "DELETE": op(self.destroy_all, {JSON: "Destroyed"}, query=VM_FILTER_QUERY)}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)$"), {
                "GET": op(self.get_vm, {JSON: "VM"}), "DELETE": op(self.destroy_vm, {JSON: "Success"})}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/logs$"), {"GET": op(self.logs, {"text/plain": None})}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/ttl$"), {
                "PUT": op(self.set_ttl, {JSON: "VM"}, body="TtlRequest", errors=(409,))}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/network$"), {
                "PUT": op(self.put_network, {JSON: "VM"}, body="NetworkRequest", errors=(409,))}),
            (re.compile(r"^/v1/vms/(?P<name>[^/]+)/stats$"), {"GET": op(self.stats, {JSON: "Stats"}, **agent)}),
            (re.compile(r"^/v1/metrics$"), {"GET": op(self.metrics, {Registry.CONTENT_TYPE: None})}),
            (re.compile(r"^/v1/events$"), {
                "GET": op(self.events, {JSON: "Events"}, query=EVENTS_QUERY, abandonable=True)}),
            (re.compile(r"^/v1/failed-starts$"), {"GET": op(self.failed_starts, {JSON: "FailedStarts"})}),
            (re.compile(r"^/v1/images$"), {"GET": op(self.list_images, {JSON: "ImageList"})}),
            (re.compile(r"^/v1/images/(?P<image>[^/]+)$"), {
                "GET": op(self.get_image, {JSON: "Image"}),
                "DELETE": op(self.delete_image, {JSON: "Success"}, errors=(409,))}),
            (re.compile(r"^/v1/openapi\.json$"), {"GET": op(self.openapi, {JSON: "OpenApi"}, public=True)}),
        ]
        self.openapi_json = None       # made at the first GET /v1/openapi.json (it depends on cfg only)
        self.route_names = {pattern: route_name(pattern) for pattern, _ in self.routes}
        self.public_paths = {self.route_names[pattern] for pattern, methods in self.routes      # no token needed
                             if all(operation.public for operation in methods.values())}

    async def health(self, req):
        """The server's health (no API token needed)"""
        return {"status": "healthy", "timestamp": utc_now(), "version": VERSION, "commit": build_commit(),
                "vms": len(self.manager.vms), "pool": self.manager.pool.state(),
                "loopLagMs": {k: round(v * 1000, 3) for k, v in LOOP_LAG.summary().items()}}

    async def list_vms(self, req):
        """List VMs, optionally filtered by labels, status and image"""
        return {"vms": [vm.api() for vm in self.manager.registry.select(parse_vm_filter(req.query))]}

    async def start_vm(self, req):
        """Start a VM; answers once its guest agent answers"""
        spec = start_spec(req.json)
        req.vm_name = spec["vmName"]
        vm = await self.manager.starter.start(spec)
        return vm.api()

    async def get_vm(self, req):
        """A VM"""
        return self.manager.registry.get(req.params["name"]).api()

    async def put_network(self, req):
        """Change a running VM's egress policy"""
        return (await self.manager.egress.set(req.params["name"], req.json)).api()

    async def destroy_vm(self, req):
        """Destroy a VM"""
        await self.manager.teardown.destroy(req.params["name"])
        return {"success": True}

    async def list_images(self, req):
        """The guest images: where each came from, its agent, whether it can start a VM, its VMs"""
        return {"images": self.manager.images.list()}

    async def get_image(self, req):
        """A guest image"""
        return self.manager.images.get(req.params["image"])

    async def delete_image(self, req):
        """Remove a guest image no VM and no warm pool uses ("default" never)"""
        await self.manager.images.remove(req.params["image"])
        return {"success": True}

    async def destroy_all(self, req):
        """Destroy every VM (or those the filter matches)"""
        return {"success": True, "destroyed": await self.manager.teardown.destroy_all(parse_vm_filter(req.query))}

    async def set_ttl(self, req):
        """Set, extend or clear a VM's TTL (from now)"""
        return self.manager.deadlines.set_ttl(req.params["name"], req.json["ttlSeconds"]).api()

    def exec(self, req):
        """Run a command in a VM: blocking, in the background, or streamed"""
        agent_body, blocking, timeout, stream = exec_parts(req.json, self.cfg)
        answer = self.manager.execs.exec(req.params["name"], agent_body, blocking, timeout, stream)
        # to await (dispatch does): without a coroutine of its own on every exec's path, but a stream's
        return self.relayed(req, answer) if stream else answer

    async def relayed(self, req, events):
        return self.relay(req, await events)

    @staticmethod
    def relay(req, events):
        return EventRelay(events, "text/event-stream" in req.headers.get("accept", ""), req.version == "HTTP/1.1")

    async def exec_stream(self, req):
        """An exec's events from seq `since` (replayed, then live until it ends)"""
        since = req.args.get("since")
        last_id = req.headers.get("last-event-id")
        if since is None and last_id:     # an EventSource resuming: the event after the last one it saw
            since = check_query({"since": [last_id]}, STREAM_QUERY)["since"] + 1
        events = await self.manager.execs.events(req.params["name"], req.params["exec_id"], since or 0)
        return self.relay(req, events)

    async def exec_attach(self, req):
        """An exec's terminal as a WebSocket (RFC 6455): its output to the client, input and control from it"""
        problem = websocket_request_problem(req.method, req.headers)
        if problem:
            raise ApiError(400, problem)
        name, exec_ref = req.params["name"], req.params["exec_id"]
        writer_role = self.terminals.admit(name, exec_ref)
        try:
            events = await self.manager.execs.events(name, exec_ref, 0)
        except BaseException:
            self.terminals.release(name, exec_ref, writer_role)
            raise
        attach = TerminalAttach(self.manager.execs, name, exec_ref, events, req.headers["sec-websocket-key"],
                                writer_role, self.terminals.end, self.cfg.http_body_timeout_s)
        self.terminals.attaches.add(attach)
        return attach

    async def exec_status(self, req):
        """A background exec's result so far"""
        return await self.manager.execs.status(req.params["name"], req.params["exec_id"])

    async def exec_kill(self, req):
        """End an exec (SIGTERM, after `grace` seconds SIGKILL): its final result"""
        return await self.manager.execs.kill(req.params["name"], req.params["exec_id"], req.args["grace"])

    async def exec_kill_all(self, req):
        """End every running exec of a VM"""
        return await self.manager.execs.kill_all(req.params["name"], req.args["grace"])

    async def exec_list(self, req):
        """A VM's running and recently finished execs"""
        return await self.manager.execs.list(req.params["name"])

    async def exec_signal(self, req):
        """Send a signal to every process of an exec"""
        return await self.manager.execs.signal(req.params["name"], req.params["exec_id"], req.json)

    async def exec_stdin(self, req):
        """Write to (or close) an exec's stdin pipe"""
        return await self.manager.execs.stdin(req.params["name"], req.params["exec_id"], req.json)

    async def logs(self, req):
        """The tail of a VM's serial console"""
        return 200, self.manager.execs.console_text(req.params["name"]), "text/plain; charset=utf-8"

    async def stats(self, req):
        """A VM's guest and VMM resource usage"""
        return await self.manager.execs.stats(req.params["name"])

    async def metrics(self, req):
        """Metrics in Prometheus's text format"""
        return 200, METRICS.expose(), Registry.CONTENT_TYPE

    async def openapi(self, req):
        """This API's OpenAPI 3.1 description (no API token needed)"""
        if self.openapi_json is None:
            self.openapi_json = json_bytes(openapi_document(self.cfg, self.routes))
        return self.openapi_json

    async def events(self, req):
        """Lifecycle events after id `since`, waiting up to `wait` seconds for one"""
        since, wait_s = req.args["since"], req.args["wait"]
        events, missed, nxt = EVENTS.after(since)
        if not events and not missed and wait_s:
            await EVENTS.wait(wait_s)
            events, missed, nxt = EVENTS.after(since)
        return {"events": events, "next": nxt, "missed": missed}

    async def failed_starts(self, req):
        """The newest failed starts: why, and where their evidence is kept"""
        return {"failedStarts": self.manager.failed_starts.listing()}


class RestServer:
    """HTTP/1.1 keep-alive server for the API README's "REST API" describes."""

    def __init__(self, cfg, manager):
        self.cfg, self.manager = cfg, manager
        self.server = None
        self.connections = set()
        self.client_watch = ClientWatch()
        self.relays = set()            # exec streams being relayed (EventRelay)
        self.terminals = Terminals()   # WebSockets attached to execs (TerminalAttach)
        self.stopping = False          # stop() was called
        self.bodies = BodyBudget(cfg.request_body_buffer_bytes)
        self.linger_budget = TokenBucket(self.LINGER_BYTES_PER_S, self.LINGER_BYTES_PER_S)
        self.held = 0                  # connections refused 401 being held unread (hold_refused)
        self.schemas = request_schemas(cfg)
        self.body_shortcuts = {"ExecRequest": usual_exec_check(self.schemas["ExecRequest"])}   # check_input
        self.api = ApiRoutes(cfg, manager, self.terminals)
        self.routes, self.route_names, self.public_paths = self.api.routes, self.api.route_names, self.api.public_paths
        # find_operation's table: each route's name at hand (a pattern's hash is computed at each lookup)
        self.route_table = [(pattern, methods, self.route_names[pattern]) for pattern, methods in self.routes]

    async def start(self):
        METRICS.on_scrape("process", refresh_process_metrics)     # here: a server made for its routes only
        METRICS.on_scrape("vms", self.refresh_server_metrics)     # (`cbox.py openapi`) has no manager
        METRICS.on_scrape("pool", self.manager.pool.export_metrics)
        METRICS.on_scrape("capacity", self.manager.export_capacity_metrics)
        self.server = await asyncio.start_server(self.connection, self.cfg.host, self.cfg.port,
                                                 limit=MAX_HEAD, reuse_address=True)
        log("serving", url=f"http://{self.cfg.host}:{self.cfg.port}", version=VERSION, commit=build_commit())

    async def stop(self):
        if self.server:
            self.stopping = True
            self.server.close()
            for writer in list(self.connections):
                writer.close()
            for relay in [*self.relays, *self.terminals.attaches]:   # they wait on the guest, not on the client
                relay.events.close()
            await self.server.wait_closed()

    # ---- connections ------------------------------------------------------------

    async def connection(self, reader, writer):
        set_nodelay(writer)
        self.connections.add(writer)
        try:
            first = True
            while await self.one_request(reader, writer, first):
                first = False
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            # cbox.py stops (asyncio.run cancels what is left): end quietly, as a connection task
            # that ends cancelled makes asyncio's StreamReaderProtocol print a traceback (3.11)
        finally:
            self.connections.discard(writer)
            writer.close()

    async def one_request(self, reader, writer, first=False):
        """Serve one request; False when the connection should close.

        Before the API token is checked only the head is read (bounded: MAX_HEAD bytes,
        MAX_HEAD_LINES header lines, REQUEST_LINE_MAX for the request line); the body is read
        after it, within the host-wide BodyBudget."""
        request = await self.read_request_head(reader, writer, first)
        if request is None:
            return False
        answer = await self.answer(request, reader, writer)
        if answer is None:             # the client went away while it was handled (499)
            return False
        status, payload, ctype = answer
        if isinstance(payload, TerminalAttach):      # the connection is the WebSocket's from here on
            await payload.run(reader, writer)
            self.log_and_count(request, status)
            return False
        if not await self.send_answer(request, writer, status, payload, ctype):
            return False
        self.log_and_count(request, status)
        if (request.body is None and status != 408
                and "100-continue" not in request.headers.get("expect", "").lower()):
            await self.drop_refused_body(reader, writer, request.headers, status)
        return request.keep_alive

    async def read_request_head(self, reader, writer, first):
        """The next request's head as a Request; None when the connection ends: closed, silent
        too long (a new connection must send its head soon; a keep-alive one may idle longer)
        or a head refused (400, 414, 431: answered here)."""
        try:
            head = await within(self.cfg.http_head_timeout_s if first else self.cfg.http_idle_timeout_s,
                                read_head(reader, MAX_HEAD_LINES))
        except asyncio.TimeoutError:
            return None
        except HttpError as e:
            if self.stopping:          # stop() closed the connection under it
                return None
            status = 431 if isinstance(e, HeadTooLarge) else 400
            writer.write(build_response(status, json_bytes({"error": str(e)}), keep_alive=False))
            log("request refused", status=status, error=str(e))
            return None
        if head is None:
            return None
        t0 = time.monotonic()
        start_line, headers = head
        try:
            method, target, version = parse_request_line(start_line)
        except ApiError as e:
            writer.write(build_response(e.status, json_bytes(e.body()), keep_alive=False))
            log("request refused", status=e.status, error=str(e), line=start_line[:200])
            return None
        return Request(method, target, headers, version, t0)

    async def answer(self, request, reader, writer):
        """(status, payload, content type) for a request whose head was read: its token checked,
        its body read within the body budget (given back once answered), its route's handler
        run; None when the client went away meanwhile (logged as 499). A request refused before
        its body was read closes the connection (request.keep_alive)."""
        body_size = 0          # taken from the body budget
        try:
            self.check_token(request)
            body_size = self.bodies.take(self.request_body_size(request.headers))
            request.body = await self.read_request_body(reader, writer, request.headers, body_size)
            return await self.dispatch(request, reader)
        except asyncio.CancelledError:
            if not self.client_watch.client_gone():
                raise
            self.log_and_count(request, 499)       # nginx's "client closed request"
            return None
        except ApiError as e:
            if request.body is None:      # refused before its body was read: the stream is out of step
                request.keep_alive = False
            return e.status, json_bytes(e.body()), "application/json"
        except Exception as e:   # never a traceback in a response
            import traceback
            log("internal error", traceback=traceback.format_exc())
            return 500, json_bytes({"error": f"internal error: {type(e).__name__}: {e}"}), "application/json"
        finally:
            self.bodies.give_back(body_size)
            if request.body:
                request.body = b""     # its bytes are no longer counted: no longer held either

    async def send_answer(self, request, writer, status, payload, ctype):
        """Write the answer (an exec stream relayed to its end; request.keep_alive says after it
        whether the connection may be kept); False when it could not be delivered (the
        connection is dropped): a client that does not read its answer must not hold the
        connection and buffer forever."""
        extra = ({"WWW-Authenticate": "Bearer"} if status == 401 else {"Allow": request.allow} if status == 405
                 else None)
        timeout = self.cfg.http_body_timeout_s
        try:
            if isinstance(payload, EventRelay):
                self.relays.add(payload)
                try:
                    request.keep_alive = await payload.send(writer, request.keep_alive, timeout)
                finally:
                    self.relays.discard(payload)
            elif isinstance(payload, BodyStream):
                writer.write(build_head(status, payload.length, ctype, request.keep_alive, extra))
                await payload.copy_to(writer, timeout)
            else:
                writer.write(build_response(status, payload, ctype, request.keep_alive, extra))
                if writer.transport.get_write_buffer_size():     # else drain() has nothing to wait for
                    await within(timeout, writer.drain())
        except (asyncio.TimeoutError, HttpError, OSError, asyncio.IncompleteReadError) as e:
            log("answer not delivered; connection dropped", path=request.target.split("?")[0][:200],
                error=repr(str(e) or type(e).__name__))
            writer.transport.abort()
            return False
        return True

    @staticmethod
    def log_and_count(request, status):
        """The request's line in the request log, and its count in the metrics."""
        log_request(request.method, request.target, status, request.t0, request.vm_name)
        count_request(request.route, request.method, status)

    LINGER_BYTES, LINGER_S = 64 * 1024, 1.0       # what is read and dropped of a body refused unread
    LINGER_BYTES_PER_S = 4 * 1024 * 1024           # ... by all connections together
    HOLD_S, HOLD_MAX = 5.0, 256     # a 401 with a body coming: the connection held unread, so many at once

    async def drop_refused_body(self, reader, writer, headers, status):
        """A request was answered without its body being read (the connection closes): read and
        drop what the client still sends, so that it sees the answer rather than a reset. A
        413 (a client with the token, or no token configured) may send up to 256 MiB for 10 s;
        anything else (401, 503, ...), after the answer and a half-close, LINGER_BYTES for
        LINGER_S, within LINGER_BYTES_PER_S for all connections together: clients without the
        token that reconnect and send bodies as fast as they can (each read costs the loop)
        then get their answer and a reset, and the API's clients keep the loop. Before that, a
        401 whose body is still coming holds its connection unread for HOLD_S (HOLD_MAX at once;
        hold_refused): the client's send waits instead of reconnecting at once."""
        if status == 413:
            await self.discard_body(reader, headers)
            return
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        if status == 401 and headers.get("content-length", "0") not in ("", "0") and self.held < self.HOLD_MAX:
            await self.hold_refused(writer)
        elif self.linger_budget.take(self.LINGER_BYTES):
            await self.discard_body(reader, headers, self.LINGER_BYTES, self.LINGER_S)

    async def hold_refused(self, writer):
        """Keep a refused connection open for HOLD_S without reading it (its answer sent and
        half-closed): a client without the token sending a large body stays blocked in its own
        send, rather than costing the loop a connection (accept, head, answer) again at once."""
        self.held += 1
        writer.transport.pause_reading()
        try:
            await asyncio.sleep(self.HOLD_S)
        finally:
            self.held -= 1

    def request_body_size(self, headers):
        """The Content-Length of a request's body (no body: 0); ApiError 411 (chunked), 400, 413."""
        if "transfer-encoding" in headers:
            raise ApiError(411, "chunked request bodies are not supported: send Content-Length")
        length = headers.get("content-length", "0")
        if not is_decimal(length):
            raise ApiError(400, "bad Content-Length header")
        size = int(length)
        if size > self.cfg.max_request_bytes:
            raise ApiError(413, f"request body larger than {self.cfg.max_request_bytes} bytes")
        return size

    async def read_request_body(self, reader, writer, headers, size):
        if size and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if size <= len(getattr(reader, "_buffer", ())):    # came with the head (the usual case): no wait, no
            return await reader.readexactly(size)          # deadline (_buffer: StreamReader's bytes read, 3.10-3.13)
        try:
            return await within(self.cfg.http_body_timeout_s, reader.readexactly(size))
        except asyncio.TimeoutError as e:
            raise ApiError(408, f"request body not received within {fmt_seconds(self.cfg.http_body_timeout_s)}") from e
        except asyncio.IncompleteReadError as e:
            raise ApiError(400, f"connection closed inside the request body ({len(e.partial)} of {size} bytes)") from e

    async def discard_body(self, reader, headers, limit=256 * 1024 * 1024, timeout=10.0):
        """Read and drop a refused body, so the client sees the 413 rather than a reset."""
        length = headers.get("content-length", "0")
        remaining = min(int(length), limit) if is_decimal(length) else 0
        deadline = time.monotonic() + timeout
        while remaining > 0 and time.monotonic() < deadline:
            try:
                chunk = await within(deadline - time.monotonic(), reader.read(min(remaining, 1 << 20)))
            except asyncio.TimeoutError:
                return
            if not chunk:
                return
            remaining -= len(chunk)

    async def dispatch(self, request, reader=None):
        """The answer (status, payload, content type) of the operation the request's path and
        method name, once its path parameters, query and body are checked (ApiError)."""
        operation, query = self.find_operation(request)
        self.check_input(request, operation, query)
        if reader is None or not operation.abandonable:
            result = await operation.handler(request)
        else:
            watched = self.client_watch.add(reader)
            try:
                result = await operation.handler(request)
            finally:
                self.client_watch.remove(watched)
        if result.__class__ is bytes:      # the usual answer (an agent's), first
            return 200, result, "application/json"
        if isinstance(result, tuple):
            return result
        if isinstance(result, EventRelay):
            return 200, result, result.content_type
        if isinstance(result, TerminalAttach):
            return 101, result, None
        return 200, result if isinstance(result, (bytes, BodyStream)) else json_bytes(result), "application/json"

    def find_operation(self, request):
        """The Operation of the request's path and method (ApiError 404, 405) and the query's
        text; the request's route, path and path parameters filled in."""
        split = urllib.parse.urlsplit(request.target)
        path = split.path
        for pattern, methods, name in self.route_table:
            m = pattern.match(path)
            if not m:
                continue
            request.route = name
            operation = methods.get(request.method)
            if operation is None:
                request.allow = ", ".join(methods)
                raise ApiError(405, f"method {request.method} not allowed on {path} (allowed: {request.allow})")
            params = m.groupdict()
            if "%" in path:        # else unquote() would give each as it is
                params = {k: urllib.parse.unquote(v) for k, v in params.items()}
            request.path, request.params = path, params
            return operation, split.query
        raise ApiError(404, f"no route {path}")

    def check_input(self, request, operation, query):
        """Path parameters, then the query (request.args), then the body (request.json) checked
        against the operation's schemas: every handler gets its input checked the same way."""
        if "name" in request.params:
            check_vm_name(request.params["name"])
        if "exec_id" in request.params:
            check_exec_id(request.params["exec_id"])
        if "image" in request.params:
            check_schema(request.params["image"], IMAGE_NAME_SCHEMA, "image")
        if query:
            request.query = parse_query(query)
        request.args = check_query(request.query, operation.query) if query or operation.query else {}
        if operation.body:
            body = parse_json_body(request.body)
            shortcut = self.body_shortcuts.get(operation.body)
            checked = shortcut(body) if shortcut else None
            request.json = checked if checked is not None else check_schema(body, self.schemas[operation.body],
                                                                             operation.body_name)

    def check_token(self, request):
        """ApiError 401 unless the request carries the API token or is for a public path (health,
        the API description): whatever its path or method, before anything of its body is read."""
        token = self.cfg.api_token
        if not token or request.target.split("?", 1)[0] in self.public_paths:   # as dispatch's urlsplit
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode())):
            path = urllib.parse.urlsplit(request.target).path
            request.route = next((self.route_names[pattern] for pattern, _ in self.routes if pattern.match(path)),
                                 request.route)      # for the metrics
            raise ApiError(401, "missing or wrong API token (send 'Authorization: Bearer <token>')")

    def refresh_server_metrics(self):
        counts = dict.fromkeys(("CREATED", "RUNNING", "STOPPED", "FAILED"), 0)
        for vm in list(self.manager.vms.values()):
            counts[vm.status] = counts.get(vm.status, 0) + 1
        for status, count in counts.items():
            M_VMS.labels(status).value = count
        M_HTTP_ABANDONED.value = self.client_watch.abandoned
        M_HTTP_BODY_BYTES.value = self.bodies.held


# =============================================================================
# 13. Python client (Client, ClientVM, ExecStream; CallbackServer: callbacks into a program)
# =============================================================================
#
# Synchronous and threaded on purpose: a user's program (and the CLI) calls it without an
# event loop. http.client and http.server are imported where they are used, so `serve`
# never loads them and `import cbox` stays as cheap and side-effect free as before.

import threading      # noqa: E402  (asyncio has loaded it already: free for `serve`)


def vm_path(name, suffix=""):
    """The API path of a VM (its name quoted), with `suffix` after it."""
    return "/v1/vms/" + urllib.parse.quote(name, safe="") + suffix


class ClientError(ApiError):
    """An error the client met: `status` is the HTTP status (None when no answer came at all),
    str(error) the server's message, `fields` the other fields of its error body (stopReason,
    evidence, console, destroyedAt); `method` and `path` name the request."""

    def __init__(self, status, message, method=None, path=None, **fields):
        super().__init__(status, message, **fields)
        self.method, self.path = method, path

    @property
    def stop_reason(self):
        return self.fields.get("stopReason")


class ServerUnreachable(ClientError):
    """No answer: the connection was refused, broke or timed out before an HTTP answer."""

    def __init__(self, message, method=None, path=None):
        super().__init__(None, message, method, path)


class StreamBroken(ClientError):
    """An exec stream broke and could not be re-attached (the command may still run)."""


def client_error(status, data, method, path):
    """The ClientError for a non-200 answer: its JSON {"error", ...} or the start of its text."""
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        fields = {k: v for k, v in payload.items() if k != "error"}
        return ClientError(status, payload["error"], method, path, **fields)
    return ClientError(status, data[:200].decode("utf-8", "replace").strip() or f"HTTP {status}", method, path)


def camel_fields(pairs):
    """{camelCaseName: value} of the (name, value) pairs whose value is not None."""
    return {key: value for key, value in pairs if value is not None}


def label_query(label=None, status=None, image=None):
    """The query pairs of a VM filter: label a {K: V} dict (V None: any value) or a list of
    "K=V"/"K" texts; status one of CREATED, RUNNING, STOPPED, FAILED; image a name or a list
    of names (any of them)."""
    if isinstance(label, dict):
        label = [key if value is None else f"{key}={value}" for key, value in label.items()]
    elif isinstance(label, str):
        label = [label]
    images = [image] if isinstance(image, str) else image or ()
    return [("label", item) for item in label or ()] + ([("status", status)] if status else []) + \
        [("image", name) for name in images]


def socket_readable(sock):
    """True when a socket has something to read (or its end): an idle keep-alive connection
    that is readable was closed by the server (or sent something unasked): do not reuse it."""
    import select
    return bool(select.select([sock], [], [], 0)[0])


def exec_body(command, env=None, cwd=None, timeout=None, stdin=None, user=None, tag=None,
              memory_limit_mb=None, pids_limit=None, **fields):
    """An exec request: `command` a str (run by /bin/sh -c) or a list of str (argv, no shell);
    `stdin` the input (str or bytes as UTF-8) or "pipe" (written later with VM.stdin)."""
    if isinstance(command, str):
        body = {"cmd": command}
    elif isinstance(command, (list, tuple)) and all(isinstance(arg, str) for arg in command):
        body = {"argv": list(command)}
    else:
        raise TypeError(f"exec: the command is a str (a shell command) or a list of str (argv), not {command!r}")
    if isinstance(stdin, bytes):
        stdin = stdin.decode()
    body.update(camel_fields((("env", env), ("cwd", cwd), ("timeout", timeout), ("stdin", stdin), ("user", user),
                              ("tag", tag), ("memoryLimitMb", memory_limit_mb), ("pidsLimit", pids_limit))))
    body.update(fields)
    return body


class ExecResult(dict):
    """An exec result as the API answers it (a dict: result["exitCode"]), with attributes:
    exit_code (None when a signal or the timeout ended it), ok (exit code 0), stdout,
    stderr, output, error, signal, timed_out, truncated, running, exec_id, duration_ms."""

    exit_code = property(lambda self: self.get("exitCode"))
    ok = property(lambda self: self.get("exitCode") == 0)
    stdout = property(lambda self: self.get("stdout", ""))
    stderr = property(lambda self: self.get("stderr", ""))
    output = property(lambda self: self.get("output", ""))
    error = property(lambda self: self.get("error", ""))
    signal = property(lambda self: self.get("signal"))
    timed_out = property(lambda self: bool(self.get("timedOut")))
    truncated = property(lambda self: bool(self.get("truncated")))
    running = property(lambda self: bool(self.get("running")))
    exec_id = property(lambda self: self.get("execId"))
    duration_ms = property(lambda self: self.get("durationMs"))


def exec_path(exec_ref, suffix=""):
    return "/exec/" + urllib.parse.quote(exec_ref, safe="") + suffix


class ExecStream:
    """The events of one exec, as an iterator of dicts: {"seq", "type": "start" | "stdout" |
    "stderr" | "dropped" | "exit", ...} (keepalives are not passed on). When the connection
    breaks, or the server reports the guest's stream broke ("error" event), it re-attaches
    with `since` = the first event not yet seen, so nothing the server kept is lost or
    repeated; after `reattach` attempts in a row without a new event it raises StreamBroken.
    `exec_id` once the start event came; `result` (an ExecResult) after the exit event."""

    PAUSES_S = (0.1, 0.3, 1.0, 2.0, 3.0)        # before each re-attach in a row (the last repeats)

    def __init__(self, vm, open_first, reattach, ref=None, since=0, on_reattach=None):
        """open_first: ((method, path), a function opening the first request), or None to
        attach with GET .../stream; on_reattach(problem) is called before each re-attach."""
        self.vm, self.open_first, self.reattach, self.on_reattach = vm, open_first, reattach, on_reattach
        self.ref, self.since = ref, since
        self.exec_id, self.result = None, None
        self.conn = self.resp = None
        self.failures = 0
        self.events = self.follow()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.events)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop reading (the command keeps running: kill it with VM.kill)."""
        self.events.close()
        self.hang_up()

    def hang_up(self):
        if self.conn is not None:
            self.conn.close()
        self.conn = self.resp = None

    def wait(self):
        """Read the stream to its end; the exec's result."""
        for _ in self:
            pass
        return self.result

    def connect(self):
        if self.open_first is not None:
            (method, path), opener = self.open_first
            self.open_first = None
            self.conn, self.resp = opener()
        else:
            method, path = "GET", vm_path(self.vm.name, exec_path(self.exec_id or self.ref, "/stream"))
            self.conn, self.resp = self.vm.client.open(method, path, query=[("since", self.since)],
                                                       headers={"Accept": NDJSON})
        if self.resp.status != 200:
            error = client_error(self.resp.status, self.resp.read(), method, path)
            self.hang_up()
            raise error

    def follow(self):
        import http.client
        try:
            while True:
                problem = "the stream ended without an exit event"
                try:
                    self.connect()
                    for line in self.resp:
                        event = json.loads(line)
                        kind = event.get("type")
                        if kind == "error":
                            self.since, problem = event["seq"], event.get("error") or problem
                            break
                        self.since, self.failures = event["seq"] + 1, 0
                        if kind == "start":
                            self.exec_id = event["execId"]
                        elif kind == "exit":
                            self.result = ExecResult(event)
                        if kind != "keepalive":
                            yield event
                        if kind == "exit":
                            return
                except ServerUnreachable as e:
                    problem = str(e)
                except TimeoutError:      # quiet for the client's timeout (a dead connection?): look again
                    self.hang_up()
                    if self.exec_id or self.ref:
                        continue          # not a failure: a quiet command may outlast any timeout
                    problem = f"no event within {fmt_seconds(self.vm.client.timeout)}"
                except (OSError, http.client.HTTPException, ValueError) as e:
                    problem = f"the stream broke: {e or type(e).__name__}"
                finally:
                    self.hang_up()
                self.pause_before_reattach(problem)
        finally:
            self.hang_up()

    def pause_before_reattach(self, problem):
        if self.exec_id is None and self.ref is None:
            raise StreamBroken(None, f"{problem} (before the exec's start event: nothing to re-attach to)",
                               "POST", vm_path(self.vm.name, "/exec"))
        if self.failures >= self.reattach:
            raise StreamBroken(None, f"{problem} ({self.failures} re-attaches in a row failed)", "GET",
                               vm_path(self.vm.name, exec_path(self.exec_id or self.ref, "/stream")))
        if self.on_reattach:
            self.on_reattach(problem)
        time.sleep(self.PAUSES_S[min(self.failures, len(self.PAUSES_S) - 1)])
        self.failures += 1


class ClientVM:
    """One VM of a Client: `name`, `info` (its VM object as last answered: status, ip,
    expiresAt...), and the routes under /v1/vms/{name}. As a context manager it destroys
    the VM on exit."""

    def __init__(self, client, info):
        self.client, self.info, self.name = client, info, info["vmName"]

    def __repr__(self):
        return f"<cbox.ClientVM {self.name} {self.info.get('status', '?')}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.destroy()
        except ClientError as e:
            if e.status != 404:       # already gone (its TTL, another client) is what we wanted
                raise

    status = property(lambda self: self.info.get("status"))
    ip = property(lambda self: self.info.get("ip"))

    def call(self, method, suffix="", body=None, query=None, timeout=None, text=False):
        return self.client.request(method, vm_path(self.name, suffix), body, query, timeout, text)

    def updated(self, info):
        self.info = info
        return self

    def refresh(self):
        """GET /v1/vms/{name}: this VM's object now."""
        return self.updated(self.call("GET"))

    def destroy(self):
        """DELETE /v1/vms/{name}."""
        self.client.destroy(self.name)

    def set_ttl(self, seconds):
        """PUT /v1/vms/{name}/ttl: destroy the VM `seconds` from now (None or 0: never)."""
        return self.updated(self.call("PUT", "/ttl", {"ttlSeconds": seconds}))

    def set_network(self, egress, allow_out=None):
        """PUT /v1/vms/{name}/network: the egress policy ("nat", "none", "allowlist" with
        `allow_out`: a list of IPv4 networks), in force when this returns."""
        return self.updated(self.call("PUT", "/network", camel_fields((("egress", egress), ("allowOut", allow_out)))))

    def logs(self):
        """GET /v1/vms/{name}/logs: the serial console's text (its start and newest part)."""
        return self.call("GET", "/logs", text=True)

    def stats(self):
        """GET /v1/vms/{name}/stats: {"guest": {...}, "vmm": {...}}."""
        return self.call("GET", "/stats")

    def exec(self, command, *, blocking=True, **options):
        """POST /v1/vms/{name}/exec: run `command` (str: by /bin/sh -c; list: argv) and answer its
        ExecResult once it ended; blocking=False answers at once (running, exec_id). Options:
        env, cwd, timeout, stdin, user, tag, memory_limit_mb, pids_limit (see exec_body). A
        command that fails is still a result (exit_code, error), not an exception. Without a
        timeout the answer is awaited as long as it takes (the server's exec_timeout_s ends it)."""
        body = exec_body(command, **options)
        if not blocking:
            body["blocking"] = False
        wait = (body.get("timeout") or math.inf) if blocking else 0     # inf: the server's exec_timeout_s
        return ExecResult(self.call("POST", "/exec", body, timeout=self.client.timeout + wait))

    def stream(self, command, reattach=5, on_reattach=None, **options):
        """POST /v1/vms/{name}/exec with "stream": true: an ExecStream, iterating the exec's
        events as they come (start, stdout, stderr, dropped, exit), re-attached after a broken
        connection from the first event not yet seen (on_reattach(problem) is told first); its
        `result` after the exit event. A command quiet for longer than the client's timeout
        is looked at again on a new connection, which is not counted as a failure."""
        body, path = dict(exec_body(command, **options), stream=True), vm_path(self.name, "/exec")
        return ExecStream(self, (("POST", path), lambda: self.client.open("POST", path, body)), reattach,
                          ref=body.get("tag"), on_reattach=on_reattach)

    def attach(self, exec_ref, since=0, reattach=5, on_reattach=None):
        """GET /v1/vms/{name}/exec/{id}/stream: an ExecStream of a running or finished exec (its
        execId or tag) from event `since`."""
        return ExecStream(self, None, reattach, ref=exec_ref, since=since, on_reattach=on_reattach)

    def execs(self):
        """GET /v1/vms/{name}/exec: the running and recently finished execs."""
        return self.call("GET", "/exec")["execs"]

    def exec_status(self, exec_ref):
        """GET /v1/vms/{name}/exec/{id}: an exec's result so far (with `running`)."""
        return ExecResult(self.call("GET", exec_path(exec_ref)))

    def kill(self, exec_ref, grace=0):
        """DELETE /v1/vms/{name}/exec/{id}: end an exec (TERM, `grace` seconds, KILL); its result."""
        return ExecResult(self.call("DELETE", exec_path(exec_ref), query=[("grace", grace)],
                                    timeout=self.client.timeout + grace))

    def kill_all(self, grace=0):
        """DELETE /v1/vms/{name}/exec: end every running exec; the execIds ended."""
        return self.call("DELETE", "/exec", query=[("grace", grace)], timeout=self.client.timeout + grace)["killed"]

    def signal(self, exec_ref, sig):
        """POST /v1/vms/{name}/exec/{id}/signal: `sig` a name ("TERM", "SIGTERM") or number; the
        signal's number in the guest."""
        return self.call("POST", exec_path(exec_ref, "/signal"), {"signal": sig})["signal"]

    def stdin(self, exec_ref, data=None, eof=False):
        """POST /v1/vms/{name}/exec/{id}/stdin: write `data` (str, or bytes as UTF-8) to an exec
        started with stdin="pipe", and close its input with eof=True; the bytes written."""
        if isinstance(data, bytes):
            data = data.decode()
        body = camel_fields((("data", data), ("eof", eof or None)))
        return self.call("POST", exec_path(exec_ref, "/stdin"), body)["written"]

    def terminal(self, exec_ref, timeout=None):
        """GET /v1/vms/{name}/exec/{id}/attach: the exec's terminal, a WebSocket (README,
        Terminal) as a TerminalSocket."""
        return self.client.websocket(vm_path(self.name, exec_path(exec_ref, "/attach")), timeout)


class TerminalSocket:
    """A WebSocket attached to an exec (ClientVM.terminal): `sock` (blocking), `frames`
    (WebSocketFrames, client side) and `rest`, bytes the server sent after its 101 answer."""

    def __init__(self, sock, frames, rest):
        self.sock, self.frames, self.rest = sock, frames, rest

    def send(self, opcode, payload):
        self.sock.sendall(self.frames.frame(opcode, payload))

    def close(self, code=1000):
        with contextlib.suppress(OSError):
            self.send(WebSocketFrames.CLOSE, code.to_bytes(2, "big"))
        self.sock.close()


class Client:
    """The REST API of a cbox.py server, for programs (synchronous, thread-safe, keep-alive).

        client = cbox.Client("http://127.0.0.1:7000", token=os.environ.get("CBOX_API_TOKEN"))
        with client.start("dev1", ttl=600) as vm:
            print(vm.exec("uname -a").stdout)

    Every route of the API has a method (VM routes are on VM objects: client.vm(name) makes
    one without a request). A non-200 answer raises ClientError; no answer raises
    ServerUnreachable. `timeout`: seconds to wait for a quick call's answer; calls that wait
    for work the server bounds itself (a start, a blocking exec, a kill's grace, an events
    long-poll) wait that long on top of it. An https:// URL (cbox.py behind a TLS proxy) is
    checked with `ssl_context` (default: the system's trusted CAs)."""

    START_WAIT_S = 900.0          # a start may wait a boot (boot_timeout_s) and a VM destroyed to make room
    IDLE_CONNECTIONS = 8          # kept open for the next calls; more calls at once open more

    def __init__(self, url="http://127.0.0.1:7000", token=None, timeout=60.0, ssl_context=None):
        split = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise ValueError(f"cbox.Client: {url!r} is not an http:// or https:// URL")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.scheme, self.host = split.scheme, split.hostname
        self.port = split.port or (443 if split.scheme == "https" else 80)
        self.prefix = split.path.rstrip("/")
        self.idle, self.lock, self.ssl_context = [], threading.Lock(), ssl_context

    def __repr__(self):
        return f"cbox.Client({self.url!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the idle keep-alive connections (the client stays usable)."""
        with self.lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    # ---- the transport -------------------------------------------------------------

    def connection(self, timeout):
        """An idle keep-alive connection that the server has not closed, else a new one."""
        import http.client
        while True:
            with self.lock:
                conn = self.idle.pop() if self.idle else None
            if conn is None:
                break
            if conn.sock is not None and not socket_readable(conn.sock):
                conn.sock.settimeout(timeout)
                conn.timeout = timeout
                return conn, True
            conn.close()          # closed by the server (http_idle_timeout_s) while idle
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_context), False
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout), False

    def release(self, conn, resp):
        if resp.will_close or conn.sock is None:
            conn.close()
            return
        with self.lock:
            if len(self.idle) < self.IDLE_CONNECTIONS:
                self.idle.append(conn)
                return
        conn.close()

    def websocket(self, path, timeout=None):
        """A WebSocket to `path` (RFC 6455 client handshake, the token as for every call) as a
        TerminalSocket; ClientError when the server refuses it, ServerUnreachable without answer."""
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        head = (f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                + (f"Authorization: Bearer {self.token}\r\n" if self.token else "") + "\r\n")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout or self.timeout)
            if self.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            sock.sendall(head.encode("latin-1"))
            answer = b""
            while b"\r\n\r\n" not in answer and len(answer) < MAX_HEAD:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError as e:
            raise ServerUnreachable(f"cannot reach {self.url}: {e}", "GET", path) from e
        head, _, rest = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        status = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
        if status != "101" or fields.get("sec-websocket-accept") != websocket_accept(key):
            sock.close()
            raise client_error(int(status) if is_decimal(status) else None, rest, "GET", path)
        sock.settimeout(None)
        return TerminalSocket(sock, WebSocketFrames(client=True, max_frame=1 << 24, max_message=1 << 24), rest)

    def open(self, method, path, body=None, query=None, timeout=None, headers=None):
        """Send one request; returns (connection, response) with the response's body unread.
        A kept connection that turns out dead before any answer is retried once on a new
        one when the request is idempotent (not a POST)."""
        import http.client
        target = self.prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json_bytes(body)
        hdrs = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        wait = self.timeout if timeout is None else None if timeout == math.inf else timeout    # inf: no limit
        for attempt in (1, 2):
            conn, reused = self.connection(wait)
            try:
                conn.request(method, target, body=data, headers=hdrs)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if not (reused and method != "POST" and attempt == 1):
                    raise ServerUnreachable(f"{self.url}: {e or type(e).__name__}", method, path) from e
            except (OSError, http.client.HTTPException) as e:
                what = "cannot reach" if conn.sock is None else "no answer from"     # connect failed, or later
                conn.close()
                raise ServerUnreachable(f"{what} {self.url}: {e or type(e).__name__}", method, path) from e

    def request(self, method, path, body=None, query=None, timeout=None, text=False):
        """One call: the answer's JSON (text=True: its text); ClientError unless it is 200."""
        import http.client
        conn, resp = self.open(method, path, body, query, timeout)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServerUnreachable(f"{self.url}: the answer broke off: {e or type(e).__name__}", method, path) from e
        self.release(conn, resp)
        if resp.status != 200:
            raise client_error(resp.status, data, method, path)
        if text:
            return data.decode("utf-8", "replace")
        try:
            return json.loads(data)
        except ValueError as e:
            raise ClientError(resp.status, f"the answer is not JSON: {data[:200]!r}", method, path) from e

    # ---- the routes ---------------------------------------------------------------

    def health(self):
        """GET /v1/health: {"status", "version", "vms", "pool", ...} (no token needed)."""
        return self.request("GET", "/v1/health")

    def start(self, name, *, callback_url=None, callback_methods=None, vcpus=None, memory_mb=None, network=None,
              ttl=None, idle_timeout=None, labels=None, image=None, disk_mb=None, **fields):
        """POST /v1/vms: start a VM; its VM object once its guest agent answers. `network`: an
        egress mode ("nat", "none", "allowlist") or {"egress", "allowOut"}; `ttl` and
        `idle_timeout` in seconds (0: none); `fields`: any other field of the request, as the
        API names it."""
        if isinstance(network, str):
            network = {"egress": network}
        body = {"vmName": name, **camel_fields((
            ("callbackUrl", callback_url), ("callbackMethods", callback_methods), ("vcpus", vcpus),
            ("memoryMb", memory_mb), ("network", network), ("ttlSeconds", ttl),
            ("idleTimeoutSeconds", idle_timeout), ("labels", labels), ("image", image), ("diskMb", disk_mb))),
            **fields}
        return ClientVM(self, self.request("POST", "/v1/vms", body, timeout=self.timeout + self.START_WAIT_S))

    def vm(self, name):
        """The VM called `name`, without asking the server (its `info` is empty until refresh())."""
        return ClientVM(self, {"vmName": name})

    def get(self, name):
        """GET /v1/vms/{name}: the VM."""
        return ClientVM(self, self.request("GET", vm_path(name)))

    def list(self, label=None, status=None, image=None):
        """GET /v1/vms: the VMs, those matching every filter given (see label_query)."""
        return [ClientVM(self, info)
                for info in self.request("GET", "/v1/vms", query=label_query(label, status, image))["vms"]]

    def destroy(self, name):
        """DELETE /v1/vms/{name}."""
        self.request("DELETE", vm_path(name), timeout=self.timeout + self.START_WAIT_S)

    def destroy_all(self, label=None, status=None):
        """DELETE /v1/vms: destroy every VM (or those matching the filter); their names."""
        return self.request("DELETE", "/v1/vms", query=label_query(label, status),
                            timeout=self.timeout + self.START_WAIT_S)["destroyed"]

    def events(self, since=0, wait=0):
        """GET /v1/events: {"events": [...], "next", "missed"}; the events after id `since`,
        waiting up to `wait` seconds for one when there is none yet."""
        return self.request("GET", "/v1/events", query=[("since", since), ("wait", wait)],
                            timeout=self.timeout + wait)

    def failed_starts(self):
        """GET /v1/failed-starts: the newest failed starts, with why and their evidence."""
        return self.request("GET", "/v1/failed-starts")["failedStarts"]

    def images(self):
        """GET /v1/images: the guest images (name, sizeBytes, builtAt, source, agent, usable, vms)."""
        return self.request("GET", "/v1/images")["images"]

    def image(self, name):
        """GET /v1/images/{image}: one guest image."""
        return self.request("GET", "/v1/images/" + urllib.parse.quote(name, safe=""))

    def remove_image(self, name):
        """DELETE /v1/images/{image}: remove an image no VM and no warm pool uses."""
        self.request("DELETE", "/v1/images/" + urllib.parse.quote(name, safe=""))

    def metrics(self):
        """GET /v1/metrics: Prometheus text."""
        return self.request("GET", "/v1/metrics", text=True)

    def openapi(self):
        """GET /v1/openapi.json: the API's OpenAPI 3.1 description."""
        return self.request("GET", "/v1/openapi.json")


# ---- CallbackServer: callbacks from guests, received by the user's program -------------

def callback_signature_problem(secret, headers, body, max_age_s=300, now=None):
    """None when this POST (headers: a mapping with case-insensitive get, body: the raw bytes)
    was signed by CBox with `secret` at most `max_age_s` seconds from now, as README
    "Callbacks" specifies (X-CBox-Timestamp, X-CBox-Signature: sha256=HEX(HMAC-SHA256(
    secret, timestamp + "." + body))); else why not."""
    timestamp, signature = headers.get("X-CBox-Timestamp") or "", headers.get("X-CBox-Signature") or ""
    if not timestamp or not signature:
        return "unsigned: X-CBox-Timestamp or X-CBox-Signature is missing"
    if not is_decimal(timestamp):
        return "X-CBox-Timestamp is not unix seconds"
    if abs((time.time() if now is None else now) - int(timestamp)) > max_age_s:
        return f"X-CBox-Timestamp is more than {max_age_s} s away from now: a stale or replayed request"
    expected = callback_headers(secret, None, body, "-", now=int(timestamp))["X-CBox-Signature"]
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return "bad X-CBox-Signature"
    return None


class SeenIds:
    """The X-CBox-Callback-Ids received in the replay window: a request whose id was seen
    is a replay. At most `limit` are kept; past that the oldest go (and a replay of those,
    still in the window, would pass: the limit bounds memory against a flood)."""

    def __init__(self, window_s, limit=100000):
        self.window_s, self.limit = window_s, limit
        self.order, self.ids, self.lock = collections.deque(), set(), threading.Lock()

    def first_time(self, callback_id, now=None):
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.order and (self.order[0][0] < now - 2 * self.window_s or len(self.order) >= self.limit):
                self.ids.discard(self.order.popleft()[1])
            if callback_id in self.ids:
                return False
            self.ids.add(callback_id)
            self.order.append((now, callback_id))
            return True


class CallbackCall:
    """One callback from a guest, as CallbackServer's handler gets it: vm (its vmName),
    method, params, exec_id (the calling command's, or None), id (X-CBox-Callback-Id),
    headers."""

    def __init__(self, body, headers):
        self.vm, self.method, self.params = body.get("vmName"), body.get("method"), body.get("params")
        self.exec_id, self.headers = body.get("execId"), headers
        self.id = headers.get("X-CBox-Callback-Id")

    def __repr__(self):
        return f"<cbox.CallbackCall {self.method} from {self.vm}>"


class CallbackServer:
    """A small threaded HTTP server for a VM's callbackUrl, run by the user's program:

        def handler(call):                 # a CallbackCall: call.vm, call.method, call.params
            if call.method == "lookup":
                return {"user": call.params["user"], "id": 42}
            raise ValueError(f"unknown method {call.method}")
        with cbox.CallbackServer(handler, secret=SECRET, port=8080) as server:
            client.start("dev1", callback_url=server.url)

    The handler's return value goes to the guest as the result, an exception's text as the
    error. With `secret` (the server's callback_secret) each POST must be signed and at most
    `max_age_s` seconds old (callback_signature_problem), and an X-CBox-Callback-Id seen before is a
    replay: those are answered 401 (409 for a replay) and the handler never runs. Bodies
    over `max_body` bytes are refused (413). Without `secret` anything that reaches the port
    is accepted: listen on loopback only."""

    def __init__(self, handler, secret=None, host="127.0.0.1", port=0, max_age_s=300, max_body=2 * 1024 * 1024):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.handler, self.secret, self.max_age_s, self.max_body = handler, secret, max_age_s, max_body
        self.seen = SeenIds(max_age_s)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30                   # a client that stalls mid-request is dropped

            def do_POST(self):
                owner.answer(self)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = Server((host, port), Handler)
        self.host, self.port = host, self.httpd.server_address[1]
        where = f"[{host}]" if ":" in host else host
        self.url = f"http://{where}:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="cbox-callbacks", daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, request):
        """Read, check and answer one POST (on a thread of the server)."""
        length = request.headers.get("Content-Length") or ""
        if not is_decimal(length) or int(length) > self.max_body:
            request.close_connection = True
            return self.reply(request, 413 if is_decimal(length) else 411,
                              {"error": f"need a Content-Length of at most {self.max_body} bytes"})
        raw = request.rfile.read(int(length))
        status, answer = self.check(request.headers, raw)
        if status == 200:
            answer = self.run_handler(answer, request.headers)
        self.reply(request, status, answer)

    def check(self, headers, raw):
        """(200, the body) for a callback to pass to the handler, else (status, error body)."""
        if self.secret:
            problem = callback_signature_problem(self.secret, headers, raw, self.max_age_s)
            if problem:
                return 401, {"error": problem}
            callback_id = headers.get("X-CBox-Callback-Id")
            if not callback_id:
                return 401, {"error": "X-CBox-Callback-Id is missing"}
            if not self.seen.first_time(callback_id):
                return 409, {"error": "X-CBox-Callback-Id seen before: a replayed request"}
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            return 400, {"error": "the body is not a callback: {\"vmName\", \"method\", \"params\"}"}
        return 200, body

    def run_handler(self, body, headers):
        try:
            result = self.handler(CallbackCall(body, headers))
        except Exception as e:          # the guest gets the handler's error as its CallbackError
            return {"error": str(e) or type(e).__name__}
        try:
            json_bytes(result)
        except (TypeError, ValueError) as e:
            return {"error": f"the host's handler answered something that is not JSON: {e}"}
        return {"result": result}

    @staticmethod
    def reply(request, status, answer):
        data = json_bytes(answer)
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


# =============================================================================
# 14. Serve (`cbox.py serve`: preflight checks, systemd notifications, the server's life)
# =============================================================================

def demo_hint():
    """Where the demo (`make demo`: the API with tests/' stand-in hypervisor) is: beside this
    cbox.py in a source checkout; an air-gap bundle or an installed copy has no stand-in."""
    if (Path(__file__).resolve().parent / "tests" / "fake_chv.py").exists():
        return "try `make demo`"
    return "try `make demo` in CBox's source checkout (this copy has no stand-in hypervisor)"


def resolve_chv_bin(cfg):
    """The hypervisor binary's path, or CommandError saying what to install."""
    chv = cfg.path(cfg.chv_bin) if "/" in cfg.chv_bin else shutil.which(cfg.chv_bin)
    if not chv or not os.access(chv, os.X_OK):
        raise CommandError(f"cloud-hypervisor binary not found at chv_bin={cfg.chv_bin!r}: install Cloud "
                           f"Hypervisor's static binary there (it needs /dev/kvm), or {demo_hint()}")
    return chv


def preflight(cfg):
    """What a host needs for real VMs; returns the problems found (empty = ready)."""
    problems = []
    if not os.path.exists("/dev/kvm"):
        problems.append(f"/dev/kvm is missing: this host cannot run real VMs ({demo_hint()})")
    try:
        resolve_chv_bin(cfg)
    except CommandError as e:
        problems.append(str(e))
    if os.geteuid() != 0:
        problems.append("not root: creating the bridge, taps and iptables rules needs root")
    for tool, package in (("ip", "iproute2"), ("mke2fs", "e2fsprogs"), ("tune2fs", "e2fsprogs"),
                          ("iptables", "iptables"), ("iptables-restore", "iptables")):
        if not shutil.which(tool) and (not tool.startswith("iptables") or cfg.firewall):
            problems.append(f"{tool} is not installed (Debian package {package})")
    return problems


def missing_images(cfg):
    """The configured guest images that are not readable files, as 'key path'."""
    return [f"{key} {cfg.path(getattr(cfg, key))}" for key in ("kernel", "initramfs", "rootfs")
            if getattr(cfg, key) and not os.access(cfg.path(getattr(cfg, key)), os.R_OK)]


class SystemdNotifier:
    """Tells systemd (a Type=notify unit) when cbox.py is ready and when it stops, by one
    datagram to $NOTIFY_SOCKET (sd_notify(3)'s protocol; '@' starts an abstract name).
    Without NOTIFY_SOCKET it does nothing. The variable is taken out of the environment
    so the hypervisors cbox.py starts do not inherit it."""

    def __init__(self, environ=os.environ):
        address = environ.pop("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif address and not address.startswith("/"):
            log("NOTIFY_SOCKET is neither a path nor an abstract name: not notifying systemd", address=address)
            address = ""
        self.address = address

    def notify(self, *assignments):
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(assignments).encode())
        except OSError as e:
            log("cannot notify systemd", state=assignments[0], error=repr(os.strerror(e.errno) if e.errno else str(e)))


async def serve_until_stopped(cfg):
    notifier = SystemdNotifier()
    if os.geteuid() != 0:
        log("not running as root: creating taps, the bridge and iptables rules will fail", level="WARNING")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_token:
        banner = "!" * 78
        log(f"\n{banner}\nWARNING: serving on {cfg.host} WITHOUT api_token: anyone who can reach this port "
            f"can run commands in every VM.\nSet api_token in the config.\n{banner}")
    cfg = cfg.replace(chv_bin=resolve_chv_bin(cfg))
    missing = missing_images(cfg)
    if missing:
        log("WARNING: guest images missing (run `make images`): " + ", ".join(missing))
    log("file descriptor limit", nofile=raise_fd_limit(), reserve=cfg.fd_reserve)
    await configure_guest_work(cfg)
    VM_CPU.configure(cfg)
    freeze_startup_objects()
    lag_probe = asyncio.get_running_loop().create_task(LOOP_LAG.probe())
    busy_vms = asyncio.get_running_loop().create_task(VM_CPU.watch_busy())
    memory_back = asyncio.get_running_loop().create_task(give_memory_back())
    EVENTS.resize(cfg.events_ring_size)
    sender = EventSender(cfg) if cfg.events_url else None
    if sender:
        EVENTS.sinks.append(sender.put)
    network = HostNetwork(cfg)
    await network.setup()
    Path(cfg.path(cfg.run_dir)).mkdir(parents=True, exist_ok=True)
    manager = VMManager(cfg, network)
    await manager.adoption.adopt_all()
    await manager.deadlines.end_overdue()
    log_bounds = asyncio.get_running_loop().create_task(bound_vmm_logs(manager.all_vms))
    deadlines = asyncio.get_running_loop().create_task(manager.deadlines.run())
    manager.pool.start()
    server = RestServer(cfg, manager)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.notify("READY=1", f"STATUS=serving on {cfg.host}:{cfg.port}, {len(manager.vms)} VM(s) adopted")
    await stop.wait()
    notifier.notify("STOPPING=1", "STATUS=stopping" + (": destroying every VM" if cfg.destroy_on_exit else ""))
    log("stopping", vms=len(manager.vms), destroy_on_exit=cfg.destroy_on_exit)
    log_bounds.cancel()
    deadlines.cancel()
    lag_probe.cancel()
    busy_vms.cancel()
    memory_back.cancel()
    await server.stop()
    await manager.shutdown()
    VM_CPU.close()
    RECORD_WRITES.flush()
    if sender:
        await sender.finish(2.0)
    log("stopped")


async def serve(cfg):
    """The server, with sys.stderr (its log lines among what goes there) written without
    waiting (StderrText over StderrNoWait) until it stopped."""
    original, sink = sys.stderr, None
    try:
        sink = StderrNoWait(asyncio.get_running_loop())
        sys.stderr = StderrText(sink, original)
    except OSError as e:                       # no stderr at all: plain writes
        log("stderr cannot be checked; log lines are written with waits", error=e.strerror)
    if sink is not None and sink.waits:
        log("stderr cannot be reopened to write without waiting; a stalled log reader stalls the server")
    try:
        await serve_until_stopped(cfg)
    finally:
        sys.stderr = original
        if sink is not None:
            sink.close()


# ---- selftest: the first thing to run on a new host -------------------------
#
# Design. With no cbox.py serving this config, selftest runs the pieces of
# `serve` in-process (HostNetwork, VMManager) and drives the VMManager directly,
# not through REST: it then sees each start phase (StepClock observers), can read
# the VM's files before a failed start removes them, and Ctrl-C cancels a start at
# once and tears the VM down. A second VM manager beside a running cbox.py would
# share its state_dir, subnet, CIDs, taps and bridge, so when the config's
# host:port answers as cbox.py, selftest goes through that server's REST API with
# a VM of its own name (cbox-selftest-<random>) and touches nothing else. When no
# server answers but state_dir holds VM records (VMs a stopped server left
# running), it refuses: their IPs, CIDs and taps are taken. The callback URL is
# served here on loopback; the callback goes guest -> vsock -> cbox.py -> URL, so
# the serving cbox.py must share this network namespace (the same host).

# =============================================================================
# 15. Selftest (`cbox.py selftest`: a new host's end-to-end check)
# =============================================================================

SELFTEST_RUNS = 20      # exec and callback round trips measured (p50)

START_HINTS = {
    "record": "cannot write the VM record in state_dir",
    "files": "cannot create the VM's directories in state_dir and run_dir",
    "disk": "cannot make the stateful disk (mke2fs and tune2fs from e2fsprogs? space in state_dir?)",
    "tap": "cannot create the VM's tap on the bridge (root? /dev/net/tun and the tun module?)",
    "spawn": "the hypervisor did not start or its API socket did not answer",
    "vm.create": "the hypervisor refused the VM config",
    "callbacks": "cannot listen on the VM's vsock callback socket in run_dir",
    "vm.boot": "the hypervisor could not boot the VM (kernel, initramfs, rootfs paths and formats? /dev/kvm usable?)",
    "agent": "guest agent did not answer: the guest did not boot or its network is down",
}

# The guest side of the callback check: SELFTEST_RUNS callbacks from Python, as a
# guest program makes them; prints one JSON line (the times, or the first error).
GUEST_CALLBACK_SCRIPT = """\
import json, sys, time
from cbox_callback import callback, CallbackError
times = []
for i in range(%(runs)d):
    params = {"i": i, "nonce": %(nonce)r}
    t0 = time.monotonic()
    try:
        result = callback("selftest.echo", params, timeout=10)
    except CallbackError as e:
        print(json.dumps({"error": str(e), "done": i}))
        sys.exit(0)
    times.append((time.monotonic() - t0) * 1000)
    if result != {"echo": params}:
        print(json.dumps({"error": "unexpected result %%r" %% (result,), "done": i}))
        sys.exit(0)
print(json.dumps({"ms": times}))
"""


def one_line(text, limit=300):
    """A hint's evidence on one line, its end kept (the newest lines matter)."""
    text = " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text if len(text) <= limit else "..." + text[-limit:]


def fmt_ms(ms):
    return "" if ms is None else (f"{ms / 1000:.2f} s" if ms >= 10000 else f"{ms:.1f} ms")


class SelftestReport:
    """The table selftest prints: a row per step (PASS, FAIL or SKIP), its time, a detail
    and, for a failure, a one-line hint. Rows are printed as they come."""

    def __init__(self, out=None):
        self.rows, self.out = [], out

    def add(self, step, result, ms=None, detail="", hint=""):
        self.rows.append((step, result, ms, detail, hint))
        if self.out:
            print(f"{step:18} {result:6} {fmt_ms(ms):>10}  {detail}".rstrip(), file=self.out, flush=True)

    def has(self, step):
        return any(row[0] == step for row in self.rows)

    def ok(self):
        return bool(self.rows) and all(row[1] == "PASS" for row in self.rows)

    def hints(self):
        return [(row[0], row[4]) for row in self.rows if row[1] == "FAIL" and row[4]]


class CallbackEcho:
    """selftest's callback URL on loopback: each POST is answered {"result": {"echo": params}}."""

    def __init__(self):
        self.server, self.url, self.calls = None, None, 0

    async def start(self):
        self.server = await asyncio.start_server(self.connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/selftest"

    async def connection(self, reader, writer):
        set_nodelay(writer)
        try:
            while (head := await read_head(reader)) is not None:
                body = await read_body(reader, head[1], 1024 * 1024)
                try:
                    params = json.loads(body).get("params")
                except (ValueError, AttributeError):
                    params = None
                self.calls += 1
                writer.write(build_response(200, json_bytes({"result": {"echo": params}})))
        except (HttpError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self):
        if self.server:
            self.server.close()


class LocalVMs:
    """selftest's VM through a VMManager in this process (no cbox.py serves this config)."""

    def __init__(self, cfg, manager):
        self.cfg, self.manager = cfg, manager

    async def start(self, name, url):
        spec = validate_start_request({"vmName": name, "callbackUrl": url}, self.cfg)
        return (await self.manager.starter.start(spec)).api()

    async def exec(self, name, body):
        return json.loads(await self.manager.execs.exec(name, *validate_exec_request(body, self.cfg)))

    async def exists(self, name):
        return name in self.manager.vms

    async def destroy(self, name):
        await self.manager.teardown.destroy(name)


class RemoteVMs:
    """selftest's VM through the REST API of the cbox.py serving this config (a Client,
    called from threads so that the loop goes on serving the callback URL)."""

    def __init__(self, client):
        self.client = client

    async def call(self, function, *args, **kwargs):
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except ServerUnreachable as e:
            raise ApiError(502, f"cbox.py at {self.client.url}: {e}") from e

    async def start(self, name, url):
        return (await self.call(self.client.start, name, callback_url=url)).info

    async def exec(self, name, body):
        options = {key: value for key, value in body.items() if key != "cmd"}
        return await self.call(self.client.vm(name).exec, body["cmd"], **options)

    async def exists(self, name):
        try:
            await self.call(self.client.get, name)
            return True
        except ClientError as e:
            if e.status == 404:
                return False
            raise

    async def destroy(self, name):
        await self.call(self.client.destroy, name)


async def running_server(cfg):
    """(Client, health) for the cbox.py serving at the config's host:port, or None when
    nothing listens there; ApiError when something else answers."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(cfg.host, cfg.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}"
    try:
        health = await asyncio.to_thread(Client(url, timeout=5.0).health)
    except ServerUnreachable:
        return None
    except ClientError as e:
        health = f"HTTP {e.status}: {e}"
    if isinstance(health, dict) and "version" in health:
        return Client(url, token=cfg.api_token or None), health
    raise ApiError(409, f"{host}:{cfg.port} answers, but not as cbox.py ({one_line(health, 100)}): "
                        "`serve` could not listen there either; change port in the config or stop that program")


class HostFootprint:
    """What selftest's own setup adds to a host (bridge, firewall chains, ip_forward,
    directories, the stateful-disk template), so that it can take it away again."""

    IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

    def __init__(self, cfg, network):
        self.cfg, self.net = cfg, network
        state = Path(cfg.path(cfg.state_dir))
        self.templates = state / "templates"
        self.new_dirs = [d for d in (state, state / "vms", self.templates, Path(cfg.path(cfg.run_dir)))
                         if not d.exists()]
        self.old_templates = set(self.templates.glob("*")) if self.templates.exists() else set()
        self.bridge_existed = interface_exists(cfg.bridge_name)
        self.ip_forward = self.IP_FORWARD.read_text() if self.IP_FORWARD.exists() else None
        self.chains_existed = True

    async def note_firewall(self):
        if self.cfg.firewall:
            self.chains_existed = await HostNetwork.iptables_ok("filter", "-n", "-L", "CBOX-FORWARD")

    async def restore(self):
        """Undo what selftest added; returns what could not be undone."""
        problems = []
        if not self.chains_existed:
            await self.net.remove_firewall()
        if not self.bridge_existed and interface_exists(self.cfg.bridge_name):
            try:
                await run_cmd("ip", "link", "del", "dev", self.cfg.bridge_name)
            except CommandError as e:
                problems.append(f"bridge {self.cfg.bridge_name}: {e}")
        if self.ip_forward is not None and self.IP_FORWARD.read_text() != self.ip_forward:
            try:
                self.IP_FORWARD.write_text(self.ip_forward)
            except OSError as e:
                problems.append(f"ip_forward: {e}")
        for path in set(self.templates.glob("*")) - self.old_templates if self.templates.exists() else ():
            path.unlink()
        for directory in reversed(self.new_dirs):
            remove_tree(directory)
        return problems


class SimpleVM:
    """The fields VmPaths and the leftover check need, from a VM's API object."""

    def __init__(self, api):
        self.vmName, self.cid, self.tapDeviceName, self.pid = api["vmName"], api["cid"], api["tapDeviceName"], None


class Selftest:
    """preflight, images, server, (network), start, exec, callback, destroy, leftovers."""

    def __init__(self, cfg, config_path, out):
        self.cfg, self.config_path = cfg, config_path
        self.report = SelftestReport(out)
        self.name = f"cbox-selftest-{uuid.uuid4().hex[:8]}"
        self.blocked = None            # why the steps still to come cannot run
        self.vms = None                # LocalVMs or RemoteVMs
        self.manager = self.network = self.footprint = None
        self.echo = CallbackEcho()
        self.start_tried = False
        self.current = None            # the step under way
        self.vm = None                 # the VM's API object once it runs
        self.local_vm = None           # the VMManager's VM object (in-process)
        self.phases = []               # (step, ms, ok) of the start, from StepClock (in-process)
        self.evidence = {}             # tails of the VM's files, taken when a start step failed

    def skip_or_false(self, step):
        self.current = step
        if self.blocked:
            self.report.add(step, "SKIP", detail=f"cannot run: {self.blocked}")
        return not self.blocked

    async def run(self):
        self.check_preflight()
        self.check_images()
        await self.connect()
        await self.start_vm()
        await self.check_exec()
        await self.check_callbacks()

    # ---- the steps before a VM --------------------------------------------------

    def check_preflight(self):
        problems = preflight(self.cfg)
        self.report.add("preflight", "FAIL" if problems else "PASS",
                        detail=f"{len(problems)} problem(s)" if problems else "/dev/kvm, chv_bin, root, tools",
                        hint="; ".join(problems))
        try:
            self.cfg = self.cfg.replace(chv_bin=resolve_chv_bin(self.cfg))
        except CommandError:
            self.blocked = "no usable chv_bin (see preflight)"

    def check_images(self):
        missing = missing_images(self.cfg)
        if missing:
            self.report.add("images", "FAIL", detail="missing: " + ", ".join(missing),
                            hint=f"{', '.join(missing)}: not found or not readable; run `make images`, or point "
                                 "kernel, initramfs and rootfs in the config at your images")
            self.blocked = self.blocked or "guest images missing"
        else:
            self.report.add("images", "PASS", detail=", ".join(
                self.cfg.path(getattr(self.cfg, k)) for k in ("kernel", "initramfs", "rootfs") if getattr(self.cfg, k)))

    async def connect(self):
        """Use the cbox.py serving this config, or set up the VM manager in-process."""
        if not self.skip_or_false("server"):
            return
        cfg = self.cfg
        url = f"http://{cfg.host}:{cfg.port}"
        try:
            found = await running_server(cfg)
        except ApiError as e:
            self.report.add("server", "FAIL", detail=f"port {cfg.port} taken", hint=str(e))
            self.blocked = "port taken"
            return
        if found:
            client, health = found
            self.vms = RemoteVMs(client)
            self.report.add("server", "PASS", detail=f"cbox.py {health.get('version')} serves {url} "
                                                     f"({health.get('vms')} VMs): selftest uses its API")
            return
        records = sorted(Path(cfg.path(cfg.state_dir), "vms").glob("*.json"))
        if records:
            self.report.add("server", "FAIL", detail=f"{len(records)} VM record(s) in state_dir, no server",
                            hint=f"nothing answers at {url}, but {records[0].parent} holds {len(records)} VM "
                                 f"record(s) (VMs a stopped cbox.py left running?): start `cbox.py serve --config "
                                 f"{self.config_path}` and run selftest again (it then uses the server), or "
                                 "destroy those VMs first")
            self.blocked = "VMs of a stopped server in state_dir"
            return
        self.report.add("server", "PASS", detail=f"none at {url}: the VM manager runs in-process")
        t0 = time.monotonic()
        self.network = HostNetwork(cfg)
        self.footprint = HostFootprint(cfg, self.network)
        try:
            await self.footprint.note_firewall()
            await self.network.setup()
            Path(cfg.path(cfg.run_dir)).mkdir(parents=True, exist_ok=True)
        except (CommandError, OSError) as e:
            self.report.add("network", "FAIL", (time.monotonic() - t0) * 1000, detail=f"bridge {cfg.bridge_name}",
                            hint=f"cannot set up the bridge and firewall: {one_line(e)} (root? iproute2 and "
                                 "iptables installed? set firewall: false where iptables is unavailable)")
            self.blocked = "network setup failed"
            return
        self.report.add("network", "PASS", (time.monotonic() - t0) * 1000,
                        detail=f"bridge {cfg.bridge_name} {cfg.bridge_ip}" + (", firewall" if cfg.firewall else ""))
        self.manager = VMManager(cfg, self.network)
        self.vms = LocalVMs(cfg, self.manager)

    # ---- the VM -----------------------------------------------------------------

    def observe(self, clock, step, ms, ok):
        """StepClock observer: the start's phases, and evidence when one fails."""
        if clock.vm_name != self.name or clock.action != "start":
            return
        self.phases.append((step, ms, ok))
        self.report.add(f"start: {step}", "PASS" if ok else "FAIL", ms)
        vm = self.manager.vms.get(self.name) if self.manager else None
        self.local_vm = vm or self.local_vm
        if not ok and vm:
            paths = vm.paths
            self.evidence = {"hypervisor output": tail_file(paths.chv_out, 2048),
                             "hypervisor log": tail_file(paths.chv_log, 2048)}

    async def start_vm(self):
        if not self.skip_or_false("start"):
            return
        await self.echo.start()
        self.start_tried = True
        t0 = time.monotonic()
        try:
            self.vm = await self.vms.start(self.name, self.echo.url)
        except ApiError as e:
            ms = (time.monotonic() - t0) * 1000
            m = re.search(r"failed at step (\S+):", str(e))
            step = m.group(1) if m else None
            self.report.add("start", "FAIL", ms, detail=f"failed at step {step}" if step else "refused",
                            hint=self.start_hint(step, str(e)))
            self.blocked = "the VM did not start"
            return
        self.report.add("start", "PASS", (time.monotonic() - t0) * 1000,
                        detail=f"{self.name} ip {self.vm['ip']} cid {self.vm['cid']}"
                               + ("" if self.phases else " (phases: in the server's log)"))

    def start_hint(self, step, error):
        hint = f"{START_HINTS[step]}: {one_line(error, 500)}" if step in START_HINTS else one_line(error, 500)
        output = self.evidence.get("hypervisor output", "").strip()
        if step == "spawn" and output:
            hint += f"; its output: {one_line(output)}"
        said = [line for line in self.evidence.get("hypervisor log", "").splitlines()
                if re.search(r"\bERROR\b", line)]     # its WARN lines are mostly harmless
        if said and step not in ("vm.create", "vm.boot"):      # their API errors already say why
            hint += f"; its log: {one_line(said[-1])}"
        return hint

    async def check_exec(self):
        if not self.skip_or_false("exec"):
            return
        nonce = uuid.uuid4().hex[:12]
        times = []
        for _ in range(SELFTEST_RUNS):
            t0 = time.monotonic()
            try:
                result = await self.vms.exec(self.name, {"cmd": f"echo {nonce}", "timeout": 30})
            except ApiError as e:
                self.report.add("exec", "FAIL", detail=f"after {len(times)} of {SELFTEST_RUNS}",
                                hint=f"exec failed: {one_line(e)}")
                self.blocked = "exec failed"
                return
            times.append((time.monotonic() - t0) * 1000)
            if result.get("exitCode") != 0 or result.get("stdout") != nonce + "\n":
                self.report.add("exec", "FAIL", detail="wrong answer",
                                hint=f"`echo {nonce}` in the guest answered {one_line(json.dumps(result))}")
                self.blocked = "exec failed"
                return
        self.report.add("exec", "PASS", statistics.median(times),
                        detail=f"p50 of {SELFTEST_RUNS} (min {min(times):.1f}, max {max(times):.1f} ms)")

    async def check_callbacks(self):
        if not self.skip_or_false("callback"):
            return
        script = GUEST_CALLBACK_SCRIPT % {"runs": SELFTEST_RUNS, "nonce": uuid.uuid4().hex[:12]}
        try:
            result = await self.vms.exec(self.name, {"cmd": "python3 -", "stdin": script, "timeout": 120})
        except ApiError as e:
            self.report.add("callback", "FAIL", hint=f"exec of the guest's callback program failed: {one_line(e)}")
            return
        lines = (result.get("stdout") or "").strip().splitlines()
        try:
            answer = json.loads(lines[-1])
        except (ValueError, IndexError):
            self.report.add("callback", "FAIL", detail="the guest program failed",
                            hint=f"python3 in the guest (exit {result.get('exitCode')}): "
                                 f"{one_line(result.get('output') or result.get('error'))}")
            return
        if "error" in answer:
            self.report.add("callback", "FAIL", detail=f"after {answer.get('done')} of {SELFTEST_RUNS}",
                            hint=self.callback_hint(answer["error"]))
            return
        times = answer["ms"]
        if self.echo.calls < SELFTEST_RUNS:
            self.report.add("callback", "FAIL", hint=f"the guest got its answers but the URL saw {self.echo.calls} "
                                                     f"of {SELFTEST_RUNS} calls")
            return
        self.report.add("callback", "PASS", statistics.median(times),
                        detail=f"p50 of {SELFTEST_RUNS} guest -> vsock -> cbox.py -> URL "
                               f"(min {min(times):.1f}, max {max(times):.1f} ms)")

    def callback_hint(self, error):
        if "callback URL" in error:
            return (f"callback failed: cbox.py could not reach the selftest's URL {self.echo.url}: {one_line(error)} "
                    "(does the serving cbox.py run in another network namespace or container?)")
        hint = (f"callback failed: {one_line(error)}: no vsock in the guest kernel (vmw_vsock_virtio_transport) "
                "or in the hypervisor?")
        vm = self.local_vm or (SimpleVM(self.vm) if self.vm else None)
        if vm:    # the hypervisor's own words about vsock, while the VM still runs
            log_text = tail_file(VmPaths(self.cfg, vm.vmName, vm.cid).chv_log, 64 * 1024)
            said = [line for line in log_text.splitlines() if "vsock" in line.lower()
                    and re.search(r"not available|unavailable|error|fail", line, re.I)]
            if said:
                hint += f" The hypervisor's log says: {one_line(said[-1])}"
        return hint

    # ---- always: destroy, leftovers, restore ---------------------------------

    async def finish(self, interrupted):
        """Destroy the VM (whatever happened before) and check nothing of it is left."""
        reason = "interrupted" if interrupted else (self.blocked or "an earlier step failed")
        if interrupted:
            step = self.current if self.current and not self.report.has(self.current) else "interrupted"
            self.report.add(step, "FAIL", detail="interrupted (Ctrl-C or SIGTERM)",
                            hint="stopped before the end; the selftest VM is destroyed all the same")
        for step in ("start", "exec", "callback"):
            if not self.report.has(step):
                self.report.add(step, "SKIP", detail=f"cannot run: {reason}")
        if self.start_tried:
            await self.destroy_vm()
        problems = await self.footprint.restore() if self.footprint else []
        if self.start_tried or self.footprint:
            problems = self.leftovers() + problems
            self.report.add("leftovers", "FAIL" if problems else "PASS",
                            detail="" if problems else "no tap, process, record or file of the VM",
                            hint="left behind: " + "; ".join(problems))
        self.echo.close()
        if isinstance(self.vms, RemoteVMs):
            self.vms.client.close()

    async def destroy_vm(self):
        t0 = time.monotonic()
        try:
            if not await self.vms.exists(self.name):
                self.report.add("destroy", "SKIP", detail="the failed start removed the VM")
                return
            await self.vms.destroy(self.name)
            self.report.add("destroy", "PASS", (time.monotonic() - t0) * 1000, detail=self.name)
        except ApiError as e:
            if e.status == 404:          # a server's start, cut short by Ctrl-C, failed meanwhile
                self.report.add("destroy", "SKIP", detail="the failed start removed the VM")
                return
            self.report.add("destroy", "FAIL", (time.monotonic() - t0) * 1000, hint=f"destroy failed: {one_line(e)}")
        finally:
            if self.manager:
                await self.manager.shutdown()

    def leftovers(self):
        cfg, found = self.cfg, []
        record = Path(cfg.path(cfg.state_dir), "vms", self.name + ".json")
        for path in (record, record.with_suffix("")):
            if path.exists():
                found.append(str(path))
        vm = self.local_vm or (SimpleVM(self.vm) if self.vm else None)
        if vm:
            run_dir = VmPaths(cfg, vm.vmName, vm.cid).run_dir
            if run_dir.exists():
                found.append(str(run_dir))
            if vm.tapDeviceName and interface_exists(vm.tapDeviceName):
                found.append(f"tap {vm.tapDeviceName}")
            watch = getattr(vm, "watch", None)
            if watch and watch.alive():
                found.append(f"hypervisor process {vm.pid}")
        return found


class LogTail:
    """Stands in for stderr while selftest runs quietly: keeps cbox.py's last log lines."""

    def __init__(self, lines=200):
        self.lines, self.partial = collections.deque(maxlen=lines), ""

    def write(self, text):
        *done, self.partial = (self.partial + text).split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self):
        pass


async def selftest(cfg, config_path, out):
    """Run the selftest; returns its report. Ctrl-C or SIGTERM stop it, and the VM is destroyed."""
    check = Selftest(cfg, config_path, out)
    StepClock.observers.append(check.observe)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(check.run())
    interrupted = []

    def interrupt():
        if not interrupted:
            interrupted.append(True)
            print("selftest: interrupted; destroying the selftest VM", file=out, flush=True)
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)
    try:
        await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
    except Exception as e:       # a bug here must still destroy the VM and show in the table
        check.report.add("selftest", "FAIL", hint=f"internal error: {type(e).__name__}: {one_line(e)}")
    finally:
        await check.finish(bool(interrupted))    # a second signal is ignored: cleanup must finish
        StepClock.observers.remove(check.observe)
    return check.report


# =============================================================================
# 16. CLI (the client commands, argument parsing, main)
# =============================================================================

def cli_selftest(args, cfg):
    out = sys.stdout
    print(f"cbox selftest: config {Path(args.config).resolve()}, hypervisor {cfg.chv_bin}", file=out)
    print(f"{'STEP':18} {'RESULT':6} {'TIME':>10}  DETAIL", file=out, flush=True)
    quiet = LogTail()
    saved, sys.stderr = sys.stderr, (sys.stderr if args.verbose else quiet)
    try:
        report = asyncio.run(selftest(cfg, args.config, out))
    finally:
        sys.stderr = saved
    hints = report.hints()
    if hints:
        print("\nhints:", file=out)
        for step, hint in hints:
            print(f"  {step}: {hint}", file=out)
    if not report.ok() and not args.verbose and quiet.lines:
        print("\ncbox.py's log, last lines (--verbose shows all of it as it happens):", file=out)
        for line in list(quiet.lines)[-15:]:
            print(f"  {line}", file=out)
    failed = sum(1 for row in report.rows if row[1] == "FAIL")
    print(f"\nselftest: {'PASS' if report.ok() else f'FAIL ({failed} step(s) failed)'}", file=out, flush=True)
    sys.exit(0 if report.ok() else 1)


def cli_client(args):
    """The Client of the client commands: --server (env CBOX_URL), the token from env CBOX_API_TOKEN."""
    return Client(args.server, token=os.environ.get("CBOX_API_TOKEN") or None)


def run_client_command(args, command):
    """Run a client command, command(args, client); an error of the API exits with its message."""
    client = cli_client(args)
    try:
        command(args, client)
    except ServerUnreachable as e:
        sys.exit(f"cbox: {e} (is `cbox.py serve` running?)")
    except StreamBroken as e:
        sys.exit(f"cbox: {e}")
    except ClientError as e:
        sys.exit(f"cbox: {e.method} {e.path}: HTTP {e.status}: {e}")
    finally:
        client.close()


def cli_labels(items):
    """--label K=V options as a labels object."""
    labels = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq:
            sys.exit(f"cbox: --label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels


def cli_health(args, client):
    """`health`: the server's state in two lines (its VMs, its warm pool)."""
    health = client.health()
    print(f"{health.get('status')}: cbox.py {health.get('version')}, {health.get('vms')} VM(s)")
    pool = health.get("pool") or {}
    print(f"warm pool: {pool.get('ready')} of {pool.get('size')} ready, {pool.get('booting')} booting"
          + (f"; last error: {pool['lastError']}" if pool.get("lastError") else ""))


def cli_network(args):
    """The "network" object of `vm start` / `vm network` from --egress and --allow-out
    (--allow-out alone means allowlist); None when neither is given."""
    if args.egress is None and not args.allow_out:
        return None
    network = {"egress": args.egress or "allowlist"}
    if args.allow_out:
        network["allowOut"] = args.allow_out
    return network


def fmt_egress(vm):
    network = vm.get("network") or {}
    return ",".join([network.get("egress") or "?", *network.get("allowOut", [])])


def cli_failed_starts(failures, show_logs):
    """`vm failures`: the kept failed starts, newest first, and where their evidence is."""
    if not failures:
        print("no failed start is kept (state_dir/failed-starts)")
    for failure in failures:
        print(f"{failure['failedAt']}  {failure['vmName']}  step={failure['step']}  stopReason={failure['stopReason']}")
        print(f"  error: {failure['error']}")
        print(f"  evidence: {failure['directory']}/ ("
              + ", ".join(f"{name} {size} B" for name, size in failure["files"].items()) + ")")
        if show_logs:
            for title, lines in (("hypervisor -v log", failure["vmmLog"]), ("console", failure["console"])):
                print(f"  {title}, last lines:" if lines else f"  {title}: (empty)")
                for line in lines:
                    print(f"    {line}")


def cli_vm_start(args, client):
    vm = client.start(args.name, callback_url=args.callback_url, callback_methods=args.callback_method,
                      vcpus=args.vcpus, memory_mb=args.memory_mb, network=cli_network(args), ttl=args.ttl,
                      idle_timeout=args.idle_timeout, labels=cli_labels(args.label) or None, image=args.image,
                      disk_mb=args.disk_mb).info
    print(f"{vm['vmName']} {vm['status']} ip={vm['ip']} cid={vm['cid']} image={vm['image']} egress={fmt_egress(vm)}"
          + (f" expires={vm['expiresAt']}" if vm.get("expiresAt") else ""))


def cli_vm_ls(args, client):
    vms = client.list(label=args.label, status=args.status, image=args.image)
    print(f"{'NAME':24} {'STATUS':8} {'IP':18} {'CID':>5} {'VCPUS':>5} {'MEM_MB':>6}  {'CREATED':20}  "
          f"{'EXPIRES':24}  LABELS")
    for vm in (vm.info for vm in vms):
        labels = ",".join(f"{k}={v}" for k, v in (vm.get("labels") or {}).items())
        print(f"{vm['vmName']:24} {vm['status']:8} {vm['ip']:18} {vm['cid']:>5} {vm['vcpus']:>5} "
              f"{vm['memoryMb']:>6}  {vm['createdAt']:20}  {vm.get('expiresAt') or '-':24}  {labels or '-'}")


def cli_vm_ttl(args, client):
    seconds = None if args.seconds == "none" else args.seconds
    if seconds is not None and not is_decimal(seconds):
        sys.exit("cbox: vm ttl: SECONDS must be a whole number or 'none'")
    vm = client.vm(args.name).set_ttl(None if seconds is None else int(seconds)).info
    print(f"{vm['vmName']} expires={vm['expiresAt'] or 'never'}")


def cli_vm_rm(args, client):
    selected = args.label or args.status
    if not args.name and not args.all and not selected:
        sys.exit("cbox: vm rm needs VM names, --label/--status or --all")
    if args.all or selected:
        print("destroyed:", " ".join(client.destroy_all(label=args.label, status=args.status)) or "(none)")
    for name in args.name:
        client.destroy(name)
        print(f"{name} destroyed")


def cli_vm_logs(args, client):
    sys.stdout.write(client.vm(args.name).logs())


def cli_vm_failures(args, client):
    cli_failed_starts(client.failed_starts(), args.logs)


def cli_vm_network(args, client):
    network = cli_network(args)
    if network is None:
        sys.exit("cbox: vm network needs --egress or --allow-out")
    vm = client.vm(args.name).set_network(network["egress"], network.get("allowOut")).info
    print(f"{vm['vmName']} egress={fmt_egress(vm)}")


VM_COMMANDS = {"start": cli_vm_start, "ls": cli_vm_ls, "ttl": cli_vm_ttl, "rm": cli_vm_rm, "logs": cli_vm_logs,
               "failures": cli_vm_failures, "network": cli_vm_network}


def cli_vm(args, client):
    VM_COMMANDS[args.vm_cmd](args, client)


def cli_image(args, client):
    """`image ls`: the guest images, what they are and which VMs use them; `image rm NAME`."""
    if args.image_cmd == "ls":
        images = client.images()
        print(f"{'NAME':16} {'SIZE_MB':>8} {'BUILT':20} {'AGENT':10} {'VMS':16} SOURCE")
        for image in images:
            source = image.get("source") or {}
            what = source.get("dockerfile") or source.get("suite") or "-"
            agent = f"{image.get('agentVersion') or '?'}/{image.get('agentProtocol') or '?'}" \
                if image.get("agentVersion") else "-"
            size = "-" if image.get("sizeBytes") is None else str(image["sizeBytes"] >> 20)
            vms = ",".join(image.get("vms") or []) or "-"
            print(f"{image['name']:16} {size:>8} {image.get('builtAt') or '-':20} {agent:10} {vms:16} {what}"
                  + ("" if image.get("usable") else f"  UNUSABLE: {image.get('problem')}"))
    elif args.image_cmd == "rm":
        for name in args.name:
            client.remove_image(name)
            print(f"{name} removed")


def add_network_args(parser):
    parser.add_argument("--egress", choices=EGRESS_MODES, help="egress policy (default: the server's default_egress)")
    parser.add_argument("--allow-out", action="append", metavar="CIDR",
                        help="an IPv4 network or address the guest may reach (repeat; implies --egress allowlist)")


def exit_status(result):
    """The CLI's exit code for an exec result: the command's, 124 for a timeout, 128+N for signal N."""
    if result.get("exitCode") is not None:
        return result["exitCode"]
    sys.stderr.write(f"cbox: {result.get('error') or 'no exit code'}\n")
    return 124 if result.get("timedOut") else 128 + (result.get("signal") or 9)


def follow_exec(stream):
    """Write a stream's output events to stdout/stderr as they come; returns the exec's result."""
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    for event in stream:
        if event["type"] in sinks:
            sinks[event["type"]].write(output_bytes(event))
            sinks[event["type"]].flush()
        elif event["type"] == "dropped":
            sys.stderr.write(f"cbox: {event['missed']} events of the output were lost\n")
    return stream.result


def cli_exec_options(args):
    """The exec options of `exec` (Client.exec's keywords) from its command line and stdin."""
    options = {"timeout": args.timeout, "cwd": args.cwd or None, "tag": args.tag or None}
    if args.user:
        options["user"] = int(args.user) if is_decimal(args.user) else args.user
    if args.env:
        options["env"] = dict(item.split("=", 1) for item in args.env)
    if not sys.stdin.isatty() and args.stdin:
        options["stdin"] = sys.stdin.read()
    return options


def cli_exec(args, client):
    command = args.command
    if not command:
        sys.exit("cbox: exec needs a command: cbox.py exec NAME -- CMD...")
    cmd, vm = command[0] if len(command) == 1 else shlex.join(command), client.vm(args.name)
    if args.no_stream:
        result = vm.exec(cmd, **cli_exec_options(args))
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    else:
        def tell(problem):
            sys.stderr.write(f"cbox: {problem}; re-attaching\n")
        stream = vm.stream(cmd, reattach=3, on_reattach=tell, **cli_exec_options(args))
        try:
            result = follow_exec(stream)
        except KeyboardInterrupt:
            sys.exit("cbox: detached; the command keeps running (GET /v1/vms/NAME/exec lists it)")
    if result.truncated:
        sys.stderr.write("cbox: output truncated (exec_output_limit_bytes)\n")
    sys.exit(exit_status(result))


def terminal_size(fd=0):
    """(cols, rows) of the terminal on fd (the window's, not $COLUMNS/$LINES), within the API's bounds."""
    try:
        size = os.get_terminal_size(fd)
        cols, rows = size.columns, size.lines
    except OSError:
        cols, rows = 80, 24
    return min(max(cols, 1), TERMINAL_SIZE_MAX), min(max(rows, 1), TERMINAL_SIZE_MAX)


class TerminalClient:
    """`cbox.py shell`'s side of an attach: the local terminal in raw mode (restored whatever
    happens), its keys as binary frames, its size at the start and on SIGWINCH, the remote
    terminal's bytes written out as they come. `~.` at the start of a line detaches (as in
    ssh; `~~` types one `~`). run() returns the exit status: the command's, 128 + a signal's,
    or None when the session ended without the command's end: a detach, or `ended` says why
    (the server's close code and reason, or a connection that broke)."""

    def __init__(self, terminal, stdin_fd=0, stdout_fd=1):
        self.terminal, self.sock, self.frames, self.rest = terminal, terminal.sock, terminal.frames, terminal.rest
        self.stdin_fd, self.stdout_fd = stdin_fd, stdout_fd
        self.line_start, self.tilde = True, False
        self.result = None
        self.ended = None              # why the session ended without the command's exit event

    def run(self):
        import termios
        import tty
        saved = termios.tcgetattr(self.stdin_fd) if os.isatty(self.stdin_fd) else None
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        def window_changed(*_):
            with contextlib.suppress(BlockingIOError):       # a wake-up is pending already
                os.write(wake_w, b"w")
        old_handler = signal.signal(signal.SIGWINCH, window_changed)
        try:
            if saved is not None:
                tty.setraw(self.stdin_fd)
            self.send_size()
            return self.loop(wake_r)
        except OSError as e:              # the connection reset, or a send into a closed one
            self.ended = f"the connection to the server broke ({e.strerror or e})"
            return None
        finally:
            signal.signal(signal.SIGWINCH, old_handler)
            if saved is not None:
                termios.tcsetattr(self.stdin_fd, termios.TCSAFLUSH, saved)
            os.close(wake_r)
            os.close(wake_w)
            self.sock.close()

    def send(self, opcode, payload):
        self.terminal.send(opcode, payload)

    def send_size(self):
        cols, rows = terminal_size(self.stdin_fd)
        self.send(WebSocketFrames.TEXT, json_bytes({"type": "resize", "cols": cols, "rows": rows}))

    def loop(self, wake_r):
        import select
        if self.rest and self.received(self.rest):
            return self.status()
        while True:
            readable, _, _ = select.select([self.stdin_fd, self.sock, wake_r], [], [])
            if wake_r in readable:
                os.read(wake_r, 64)
                self.send_size()
            if self.sock in readable:
                data = self.sock.recv(256 * 1024)
                if not data:
                    self.ended = "the connection to the server broke"
                if not data or self.received(data):
                    return self.status()
            if self.stdin_fd in readable:
                keys = os.read(self.stdin_fd, 4096)
                typed = self.typed(keys) if keys else None
                if typed is None:
                    self.send(WebSocketFrames.CLOSE, (1000).to_bytes(2, "big"))
                    return None
                if typed:
                    self.send(WebSocketFrames.BINARY, typed)

    def typed(self, keys):
        """The keys to send; None when `~.` asks to detach (or the local input ended)."""
        out = bytearray()
        for byte in keys:
            if self.tilde:
                self.tilde = False
                if byte == ord("."):
                    return None
                if byte != ord("~"):
                    out.append(ord("~"))
            elif byte == ord("~") and self.line_start:
                self.tilde = True
                continue
            out.append(byte)
            self.line_start = byte in (ord("\r"), ord("\n"))
        return bytes(out)

    def received(self, data):
        """Handle the server's frames; True once the session is over."""
        for opcode, payload in self.frames.feed(data):
            if opcode == WebSocketFrames.BINARY:
                os.write(self.stdout_fd, payload)
            elif opcode == WebSocketFrames.TEXT:
                self.control(json.loads(payload))
            elif opcode == WebSocketFrames.PING:
                self.send(WebSocketFrames.PONG, payload)
            elif opcode == WebSocketFrames.CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.ended = f"the server closed the terminal ({code}: {payload[2:].decode('utf-8', 'replace')})"
                return True
        return False

    def control(self, message):
        if message.get("type") == "exit":
            self.result = message
        elif message.get("type") == "error":
            os.write(2, f"\r\ncbox: {log_text(message.get('error'))}\r\n".encode())

    def status(self):
        if self.result is None:
            return None
        return exit_status(self.result)


SHELL_OF_USER = ('s=$(sed -n "s|^$(id -un):.*:||p" /etc/passwd 2>/dev/null); '
                 '[ -x "$s" ] || s=/bin/sh; exec "$s" -l')


def cli_shell(args, client):
    """`cbox.py shell NAME [-- CMD...]`: a terminal in the VM (the user's login shell by default)."""
    vm = client.vm(args.name)
    try:
        if args.attach:
            exec_id = args.attach
        else:
            cols, rows = terminal_size()
            term = os.environ.get("TERM", "")
            options = {"term": term} if schema_regex(TERM_PATTERN).search(term) else {}
            if args.user:
                options["user"] = int(args.user) if is_decimal(args.user) else args.user
            exec_id = vm.exec(args.command or SHELL_OF_USER, blocking=False, tty=True, cols=cols, rows=rows,
                              **options).exec_id
        terminal = vm.terminal(exec_id)
    except ClientError as e:
        sys.exit(f"cbox: {e.method} {e.path}: " + (f"HTTP {e.status}: " if e.status else "") + log_text(str(e)))
    session = TerminalClient(terminal)
    status = session.run()
    if status is not None:
        sys.exit(status)
    again = f"cbox.py shell {args.name} --attach {exec_id}"
    if session.ended:
        sys.exit(f"cbox: {log_text(session.ended)}; the command may still run: {again}")
    sys.stderr.write(f"cbox: detached; the command keeps running: {again}\n")


CLIENT_COMMANDS = {"health": cli_health, "vm": cli_vm, "exec": cli_exec,     # each (args, client)
                   "shell": cli_shell, "image": cli_image}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cbox.py", description="CBox: commands in Cloud Hypervisor microVMs")
    parser.add_argument("--server", default=os.environ.get("CBOX_URL", "http://127.0.0.1:7000"),
                        help="REST API for the client commands (env CBOX_URL; token from env CBOX_API_TOKEN)")
    parser.add_argument("--version", action="version", version=f"cbox.py {VERSION} commit {build_commit()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    config = os.environ.get("CBOX_CONFIG") or "config.yaml"    # the installed `cbox` command sets it
    p = sub.add_parser("serve", help="run the REST server")
    p.add_argument("--config", default=config, help="config file (env CBOX_CONFIG, else config.yaml)")
    p = sub.add_parser("check-config", help="parse the config and print the effective settings")
    p.add_argument("--config", default=config, help="config file (env CBOX_CONFIG, else config.yaml)")
    p = sub.add_parser("openapi", help="print the OpenAPI 3.1 description of the REST API (as GET /v1/openapi.json)")
    p.add_argument("--config", default=config, help="config file (env CBOX_CONFIG, else config.yaml)")
    p = sub.add_parser("preflight", help="check this host can run real VMs (KVM, cloud-hypervisor, tools)")
    p.add_argument("--config", default=config, help="config file (env CBOX_CONFIG, else config.yaml)")
    p = sub.add_parser("selftest", help="check this host end to end: preflight, boot a VM, exec, "
                                        "a callback, destroy (exit 0 when all pass)")
    p.add_argument("--config", default=config, help="config file (env CBOX_CONFIG, else config.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="show cbox.py's log as it happens")
    sub.add_parser("health", help="the server's state: its VMs and warm pool")
    p = sub.add_parser("vm", help="start, list, remove VMs")
    vm_sub = p.add_subparsers(dest="vm_cmd", required=True)
    q = vm_sub.add_parser("start")
    q.add_argument("name")
    q.add_argument("--callback-url")
    q.add_argument("--callback-method", action="append", metavar="METHOD",
                   help="allow this callback method (repeat it; default: every method)")
    q.add_argument("--vcpus", type=int)
    q.add_argument("--memory-mb", type=int)
    add_network_args(q)
    q.add_argument("--ttl", type=int, metavar="SECONDS", help="destroy the VM this long after its start")
    q.add_argument("--idle-timeout", type=int, metavar="SECONDS", help="destroy the VM after this long unused")
    q.add_argument("--label", action="append", metavar="K=V", help="a label (repeatable)")
    q.add_argument("--image", help="the guest image (`image ls`; default: default)")
    q.add_argument("--disk-mb", type=int, help="the VM's stateful disk, MiB (default: the server's stateful_size_in_mb)")
    q = vm_sub.add_parser("ls")
    q.add_argument("--label", action="append", metavar="K=V", help="only VMs with this label (K=V, or K: any value)")
    q.add_argument("--image", action="append", help="only VMs of this image (repeatable: any of them)")
    q.add_argument("--status", help="only VMs with this status (RUNNING, STOPPED, FAILED, CREATED)")
    q = vm_sub.add_parser("ttl", help="set a VM's deadline SECONDS from now ('none': no deadline)")
    q.add_argument("name")
    q.add_argument("seconds")
    q = vm_sub.add_parser("rm")
    q.add_argument("name", nargs="*")
    q.add_argument("--all", action="store_true", help="destroy every VM")
    q.add_argument("--label", action="append", metavar="K=V", help="destroy the VMs with this label (repeatable: all must match)")
    q.add_argument("--status", help="destroy the VMs with this status")
    q = vm_sub.add_parser("logs")
    q.add_argument("name")
    q = vm_sub.add_parser("failures", help="the newest failed starts: why, and where their evidence is kept")
    q.add_argument("--logs", action="store_true", help="also the last lines of the hypervisor's -v log and console")
    q = vm_sub.add_parser("network", help="change a running VM's egress policy")
    q.add_argument("name")
    add_network_args(q)
    p = sub.add_parser("image", help="list and remove guest images")
    image_sub = p.add_subparsers(dest="image_cmd", required=True)
    image_sub.add_parser("ls", help="the images: size, when built, agent version/protocol, VMs, source")
    q = image_sub.add_parser("rm", help="remove images no VM and no warm pool uses (never default)")
    q.add_argument("name", nargs="+")
    p = sub.add_parser("exec", help="run a command in a VM: exec NAME -- CMD...")
    p.add_argument("name")
    p.add_argument("--timeout", type=float)
    p.add_argument("--cwd")
    p.add_argument("--env", action="append", metavar="K=V")
    p.add_argument("--stdin", action="store_true", help="send this program's stdin to the command")
    p.add_argument("--tag", help="a name for the exec, usable wherever its execId is")
    p.add_argument("--user", help="guest user name or uid to run the command as")
    p.add_argument("--no-stream", action="store_true",
                   help="wait for the command to end and print its output then (no live output)")
    p.add_argument("command", nargs="*", help="the command; put it after -- when it has options")
    p = sub.add_parser("shell", help="a terminal in a VM: shell NAME [-- CMD...] (default the user's login shell); "
                                     "~. detaches")
    p.add_argument("name")
    p.add_argument("--user", help="guest user name or uid to run the command as")
    p.add_argument("--attach", metavar="EXEC_ID", help="attach to a terminal exec that runs already")
    p.add_argument("command", nargs="*", help="the command; put it after -- when it has options")
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = None
    verb = next((i for i, word in enumerate(argv) if word in ("exec", "shell")), None)   # commands with a tail
    if verb is not None and "--" in argv[verb:]:
        cut = argv.index("--", verb)
        argv, tail = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if tail is not None:
        args.command = args.command + tail
    if args.cmd in ("serve", "check-config", "openapi", "preflight", "selftest"):
        try:
            cfg = load_config(args.config)
        except (ConfigError, OSError) as e:
            sys.exit(f"cbox: config: {e}")
        if args.cmd == "check-config":
            for key in CONFIG_KEYS:
                secret = key in ("api_token", "callback_secret") and getattr(cfg, key)
                print(f"{key}: {'(set)' if secret else repr(getattr(cfg, key))}")
            return
        if args.cmd == "openapi":
            print(json.dumps(openapi_document(cfg, ApiRoutes(cfg, None, None).routes), indent=1))
            return
        if args.cmd == "preflight":
            problems = preflight(cfg)
            for problem in problems:
                print(f"cbox: {problem}", file=sys.stderr)
            sys.exit(1 if problems else 0)
        if args.cmd == "selftest":
            cli_selftest(args, cfg)
        try:
            asyncio.run(serve(cfg))
        except (CommandError, OSError) as e:
            sys.exit(f"cbox: {e}")
    else:
        run_client_command(args, CLIENT_COMMANDS[args.cmd])


if __name__ == "__main__":
    main()

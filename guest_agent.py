#!/usr/bin/env python3
"""CBox guest agent: init, exec server and callback client of a CBox microVM.

One stdlib-only file (Python 3.10+). Importing it has no side effects; it
exports `callback()` and `CallbackError` for the `cbox_callback` shim.

Ways to run it
  python3 guest_agent.py [--port 4031] [--listen 0.0.0.0]
      The agent. As PID 1 (the VM's init) it mounts /proc, /sys, /dev, ...,
      sets PATH/HOME/LANG, the hostname, /etc/resolv.conf, lo and eth0 from
      the kernel command line, reaps orphans and powers the VM off on SIGTERM
      or on any fatal error. As a plain process (test stand-in, development)
      it reads CBOX_CMDLINE instead of /proc/cmdline, calls back through the
      Unix socket CBOX_CALLBACK_SOCKET instead of vsock, configures only lo,
      eth0 and the hostname of its own namespaces, mounts nothing and writes
      files only in its own temporary directory.
  cbox_callback [--timeout S] METHOD [PARAMS_JSON | -]
  python3 guest_agent.py callback [--timeout S] METHOD [PARAMS_JSON | -]
      Calls the host (contract section 2): prints the result as JSON, exit 0;
      `Error: <message>` on stderr, exit 1; bad usage or bad JSON, exit 2.
  python3 guest_agent.py install-shims DIR
      Writes the `cbox_callback` script and `cbox_callback.py` module to DIR.

Process model (tini): the main process is a supervisor that forks the HTTP
server and restarts it when it dies; it owns every waitpid(-1) (as PID 1 it
reaps all orphans, outside PID 1 it is a child subreaper). The server only
waits for its own commands (waitpid of their pids, pidfds), never waitpid(-1);
its threads block SIGCHLD (a command's exit wakes none of them), its commands
start with no signal blocked.

Internal HTTP API (cbox.py -> agent, TCP 4031, JSON, errors {"error": msg})
  GET    /health     {"status":"ok","vmName","uptimeS","bootUptimeS","pid","version"}
  GET    /stats      {"memTotalBytes","memAvailableBytes","load1","load5","load15",
                     "rootDisk","stateDisk": {"totalBytes","usedBytes"},"uptimeS"}
  POST   /identity   {"vm": name} -> {"vmName","hostname"}: the VM's new name (a warm pool VM
                     claimed by a start request): hostname (sethostname, /etc/hostname as
                     PID 1), CBOX_VM_NAME of later commands, /health's vmName and the log;
                     kept across restarts of the server. name: ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$
  POST   /exec       {"cmd" | "argv" (exactly one), "env", "cwd", "stdin", "timeout",
                      "maxOutput", "blocking", "user", "tag", "memoryLimitMb",
                      "pidsLimit", "keepaliveS", "tty", "cols", "rows", "term"}
                     -> exec result, or {"execId","tag","output":"","error":"","running":true}
  GET    /exec       {"execs": [{"execId","tag","cmd" or "argv","running","exitCode",
                     "startedAt","durationMs"}]}: running and kept finished execs, oldest first
  DELETE /exec?grace=S   ends every running exec as DELETE /exec/{id} does -> {"killed": [execIds]}
  GET    /exec/{id}  exec result so far (404 unknown id)
  DELETE /exec/{id}?grace=S  SIGTERM to every process of the exec, up to S seconds
                     (0-3600, default 0: no SIGTERM) for it to end, then SIGKILL;
                     returns the final exec result
  GET    /exec/{id}/stream?since=SEQ   the exec's events, see Streams (since: default 0)
  POST   /exec/{id}/stdin   {"data": str | "dataBase64": base64 of bytes, "eof": bool}
                     -> {"written": bytes of data}; 409 without a "pipe" stdin or a terminal,
                     once it is closed or the exec ended; at most 1 MiB of data per request
                     (413); waits up to 10 s for the command to read (then answers the
                     bytes written so far). eof closes a pipe; on a terminal it types VEOF.
  POST   /exec/{id}/signal  {"signal": "TERM" | "SIGTERM" | 15, "to": "all" | "foreground"}
                     -> {"execId","signal": number} to every process of the exec ("all",
                     the default); "foreground": to the terminal's foreground process
                     group only, as a key like Ctrl-C does -> {"execId","signal","to",
                     "processGroup"}; unknown signal or "to" 400, finished exec 409, no
                     terminal or no foreground process group 409
  POST   /exec/{id}/resize  {"cols": 1-4096, "rows": 1-4096} -> {"execId","cols","rows"}:
                     the terminal's size (TIOCSWINSZ; the kernel sends SIGWINCH to its
                     foreground process group when it changed); 409 without a terminal
                     or once the exec ended
  {id} is an execId, else a tag: the running exec with that tag, else the newest
  kept finished one.
  Request: cmd runs as `/bin/sh -c cmd`, argv (non-empty list of strings) runs
  without a shell (argv[0] looked up in the command's PATH; not found: 400).
  user: a user name or uid of the guest (unknown: 400): uid, gid, groups, and
  HOME/USER/LOGNAME are set. tag: ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$, 409 while
  a running exec holds it. stdin: a string of input (written, then closed), or
  exactly "pipe" (kept open for POST .../stdin); without it /dev/null.
  memoryLimitMb, pidsLimit: positive integers, cgroup limits (pidsLimit
  defaults to 1024 where cgroups work). keepaliveS: stream keepalive period
  (default 15). timeout: seconds, null or 0 = no limit. maxOutput: bytes kept
  of each of stdout, stderr and output, and of stream events (default 4 MiB,
  at most 64 MiB). Every command gets CBOX_EXEC_ID (and CBOX_EXEC_TAG when
  tagged) in its environment, runs in a session of its own, in the agent's
  cwd unless "cwd" is given.
  Exec result: {"execId","tag","cmd" or "argv","user","running","output",
  "stdout","stderr","exitCode","signal","signalName","error","timedOut",
  "truncated","oomKilled","killScope","limitsApplied","startedAt","durationMs"}.
  "output" interleaves stdout and stderr in the order the agent read them
  (approximate). A death by signal N gives exitCode null, signal N,
  signalName "SIGxxx". oomKilled: the kernel's OOM killer killed a process of
  the exec's cgroup (memory.events oom_kill). killScope: "cgroup" or
  "process-group", what a timeout, DELETE or signal reaches; limitsApplied:
  whether memoryLimitMb/pidsLimit (and the default pids limit) are in force.
  startedAt: RFC 3339 UTC. tty: whether the exec runs on a terminal. Finished
  background execs stay queryable for 10
  minutes (at most 256 of them and 64 MiB of output and events); blocking
  execs are forgotten once answered.
  Kill scope: as PID 1 the agent mounts cgroup2, moves itself to
  /sys/fs/cgroup/cbox-agent, and runs each exec in /sys/fs/cgroup/cbox-exec/
  <execId> (entered before the command runs: it waits for a line on stdin
  that the agent writes once it moved it); a timeout or kill writes
  cgroup.kill, which also ends processes that called setsid or double-forked.
  The leaf is removed when the exec ends (later, once empty, when background
  processes outlive it). cbox-exec as a whole is limited to all tasks but 256
  and all memory but max(64 MiB, 1/8), the agent has oom_score_adj -1000 and
  commands 500, so no command can starve the agent. Elsewhere (a plain
  process: the stand-in) kills and signals reach the process group, and
  limits are not applied (limitsApplied false).
  Terminal: "tty": true runs the command on a pseudo-terminal of its own (from
  /dev/ptmx): its stdin, stdout and stderr are the terminal, it leads a session of
  its own whose controlling terminal it is, TERM is "term" (default
  xterm-256color, ^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$), the window is "cols" x
  "rows" (1-4096 each, default 80 x 24); cols, rows and term without tty: 400.
  Everything else is as for any exec: cgroup, limits, timeout, kills, maxOutput,
  tags, blocking or not. Output comes as "stdout" events (each what the master
  holds when it is read, up to 256 KiB without waiting for more: the terminal's
  bytes, \r\n line ends, escape sequences) and in
  "stdout"/"output" of the result; "stderr" stays empty. Input is always open:
  POST .../stdin writes to the terminal as typed (\x03 is Ctrl-C while the
  terminal has ISIG), "dataBase64" for bytes that are not UTF-8; "eof" types the
  terminal's VEOF character (Ctrl-D: end of input for a reading command in
  canonical mode, at the start of a line) and leaves the terminal open; a "stdin"
  field other than "pipe" is 400. A re-attaching reader replays from the event
  log (below): the newest events within max(maxOutput, 64 KiB) bytes of their
  JSON lines. Without a cgroup (the stand-in) kills and "all" signals reach the
  command's process group and the terminal's foreground process group. A guest
  that cannot open a pseudo-terminal answers 409 "tty: this guest cannot open a
  pseudo-terminal (...)".
  Streams: GET /exec/{id}/stream answers 200, Content-Type
  application/x-ndjson, chunked (HTTP/1.0: until close), one JSON event per
  line, each event its own chunk, until the exec ended: then the last event
  is "exit" and the body ends. Every event has "seq": 0, 1, 2, ... per exec,
  the same for every reader. Events: seq 0 {"type":"start","execId","tag",
  "pid","startedAt"}; {"type":"stdout"|"stderr","data": text} as output is
  read (UTF-8, never splitting a character; invalid bytes become U+FFFD and
  the event then also has "dataBase64", the exact bytes: so output is
  carried losslessly); {"type":"keepalive"} after keepaliveS of silence while
  the exec runs; exactly one last {"type":"exit", ...the exec result without
  output, stdout and stderr (they were streamed; GET /exec/{id} has them)}.
  The newest events are kept within max(maxOutput, 64 KiB) bytes (always the
  last one). A reader asking for events older than the oldest kept one (F)
  first gets {"seq": F-1, "type":"dropped", "missed": F-since, "fromSeq":
  since}, standing in for the lost events since..F-1, then F, F+1, ...
  since may be up to the next seq (wait for new events); beyond it 400 "since
  N is beyond the last event M"; not a non-negative integer: 400. A reader
  that falls behind never slows the command (it loses events, as above); one
  that disconnects does not affect the exec.
  Output is kept as bytes (output as runs over stdout and stderr, not a
  third copy) and decoded only when a response is written; a response with
  more than 256 KiB of it is written in pieces, its length counted first,
  so no whole copy of it is ever held.

Callbacks: a command's callback carries "execId" (its CBOX_EXEC_ID) beside
"method" and "params".

Sections, in file order
  1. Constants, logging, /proc readers, kernel command line
  2. Callback client and its CLI
  3. Callback shims (cbox_callback script and module on PATH/PYTHONPATH)
  4. System setup: PID 1 duties (mounts, env, poweroff), hostname, network, exec cgroups
  5. Running commands: request validation, captured output, stream events, Exec, ExecRegistry
  6. HTTP server: response encoding, hand-written HTTP/1.1 parser, event streams, routes
  7. Supervisor: forks, restarts and reaps
  8. Entry points
"""
import array
import base64
import codecs
import collections
import errno
import fcntl
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

# ---------------------------------------------------------------------------
# 1. Constants, logging, /proc readers, kernel command line
# ---------------------------------------------------------------------------

AGENT_VERSION = "0.1.0"
# the host<->agent API generation: bumped when cbox.py starts needing something an older
# agent lacks; rootfs/build.py records it in an image's image.json, cbox.py refuses images
# whose agent is older than its own AGENT_PROTOCOL. 2: an output event holds at most
# OUTPUT_CHUNK bytes of output (cbox.py's bound on an event line follows from it)
AGENT_PROTOCOL = 2
DEFAULT_PORT = 4031
DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_CALLBACK_PORT = 4032
VSOCK_HOST_CID = 2
CALLBACK_MAX_LINE = 1 << 20          # callback wire: one JSON object per line
CALLBACK_CONNECT_RETRY_S = 2.0       # how long to retry a refused connect
DEFAULT_CALLBACK_TIMEOUT_S = 30.0

MAX_BODY = 16 << 20                  # HTTP request body limit (413 above)
MAX_HEAD = 64 << 10                  # HTTP request line + headers limit
DEFAULT_MAX_OUTPUT = 4 << 20         # per stream cap of captured output
MAX_OUTPUT_LIMIT = 64 << 20          # largest maxOutput a request may ask for
READ_CHUNK = 256 << 10               # pipe and socket read size
OUTPUT_CHUNK = 64 << 10              # a command's output read: an output event holds at most this
                                     # (cbox.py parses an event line in one go: small lines keep it short)
TEXT_PIECE = 256 << 10               # captured bytes decoded and JSON-escaped at a time
SMALL_BODY = 256 << 10               # captured bytes up to which a response is built whole
KEEP_BODY = 16 << 20                 # encoded bytes of a large response kept between counting and sending
DENSE_RUNS = 1024                    # more output runs than this, under 32 bytes on average: own buffer
PIPE_SIZE = 1 << 20                  # pipe buffer for a command's output once it filled the default
DEFAULT_PIPE_SIZE = 64 << 10
DRAIN_GRACE_S = 0.2                  # reading after exit, for pipes kept open
EXIT_WATCH_AFTER_S = 0.05            # a command's exit is watched on a pidfd once it ran this long
                                     # (on pipes: from its start, the agent holding their write ends
                                     # until then)
CHILD_EXIT_SIGNAL = {signal.SIGCHLD}  # blocked in the server's threads, not in commands
FINISHED_TTL_S = 600.0               # finished background execs stay queryable
MAX_FINISHED = 256                   # ... at most this many
MAX_FINISHED_BYTES = 64 << 20        # ... holding at most this much output
DEFAULT_KEEPALIVE_S = 15.0           # stream keepalive after this much silence
MIN_EVENT_RING = 64 << 10            # an exec's event ring holds at least this many bytes
STREAM_BATCH = 256 << 10             # event bytes a stream reader sends per wakeup at most
MAX_STDIN_REQUEST = 1 << 20          # data bytes of one POST /exec/{id}/stdin
STDIN_WRITE_TIMEOUT_S = 10.0         # how long a stdin write waits for the command to read
MAX_GRACE_S = 3600.0                 # DELETE ?grace= upper bound
DEFAULT_TTY_COLS, DEFAULT_TTY_ROWS = 80, 24
MAX_TTY_SIZE = 4096                  # cols and rows of a terminal, each at most
DEFAULT_TERM = "xterm-256color"
TERM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
EXEC_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

CGROUP_ROOT = "/sys/fs/cgroup"
AGENT_CGROUP = "cbox-agent"          # the supervisor and server (no-internal-process rule)
EXEC_CGROUP = "cbox-exec"            # parent of one leaf per exec: cbox-exec/<execId>
EXEC_CONTROLLERS = ("cpu", "memory", "pids")
DEFAULT_EXEC_PIDS_LIMIT = 1024       # pids.max of an exec that names no pidsLimit
AGENT_TASK_RESERVE = 256             # tasks (pids) all execs together leave to the agent
AGENT_MEMORY_RESERVE = 64 << 20      # memory all execs together leave to the agent (at least)
AGENT_OOM_SCORE_ADJ = -1000          # the OOM killer never picks the agent
EXEC_OOM_SCORE_ADJ = 500             # ... and picks commands first

STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_SHIM_DIR = "/run/cbox"
RESTART_DELAY_MIN_S = 0.1
RESTART_DELAY_MAX_S = 5.0
RESTART_RESET_AFTER_S = 30.0         # a server that lived this long restarts fast


# Twin of cbox.log: must agree on the shape of a line on stderr: "<program>: message".
def log(message):
    """Write one line to stderr (the serial console in a VM)."""
    try:
        os.write(2, f"cbox-agent: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


_log_queue = None


def start_background_log():
    """Start the thread behind log_later(), so request paths never wait on a slow console."""
    global _log_queue
    _log_queue = queue.SimpleQueue()

    def write_lines():
        while True:
            log(_log_queue.get())

    threading.Thread(target=write_lines, name="log", daemon=True).start()


def log_later(message):
    """Queue a log line (falls back to writing it at once)."""
    if _log_queue is None:
        log(message)
    else:
        _log_queue.put(message)


# Twin of cbox.fmt_seconds: must agree on the text (timeouts in messages users read come from both).
def fmt_seconds(seconds):
    """5 -> '5s', 0.5 -> '0.5s'."""
    seconds = float(seconds)
    return f"{int(seconds)}s" if seconds.is_integer() else f"{seconds:g}s"


def read_uptime():
    """Seconds since boot from /proc/uptime, or None."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def system_stats():
    """GET /stats: memory, load, disk use and uptime as this system sees them.

    In a CBox VM / is the overlay of the initramfs: its statfs reports its upper layer,
    the state disk (overlayfs ovl_statfs), and the read-only root disk is mounted
    nowhere this process can reach after switch_root, so its use comes from its ext4
    superblock (a read-only disk's counts are those of its build). Outside a VM (no disk
    with serial cbox-rootfs) rootDisk is the filesystem of / and stateDisk is null."""
    def usage(path):
        st = os.statvfs(path)
        return {"totalBytes": st.f_blocks * st.f_frsize, "usedBytes": (st.f_blocks - st.f_bfree) * st.f_frsize}

    def ext4_usage(device):
        with open(device, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
        if struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
            return None
        wide = struct.unpack_from("<I", sb, 0x60)[0] & 0x80       # INCOMPAT_64BIT: the _hi halves count
        blocks, free = struct.unpack_from("<I", sb, 0x4)[0], struct.unpack_from("<I", sb, 0xC)[0]
        if wide:
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
            free |= struct.unpack_from("<I", sb, 0x158)[0] << 32
        size = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
        return {"totalBytes": blocks * size, "usedBytes": (blocks - free) * size}

    stats = {"memTotalBytes": None, "memAvailableBytes": None, "load1": None, "load5": None, "load15": None,
             "rootDisk": None, "stateDisk": None, "uptimeS": read_uptime()}
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.endswith("kB\n")}
        stats["memTotalBytes"], stats["memAvailableBytes"] = mem.get("MemTotal"), mem.get("MemAvailable")
        with open("/proc/loadavg") as f:
            stats["load1"], stats["load5"], stats["load15"] = (float(x) for x in f.read().split()[:3])
    except (OSError, ValueError):
        pass
    root_device = None
    for name in sorted(os.listdir("/sys/block")) if os.path.isdir("/sys/block") else ():
        try:
            with open(f"/sys/block/{name}/serial") as f:
                if f.read().strip() == "cbox-rootfs":
                    root_device = f"/dev/{name}"
        except OSError:
            continue
    try:
        stats["rootDisk"] = ext4_usage(root_device) if root_device else usage("/")
        stats["stateDisk"] = usage("/") if root_device else None
    except (OSError, struct.error):
        pass
    return stats


_proc_is_ours = {}      # pid -> proc_shows_our_pids() (a forked server asks again)


def proc_shows_our_pids():
    """Whether /proc is a mount of our own pid namespace. Under the stand-in the agent
    runs in a pid namespace of its own but sees the host's /proc, where its pids name
    other processes (pid 2, its own, is the host's kthreadd there): nothing it reads or
    writes under /proc/<pid> may then be trusted to be about its own processes. Asked
    once per process (after PID 1 mounted /proc): it cannot change later."""
    pid = os.getpid()
    if pid not in _proc_is_ours:
        try:
            _proc_is_ours[pid] = os.readlink("/proc/self") == str(pid)
        except OSError:
            _proc_is_ours[pid] = False
    return _proc_is_ours[pid]


# Twin of cbox.py's proc_start_time() (each file stays standalone).
def proc_start_time(pid):
    """The kernel's start time of pid (clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def parse_cmdline(text):
    """The cbox.* keys of a kernel command line, without the prefix."""
    keys = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("cbox."):
            keys[key[len("cbox."):]] = value.strip('"')
    return keys


def read_cmdline():
    """cbox.* keys from $CBOX_CMDLINE when set, else from /proc/cmdline."""
    text = os.environ.get("CBOX_CMDLINE")
    if text is None:
        try:
            with open("/proc/cmdline") as f:
                text = f.read()
        except OSError:
            text = ""
    return parse_cmdline(text)


class GuestConfig:
    """What the host told this guest through the kernel command line."""

    def __init__(self, keys):
        self.vm = keys.get("vm") or None
        self.ip = keys.get("ip") or None            # a.b.c.d/prefix
        self.gw = keys.get("gw") or None
        self.dns = [d for d in keys.get("dns", "").split(",") if d]
        try:
            self.callback_port = int(keys.get("callback_port") or DEFAULT_CALLBACK_PORT)
        except ValueError:
            self.callback_port = DEFAULT_CALLBACK_PORT


# ---------------------------------------------------------------------------
# 2. Callback client and its CLI
# ---------------------------------------------------------------------------

class CallbackError(Exception):
    """A callback failed: the host answered with an error or could not be reached."""


_CONNECT_RETRY_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOENT,
                         errno.ETIMEDOUT, errno.EAGAIN}


def _callback_address():
    """(family, address, label) of the host's callback listener."""
    path = os.environ.get("CBOX_CALLBACK_SOCKET")
    if path:
        return socket.AF_UNIX, path, f"unix socket {path}"
    port = os.environ.get("CBOX_CALLBACK_PORT") or read_cmdline().get("callback_port")
    try:
        port = int(port or DEFAULT_CALLBACK_PORT)
    except ValueError:
        raise CallbackError(f"bad callback port {port!r}") from None
    if not hasattr(socket, "AF_VSOCK"):
        raise CallbackError("this system has no vsock support and CBOX_CALLBACK_SOCKET is not set")
    return socket.AF_VSOCK, (VSOCK_HOST_CID, port), f"vsock {VSOCK_HOST_CID}:{port}"


def _connect_callback(deadline, timeout):
    """A connected socket to the host, retrying refused connects for a few seconds."""
    family, address, label = _callback_address()
    give_up = min(deadline, time.monotonic() + CALLBACK_CONNECT_RETRY_S)
    delay = 0.02
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(address)
            return sock
        except socket.timeout:
            sock.close()
            raise CallbackError(f"callback timed out after {fmt_seconds(timeout)} "
                                f"(connecting to {label})") from None
        except OSError as e:
            sock.close()
            reason = e.strerror or str(e)
            if e.errno not in _CONNECT_RETRY_ERRNOS:
                raise CallbackError(f"cannot connect to the host callback {label}: {reason}") from None
            if time.monotonic() + delay >= give_up:
                raise CallbackError(f"cannot connect to the host callback {label}: {reason} "
                                    "(is the host listening?)") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _read_line(sock, deadline):
    """One line (without its newline) from sock; the text before EOF if none."""
    line = bytearray()
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(65536)
        if not data:
            return bytes(line)
        end = data.find(b"\n")
        if end >= 0:
            return bytes(line + data[:end])
        line += data
        if len(line) > CALLBACK_MAX_LINE:
            raise CallbackError("the host's reply exceeds 1 MiB")


def callback(method, params=None, timeout=DEFAULT_CALLBACK_TIMEOUT_S):
    """Call `method` on the host with JSON `params`; return its result or raise CallbackError."""
    if not isinstance(method, str) or not method:
        raise CallbackError("method must be a non-empty string")
    message = {"method": method, "params": params}
    if os.environ.get("CBOX_EXEC_ID"):  # the exec that made the call, for the host to pass on
        message["execId"] = os.environ["CBOX_EXEC_ID"]
    try:
        request = json.dumps(message).encode() + b"\n"
    except (TypeError, ValueError) as e:
        raise CallbackError(f"params are not JSON serializable: {e}") from None
    if len(request) > CALLBACK_MAX_LINE:
        raise CallbackError("the request exceeds 1 MiB")
    deadline = time.monotonic() + timeout
    sock = _connect_callback(deadline, timeout)
    try:
        sock.sendall(request)
        line = _read_line(sock, deadline)
    except socket.timeout:
        raise CallbackError(f"callback timed out after {fmt_seconds(timeout)}") from None
    except OSError as e:
        raise CallbackError(f"callback connection failed: {e.strerror or e}") from None
    finally:
        sock.close()
    if not line.strip():
        raise CallbackError("the host closed the callback connection without a reply")
    try:
        reply = json.loads(line)
    except ValueError:
        raise CallbackError(f"invalid reply from the host: {line[:200]!r}") from None
    if not isinstance(reply, dict) or not ("result" in reply or "error" in reply):
        raise CallbackError(f"invalid reply from the host: {line[:200]!r}")
    if reply.get("error") is not None:
        raise CallbackError(str(reply["error"]))
    return reply.get("result")


CALLBACK_USAGE = "usage: cbox_callback [--timeout SECONDS] METHOD [PARAMS_JSON | -]"


def callback_main(args):
    """The cbox_callback command line; returns the exit status."""
    args = list(args)
    if args and args[0] in ("-h", "--help"):
        print(CALLBACK_USAGE + "\nCalls METHOD on the CBox host; prints the JSON result.")
        return 0
    timeout = DEFAULT_CALLBACK_TIMEOUT_S
    if args and (args[0] == "--timeout" or args[0].startswith("--timeout=")):
        value = args.pop(0).partition("=")[2] or (args.pop(0) if args else "")
        try:
            timeout = float(value)
            if not timeout > 0:
                raise ValueError
        except ValueError:
            print(f"Error: --timeout needs a positive number of seconds\n{CALLBACK_USAGE}", file=sys.stderr)
            return 2
    if not 1 <= len(args) <= 2 or not args[0]:
        print(CALLBACK_USAGE, file=sys.stderr)
        return 2
    params = None
    if len(args) == 2:
        text = sys.stdin.read() if args[1] == "-" else args[1]
        try:
            params = json.loads(text)
        except ValueError as e:
            print(f"Error: PARAMS_JSON is not valid JSON: {e}\n{CALLBACK_USAGE}", file=sys.stderr)
            return 2
    try:
        result = callback(args[0], params, timeout=timeout)
    except CallbackError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------
# 3. Callback shims: tiny files that load this one from its absolute path
# ---------------------------------------------------------------------------

_SHIM_LOADER = '''import importlib.util as _util
import sys as _sys

_agent = _sys.modules.get("cbox_guest_agent")
if _agent is None:
    _spec = _util.spec_from_file_location("cbox_guest_agent", {agent!r})
    _agent = _util.module_from_spec(_spec)
    _sys.modules["cbox_guest_agent"] = _agent
    _spec.loader.exec_module(_agent)
'''

_SHIM_SCRIPT = '''{interpreter}
"""cbox_callback METHOD [PARAMS_JSON]: call the CBox host (generated by guest_agent.py)."""
{loader}
_sys.exit(_agent.callback_main(_sys.argv[1:]))
'''

_SHIM_MODULE = '''"""from cbox_callback import callback; callback("m", {{"k": 1}}, timeout=30)

Generated by guest_agent.py: calls the CBox host, raises CallbackError on failure.
"""
{loader}
callback = _agent.callback
CallbackError = _agent.CallbackError
__all__ = ["callback", "CallbackError"]

if __name__ == "__main__":
    _sys.exit(_agent.callback_main(_sys.argv[1:]))
'''


# Twin of cbox.write_atomically: must agree that a reader sees the old file or the whole new one.
def write_atomically(path, text, mode):
    """Replace path with text and permission bits mode; readers never see a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _shim_interpreter(python):
    """The script's first line(s): python3 -S, as the callback needs only the stdlib.

    -S skips the site import (.pth files in site-packages may import heavy
    packages: most of a callback's start-up time). The environment is kept:
    CBOX_CALLBACK_* come from it. A path a shebang cannot hold (spaces,
    length) gets a line both sh and Python read: sh execs python3 -S on the
    script, Python sees a string expression.
    """
    if python and os.path.isabs(python) and not any(c.isspace() for c in python) and len(python) < 120:
        return f"#!{python} -S"
    return '#!/bin/sh\n"exec" "python3" "-S" "$0" "$@"'


def write_callback_shims(directory, agent_path=None, python=None):
    """Write the `cbox_callback` script and `cbox_callback.py` module into directory."""
    agent_path = os.path.abspath(agent_path or __file__)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    loader = _SHIM_LOADER.format(agent=agent_path)
    script = _SHIM_SCRIPT.format(interpreter=_shim_interpreter(python or sys.executable), loader=loader)
    write_atomically(os.path.join(directory, "cbox_callback"), script, 0o755)
    write_atomically(os.path.join(directory, "cbox_callback.py"), _SHIM_MODULE.format(loader=loader), 0o644)


# ---------------------------------------------------------------------------
# 4. System setup: PID 1 duties, hostname, network
# ---------------------------------------------------------------------------

_libc_handle = None


def libc():
    """The C library through ctypes (errno kept), loaded on first use."""
    global _libc_handle
    if _libc_handle is None:
        import ctypes
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _check_libc(result, what):
    if result != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option, value):
    import ctypes
    fn = libc().prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _check_libc(fn(option, value, 0, 0, 0), f"prctl({option})")


MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
INIT_MOUNTS = [  # source, target, type, flags, options
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
]
DEV_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
             "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2"}


def mount(source, target, fstype, flags=0, options=""):
    import ctypes
    fn = libc().mount
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _check_libc(fn(source.encode(), target.encode(), fstype.encode(), flags,
                   options.encode() if options else None), f"mount {target}")


def mount_points():
    """Mount points listed in /proc/self/mountinfo (empty before /proc is mounted)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4] for line in f if len(line.split()) > 4}
    except OSError:
        return set()


def mount_filesystems():
    """Mount what a Linux userland expects, skipping what is already mounted."""
    mounted_dev = False
    for source, target, fstype, flags, options in INIT_MOUNTS:
        if target in mount_points():
            continue
        if target.startswith("/dev/") and not mounted_dev and not os.path.isdir(target):
            continue  # never create entries in a /dev that is not ours
        try:
            os.makedirs(target, exist_ok=True)
            mount(source, target, fstype, flags, options)
        except OSError as e:
            log(f"cannot mount {target}: {e}")
            continue
        mounted_dev = mounted_dev or target == "/dev"
    if mounted_dev:
        for link, target in DEV_LINKS.items():
            try:
                os.symlink(target, link)
            except OSError:
                pass


def ensure_standard_fds():
    """Give init a stdin, stdout and stderr when the kernel found no /dev/console."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        for path in (("/dev/null",) if fd == 0 else ("/dev/console", "/dev/null")):
            try:
                new = os.open(path, os.O_RDWR | os.O_NOCTTY)
            except OSError:
                continue
            if new != fd:
                os.dup2(new, fd)
                os.close(new)
            break


def set_init_environment():
    os.environ["PATH"] = STANDARD_PATH
    os.environ["HOME"] = "/root"
    os.environ["LANG"] = "C.UTF-8"


def namespace_is_hosts(kind):
    """True when our `kind` namespace (net, uts) is provably the one of the machine's init."""
    try:
        return os.readlink(f"/proc/self/ns/{kind}") == os.readlink(f"/proc/1/ns/{kind}")
    except OSError:
        return False


def write_etc_file(path, text):
    """Best effort write of a small file under /etc (PID 1 only)."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        log(f"cannot write {path}: {e}")


SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = 0x8916, 0x891C, 0x890B
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2
IFREQ_SIZE = 40


def _ioctl(request, arg):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, arg)


def _sockaddr_in(address):
    """struct sockaddr_in (16 bytes) for an IPv4 address, port 0."""
    return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def _ifreq_ipv4(ifname, address):
    """struct ifreq carrying a sockaddr_in."""
    return struct.pack("16s", ifname.encode()) + _sockaddr_in(address).ljust(IFREQ_SIZE - 16, b"\0")


def set_link_up(ifname):
    request = struct.pack("16sH", ifname.encode(), 0).ljust(IFREQ_SIZE, b"\0")
    flags = struct.unpack_from("16sH", _ioctl(SIOCGIFFLAGS, request))[1]
    if not flags & IFF_UP:
        _ioctl(SIOCSIFFLAGS, struct.pack("16sH", ifname.encode(), flags | IFF_UP).ljust(IFREQ_SIZE, b"\0"))


def set_ipv4_address(ifname, address, prefix):
    netmask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    _ioctl(SIOCSIFADDR, _ifreq_ipv4(ifname, address))
    _ioctl(SIOCSIFNETMASK, _ifreq_ipv4(ifname, netmask))


def add_default_route(gateway):
    """ioctl(SIOCADDRT) with a struct rtentry: 0.0.0.0/0 via gateway."""
    import ctypes

    class Sockaddr(ctypes.Structure):
        _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 14)]

    class RtEntry(ctypes.Structure):
        _fields_ = [("pad1", ctypes.c_ulong), ("dst", Sockaddr), ("gateway", Sockaddr),
                    ("genmask", Sockaddr), ("flags", ctypes.c_ushort), ("pad2", ctypes.c_short),
                    ("pad3", ctypes.c_ulong), ("pad4", ctypes.c_void_p), ("metric", ctypes.c_short),
                    ("dev", ctypes.c_char_p), ("mtu", ctypes.c_ulong), ("window", ctypes.c_ulong),
                    ("irtt", ctypes.c_ushort)]

    def ipv4(address):
        return Sockaddr.from_buffer_copy(_sockaddr_in(address))

    route = RtEntry(dst=ipv4("0.0.0.0"), gateway=ipv4(gateway), genmask=ipv4("0.0.0.0"),
                    flags=RTF_UP | RTF_GATEWAY)
    try:
        _ioctl(SIOCADDRT, bytes(route))
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise


def configure_network(config):
    """lo up; eth0 address, up and default route from cbox.ip / cbox.gw."""
    set_link_up("lo")
    if not config.ip:
        log("no cbox.ip on the command line: eth0 left alone")
        return
    try:
        socket.if_nametoindex("eth0")
    except OSError:
        log("no eth0: network not configured")
        return
    import ipaddress
    interface = ipaddress.IPv4Interface(config.ip)
    set_ipv4_address("eth0", str(interface.ip), interface.network.prefixlen)
    set_link_up("eth0")
    if config.gw:
        add_default_route(config.gw)
    log(f"eth0 {interface.with_prefixlen} gw {config.gw or '-'}")


def _best_effort(what, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # setup problems are logged, never fatal
        log(f"{what} failed: {e}")


def set_hostname(name, as_init):
    """The hostname of our UTS namespace (never the host's) and, as PID 1, /etc/hostname."""
    if as_init or not namespace_is_hosts("uts"):
        _best_effort("sethostname", socket.sethostname, name)
    else:
        log("UTS namespace is the host's: hostname left alone")
    if as_init:
        write_etc_file("/etc/hostname", name + "\n")


VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")   # cbox.py's VM name rule


class Identity:
    """The VM's name (cbox.vm) and its later changes (POST /identity: a warm pool VM gets
    the name of the start request that claimed it). A change is kept in a file beside the
    shims, so a server the supervisor restarts (forked from the old config) keeps it."""

    def __init__(self, config, base_env, path, as_init):
        self.config, self.base_env, self.path, self.as_init = config, base_env, path, as_init

    def load(self):
        """Take over a name an earlier server set (called in each new server)."""
        try:
            with open(self.path) as f:
                name = f.read().strip()
        except OSError:
            return
        if VM_NAME.fullmatch(name):
            self._use(name)

    def change(self, name):
        set_hostname(name, self.as_init)
        self._use(name)
        _best_effort("keeping the VM name", write_atomically, self.path, name + "\n", 0o644)
        log_later(f"identity: vm={name}")     # the serial console is slow in a VM: after the answer

    def _use(self, name):
        self.config.vm = name
        self.base_env["CBOX_VM_NAME"] = name


def setup_system(config, as_init):
    """Init duties as PID 1; namespace-local hostname and network otherwise."""
    if as_init:
        mount_filesystems()
        ensure_standard_fds()
        set_init_environment()
    if config.vm:
        set_hostname(config.vm, as_init)
    if as_init and config.dns:
        write_etc_file("/etc/resolv.conf", "".join(f"nameserver {d}\n" for d in config.dns))
    if as_init or not namespace_is_hosts("net"):
        _best_effort("network setup", configure_network, config)
    else:
        log("network namespace is the host's: network left alone")


def write_proc_value(path, value):
    """Write one value to a /proc or cgroup file (raises OSError): open, one write, close
    (the file object's buffering and checks cost four more system calls, on every exec)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)    # as open(path, "w")
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read_meminfo_bytes(field):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_int_file(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class ExecCgroup:
    """One exec's cgroup leaf."""

    def __init__(self, path):
        self.path = path

    def write(self, name, value):
        write_proc_value(os.path.join(self.path, name), value)

    def adopt(self, pid):
        """Move pid (stopped before running user code) into this cgroup."""
        self.write("cgroup.procs", pid)

    def procs(self):
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return []

    def signal(self, signum):
        """Send signum to every process of the cgroup (forks racing it get a second round)."""
        seen = set()
        for _ in range(3):
            pids = [pid for pid in self.procs() if pid not in seen]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            seen.update(pids)

    def kill(self):
        """SIGKILL every process of the cgroup at once, escapees included (cgroup.kill)."""
        try:
            self.write("cgroup.kill", 1)
        except OSError:  # kernel before 5.14
            for _ in range(10):
                if not self.procs():
                    return
                self.signal(signal.SIGKILL)

    def oom_killed(self):
        """True when an OOM killer killed a process of this cgroup (memory.events oom_kill)."""
        try:
            with open(os.path.join(self.path, "memory.events")) as f:
                return any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in f)
        except (OSError, ValueError, IndexError):
            return False

    def remove(self):
        try:
            os.rmdir(self.path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False


class ExecCgroups:
    """The cgroup v2 tree of the execs: CGROUP_ROOT/cbox-exec/<execId>, one leaf per exec.

    Set up by PID 1 (setup_cgroups): cgroup2 mounted, the agent moved into
    cbox-agent (a cgroup with processes may not have controllers enabled for
    children), cpu/memory/pids enabled for the children of the root and of
    cbox-exec, and cbox-exec limited to all but a reserve of tasks and
    memory, so no exec, nor all together, can starve the agent.
    """

    def __init__(self, root=CGROUP_ROOT):
        self.root = root
        self.base = os.path.join(root, EXEC_CGROUP)
        self._lingering = set()      # leaves of finished execs that still had processes
        self._lock = threading.Lock()

    def create(self, exec_id, memory_mb, pids_limit):
        """A new leaf for an exec, with its limits set (raises OSError)."""
        path = os.path.join(self.base, exec_id)
        os.mkdir(path)
        leaf = ExecCgroup(path)
        try:
            if memory_mb:
                leaf.write("memory.max", memory_mb << 20)
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    leaf.write("memory.swap.max", 0)
            leaf.write("pids.max", pids_limit or DEFAULT_EXEC_PIDS_LIMIT)
        except OSError:
            leaf.remove()
            raise
        return leaf

    def release(self, leaf):
        """Remove a finished exec's leaf; one its leftovers still use is retried later."""
        with self._lock:
            if not leaf.remove():
                self._lingering.add(leaf.path)
            for path in list(self._lingering):
                if ExecCgroup(path).remove():
                    self._lingering.discard(path)

    def remove_stale(self):
        """Leaves left by an earlier server (it died): remove the empty ones."""
        try:
            names = os.listdir(self.base)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.base, name)
            if os.path.isdir(path) and not ExecCgroup(path).remove():
                self._lingering.add(path)


def _enable_controllers(directory):
    """Enable EXEC_CONTROLLERS (those the kernel has) for directory's children, one by one."""
    try:
        with open(os.path.join(directory, "cgroup.controllers")) as f:
            available = f.read().split()
    except OSError:
        return
    for name in EXEC_CONTROLLERS:
        if name in available:
            try:
                write_proc_value(os.path.join(directory, "cgroup.subtree_control"), f"+{name}")
            except OSError as e:
                log(f"cgroup: cannot enable {name} in {directory}: {e}")


def setup_cgroups():
    """PID 1: the exec cgroup tree (ExecCgroups), or None where cgroup v2 is unusable."""
    try:
        if CGROUP_ROOT not in mount_points():
            mount("cgroup2", CGROUP_ROOT, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        agent_dir = os.path.join(CGROUP_ROOT, AGENT_CGROUP)
        os.makedirs(agent_dir, exist_ok=True)
        write_proc_value(os.path.join(agent_dir, "cgroup.procs"), os.getpid())
        _enable_controllers(CGROUP_ROOT)
        exec_dir = os.path.join(CGROUP_ROOT, EXEC_CGROUP)
        os.makedirs(exec_dir, exist_ok=True)
        _enable_controllers(exec_dir)
        tasks = min(n for n in (read_int_file("/proc/sys/kernel/threads-max"),
                                read_int_file("/proc/sys/kernel/pid_max"), 1 << 22) if n)
        write_proc_value(os.path.join(exec_dir, "pids.max"), max(tasks - AGENT_TASK_RESERVE, 64))
        total = read_meminfo_bytes("MemTotal")
        if total and os.path.exists(os.path.join(exec_dir, "memory.max")):
            reserve = max(AGENT_MEMORY_RESERVE, total // 8)
            write_proc_value(os.path.join(exec_dir, "memory.max"), max(total - reserve, 32 << 20))
    except OSError as e:
        log(f"cgroup v2 unavailable ({e}): execs are killed by process group")
        return None
    _best_effort("oom_score_adj", write_proc_value, "/proc/self/oom_score_adj", AGENT_OOM_SCORE_ADJ)
    return ExecCgroups()


LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def power_off(reason):
    """sync + reboot(POWER_OFF). PID 1 only; never returns."""
    if os.getpid() != 1:  # never power off a machine we are not the init of
        log(f"fatal: {reason}")
        os._exit(1)
    log(f"powering off: {reason}")
    try:
        os.sync()
        _check_libc(libc().reboot(LINUX_REBOOT_CMD_POWER_OFF), "reboot")
    except Exception as e:
        log(f"poweroff failed: {e}")
    while True:  # PID 1 must never exit
        time.sleep(3600)


# ---------------------------------------------------------------------------
# 5. Running commands
# ---------------------------------------------------------------------------

class RequestError(Exception):
    """A request that gets an error answer: HTTP status and message."""

    def __init__(self, status, message, close=False, headers=""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers      # extra response header lines, CRLF-terminated


def _text_field(body, name, optional=False, nul_ok=False):
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"{name} must be a string" + (" or null" if optional else ""))
    if not nul_ok and "\0" in value:
        raise RequestError(400, f"{name} must not contain NUL characters")
    return value


def _env_field(env):
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise RequestError(400, "env must be an object of strings")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise RequestError(400, f"env: bad variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise RequestError(400, f"env: value of {key} must be a string without NUL")
    return env


def _timeout_field(timeout):
    """Seconds, or None for no limit (null and 0 both mean no limit)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or timeout != timeout or timeout < 0 or timeout == float("inf"):
        raise RequestError(400, "timeout must be a non-negative number of seconds or null")
    return timeout or None


def _max_output_field(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_OUTPUT_LIMIT:
        raise RequestError(400, f"maxOutput must be an integer from 0 to {MAX_OUTPUT_LIMIT}")
    return value


def _positive_int_field(body, name, limit):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise RequestError(400, f"{name} must be a positive integer (at most {limit})")
    return value


def _argv_field(value):
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise RequestError(400, "argv must be a non-empty list of strings")
    if any("\0" in a for a in value):
        raise RequestError(400, "argv must not contain NUL characters")
    if not value[0]:
        raise RequestError(400, "argv[0] must not be empty")
    return list(value)


def _user_field(value):
    """The passwd entry of a user name or numeric uid, or None."""
    if value is None:
        return None
    import pwd
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return pwd.getpwuid(value)
        if isinstance(value, str) and value and "\0" not in value:
            return pwd.getpwuid(int(value)) if value.isdigit() else pwd.getpwnam(value)
    except (KeyError, OverflowError):
        raise RequestError(400, f"unknown user {value!r} in the guest") from None
    raise RequestError(400, "user must be a user name or a numeric uid")


def _tag_field(value):
    if value is None:
        return None
    if not isinstance(value, str) or not EXEC_TAG.fullmatch(value):
        raise RequestError(400, "tag must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit")
    return value


def _tty_fields(body):
    """(tty, cols, rows, term) of a request; cols, rows and term only go with "tty": true."""
    tty = body.get("tty", False)
    if not isinstance(tty, bool):
        raise RequestError(400, "tty must be a boolean")
    if not tty:
        given = sorted(name for name in ("cols", "rows", "term") if name in body)
        if given:
            raise RequestError(400, f"{', '.join(given)} need \"tty\": true")
        return False, None, None, None
    cols, rows = (_positive_int_field(body, name, MAX_TTY_SIZE) for name in ("cols", "rows"))
    term = body.get("term", DEFAULT_TERM)
    if not isinstance(term, str) or not TERM_NAME.fullmatch(term):
        raise RequestError(400, "term must be 1-64 characters of A-Z a-z 0-9 _ . + - starting with a letter or digit")
    if body.get("stdin") not in (None, "pipe"):
        raise RequestError(400, 'with "tty": true the input goes through POST /exec/{id}/stdin: '
                                'stdin may only be omitted or "pipe"')
    return True, cols or DEFAULT_TTY_COLS, rows or DEFAULT_TTY_ROWS, term


def _keepalive_field(value):
    if value is None:
        return DEFAULT_KEEPALIVE_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise RequestError(400, "keepaliveS must be a number of seconds above 0 (at most 3600)")
    return float(value)


class ExecSpec:
    """A validated exec request."""

    FIELDS = frozenset(("cmd", "argv", "env", "cwd", "stdin", "timeout", "maxOutput", "blocking",
                        "user", "tag", "memoryLimitMb", "pidsLimit", "keepaliveS",
                        "tty", "cols", "rows", "term"))
    TTY_FIELDS = frozenset(("tty", "cols", "rows", "term"))

    def __init__(self, body):
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        unknown = body.keys() - self.FIELDS
        if unknown:
            raise RequestError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        if ("cmd" in body) == ("argv" in body):
            raise RequestError(400, "cmd is required (or argv instead, not both)")
        self.cmd = _text_field(body, "cmd") if "cmd" in body else None
        self.argv = _argv_field(body["argv"]) if "argv" in body else None
        # fields left out take their defaults without a validator's call (every exec pays it)
        self.env = _env_field(body["env"]) if "env" in body else {}
        self.cwd = _text_field(body, "cwd", optional=True) if "cwd" in body else None
        self.stdin = _text_field(body, "stdin", optional=True, nul_ok=True) if "stdin" in body else None
        self.tty, self.cols, self.rows, self.term = _tty_fields(body) if self.TTY_FIELDS & body.keys() \
            else (False, None, None, None)
        self.stdin_pipe = self.stdin == "pipe" or self.tty     # a terminal's input is always open
        self.timeout = _timeout_field(body["timeout"]) if "timeout" in body else None
        self.max_output = _max_output_field(body["maxOutput"]) if "maxOutput" in body else DEFAULT_MAX_OUTPUT
        self.blocking = body.get("blocking", True)
        if not isinstance(self.blocking, bool):
            raise RequestError(400, "blocking must be a boolean")
        self.user = _user_field(body["user"]) if "user" in body else None
        self.tag = _tag_field(body["tag"]) if "tag" in body else None
        self.memory_mb = _positive_int_field(body, "memoryLimitMb", 1 << 24) if "memoryLimitMb" in body else None
        self.pids_limit = _positive_int_field(body, "pidsLimit", 1 << 22) if "pidsLimit" in body else None
        self.keepalive = _keepalive_field(body["keepaliveS"]) if "keepaliveS" in body else DEFAULT_KEEPALIVE_S

    @property
    def command(self):
        """What runs: the argv given, or /bin/sh -c cmd."""
        return self.argv if self.argv is not None else ["/bin/sh", "-c", self.cmd]

    def display(self):
        """The command as given, one line, for logs."""
        text = self.cmd if self.cmd is not None else " ".join(self.argv)
        return text.replace("\n", "\\n")

    def given(self):
        """{"cmd": ...} or {"argv": [...]}, as the request gave it."""
        return {"cmd": self.cmd} if self.cmd is not None else {"argv": self.argv}


def parse_signal(value):
    """A signal number from "TERM", "SIGTERM", "15" or 15; RequestError 400 when unknown."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isdigit():
        number = int(value)
    elif isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        member = getattr(signal.Signals, name, None) if name.isidentifier() else None
        number = int(member) if isinstance(member, signal.Signals) else None
    if number is None or number not in signal.valid_signals() or number <= 0:
        raise RequestError(400, f"unknown signal {value!r}")
    return number


_utc_second = [None, ""]     # the last whole second formatted: (second, its text)


def utc_timestamp(epoch):
    """RFC 3339 UTC with milliseconds: 2026-01-02T03:04:05.678Z."""
    second, cached = _utc_second
    if int(epoch) != second:
        second, cached = int(epoch), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
        _utc_second[:] = second, cached       # one list: threads see a matching pair
    return cached + f".{int(epoch % 1 * 1000):03d}Z"


LOG_EXECS_OVER_S = 1.0      # blocking execs that end normally are logged only from this long


# Twin of cbox.signal_name: must agree on the name (exit reasons name signals in both).
def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def grow_pipe(fd):
    try:
        fcntl.fcntl(fd, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
    except OSError:
        pass


json_string = json.encoder.encode_basestring   # str -> '"escaped"', non-ASCII kept
_scan_json = json.decoder.JSONDecoder().scan_once     # (value, end) of the JSON value at an index
JSON_BYTE_ESCAPES = [(b"\\", b"\\\\"), (b'"', b'\\"')] + [  # backslash first
    (bytes([c]), json_string(chr(c))[1:-1].encode()) for c in range(32)]
JSON_PLAIN_BYTES = bytes(c for c in range(128) if bytes([c]) not in dict(JSON_BYTE_ESCAPES))


class CapturedText:
    """A JSON string value kept as bytes until sent: UTF-8 decoded with replacement.

    segments: (buffer, start, end) ranges, iterable more than once, over
    bytearrays that only ever grow; they are read under `lock` (None: the
    caller holds it), a piece at a time, so a response never holds a whole
    decoded or escaped copy of a large output.
    """

    def __init__(self, lock, segments, size):
        self.lock = lock
        self.segments = segments
        self.size = size

    def raw_pieces(self):
        """The bytes, in pieces of at most TEXT_PIECE bytes (short segments joined)."""
        piece = bytearray()
        for buf, start, end in self.segments:
            while start < end:
                stop = min(end, start + TEXT_PIECE - len(piece))
                if self.lock is None:
                    piece += memoryview(buf)[start:stop]
                else:
                    with self.lock:
                        piece += memoryview(buf)[start:stop]
                start = stop
                if len(piece) >= TEXT_PIECE:
                    yield piece
                    piece = bytearray()
        if piece:
            yield piece

    def text(self):
        """The whole text, for small values."""
        return b"".join(self.raw_pieces()).decode("utf-8", "replace") if self.size else ""

    def json_pieces(self):
        """The JSON string's UTF-8 bytes without its quotes, piece by piece.

        ASCII pieces with few bytes to escape (text) are escaped as bytes, a
        few times faster than as str; the JSON is the same as json.dumps's.
        """
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for piece in self.raw_pieces():
            special = piece.translate(None, JSON_PLAIN_BYTES) if piece.isascii() else None
            if special is not None and len(special) * 8 <= len(piece) and not decoder.getstate()[0]:
                for byte, escaped in JSON_BYTE_ESCAPES:
                    if byte in special:
                        piece = piece.replace(byte, escaped)
                yield piece
            else:
                text = decoder.decode(piece)
                if text:
                    yield memoryview(json_string(text).encode())[1:-1]
        text = decoder.decode(b"", True)
        if text:
            yield json_string(text)[1:-1].encode()


def _captured_text(value):
    """json.dumps default=: CapturedText -> str."""
    if isinstance(value, CapturedText):
        return value.text()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


RESPONSE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_captured_text)
try:    # the C encoder made once (RESPONSE_JSON.encode makes one per call); as cbox.py's json_bytes
    _RESPONSE_CHUNKS = json.encoder.c_make_encoder(None, _captured_text, json_string, None, ":", ",",
                                                   False, False, True)
except (AttributeError, TypeError):    # no C accelerator
    _RESPONSE_CHUNKS = None


def response_json(obj):
    """RESPONSE_JSON.encode(obj), without its per-call set-up (and no check for cycles)."""
    if _RESPONSE_CHUNKS is None:
        return RESPONSE_JSON.encode(obj)
    return "".join(_RESPONSE_CHUNKS(obj, 0))


OUTPUT_FIELDS = ("output", "stdout", "stderr")     # of an exec result, left out of its exit event
JSON_BOOLS = ("false", "true")                      # indexed by a bool


class OutputRuns:
    """(buffer, start, end) segments of output runs: +n is the next n bytes of stdout, -n of stderr."""

    def __init__(self, runs, stdout, stderr):
        self.runs, self.stdout, self.stderr = runs, stdout, stderr

    def __iter__(self):
        out = err = 0
        for run in self.runs:
            if run > 0:
                yield self.stdout, out, out + run
                out += run
            else:
                yield self.stderr, err, err - run
                err -= run


UTF8_DECODER = codecs.getincrementaldecoder("utf-8")


class StreamDecoder:
    """Incremental UTF-8 decoding of one output stream: characters are never split
    between events; invalid bytes become U+FFFD and the raw bytes are kept too."""

    def __init__(self):
        self._strict = None         # made at the first bytes (most streams of short commands get none)

    def decode(self, data, final=False):
        """(text, raw bytes of that text when it holds replacements, else None)."""
        if self._strict is None:
            if not data:
                return "", None
            self._strict = UTF8_DECODER("strict")
        try:
            return self._strict.decode(data, final), None
        except UnicodeDecodeError:  # the strict decoder's buffer is left as it was
            raw = self._strict.getstate()[0] + bytes(data)
            lenient = UTF8_DECODER("replace")
            text = lenient.decode(raw, final)
            pending = lenient.getstate()[0]
            self._strict.setstate((pending, 0))
            return text, raw[:len(raw) - len(pending)]


def encode_event(seq, event):
    """One NDJSON line: {"seq": N, ...event}."""
    return f'{{"seq":{seq},{response_json(event)[1:]}\n'.encode("utf-8", "replace")


class EventLog:
    """An exec's stream events: a ring of encoded NDJSON lines, seq 0, 1, 2, ...

    One thread appends (the exec's I/O loop), any number of readers follow
    with a Condition. The ring keeps the newest events within `cap` bytes
    (always the last one); a reader that falls behind loses the oldest and
    gets one "dropped" event instead (see follow()).
    """

    _cond = None                    # Condition on lock, made for the first waiter (most execs have none)
    waiting = 0                     # readers waiting on it (an append wakes them only then)
    first_seq = 0                   # oldest kept
    next_seq = 0
    size = 0                        # bytes of the kept lines
    closed = False                  # the exit event is in
    # (class attributes: the initial values, replaced per instance when set)

    def __init__(self, cap):
        self.cap = cap
        self.lock = threading.Lock()
        self.lines = {}             # seq -> encoded line
        self.last_append = time.monotonic()

    def append(self, event, last=False, members=None):
        """Append event (a dict), or `members`: its JSON members encoded already."""
        if members is None:
            line = encode_event(self.next_seq, event)   # the only appender: next_seq is stable here
        else:
            line = f'{{"seq":{self.next_seq},{members}\n'.encode("utf-8", "replace")
        with self.lock:
            self.lines[self.next_seq] = line
            self.next_seq += 1
            self.size += len(line)
            while self.size > self.cap and self.first_seq < self.next_seq - 1:
                self.size -= len(self.lines.pop(self.first_seq))
                self.first_seq += 1
            self.closed = self.closed or last
            self.last_append = time.monotonic()
            if self.waiting:
                self._cond.notify_all()

    def wait_closed(self, timeout):
        """Wait up to timeout seconds for the exit event; whether it is in."""
        with self.lock:
            self.waiting += 1
            try:
                return self._condition().wait_for(lambda: self.closed, timeout)
            finally:
                self.waiting -= 1

    def _condition(self):
        """The Condition readers wait on (lock held)."""
        if self._cond is None:
            self._cond = threading.Condition(self.lock)
        return self._cond

    def check_since(self, since):
        with self.lock:
            if since > self.next_seq:
                raise RequestError(400, f"since {since} is beyond the last event {self.next_seq - 1}")

    def follow(self, since, wait_s):
        """Yield lists of lines from seq `since` until the exit event was yielded.

        When `since` is older than the oldest kept event F, the first line is
        {"seq": F-1, "type": "dropped", "missed": F-since, "fromSeq": since}:
        it stands in for the missed events since..F-1, so seq still grows by
        one and `missed` says how many events are lost.
        """
        pos = since
        while True:
            batch, size = [], 0
            with self.lock:
                while pos >= self.next_seq and not self.closed:
                    self.waiting += 1
                    try:
                        self._condition().wait(wait_s)
                    finally:
                        self.waiting -= 1
                if pos < self.first_seq:
                    batch.append(encode_event(self.first_seq - 1, {
                        "type": "dropped", "missed": self.first_seq - pos, "fromSeq": pos}))
                    pos = self.first_seq
                while pos < self.next_seq and size < STREAM_BATCH:
                    batch.append(self.lines[pos])
                    size += len(batch[-1])
                    pos += 1
                finished = self.closed and pos >= self.next_seq
            if batch:
                yield batch
            if finished:
                return


def set_window_size(fd, cols, rows):
    """TIOCSWINSZ on a terminal (its master or slave): the kernel sends SIGWINCH to the
    terminal's foreground process group when the size changed."""
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(cols, rows, user):
    """(master, slave) of a new pseudo-terminal (/dev/ptmx) of cols x rows, its slave owned
    by `user` (a passwd entry, or None: root) so the command can open it; RequestError
    409 where the guest has none to give."""
    try:
        master, slave = os.openpty()
    except OSError as e:
        raise RequestError(409, f"tty: this guest cannot open a pseudo-terminal "
                                f"(/dev/ptmx, /dev/pts: {e.strerror or e})") from None
    try:
        set_window_size(master, cols, rows)
        if user is not None:
            os.fchown(slave, user.pw_uid, -1)
    except OSError as e:
        os.close(master)
        os.close(slave)
        raise RequestError(500, f"cannot set up the terminal: {e}") from None
    return master, slave


def terminal_eof_char(fd):
    """The terminal's VEOF character (Ctrl-D unless the command changed it), as bytes."""
    import termios
    try:
        char = termios.tcgetattr(fd)[6][termios.VEOF]
    except (termios.error, OSError):
        return b"\x04"
    return bytes([char]) if isinstance(char, int) else char


# Commands are started by _posixsubprocess.fork_exec, what Popen calls, without Popen's
# Python layers (they cost more CPU than the vfork and exec themselves). Its arguments
# differ between Python versions (read in each one's Lib/subprocess.py,
# Popen._execute_child): 3.10 has no process_group and no allow_vfork, 3.11-3.13 have
# both. Any other version, or no _posixsubprocess, starts commands with Popen.
try:
    import _posixsubprocess
    FORK_EXEC = _posixsubprocess.fork_exec if (3, 10) <= sys.version_info[:2] <= (3, 13) else None
except ImportError:
    FORK_EXEC = None
FORK_EXEC_HAS_PROCESS_GROUP = sys.version_info[:2] >= (3, 11)
# Newer versions report a failed chdir as "noexec:chdir" and other failures before the
# exec as "noexec"; older ones report only "noexec", for a failed chdir (as their Popen reads it).
NOEXEC_MEANS_CHDIR = "noexec:chdir" not in subprocess.Popen._execute_child.__code__.co_consts
MAX_EXEC_ERROR_REPORT = 50000        # bytes of the child's exec failure report read (as Popen)
FS_ENCODING, FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()   # os.fsencode's


def _encode_variable(key, value):
    """os.fsencode(key) + b"=" + os.fsencode(value) of a name and value (str), as Popen checks it."""
    if "=" in key:
        raise ValueError("illegal environment variable name")
    return f"{key}={value}".encode(FS_ENCODING, FS_ERRORS)


_encoded_env = [({}, {})]           # (a base environment, its variables encoded): one item, swapped whole


def encode_environment(env, base_env, overrides):
    """execve's b"KEY=value" list of env, base_env with overrides over it (Popen's encoding,
    in env's order); base_env's variables are encoded once per change of it, not at every exec."""
    base, encoded = _encoded_env[0]
    if base != base_env:
        base = dict(base_env)
        encoded = {key: _encode_variable(key, value) for key, value in base.items()}
        _encoded_env[0] = (base, encoded)
    if overrides.keys().isdisjoint(base):     # env is base's variables, then the overrides
        return [*encoded.values(), *[_encode_variable(key, value) for key, value in overrides.items()]]
    return [encoded[key] if base.get(key) is value else _encode_variable(key, value)
            for key, value in env.items()]


def _above_standard_fds(fd):
    """fd, or a dup of it that is not 0, 1 or 2 (fork_exec's report fd must not be)."""
    low = []
    while fd < 3:
        low.append(fd)
        fd = os.dup(fd)
    for old in low:
        os.close(old)
    return fd


def exec_failure(report, cwd, program):
    """The exception of the child's report "ExceptionName:hex errno:message", as Popen makes it."""
    import builtins
    try:
        name, hex_errno, message = report.split(b":", 2)
        message = message.decode()
    except ValueError:
        name, hex_errno, message = b"SubprocessError", b"0", f"Bad exception data from child: {bytes(report)!r}"
    kind = getattr(builtins, name.decode("ascii"), subprocess.SubprocessError)
    if not (issubclass(kind, OSError) and hex_errno):
        return kind(message)
    number = int(hex_errno, 16)
    filename = program
    if message == "noexec:chdir" or (message == "noexec" and NOEXEC_MEANS_CHDIR):
        message, filename = "", cwd
    elif message == "noexec":
        message, filename = "", None
    if number != 0:
        message = os.strerror(number)
    return kind(number, message) if filename is None else kind(number, message, filename)


def fork_exec_command(argv, fds, cwd, env, env_list, uid, gid, gids):
    """Popen._execute_child's POSIX path for our arguments: the pid, or the child's exec
    failure raised as Popen raises it."""
    program = argv[0]
    executable = program.encode(FS_ENCODING, FS_ERRORS)      # os.fsencode(program)
    if b"/" in executable:           # os.path.dirname(executable), as Popen tests it
        executables = (executable,)
    else:
        executables = tuple(os.path.join(os.fsencode(d), executable) for d in os.get_exec_path(env))
    sys.audit("subprocess.Popen", program, argv, cwd, env)
    report_r, report_w = os.pipe()
    try:
        try:
            report_w = _above_standard_fds(report_w)
            common = (argv, executables, True, (report_w,), cwd, env_list,
                      fds[0], -1, -1, fds[1], -1, fds[2], report_r, report_w, True, True)
            if FORK_EXEC_HAS_PROCESS_GROUP:
                pid = FORK_EXEC(*common, -1, gid, gids, uid, -1, None, subprocess._USE_VFORK)
            else:
                pid = FORK_EXEC(*common, gid, gids, uid, -1, None)
        finally:
            os.close(report_w)
        report = os.read(report_r, MAX_EXEC_ERROR_REPORT)    # b"": it ran exec
        while report and len(report) <= MAX_EXEC_ERROR_REPORT:
            part = os.read(report_r, MAX_EXEC_ERROR_REPORT)
            if not part:
                break
            report += part
    finally:
        os.close(report_r)
    if report:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise exec_failure(report, cwd, program)
    return pid


class ForkedChild:
    """A command fork_exec_command started: what Exec uses of a Popen."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None
        self._lock = threading.Lock()

    def wait(self):
        with self._lock:
            if self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:   # SIGCHLD ignored: no status (Popen says 0 too)
                    self.returncode = 0
        return self.returncode

    def poll(self):
        """The exit status once it exited (reaped then), else None; never waits."""
        if self.returncode is None and self._lock.acquire(blocking=False):   # else wait() reaps it
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 0
            finally:
                self._lock.release()
        return self.returncode

    def kill(self):
        """SIGKILL, unless it was reaped (then its pid may be another process's)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def spawn_command(argv, fds, cwd, base_env, overrides, user):
    """Start argv with stdin, stdout, stderr = fds (ints) as Popen(argv, stdin=, stdout=,
    stderr=, cwd=, env=, start_new_session=True, user=, group=, extra_groups=) would, with
    close_fds and restore_signals; the environment: base_env with overrides over it; user:
    a passwd entry (its uid, gid and groups) or None.

    A Popen, or (fork_exec called directly) a ForkedChild: Exec uses only pid, wait()
    and kill(). Raises what Popen raises: OSError (the exec failed, a bad cwd, ...),
    ValueError, UnicodeError, SubprocessError.
    """
    env = dict(base_env)
    env.update(overrides)
    uid = gid = gids = None
    if user is not None:
        uid, gid, gids = user.pw_uid, user.pw_gid, os.getgrouplist(user.pw_name, user.pw_gid)
    # the command starts with this thread's signal mask: SIGCHLD, blocked in the server's
    # threads (AgentServer.serve_forever), is unblocked while it is spawned
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_EXIT_SIGNAL)
    try:
        if FORK_EXEC is None:
            ids = {} if user is None else {"user": uid, "group": gid, "extra_groups": gids}
            return subprocess.Popen(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], cwd=cwd, env=env,
                                    start_new_session=True, **ids)
        return ForkedChild(fork_exec_command(argv, fds, cwd, env, encode_environment(env, base_env, overrides),
                                             uid, gid, gids))
    finally:
        if signal.SIGCHLD in mask:
            signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_EXIT_SIGNAL)


_devnull = []
_devnull_lock = threading.Lock()


def devnull_fd():
    """/dev/null for commands' stdin, opened once (Popen's DEVNULL opens and closes it each time)."""
    if not _devnull:
        with _devnull_lock:
            if not _devnull:
                _devnull.append(os.open(os.devnull, os.O_RDWR))
    return _devnull[0]


# Run under cgroups: the command waits for one line on stdin ("go", written once the
# agent moved it into its cgroup), so no user code runs outside the cgroup; the rest
# of stdin, if any, is the command's.
WAIT_FOR_CGROUP = 'read -r CBOX_GO || exit 125; exec "$@"'
WAIT_FOR_CGROUP_NULL = 'read -r CBOX_GO || exit 125; exec "$@" </dev/null'
# A "cmd" runs in the shell that waited (one exec of sh, not two): the wait goes in front
# of the command's text, on its first line (so the shell's line numbers stay the command's).
CMD_AFTER_CGROUP = 'read -r CBOX_GO || exit 125; unset CBOX_GO; '
CMD_AFTER_CGROUP_NULL = CMD_AFTER_CGROUP + 'exec </dev/null; '
# On a terminal ($1 its path): the shell, a session leader, opens it as stdin, stdout and
# stderr, which makes it the session's controlling terminal; then it runs the command.
OPEN_TTY = 'exec 0<>"$1" 1>&0 2>&0 || exit 125; shift; exec "$@"'
WAIT_FOR_CGROUP_TTY = 'read -r CBOX_GO || exit 125; ' + OPEN_TTY


class Exec:
    """One command (`/bin/sh -c cmd` or an argv) in its own session and cgroup, its output and fate.

    start() spawns it, run() (in one thread) feeds stdin, drains stdout and
    stderr into the captured output and the event log, and waits for the
    exit in one poll loop (seen on a pidfd, or as its pipes' end; see _io_loop);
    kill()/send_signal()/write_stdin() may
    be called from any thread, result() gives the API's exec result at any time.
    """

    # Initial values no exec shares a mutable copy of: class attributes, so that each exec
    # pays only for what it sets (an instance attribute replaces one when it is set).
    output_size = 0
    _output = None
    truncated = timed_out = oom_killed = False
    returncode = pid = None
    _started_at = (None, "")          # (epoch, its startedAt text)
    finished = None                   # monotonic time once run() is over
    _final = None                     # the result once run() is over (it no longer changes)
    _outcome_json = None              # the result but its output, as JSON, once run() is over
    _proc = None
    _leaf = None                      # ExecCgroup while the exec runs
    _stdin_fd = None
    _tty_fd = None                    # a terminal's master for resize and its process groups (_lock)
    _held = ()                        # the write ends of stdout and stderr the agent holds (_io_loop)
    _stdin_data = memoryview(b"")

    def __init__(self, exec_id, spec, cgroups=None):
        self.id = exec_id
        self.spec = spec
        self.tag = spec.tag
        self.cgroups = cgroups
        self.kill_scope = "cgroup" if cgroups is not None else "process-group"
        self.stdout = bytearray()
        self.stderr = bytearray()
        # `output` is not a third copy: runs over stdout and stderr in arrival
        # order (+n: the next n bytes of stdout, -n: of stderr), or, should
        # the runs get many and short, a buffer of its own (_output).
        self._runs = array.array("i")
        self.started = time.monotonic()
        self.started_epoch = time.time()
        self.events = EventLog(max(spec.max_output, MIN_EVENT_RING))
        self._lock = threading.Lock()  # guards buffers, returncode and killing
        self._readers = {}             # pipe fd -> buffer
        self._kinds = {}               # pipe fd -> "stdout" / "stderr"
        self._decoders = {}            # pipe fd -> StreamDecoder
        self._grown = set()            # pipe fds already given PIPE_SIZE
        self._stdin_lock = threading.Lock()   # POST .../stdin writers of a pipe

    # -- spawning -----------------------------------------------------------

    def environment_overrides(self):
        """The variables the command's environment sets over the base environment's."""
        spec = self.spec
        env = {}
        if spec.user is not None:
            env.update(HOME=spec.user.pw_dir, USER=spec.user.pw_name, LOGNAME=spec.user.pw_name)
        env.update(spec.env)
        env["CBOX_EXEC_ID"] = self.id
        if self.tag:
            env["CBOX_EXEC_TAG"] = self.tag
        if spec.tty:
            env["TERM"] = spec.term
        return env

    def _check_program(self, search_path):
        """400 unless argv[0] names an executable (so both spawn paths fail alike)."""
        program = self.spec.argv[0]
        if "/" in program:
            path = os.path.join(self.spec.cwd or os.getcwd(), program)
            found = os.path.isfile(path) and os.access(path, os.X_OK)
        else:
            import shutil
            found = shutil.which(program, path=search_path) is not None
        if not found:
            raise RequestError(400, f"argv[0] {program!r}: command not found")

    def start(self, base_env):
        spec = self.spec
        if spec.cwd is not None and not os.path.isdir(spec.cwd):
            what = "is not a directory" if os.path.exists(spec.cwd) else "does not exist"
            raise RequestError(400, f"cwd {spec.cwd} {what}")
        env = self.environment_overrides()
        if spec.argv is not None:
            self._check_program(env.get("PATH", base_env.get("PATH", "")))
        if self.cgroups is not None:
            try:
                self._leaf = self.cgroups.create(self.id, spec.memory_mb, spec.pids_limit)
            except OSError as e:
                raise RequestError(500, f"cannot create the exec's cgroup: {e}") from None
        try:
            self._spawn(base_env, env)
        except BaseException:
            if self._leaf is not None:
                self._leaf.remove()
                self._leaf = None
            raise
        # as response_json would write it (id, tag and startedAt need no escapes), without its cost
        tag = "null" if self.tag is None else f'"{self.tag}"'
        self.events.append(None, members=f'"type":"start","execId":"{self.id}","tag":{tag},"pid":{self.pid},'
                                         f'"startedAt":"{self.started_at}","tty":{"true" if self.spec.tty else "false"}}}')

    def _spawn(self, base_env, env):
        spec = self.spec
        wait_for_cgroup = self._leaf is not None
        if spec.tty:
            argv, child, close_after, parent, go_fd = self._open_pty(wait_for_cgroup)
        else:
            argv, child, close_after, parent, go_fd = self._open_pipes(wait_for_cgroup)
        own_go_fd = go_fd is not None and go_fd != self._stdin_fd     # a tty's: closed after "go"
        try:
            self._proc = spawn_command(argv, child, spec.cwd, base_env, env, spec.user)
        except (OSError, ValueError, UnicodeError, subprocess.SubprocessError) as e:
            for fd in parent:
                os.close(fd)
            self._stdin_fd, self._tty_fd, self._readers, self._held = None, None, {}, ()
            if isinstance(e, (FileNotFoundError, NotADirectoryError)) and spec.cwd is not None:
                raise RequestError(400, f"cwd {spec.cwd} does not exist") from None
            raise RequestError(500 if isinstance(e, OSError) else 400, f"cannot start command: {e}") from None
        finally:
            for fd in close_after:
                os.close(fd)
        self.pid = self._proc.pid
        self.started = time.monotonic()
        self.started_epoch = time.time()
        try:  # children inherit it: the OOM killer picks commands before anything else
            if proc_shows_our_pids():
                write_proc_value(f"/proc/{self.pid}/oom_score_adj", EXEC_OOM_SCORE_ADJ)
        except OSError:
            pass
        if wait_for_cgroup:
            try:
                self._leaf.adopt(self.pid)
                os.write(go_fd, b"go\n")   # an empty pipe: never blocks
            except OSError as e:
                self._abort_spawn()
                raise RequestError(500, f"cannot move the command into its cgroup: {e}") from None
            finally:
                if own_go_fd:
                    os.close(go_fd)
        if spec.stdin is None and not spec.tty and self._stdin_fd is not None:
            self._close_stdin()
        if spec.stdin_pipe:
            os.set_blocking(self._stdin_fd, False)

    def _open_pipes(self, wait_for_cgroup):
        """(argv, the child's stdin/stdout/stderr fds, the fds to close once it was spawned,
        the parent's fds, the fd "go" goes to) of a command on pipes."""
        spec = self.spec
        argv = spec.command
        if wait_for_cgroup and spec.cmd is not None:
            prefix = CMD_AFTER_CGROUP_NULL if spec.stdin is None else CMD_AFTER_CGROUP
            argv = ["/bin/sh", "-c", prefix + spec.cmd]
        elif wait_for_cgroup:
            script = WAIT_FOR_CGROUP_NULL if spec.stdin is None else WAIT_FOR_CGROUP
            argv = ["/bin/sh", "-c", script, "cbox-exec"] + argv
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r = None
        if spec.stdin is not None or wait_for_cgroup:
            in_r, self._stdin_fd = os.pipe()
        if spec.stdin is not None and not spec.stdin_pipe:
            self._stdin_data = memoryview(spec.stdin.encode("utf-8", "replace"))
        self._readers = {out_r: self.stdout, err_r: self.stderr}
        self._kinds = {out_r: "stdout", err_r: "stderr"}
        self._decoders = {out_r: StreamDecoder(), err_r: StreamDecoder()}
        self._held = (out_w, err_w)
        parent = [fd for fd in (out_r, err_r, self._stdin_fd, out_w, err_w) if fd is not None]
        close_after = [in_r] if in_r is not None else []
        return argv, (devnull_fd() if in_r is None else in_r, out_w, err_w), close_after, parent, self._stdin_fd

    def _open_pty(self, wait_for_cgroup):
        """_open_pipes's answer for a command on a pseudo-terminal of its own.

        The command's stdin, stdout and stderr are the terminal. A wrapper shell,
        session leader from start_new_session, opens the terminal by its path
        (without O_NOCTTY), which makes it the session's controlling terminal (Popen
        can only dup2 an fd, which does not); with cgroups it first waits for "go"
        on a pipe of its own, so the "go" line is never typed into the terminal. The
        agent reads and writes the master: `_stdin_fd` is a dup of it, closed apart
        from the reader's (POST .../stdin, /resize, foreground signals use it).
        """
        spec = self.spec
        master, slave = open_pty(spec.cols, spec.rows, spec.user)
        go_r = go_w = None
        try:
            path = os.ttyname(slave)
            self._stdin_fd = os.dup(master)
            self._tty_fd = os.dup(master)
            if wait_for_cgroup:
                go_r, go_w = os.pipe()
        except OSError as e:
            for fd in (master, slave, self._stdin_fd, self._tty_fd):
                if fd is not None:
                    os.close(fd)
            self._stdin_fd = self._tty_fd = None
            raise RequestError(500, f"cannot set up the terminal: {e}") from None
        script = WAIT_FOR_CGROUP_TTY if wait_for_cgroup else OPEN_TTY
        argv = ["/bin/sh", "-c", script, "cbox-exec", path] + spec.command
        os.set_blocking(master, False)
        self._readers = {master: self.stdout}
        self._kinds = {master: "stdout"}
        self._decoders = {master: StreamDecoder()}
        parent = [fd for fd in (master, self._stdin_fd, self._tty_fd, go_w) if fd is not None]
        close_after = [slave] if go_r is None else [slave, go_r]
        return argv, (slave if go_r is None else go_r, slave, slave), close_after, parent, go_w

    def _abort_spawn(self):
        """The command never ran user code: kill and reap it, close its pipes."""
        self._proc.kill()
        self._proc.wait()
        self._release_pipes()
        for fd in list(self._readers) + [self._stdin_fd, self._tty_fd]:
            if fd is not None:
                os.close(fd)
        self._readers, self._stdin_fd, self._tty_fd = {}, None, None

    # -- the I/O loop ---------------------------------------------------------

    def run(self):
        """Feed, drain and wait until the command is over; always ends the event log (see wait_done)."""
        try:
            self._io_loop()
        finally:
            self._release_pipes()
            self._close_stdin()
            for fd in list(self._readers):
                self._emit(fd, *self._decoders[fd].decode(b"", final=True))
                os.close(fd)
            self._readers.clear()
            if self.returncode is None:  # only after an internal error
                self.kill_all()
                self._reap()
            self._close_tty()
            self._release_cgroup()
            self.finished = time.monotonic()
            self._outcome_json = self._outcome(self.returncode)   # the exit event's, and in answer()
            self.events.append(None, last=True, members='"type":"exit",' + self._outcome_json[1:])
            # the end: wait_done() returns

    def _close_tty(self):
        with self._lock:
            if self._tty_fd is not None:
                os.close(self._tty_fd)
                self._tty_fd = None

    def _release_cgroup(self):
        with self._lock:
            leaf, self._leaf = self._leaf, None
        if leaf is not None:
            self.oom_killed = leaf.oom_killed()
            self.cgroups.release(leaf)

    def _io_loop(self):
        poller = select.poll()
        for fd in self._readers:
            poller.register(fd, select.POLLIN)
        # On pipes the exit is watched on a pidfd from the start, and the agent holds the pipes'
        # write ends until the command was reaped or ran EXIT_WATCH_AFTER_S: so a quick command
        # wakes the agent once, when it can be reaped (its pipes' hang-up comes before that:
        # the kernel closes a dying process's files before exit_notify makes it a zombie, and
        # the agent, woken then, often found it not yet reapable on a loaded host and had to
        # sleep again on a pidfd). Once the pipes are released their
        # end means the command's output ended; a terminal's exit is watched (_exit_notifier)
        # only once the command outlived EXIT_WATCH_AFTER_S or its output ended.
        exit_fd = waiter = None
        watch_at = self.started + EXIT_WATCH_AFTER_S
        if self._held:
            exit_fd = self._pidfd()
            if exit_fd is None:
                self._release_pipes()
            else:
                poller.register(exit_fd, select.POLLIN)
        feeding = self._stdin_fd is not None and not self.spec.stdin_pipe
        if feeding:
            os.set_blocking(self._stdin_fd, False)
            poller.register(self._stdin_fd, select.POLLOUT)
        deadline = self.started + self.spec.timeout if self.spec.timeout else None
        drain_until = None
        try:
            while True:
                now = time.monotonic()
                wait = None
                if self.returncode is not None:           # exited: drain, bounded
                    if not self._readers:
                        break
                    if drain_until is None:
                        drain_until = now + DRAIN_GRACE_S
                    if now >= drain_until:
                        break
                    wait = drain_until - now
                else:
                    if self._held and now >= watch_at:
                        self._release_pipes()     # a long-running command holds no more fds than that
                    if exit_fd is None and (not self._readers or now >= watch_at):
                        if not self._readers and self._reap_if_exited():
                            self._exited(poller, feeding)
                            break                     # reaped, its output ended: done
                        exit_fd, waiter = self._exit_notifier()
                        poller.register(exit_fd, select.POLLIN)
                    if deadline is not None and not self.timed_out:
                        if now >= deadline:
                            self.timed_out = True
                            self.kill_all()
                            continue
                        wait = deadline - now
                    keepalive_at = self.events.last_append + self.spec.keepalive
                    if now >= keepalive_at:
                        self.events.append({"type": "keepalive"})
                        continue
                    wait = keepalive_at - now if wait is None else min(wait, keepalive_at - now)
                    if exit_fd is None or self._held:
                        wait = min(wait, watch_at - now)
                for fd, revents in poller.poll(None if wait is None else wait * 1000 + 1):
                    if fd == exit_fd:
                        poller.unregister(exit_fd)
                        self._reap()
                        self._exited(poller, feeding)
                    elif feeding and fd == self._stdin_fd:
                        if not self._feed_stdin():
                            poller.unregister(fd)
                            self._close_stdin()
                    elif fd in self._readers:
                        self._read(poller, fd, revents)
        finally:
            if exit_fd is not None:
                os.close(exit_fd)
            if waiter is not None:
                waiter.join()

    def _exited(self, poller, feeding):
        """The command was reaped: its stdin is of no more use, its pipes end once no other
        process holds them."""
        self._release_pipes()
        if feeding and self._stdin_fd is not None:
            poller.unregister(self._stdin_fd)
        self._close_stdin()

    def _release_pipes(self):
        """Close the write ends of stdout and stderr the agent held (see _io_loop)."""
        for fd in self._held:
            os.close(fd)
        self._held = ()

    def _pidfd(self):
        """The command's pidfd (readable once it exited), or None where there is none."""
        try:
            return os.pidfd_open(self._proc.pid)
        except (AttributeError, OSError):
            return None

    def _exit_notifier(self):
        """An fd readable once the command exited: its pidfd, or a pipe fed by a waiter thread."""
        pidfd = self._pidfd()
        if pidfd is not None:
            return pidfd, None
        r, w = os.pipe()

        def wait_and_notify():
            self._proc.wait()
            os.close(w)

        waiter = threading.Thread(target=wait_and_notify, daemon=True)
        waiter.start()
        return r, waiter

    def _read(self, poller, fd, revents):
        try:
            # a pipe that hung up with nothing left (POLLHUP without POLLIN) is at its end: no read
            data = b"" if revents == select.POLLHUP and not self.spec.tty else os.read(fd, OUTPUT_CHUNK)
        except BlockingIOError:     # a terminal's master (non-blocking) with nothing after all
            return
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b""              # a terminal's master once no process holds the terminal
        if data and self.spec.tty:
            data = self._read_more(fd, data)
        if len(data) >= DEFAULT_PIPE_SIZE and fd not in self._grown:
            self._grown.add(fd)     # it filled the pipe: a bigger one means fewer wakeups from now on
            grow_pipe(fd)
        if not data:
            self._emit(fd, *self._decoders[fd].decode(b"", final=True))
            poller.unregister(fd)
            os.close(fd)
            del self._readers[fd]
            return
        with self._lock:
            self._capture(self._readers[fd], data)
        self._emit(fd, *self._decoders[fd].decode(data))

    @staticmethod
    def _read_more(fd, data):
        """A terminal's master gives a few KiB a read: take what else is there now (up to
        OUTPUT_CHUNK, never waiting), so bulk output makes few events."""
        chunks, size = [data], len(data)
        while size < OUTPUT_CHUNK:
            try:
                more = os.read(fd, OUTPUT_CHUNK - size)
            except OSError:         # EAGAIN: nothing more yet; EIO: the next read ends it
                break
            if not more:
                break
            chunks.append(more)
            size += len(more)
        return b"".join(chunks)

    def _emit(self, fd, text, raw):
        """A stdout/stderr event; raw bytes ride along (base64) when the text has replacements."""
        if not text:
            return
        event = {"type": self._kinds[fd], "data": text}
        if raw is not None:
            event["dataBase64"] = base64.b64encode(raw).decode("ascii")
        self.events.append(event)

    def _capture(self, buf, data):
        """Append data read from stdout or stderr (buf) to it and to output, each capped (lock held).

        Output never holds more of a stream than that stream's buffer: it is
        capped at the same size and also holds the other stream's bytes.
        """
        cap = self.spec.max_output
        kept = data if len(buf) + len(data) <= cap else data[:max(cap - len(buf), 0)]
        buf += kept
        n = min(cap - self.output_size, len(data))
        if len(kept) < len(data) or n < len(data):
            self.truncated = True
        if n <= 0:
            return
        if self._output is not None:
            self._output += kept[:n]
        else:
            runs = self._runs
            run = n if buf is self.stdout else -n
            if runs and (runs[-1] > 0) == (run > 0):
                runs[-1] += run
            else:
                runs.append(run)
        self.output_size += n
        if self._output is None and len(self._runs) > DENSE_RUNS and len(self._runs) * 32 > self.output_size:
            output = bytearray()
            for piece in self._output_text(lock=None).raw_pieces():
                output += piece
            self._output, self._runs = output, array.array("i")

    def _feed_stdin(self):
        """Write some stdin; False once all is written or the reader went away."""
        try:
            written = os.write(self._stdin_fd, self._stdin_data[:READ_CHUNK])
        except BlockingIOError:
            return True
        except OSError:  # EPIPE: the command does not want more input
            return False
        self._stdin_data = self._stdin_data[written:]
        return len(self._stdin_data) > 0

    def _close_stdin(self):
        with self._stdin_lock:
            if self._stdin_fd is not None:
                os.close(self._stdin_fd)
                self._stdin_fd = None

    def write_stdin(self, data, eof):
        """POST .../stdin: write data to a "pipe" stdin or the terminal (waits for the reader,
        bounded); bytes of data written. eof closes a pipe; on a terminal it types the
        terminal's VEOF character (Ctrl-D) after the data, and the terminal stays open."""
        if not self.spec.stdin_pipe:
            raise RequestError(409, f"exec {self.id} has no stdin pipe (start it with \"stdin\": \"pipe\")")
        with self._stdin_lock:
            if self._stdin_fd is None or self.finished is not None:
                raise RequestError(409, f"the stdin of exec {self.id} is closed")
            if eof and self.spec.tty:
                return min(self._write_stdin(data + terminal_eof_char(self._stdin_fd)), len(data))
            written = self._write_stdin(data)
            if eof:
                os.close(self._stdin_fd)
                self._stdin_fd = None
            return written

    def _write_stdin(self, data):
        """Write data to the stdin pipe or terminal (_stdin_lock held), within STDIN_WRITE_TIMEOUT_S."""
        view, written = memoryview(data), 0
        give_up = time.monotonic() + STDIN_WRITE_TIMEOUT_S
        while written < len(view):
            try:
                written += os.write(self._stdin_fd, view[written:written + READ_CHUNK])
                continue
            except BlockingIOError:
                pass
            except OSError:  # EPIPE: the command closed its stdin
                os.close(self._stdin_fd)
                self._stdin_fd = None
                raise RequestError(409, f"exec {self.id} closed its stdin after {written} bytes") from None
            if self.returncode is not None or time.monotonic() >= give_up:
                break
            select.select([], [self._stdin_fd], [], 0.05)  # short: an exit shows on returncode
        return written

    def _reap(self):
        with self._lock:
            self.returncode = self._proc.wait()

    def _reap_if_exited(self):
        """Reap the command if it exited (never waits); whether it was."""
        with self._lock:
            self.returncode = self._proc.poll()
        return self.returncode is not None

    def kill_all(self):
        """SIGKILL every process of the exec: its cgroup (escapees too), else its process group."""
        with self._lock:
            if self._leaf is not None:
                self._leaf.kill()
            else:
                self._signal_groups(signal.SIGKILL)

    def send_signal(self, signum):
        """Send signum to every process of the exec (cgroup, else process group)."""
        with self._lock:
            if self.finished is not None:
                raise RequestError(409, f"exec {self.id} has finished")
            if self._leaf is not None:
                self._leaf.signal(signum)
            else:
                self._signal_groups(signum)

    def _signal_groups(self, signum):
        """Without cgroups (_lock held): signum to the command's process group and, on a
        terminal, to its foreground process group too (a job control shell's job)."""
        if self.returncode is not None or self._proc is None:
            return                  # its pid is ours only until reaped
        groups = {self._proc.pid, self._foreground_group()} - {None}
        for group in groups:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass

    def _foreground_group(self):
        """The terminal's foreground process group (_lock held), or None (no terminal, none
        set: never 0 or the agent's own group, which killpg would take for ours)."""
        if self._tty_fd is None:
            return None
        try:
            group = os.tcgetpgrp(self._tty_fd)
        except OSError:
            return None
        return group if group > 0 and group != os.getpgrp() else None

    def _terminal(self):
        """The terminal's master fd (_lock held); 409 without a terminal or once the exec ended."""
        if not self.spec.tty:
            raise RequestError(409, f"exec {self.id} has no terminal (start it with \"tty\": true)")
        if self._tty_fd is None or self.finished is not None:
            raise RequestError(409, f"exec {self.id} has finished")
        return self._tty_fd

    def resize(self, cols, rows):
        """POST .../resize: the terminal's new size (the kernel sends SIGWINCH on a change)."""
        with self._lock:
            set_window_size(self._terminal(), cols, rows)

    def signal_foreground(self, signum):
        """signum to the terminal's foreground process group (as a key like Ctrl-C does); its id."""
        with self._lock:
            self._terminal()
            group = self._foreground_group()
            try:
                if group is None:
                    raise ProcessLookupError
                os.killpg(group, signum)
            except ProcessLookupError:
                raise RequestError(409, f"the terminal of exec {self.id} has no foreground process group") from None
            return group

    def kill(self, wait_s=5.0):
        """Kill every process of a running exec and wait until run() is over."""
        self.kill_all()
        self.wait_done(wait_s)

    def wait_done(self, timeout):
        """Wait up to timeout seconds for run() to be over."""
        self.events.wait_closed(timeout)

    def terminate(self, grace_s):
        """SIGTERM everything, wait up to grace_s for the end, then kill (grace 0: SIGKILL at once)."""
        if grace_s > 0 and self.running:
            try:
                self.send_signal(signal.SIGTERM)
            except RequestError:   # it just finished
                pass
            self.wait_done(grace_s)
        if self.running:
            self.kill()

    # -- results --------------------------------------------------------------

    @property
    def running(self):
        return self.finished is None

    @property
    def output_bytes(self):
        output = len(self._output) if self._output is not None else len(self._runs) * self._runs.itemsize
        return len(self.stdout) + len(self.stderr) + output + self.events.size

    def error_message(self, returncode):
        if self.timed_out:
            return f"timed out after {fmt_seconds(self.spec.timeout)}"
        if returncode is None or returncode == 0:
            return ""
        if returncode > 0:
            return f"exit status {returncode}"
        return f"killed by signal {-returncode} ({signal_name(-returncode)})"

    def _output_text(self, lock):
        """Output so far as CapturedText (self._lock held), read under `lock` when sent."""
        if self._output is not None:
            return CapturedText(lock, [(self._output, 0, self.output_size)], self.output_size)
        # a copy: the last run may still grow, runs may turn into _output
        return CapturedText(lock, OutputRuns(self._runs[:], self.stdout, self.stderr), self.output_size)

    @property
    def started_at(self):
        """startedAt (RFC 3339), formatted once."""
        if self._started_at[0] != self.started_epoch:
            self._started_at = (self.started_epoch, utc_timestamp(self.started_epoch))
        return self._started_at[1]

    def result(self):
        """The exec result; output, stdout and stderr are CapturedText, decoded when sent.
        Once run() is over it is the same dict each time (readers only read it)."""
        if self._final is not None:
            return self._final
        finished = self._outcome_json
        with self._lock:
            outputs = self._outputs()
            returncode = self.returncode
        result = _scan_json(finished or self._outcome(returncode), 0)[0]
        result.update(outputs)
        if finished is not None:
            self._final = result
        return result

    def _outputs(self):
        """output, stdout and stderr so far (self._lock held)."""
        return {"output": self._output_text(self._lock),
                "stdout": CapturedText(self._lock, [(self.stdout, 0, len(self.stdout))], len(self.stdout)),
                "stderr": CapturedText(self._lock, [(self.stderr, 0, len(self.stderr))], len(self.stderr))}

    def _outcome(self, returncode):
        """The exec result but its output (OUTPUT_FIELDS), as JSON (the exit event's members):
        written out here, as compact JSON would be, as the C encoder takes 10 times longer.
        The id, tag, kill scope and startedAt need no escapes."""
        spec = self.spec
        running = self.running
        end = self.finished or time.monotonic()
        exit_code = returncode if returncode is not None and returncode >= 0 else None
        signum = -returncode if returncode is not None and returncode < 0 else None
        command = f'"cmd":{json_string(spec.cmd)}' if spec.cmd is not None else f'"argv":{response_json(spec.argv)}'
        tag = "null" if self.tag is None else f'"{self.tag}"'
        return (f'{{"execId":"{self.id}","tag":{tag},{command},'
                f'"user":{"null" if spec.user is None else json_string(spec.user.pw_name)},'
                f'"running":{JSON_BOOLS[running]},"exitCode":{"null" if exit_code is None else exit_code},'
                f'"signal":{"null" if signum is None else signum},'
                f'"signalName":{"null" if signum is None else json_string(signal_name(signum))},'
                f'"error":{json_string(self.error_message(None if running else returncode))},'
                f'"timedOut":{JSON_BOOLS[self.timed_out]},"truncated":{JSON_BOOLS[self.truncated]},'
                f'"oomKilled":{JSON_BOOLS[self.oom_killed]},"killScope":"{self.kill_scope}",'
                f'"limitsApplied":{JSON_BOOLS[self.cgroups is not None]},"tty":{JSON_BOOLS[spec.tty]},'
                f'"startedAt":"{self.started_at}","durationMs":{round((end - self.started) * 1000, 3)!r}}}')

    def answer(self):
        """The exec result as an answer's body: once run() is over and the output is small,
        its JSON bytes (the exit event's encoding and the output, so the result is encoded
        once), else result()'s dict."""
        if self._outcome_json is None or self.output_size + len(self.stdout) + len(self.stderr) > SMALL_BODY:
            return self.result()
        if not self.output_size:        # nothing captured (stdout and stderr hold no more than output)
            return (self._outcome_json[:-1] + ',"output":"","stdout":"","stderr":""}').encode("utf-8", "replace")
        with self._lock:
            outputs = self._outputs()
        outputs = "".join([f',"{key}":{json_string(outputs[key].text())}' for key in OUTPUT_FIELDS])
        return (self._outcome_json[:-1] + outputs + "}").encode("utf-8", "replace")

    def listing(self):
        """The short form of GET /exec."""
        end = self.finished or time.monotonic()
        returncode = self.returncode
        entry = {"execId": self.id, "tag": self.tag}
        entry.update(self.spec.given())
        entry.update({"running": self.running,
                      "exitCode": returncode if returncode is not None and returncode >= 0 else None,
                      "startedAt": self.started_at,
                      "durationMs": round((end - self.started) * 1000, 3)})
        return entry

    def summary(self):
        """Short log form: id, command (80 chars), outcome, duration."""
        cmd = self.spec.display()
        cmd = cmd if len(cmd) <= 80 else cmd[:77] + "..."
        outcome = self.error_message(self.returncode) or "exit 0"
        return f"exec {self.id} {cmd!r} -> {outcome} {(self.finished - self.started) * 1000:.1f}ms"


class ExecRegistry:
    """Running execs, and finished background execs kept for a while; ids and tags."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running = {}
        self._finished = collections.OrderedDict()
        self._finished_bytes = 0      # output_bytes of the kept finished execs (fixed once finished)

    @staticmethod
    def new_id():
        return os.urandom(8).hex()

    def add(self, ex):
        """Register a new exec; 409 when a running exec holds its tag."""
        with self._lock:
            if ex.tag is not None and any(other.tag == ex.tag for other in self._running.values()):
                raise RequestError(409, f"tag {ex.tag!r} is used by a running exec")
            self._running[ex.id] = ex

    def discard(self, ex):
        """Forget an exec that never started."""
        with self._lock:
            self._running.pop(ex.id, None)

    def get(self, key):
        """The exec with id `key`, else the one tagged `key`: running first, else the newest finished."""
        with self._lock:
            self._prune()
            ex = self._running.get(key) or self._finished.get(key)
            if ex is None:
                ex = next((e for e in self._running.values() if e.tag == key), None)
            if ex is None:
                ex = next((e for e in reversed(self._finished.values()) if e.tag == key), None)
            return ex

    def finish(self, ex, keep):
        with self._lock:
            self._running.pop(ex.id, None)
            if keep:
                self._finished[ex.id] = ex
                self._finished_bytes += ex.output_bytes
            self._prune()

    def running(self):
        with self._lock:
            return list(self._running.values())

    def all(self):
        """Running and kept finished execs, oldest first."""
        with self._lock:
            self._prune()
            execs = list(self._finished.values()) + list(self._running.values())
        return sorted(execs, key=lambda ex: ex.started_epoch)

    def _prune(self):
        now = time.monotonic()
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if (len(self._finished) <= MAX_FINISHED and self._finished_bytes <= MAX_FINISHED_BYTES
                    and oldest.finished + FINISHED_TTL_S > now):
                break
            self._finished_bytes -= oldest.output_bytes
            del self._finished[oldest.id]


def command_environment(config, shim_dir, as_init):
    """The base environment of every command (a request's env is merged over it)."""
    path = STANDARD_PATH if as_init else (os.environ.get("PATH") or STANDARD_PATH)
    env = {
        "PATH": f"{shim_dir}:{path}",
        "PYTHONPATH": shim_dir,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "CBOX_CALLBACK_PORT": str(config.callback_port),
    }
    if config.vm:
        env["CBOX_VM_NAME"] = config.vm
    if os.environ.get("CBOX_CALLBACK_SOCKET"):
        env["CBOX_CALLBACK_SOCKET"] = os.environ["CBOX_CALLBACK_SOCKET"]
    return env


# ---------------------------------------------------------------------------
# 6. HTTP server
# ---------------------------------------------------------------------------

# Twin of cbox.py's REASONS (each file stays standalone).
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 505: "HTTP Version Not Supported"}


class Request:
    def __init__(self, method, path, version, headers, body, query=""):
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers
        self.body = body
        self.query = query

    def param(self, name):
        """A query parameter's value, or None."""
        if not self.query:
            return None
        import urllib.parse
        values = urllib.parse.parse_qs(self.query, keep_blank_values=True).get(name)
        return values[-1] if values else None

    def json(self):
        """The body as JSON; a JSON object body is parsed by the C scanner straight away
        (json.loads's Python layers cost more than the parse), anything else by json.loads."""
        body = self.body
        if body[:1] == b"{" and body[-1:] == b"}":
            try:
                text = body.decode("utf-8")
                value, end = _scan_json(text, 0)
                if end == len(text):
                    return value
            except (ValueError, StopIteration):
                pass            # json.loads says what is wrong
        try:
            return json.loads(body)
        except ValueError as e:
            raise RequestError(400, f"malformed JSON: {e}") from None

    @property
    def keep_alive(self):
        connection = self.headers.get("connection", "").lower()
        return self.version == "HTTP/1.1" and "close" not in connection


def _response_head(status, length, headers):
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{headers}\r\n").encode("latin-1")


def json_parts(obj):
    """The compact JSON of a dict as bytes-like parts, CapturedText values piece by piece."""
    pending = "{"
    for key, value in obj.items():
        pending += ("" if pending == "{" else ",") + json_string(key) + ":"
        if isinstance(value, CapturedText):
            yield (pending + '"').encode()
            yield from value.json_pieces()
            pending = '"'
        else:
            pending += response_json(value)
    yield (pending + "}").encode("utf-8", "replace")


class HttpConnection:
    """Reads requests from and writes responses to one client socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self):
        data = self.sock.recv(READ_CHUNK)
        self.buf += data
        return bool(data)

    def _read_exact(self, n):
        while len(self.buf) < n:
            if not self._fill():
                raise RequestError(400, "request body is incomplete", close=True)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _read_line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > MAX_HEAD or not self._fill():
                raise RequestError(400, "bad chunked body", close=True)

    def read_request(self):
        """The next request, or None when the client closed the connection."""
        while True:
            while self.buf.startswith(b"\r\n"):
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise RequestError(431, "request head too large", close=True)
            if not self._fill():
                if self.buf:
                    raise RequestError(400, "incomplete request", close=True)
                return None
        head = self.buf[:end].decode("latin-1")
        del self.buf[:end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise RequestError(400, f"bad request line {lines[0][:100]!r}", close=True)
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise RequestError(400, f"bad header line {line[:100]!r}", close=True)
            headers[name.strip().lower()] = value.strip()
        body = self._read_body(headers)
        path, _, query = target.partition("?")
        return Request(method, path, version, headers, body, query)

    def _read_body(self, headers):
        expect_continue = headers.get("expect", "").lower() == "100-continue"
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding:
            if encoding != "chunked":
                raise RequestError(501, f"unsupported transfer-encoding {encoding}", close=True)
            if expect_continue:
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            return self._read_chunked()
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise RequestError(400, "bad content-length", close=True)
        length = int(length)
        if length > MAX_BODY:
            raise RequestError(413, f"request body exceeds {MAX_BODY} bytes", close=True)
        if expect_continue and length > len(self.buf):
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return self._read_exact(length)

    def _read_chunked(self):
        body = bytearray()
        while True:
            try:
                size = int(self._read_line().split(b";")[0], 16)
            except ValueError:
                raise RequestError(400, "bad chunk size", close=True) from None
            if size == 0:
                while self._read_line():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise RequestError(413, f"request body exceeds {MAX_BODY} bytes", close=True)
            body += self._read_exact(size)
            self._read_exact(2)

    def send_json(self, status, obj, close=False, headers=""):
        """Send obj (a dict, maybe with CapturedText values, or JSON bytes) as a JSON response.

        A small body goes out with the head in one sendall (no Nagle /
        delayed-ACK stall). A large one is never whole in memory: it is
        encoded once to count its length (kept if at most KEEP_BODY), then
        sent (encoded again when it was not kept), piece by piece.
        """
        if close:
            headers += "Connection: close\r\n"
        if type(obj) is bytes:      # encoded already (Exec.answer)
            self.sock.sendall(_response_head(status, len(obj), headers) + obj)
            return
        captured = sum([v.size for v in obj.values() if type(v) is CapturedText])
        if captured <= SMALL_BODY:
            body = response_json(obj).encode("utf-8", "replace")
            self.sock.sendall(_response_head(status, len(body), headers) + body)
            return
        length, kept = 0, []
        for part in json_parts(obj):
            length += len(part)
            if kept is not None:
                if length <= KEEP_BODY:
                    kept.append(part)
                else:
                    kept = None
        self.sock.sendall(_response_head(status, length, headers))
        sent = 0
        for part in json_parts(obj) if kept is None else kept:
            self.sock.sendall(part)
            sent += len(part)
        if sent != length:  # a bug: captured bytes only grow and are read up to a snapshot
            log_later(f"internal error: sent a body of {sent} bytes, announced {length}; closing")
            raise ConnectionError("response length mismatch")


class EventStream:
    """A route's answer that is an exec's event stream (GET /exec/{id}/stream)."""

    def __init__(self, ex, since):
        self.ex = ex
        self.since = since

    def send(self, sock, chunked, close):
        """Stream NDJSON until the exit event: each event its own chunk, each wakeup one send."""
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\n"
        head += "Transfer-Encoding: chunked\r\n" if chunked else ""
        head += "Connection: close\r\n\r\n" if close else "\r\n"
        sock.sendall(head.encode("latin-1"))
        for lines in self.ex.events.follow(self.since, self.ex.spec.keepalive):
            if chunked:
                sock.sendall(b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines))
            else:
                sock.sendall(b"".join(lines))
        if chunked:
            sock.sendall(b"0\r\n\r\n")


class AgentServer:
    """The exec server: accepts connections, one thread per connection."""

    def __init__(self, listener, config, base_env, started, agent_start_uptime, cgroups=None, identity=None):
        self.listener = listener
        self.identity = identity                  # Identity: POST /identity (None: no such route)
        self.config = config
        self.base_env = base_env
        self.started = started                    # monotonic time the agent started
        self.agent_start_uptime = agent_start_uptime
        self.cgroups = cgroups                    # ExecCgroups, or None: process groups
        self.registry = ExecRegistry()

    def serve_forever(self):
        # Every thread of the server blocks SIGCHLD (threads inherit the mask of the one that
        # starts them), so a command's exit wakes none of them: a command may end before
        # the thread that spawned it restored its signal mask (fork_exec blocks them all
        # around vfork), and the kernel then wakes another thread, one that does not block
        # it, only to discard it (SIG_DFL). spawn_command unblocks it for the command.
        signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_EXIT_SIGNAL)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        # not SIG_IGN: an ignored signal stays ignored in every command we exec
        signal.signal(signal.SIGHUP, lambda *_: None)
        start_background_log()
        if self.cgroups is not None:
            self.cgroups.remove_stale()
        address, port = self.listener.getsockname()[:2]
        uptime = read_uptime()
        took = (uptime - self.agent_start_uptime) if uptime and self.agent_start_uptime else 0.0
        log(f"ready on {address}:{port} vm={self.config.vm or '-'} "
            f"uptime={uptime or 0:.2f}s agent_start={took:.2f}s pid={os.getpid()}")
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log(f"accept: {e}")
                    time.sleep(0.1)
                elif e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    # Another holder of the listening socket (guest root can take it over with
                    # pidfd_getfd) left it non-blocking: wait for connections again, do not spin.
                    log("accept: the listening socket was made non-blocking; blocking again")
                    self.listener.setblocking(True)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(sock,), daemon=True).start()

    def _on_stop_signal(self, signum, frame):
        running = self.registry.running()
        for ex in running:
            ex.kill_all()
        log(f"server stopping on {signal_name(signum)}, killed {len(running)} running exec(s)")
        os._exit(0)

    def _serve_connection(self, sock):
        conn = HttpConnection(sock)
        try:
            while True:
                try:
                    request = conn.read_request()
                    if request is None:
                        return
                    status, obj, headers = self.route(request)
                    close = not request.keep_alive
                    if isinstance(obj, EventStream):
                        obj.send(sock, chunked=request.version == "HTTP/1.1", close=close)
                        if close:
                            return
                        continue
                except RequestError as e:
                    status, obj, headers, close = e.status, {"error": e.message}, e.headers, e.close
                except (OSError, ConnectionError):
                    return
                except Exception as e:  # a bug: answer 500, keep serving others
                    import traceback
                    log("internal error: " + traceback.format_exc().replace("\n", " | "))
                    status, obj, headers, close = 500, {"error": f"internal error: {e}"}, "", True
                conn.send_json(status, obj, close=close, headers=headers)
                if close:
                    return
        except OSError:
            pass
        finally:
            sock.close()

    # -- routes ---------------------------------------------------------------

    def route(self, request):
        """(status, body or EventStream, extra headers) for a request."""
        path, method = request.path, request.method
        if path == "/health":
            self._allow(method, "GET")
            return 200, self.health(), ""
        if path == "/stats":
            self._allow(method, "GET")
            return 200, system_stats(), ""
        if path == "/identity" and self.identity is not None:
            self._allow(method, "POST")
            return 200, self.set_identity(request), ""
        if path == "/exec":
            self._allow(method, "GET, POST, DELETE")
            if method == "GET":
                return 200, {"execs": [ex.listing() for ex in self.registry.all()]}, ""
            if method == "DELETE":
                return 200, self.end_all(request), ""
            return self.post_exec(request)
        parts = path.split("/")
        if len(parts) in (3, 4) and parts[1] == "exec" and parts[2]:
            action = parts[3] if len(parts) == 4 else None
            allowed = {None: "GET, DELETE", "stream": "GET", "stdin": "POST", "signal": "POST",
                       "resize": "POST"}.get(action)
            if allowed is None:
                raise RequestError(404, f"no route for {path}")
            self._allow(method, allowed)
            ex = self.registry.get(parts[2])
            if ex is None:
                raise RequestError(404, f"unknown exec id or tag {parts[2]}")
            if action is None:
                if method == "DELETE":
                    ex.terminate(self._grace(request))
                return 200, ex.result(), ""
            return getattr(self, f"exec_{action}")(ex, request)
        raise RequestError(404, f"no route for {path}")

    @staticmethod
    def _allow(method, allowed):
        if method not in allowed.split(", "):
            raise RequestError(405, f"method {method} not allowed (allowed: {allowed})",
                               headers=f"Allow: {allowed}\r\n")

    def health(self):
        return {"status": "ok", "vmName": self.config.vm,
                "uptimeS": round(time.monotonic() - self.started, 3),
                "bootUptimeS": read_uptime(), "pid": os.getpid(), "version": AGENT_VERSION}

    def set_identity(self, request):
        body = request.json()
        if not isinstance(body, dict) or set(body) != {"vm"}:
            raise RequestError(400, 'body must be {"vm": name}')
        name = body["vm"]
        if not isinstance(name, str) or not VM_NAME.fullmatch(name):
            raise RequestError(400, "vm must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
        self.identity.change(name)
        return {"vmName": name, "hostname": socket.gethostname()}

    def post_exec(self, request):
        spec = ExecSpec(request.json())
        ex = Exec(self.registry.new_id(), spec, self.cgroups)
        self.registry.add(ex)
        try:
            ex.start(self.base_env)
        except BaseException:
            self.registry.discard(ex)
            raise
        if spec.blocking:
            self._run_exec(ex, keep=False)
            return 200, ex.answer(), ""
        threading.Thread(target=self._run_exec, args=(ex, True), daemon=True).start()
        return 200, {"execId": ex.id, "tag": ex.tag, "output": "", "error": "", "running": True}, ""

    def _run_exec(self, ex, keep):
        try:
            ex.run()
        finally:
            self.registry.finish(ex, keep)
            if keep or ex.timed_out or ex.returncode is None or ex.returncode < 0 \
                    or ex.finished - ex.started >= LOG_EXECS_OVER_S:
                # Not every exec: in a VM this log is the emulated serial console,
                # which costs guest time per byte; quick blocking execs stay quiet.
                log_later(ex.summary())

    @staticmethod
    def _grace(request):
        value = request.param("grace")
        try:
            grace = float(value) if value is not None else 0.0
            if not 0 <= grace <= MAX_GRACE_S:
                raise ValueError
        except ValueError:
            raise RequestError(400, f"grace must be a number of seconds from 0 to {MAX_GRACE_S:g}") from None
        return grace

    def end_all(self, request):
        """DELETE /exec: end every running exec (TERM, grace, KILL), in parallel."""
        grace = self._grace(request)
        running = self.registry.running()
        threads = [threading.Thread(target=ex.terminate, args=(grace,), daemon=True) for ex in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"killed": [ex.id for ex in running]}

    @staticmethod
    def exec_stream(ex, request):
        value = request.param("since")
        since = 0
        if value is not None:
            if not value.isdigit():
                raise RequestError(400, f"since must be a non-negative integer, not {value!r}")
            since = int(value)
        ex.events.check_since(since)
        return 200, EventStream(ex, since), ""

    @staticmethod
    def exec_stdin(ex, request):
        body = request.json()
        if not isinstance(body, dict) or set(body) - {"data", "dataBase64", "eof"}:
            raise RequestError(400, 'body must be {"data": str, "eof": bool} ("dataBase64" instead of "data" for bytes)')
        if "data" in body and "dataBase64" in body:
            raise RequestError(400, "give data or dataBase64, not both")
        data = body.get("data", "")
        encoded = body.get("dataBase64")
        eof = body.get("eof", False)
        if not isinstance(data, str) or not isinstance(encoded, (str, type(None))) or not isinstance(eof, bool):
            raise RequestError(400, "data and dataBase64 must be strings and eof a boolean")
        if encoded is not None:
            if len(encoded) > (MAX_STDIN_REQUEST + 2) // 3 * 4:
                raise RequestError(413, f"data exceeds {MAX_STDIN_REQUEST} bytes per request")
            try:
                raw = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise RequestError(400, "dataBase64 is not valid base64") from None
        else:
            raw = data.encode("utf-8", "replace")
        if len(raw) > MAX_STDIN_REQUEST:
            raise RequestError(413, f"data exceeds {MAX_STDIN_REQUEST} bytes per request")
        return 200, {"written": ex.write_stdin(raw, eof)}, ""

    @staticmethod
    def exec_signal(ex, request):
        body = request.json()
        if not isinstance(body, dict) or "signal" not in body or set(body) - {"signal", "to"}:
            raise RequestError(400, 'body must be {"signal": name or number, "to": "all" or "foreground"}')
        signum = parse_signal(body["signal"])
        to = body.get("to", "all")
        if to == "foreground":
            group = ex.signal_foreground(signum)
            return 200, {"execId": ex.id, "signal": signum, "to": to, "processGroup": group}, ""
        if to != "all":
            raise RequestError(400, 'to must be "all" (every process of the exec) or "foreground" '
                                    "(the terminal's foreground process group)")
        ex.send_signal(signum)
        return 200, {"execId": ex.id, "signal": signum}, ""

    @staticmethod
    def exec_resize(ex, request):
        body = request.json()
        if not isinstance(body, dict) or set(body) != {"cols", "rows"}:
            raise RequestError(400, 'body must be {"cols": int, "rows": int}')
        cols, rows = (_positive_int_field(body, name, MAX_TTY_SIZE) for name in ("cols", "rows"))
        ex.resize(cols, rows)
        return 200, {"execId": ex.id, "cols": cols, "rows": rows}, ""


def open_listener(address, port):
    """A listening TCP socket; numeric address only (no DNS lookups)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    return sock


# ---------------------------------------------------------------------------
# 7. Supervisor (tini model)
# ---------------------------------------------------------------------------

SUPERVISOR_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def reap_children():
    """Reap every exited child; yields (pid, wait status)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def describe_status(status):
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}" if code >= 0 else f"killed by {signal_name(-code)}"


def child_pids(parent):
    """Pids whose parent is `parent`, from /proc (none where /proc is another pid
    namespace's: there the init of ours ends what is left when it ends)."""
    pids = []
    if not proc_shows_our_pids():
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def kill_leftover_children():
    """Outside PID 1: kill what the server's commands left behind (we are their subreaper)."""
    me, my_group = os.getpid(), os.getpgrp()
    for _ in range(20):
        pids = child_pids(me)
        for _ in reap_children():
            pass
        if not pids:
            return
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group != my_group:
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def kill_all_processes(grace_s=2.0):
    """PID 1 only: SIGTERM everyone, wait a little, SIGKILL the rest, reap."""
    if os.getpid() != 1:
        return
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        try:
            os.kill(-1, signum)
        except ProcessLookupError:
            return
        give_up = time.monotonic() + wait_s
        while time.monotonic() < give_up:
            for _ in reap_children():
                pass
            try:
                os.kill(-1, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


class Supervisor:
    """Forks the server, restarts it when it dies, reaps, stops on SIGTERM/SIGINT."""

    def __init__(self, make_server, as_init):
        self.make_server = make_server      # called in the child; returns an AgentServer
        self.as_init = as_init
        self.server_pid = None
        self.server_started = 0.0
        self.restart_delay = RESTART_DELAY_MIN_S
        self.restart_at = None

    def run(self):
        """Supervise until SIGTERM/SIGINT; returns the name of that signal."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)  # PID 1 gets only handled signals
        signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        self._start_server()
        while True:
            timeout = 60.0 if self.restart_at is None else max(self.restart_at - time.monotonic(), 0.0)
            info = signal.sigtimedwait(SUPERVISOR_SIGNALS, timeout)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self.stop_server()
                return signal_name(info.si_signo)
            self._reap()
            if self.server_pid is None and time.monotonic() >= self.restart_at:
                self._start_server()

    def _reap(self):
        for pid, status in reap_children():
            if pid != self.server_pid:
                continue
            lived = time.monotonic() - self.server_started
            if lived >= RESTART_RESET_AFTER_S:
                self.restart_delay = RESTART_DELAY_MIN_S
            log(f"server (pid {pid}) {describe_status(status)} after {lived:.1f}s; "
                f"restarting in {self.restart_delay:g}s")
            self.server_pid = None
            self.restart_at = time.monotonic() + self.restart_delay
            self.restart_delay = min(self.restart_delay * 2, RESTART_DELAY_MAX_S)
            if not self.as_init:
                kill_leftover_children()

    def _start_server(self):
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._server_child(parent)
        self.server_pid = pid
        self.server_started = time.monotonic()
        self.restart_at = None

    def _server_child(self, parent):
        """Runs in the forked child; never returns."""
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            if not self.as_init:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
            self.make_server().serve_forever()
        except BaseException:
            import traceback
            log("server crashed: " + traceback.format_exc().replace("\n", " | "))
        finally:
            os._exit(1)

    def stop_server(self, grace_s=3.0):
        """SIGTERM the server (it kills its commands), SIGKILL it after grace_s."""
        pid = self.server_pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                give_up = time.monotonic() + grace_s
                while os.waitpid(pid, os.WNOHANG)[0] == 0:
                    if time.monotonic() >= give_up:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        break
                    time.sleep(0.01)
            except ChildProcessError:
                pass
            self.server_pid = None
        if not self.as_init:
            kill_leftover_children()


# ---------------------------------------------------------------------------
# 8. Entry points
# ---------------------------------------------------------------------------

def parse_agent_args(args):
    import argparse
    parser = argparse.ArgumentParser(prog="guest_agent.py", description="CBox guest agent")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default 4031)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="numeric address (default 0.0.0.0)")
    return parser.parse_args(args)


def run_agent(options, as_init):
    """Set up, then supervise the server until SIGTERM/SIGINT; returns the signal's name."""
    started = time.monotonic()
    # As PID 1 this process was created for the initramfs's init script (exec keeps the
    # start time), so take the uptime now: it counts from Python's start, not the kernel's.
    if as_init:
        agent_start_uptime = read_uptime()
    else:
        ticks = proc_start_time("self")
        agent_start_uptime = None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")
    config = GuestConfig(read_cmdline())
    log(f"starting (pid {os.getpid()}, {'init' if as_init else 'stand-in'} mode, vm={config.vm or '-'})")
    setup_system(config, as_init)
    cgroups = setup_cgroups() if as_init else None
    if as_init:
        shim_dir = INIT_SHIM_DIR
    else:
        import tempfile
        shim_dir = tempfile.mkdtemp(prefix="cbox-agent-")
    try:
        try:
            write_callback_shims(shim_dir)
        except OSError as e:
            if not as_init:
                raise
            log(f"cannot write the callback shims to {shim_dir}: {e}")
        listener = open_listener(options.listen, options.port)
        base_env = command_environment(config, shim_dir, as_init)
        if not as_init:
            prctl(PR_SET_CHILD_SUBREAPER, 1)

        identity = Identity(config, base_env, os.path.join(shim_dir, "vm-name"), as_init)

        def make_server():
            identity.load()
            return AgentServer(listener, config, base_env, started, agent_start_uptime, cgroups, identity)

        stopped_by = Supervisor(make_server, as_init).run()
        log(f"stopped by {stopped_by}")
        return stopped_by
    finally:
        if not as_init:
            import shutil
            shutil.rmtree(shim_dir, ignore_errors=True)


def init_main(options):
    """PID 1: run the agent; on SIGTERM or any error, stop everything and power off."""
    try:
        reason = f"stopped by {run_agent(options, as_init=True)}"
    except BaseException:
        import traceback
        reason = "fatal error: " + traceback.format_exc().replace("\n", " | ")
    try:
        kill_all_processes()
    finally:
        power_off(reason)


def agent_main(args):
    options = parse_agent_args(args)
    if os.getpid() == 1:
        init_main(options)  # never returns
    try:
        run_agent(options, as_init=False)
    except OSError as e:
        log(f"fatal: {e}")
        return 1
    return 0


def main(argv=None):
    argv = sys.argv if argv is None else argv
    if os.path.basename(argv[0]) in ("cbox_callback", "cbox_callback.py"):
        return callback_main(argv[1:])
    if len(argv) > 1 and argv[1] == "callback":
        return callback_main(argv[2:])
    if len(argv) > 1 and argv[1] == "install-shims":
        if len(argv) != 3:
            print("usage: guest_agent.py install-shims DIR", file=sys.stderr)
            return 2
        write_callback_shims(argv[2])
        return 0
    return agent_main(argv[1:])


if __name__ == "__main__":
    if os.getpid() == 1:
        try:
            main()
        finally:
            power_off("main returned")
    sys.exit(main())

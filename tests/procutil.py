"""Commands, processes and waiting, for the tests and the benchmark (stdlib only).

One home for what many test files need: run a command and fail with its
stderr, wait for a condition with a deadline, stop a process politely then
by force. conftest.py imports these too; bench/bench.py imports them as it
imports nsutil.
"""
import os
import signal
import subprocess
import time


def run(*args, check=True, **kw):
    """Run a command, raising with its stderr on failure."""
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def wait_for(cond, timeout=10.0, interval=0.02, what="condition"):
    """cond()'s first true value, asked every `interval` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def proc_cpu_seconds(pid):
    """User + system CPU seconds of a process so far (/proc/<pid>/stat); OSError when it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_state(pid):
    """The state letter of /proc/<pid>/stat (R, S, T, Z, ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def stop_process(proc, grace=5.0, sig=signal.SIGTERM):
    """Send a subprocess.Popen `sig`, SIGKILL it if it still runs after `grace` s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()

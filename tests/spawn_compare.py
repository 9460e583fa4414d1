"""guest_agent.spawn_command started both ways, through fork_exec directly and through
Popen, on the same cases: prints {"fast": [...], "popen": [...], "fastPath": bool} as JSON.

  python3.X tests/spawn_compare.py AGENT.py

Stdlib only, so any interpreter can run it (test_agent.py runs it with each one it finds).
What a case reports: the exception as Popen's caller sees it, or the command's exit
status and its output (process-specific numbers as what they mean).
Run as root (a case runs as the user nobody).
"""
import importlib.util
import json
import os
import pwd
import signal
import sys
import tempfile

PROBE = r"""
set -- $(cut -d' ' -f1,5,6 /proc/$$/stat)
echo "pid is group leader: $([ "$1" = "$2" ] && echo yes || echo no)"
echo "pid is session leader: $([ "$1" = "$3" ] && echo yes || echo no)"
grep -E '^Sig(Ign|Blk)' /proc/self/status
echo "fds: $(ls /proc/self/fd | sort -n | tr '\n' ' ')"
echo "cwd: $(pwd)"
id
env | sort
read -r line && echo "stdin: $line"
exit 7
"""


def load_agent(path):
    spec = importlib.util.spec_from_file_location("guest_agent_spawn_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(ga, argv, cwd=None, env=None, user=None, stdin=None):
    base = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    leaked = os.open(os.devnull, os.O_RDONLY)   # inheritable, like a careless library's fd
    os.set_inheritable(leaked, True)
    os.write(in_w, (stdin or "").encode())
    os.close(in_w)
    try:
        child = ga.spawn_command(argv, (in_r, out_w, out_w), cwd, base, env or {}, user)
    except Exception as e:
        return {"raised": type(e).__name__, "errno": getattr(e, "errno", None),
                "filename": getattr(e, "filename", None), "text": str(e)}
    finally:
        for fd in (in_r, out_w, leaked):
            os.close(fd)
    chunks = []
    while True:
        data = os.read(out_r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(out_r)
    output = b"".join(chunks).decode(errors="backslashreplace")
    return {"exit": child.wait(), "again": child.wait(), "output": output}


def cases(ga, scratch):
    nobody = pwd.getpwnam("nobody")
    plain = os.path.join(scratch, "not-executable")
    with open(plain, "w") as f:
        f.write("echo no\n")
    yield run_case(ga, ["/bin/sh", "-c", PROBE], stdin="hello\n")
    yield run_case(ga, ["/bin/sh", "-c", PROBE], cwd=scratch, env={"A": "1", "HOME": "/elsewhere"})
    yield run_case(ga, ["/bin/sh", "-c", PROBE], cwd="/", user=nobody)
    yield run_case(ga, ["sh", "-c", "echo found on PATH; kill -9 $$"])
    yield run_case(ga, ["/bin/sh", "-c", "exit 3"], cwd=os.path.join(scratch, "missing"))
    yield run_case(ga, ["/bin/sh", "-c", "exit 3"], cwd=plain)
    yield run_case(ga, ["/no/such/program"])
    yield run_case(ga, ["no-such-program-on-path"])
    yield run_case(ga, [plain])
    yield run_case(ga, [scratch])
    yield run_case(ga, ["/bin/sh", "-c", "echo a\0b"])
    yield run_case(ga, ["/bin/sh", "-c", "env"], env={"A=B": "1"})
    yield run_case(ga, ["/bin/sh", "-c", "env"], env={"A": "\udcff"})
    yield run_case(ga, ["grep", "SigBlk", "/proc/self/status"])      # not through sh: dash clears the mask
    yield run_case(ga, ["grep", "SigBlk", "/proc/self/status"], user=nobody)


def main(agent):
    ga = load_agent(agent)
    signal.pthread_sigmask(signal.SIG_BLOCK, ga.CHILD_EXIT_SIGNAL)    # as the agent server's threads
    fast_path = ga.FORK_EXEC is not None
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        fast = list(cases(ga, scratch))
        ga.FORK_EXEC = None
        popen = list(cases(ga, scratch))
    print(json.dumps({"fast": fast, "popen": popen, "fastPath": fast_path,
                      "version": list(sys.version_info[:2])}))


if __name__ == "__main__":
    main(sys.argv[1])

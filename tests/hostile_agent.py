#!/usr/bin/env python3
"""A hostile stand-in for the guest agent, started by an exec inside the guest.

    exec python3 hostile_agent.py STOP_FILE MAX_SECONDS

What a root attacker in a guest can do to take the agent's place on port 4031:
it duplicates the agent server's listening socket with pidfd_getfd(2) (the
server is this command's parent), shuts down the server's open connections (so
cbox.py's keep-alive connections come back through the listener), stops the
server with SIGSTOP (its supervisor does not notice a stopped child, so nothing
restarts it) and answers every request itself, badly. The answer is chosen by
the request's "cmd" (see answer()); a streamed exec whose cmd is hostile:stream_*
gets the execId hostile-stream_*, and its event stream is the attack (see stream()). When STOP_FILE appears or MAX_SECONDS pass it
closes what it took and resumes the real server with SIGCONT.
Stdlib only; Linux 5.6+ (pidfd_getfd), root.
"""
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time

SYS_PIDFD_GETFD = 438           # x86-64 and arm64 alike (asm-generic numbering since 5.6)
AGENT_PORT = 4031
_libc = ctypes.CDLL(None, use_errno=True)


def take_sockets(pid):
    """(listening socket on AGENT_PORT, [connected sockets on it]) duplicated from `pid`."""
    pidfd = os.pidfd_open(pid)
    listener, conns = None, []
    for fd in range(3, 1024):
        new = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            continue
        try:
            sock = socket.socket(fileno=new)
        except OSError:
            os.close(new)
            continue
        try:
            port = sock.getsockname()[1] if sock.family in (socket.AF_INET, socket.AF_INET6) else None
        except OSError:
            port = None
        if port != AGENT_PORT:
            sock.detach()
            os.close(new)
        elif sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener = sock
        else:
            conns.append(sock)
    os.close(pidfd)
    return listener, conns


def read_request(conn, target=None):
    """The request's JSON body ({} without one); `target`, a list, gets the request target."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    if target is not None:
        target[:] = [head.split(b" ")[1].decode("latin-1") if head.count(b" ") >= 2 else ""]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        more = conn.recv(65536)
        if not more:
            return None
        rest += more
    try:
        return json.loads(rest[:length] or b"{}")
    except ValueError:
        return {}


def answer(conn, mode, stop):
    """The bad answer for `mode`; returns when it is done or the peer is gone."""
    send = conn.sendall
    if mode == "chunked1":          # an endless chunked body of 1-byte chunks
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"1\r\nx\r\n" * 8192
        while not stop.is_set():
            send(piece)
    elif mode == "drip":            # a Content-Length body, one byte every 0.2 s
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n")
        while not stop.is_set():
            send(b" ")
            time.sleep(0.2)
    elif mode == "nested":          # an error body nested deeper than any parser recurses
        body = b'{"error": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        send(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
             % len(body) + body)
    elif mode == "nested_ok":       # a 200 whose body is nested too deep
        body = b"[" * 100000 + b"]" * 100000
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
             % len(body) + body)
    elif mode == "nolength":        # neither length nor chunking: endless bytes until the close
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        piece = b"0" * 65536
        while not stop.is_set():
            send(piece)
    elif mode == "trailers":        # a short chunked body, then trailer lines without end
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"2\r\n{}\r\n0\r\n")
        while not stop.is_set():
            send(b"X-Trailer: x\r\n" * 1000)
            time.sleep(0.001)
    elif mode == "hang":            # read the request, never answer
        while not stop.is_set():
            try:
                conn.settimeout(0.2)
                if conn.recv(1) == b"":
                    return
            except socket.timeout:
                pass
    else:                           # anything else: a plain, valid answer
        body = json.dumps({"exitCode": 0, "stdout": "hostile\n", "stderr": "", "output": "hostile\n"}).encode()
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
             % len(body) + body)


# Just under cbox.py's bound for an event line (GuestAgent.EVENT_LINE_MAX, 512 KiB): legal, and
# its data `yes` output (`y` and an escape in turn), the slowest JSON string to decode found
# (6.7 ms a line with json.loads; "\n" alone: 3.5 ms).
BOUND_FILL = b"y\\n" * ((512 * 1024 - 64) // 3)

STREAM_LINES = {    # an exec's event stream: 12 lines like these after its start event
    "stream_huge": lambda seq: b'{"seq":%d,"type":"stdout","data":[' % seq + b"1," * (25 << 20) + b'1]}\n',
    "stream_bound": lambda seq: b'{"seq":%d,"type":"stdout","data":"' % seq + BOUND_FILL + b'"}\n',
    "stream_nested": lambda seq: b'{"seq":%d,"type":"stdout","data":' % seq + b"[" * 200_000 + b"]" * 200_000
                                 + b"}\n",
}


def stream(conn, mode):
    """GET /exec/hostile-MODE/stream: a start event, then 12 hostile lines (as many readers
    as ask); a cbox.py that stops reading ends it (the send fails)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n"
                 b'{"seq":0,"type":"start","execId":"hostile-%s"}\n' % mode.encode())
    for seq in range(1, 13):
        conn.sendall(STREAM_LINES[mode](seq))
    conn.close()


def serve(conn, stop):
    try:
        while not stop.is_set():
            target = []
            request = read_request(conn, target)
            if request is None:
                return
            mode = request.get("cmd", "") if isinstance(request, dict) else ""
            mode = mode.removeprefix("hostile:")
            if target[0].startswith("/exec/hostile-stream_") and target[0].split("/")[2][8:] in STREAM_LINES:
                return stream(conn, target[0].split("/")[2][8:])
            if mode in STREAM_LINES and request.get("blocking") is False:      # a streamed exec starts
                body = json.dumps({"execId": f"hostile-{mode}", "running": True}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
                continue
            answer(conn, mode, stop)
    except OSError:
        pass
    finally:
        conn.close()


def main(stop_file, max_seconds):
    time.sleep(0.3)                 # let the agent answer the exec that started us
    server = os.getppid()
    os.kill(server, signal.SIGSTOP)     # first: a connection it accepts meanwhile would be missed (and hang)
    listener, conns = take_sockets(server)
    if listener is None:
        os.kill(server, signal.SIGCONT)
        print("hostile: no listening socket found", flush=True)
        return 1
    for sock in conns:              # cbox.py's idle keep-alive connections: back through the listener
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
    print("hostile: serving", flush=True)
    stop = threading.Event()
    listener.settimeout(0.2)
    deadline = time.monotonic() + max_seconds
    try:
        while time.monotonic() < deadline and not os.path.exists(stop_file):
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn, stop), daemon=True).start()
    finally:
        stop.set()
        listener.setblocking(True)  # the server's copy shares the flags: leave it as it was
        listener.close()            # the server keeps its own copy
        os.kill(server, signal.SIGCONT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))

"""Sockets inside a network namespace, for the tests and the benchmark (stdlib only)."""
import contextlib
import ctypes
import os
import socket
import threading

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def setns(ns):
    """The calling thread (only it, and the threads it starts later) into a network namespace:
    its path (/run/netns/X, /proc/PID/ns/net) or an open file descriptor of it."""
    fd = os.open(ns, os.O_RDONLY) if isinstance(ns, str) else ns
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns} failed")
    finally:
        if fd is not ns:
            os.close(fd)


@contextlib.contextmanager
def entered(ns_path):
    """The calling thread inside the network namespace at ns_path for the block, then back
    in its own (so the sockets and threads the block makes are in that namespace)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(ns_path)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


def socket_in_ns(ns_path, family=socket.AF_INET, type=socket.SOCK_STREAM):
    """A socket created inside the network namespace at ns_path (/run/netns/X or
    /proc/PID/ns/net). setns() switches only the calling thread, so a throwaway
    thread enters the namespace, makes the socket and ends; the socket stays there."""
    out = {}

    def make():
        try:
            setns(ns_path)
            out["sock"] = socket.socket(family, type)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


class CallbackURLServer:
    """A callback URL server on a listening socket (made inside a namespace by the caller).

    Each POST body (JSON) is recorded in `calls` (and with its headers and raw bytes in
    `requests`, as (headers, bytes) pairs) and answered with `reply(body)`, a
    (status, bytes) pair. single_write: head and body leave in one send() (as most
    servers do); False is the stock http.server: the head, then the body in a second
    send() while Nagle is on."""

    def __init__(self, listener, reply, single_write=False):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import json

        calls = self.calls = []
        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 64 * 1024 if single_write else 0     # flushed once per request

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                requests.append((self.headers, raw))
                calls.append(body)
                status, data = reply(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass      # cbox hanging up on a slow answer is expected

        self.httpd = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.httpd.socket.close()
        self.httpd.socket = listener
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/cb"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

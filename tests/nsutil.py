"""Sockets inside a network namespace, for the tests and the benchmark (stdlib only)."""
import ctypes
import os
import socket
import threading

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def socket_in_ns(ns_path, family=socket.AF_INET, type=socket.SOCK_STREAM):
    """A socket created inside the network namespace at ns_path (/run/netns/X or
    /proc/PID/ns/net). setns() switches only the calling thread, so a throwaway
    thread enters the namespace, makes the socket and ends; the socket stays there."""
    out = {}

    def make():
        try:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns_path} failed")
            finally:
                os.close(fd)
            out["sock"] = socket.socket(family, type)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]

"""Egress policy per VM (issue 12, "Egress policy"): request validation, the rules of a
VM's chain, and, from inside stand-in guests, what the policy lets out.

Guest traffic goes only to an "outside world" namespace the test makes (the `world`
fixture, TEST-NET addresses that exist only there), never beyond the test's namespaces.
"""
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import NetNS, socket_in_netns, unique
from nsutil import CallbackURLServer
from procutil import run, wait_for

import cbox  # noqa: E402


def write_config(tmp_path, body):
    path = tmp_path / "config.yaml"
    path.write_text("hostservices:\n  restserver:\n" + "".join(f"    {line}\n" for line in body))
    return path


@pytest.fixture
def cfg(tmp_path):
    return cbox.load_config(write_config(tmp_path, []))


# ---- validation ---------------------------------------------------------------------

def test_network_defaults_to_the_configured_egress(tmp_path, cfg):
    assert cfg.default_egress == "nat"
    assert cbox.check_network(None, cfg) == {"egress": "nat", "allowOut": []}
    assert cbox.check_network({}, cfg) == {"egress": "nat", "allowOut": []}
    closed = cbox.load_config(write_config(tmp_path, ["default_egress: none"]))
    assert cbox.check_network(None, closed) == {"egress": "none", "allowOut": []}


def test_allow_out_is_canonical_and_deduplicated(cfg):
    policy = cbox.check_network({"egress": "allowlist", "allowOut": ["192.0.2.7", "198.51.100.0/24",
                                                                     "192.0.2.7/32", "0.0.0.0/0"]}, cfg)
    assert policy == {"egress": "allowlist", "allowOut": ["192.0.2.7/32", "198.51.100.0/24", "0.0.0.0/0"]}
    assert cbox.check_network({"egress": "allowlist"}, cfg) == {"egress": "allowlist", "allowOut": []}
    # a VM object's network sent back as it is
    assert cbox.check_network({"egress": "nat", "allowOut": []}, cfg) == {"egress": "nat", "allowOut": []}
    assert cbox.check_network({"egress": "none", "allowOut": None}, cfg) == {"egress": "none", "allowOut": []}


@pytest.mark.parametrize("network,fragment", [
    ("nat", "network must be an object"),
    ({"egress": "open"}, "network.egress must be one of nat, none, allowlist, got 'open'"),
    ({"egress": 5}, "network.egress must be one of"),
    ({"egress": "nat", "allowout": []}, "network: unknown field(s): allowout"),
    ({"egress": "nat", "allowOut": ["192.0.2.1"]}, "only allowed with egress 'allowlist'"),
    ({"egress": "none", "allowOut": ["192.0.2.1"]}, "only allowed with egress 'allowlist'"),
    ({"egress": "allowlist", "allowOut": "192.0.2.1"}, "must be a list of IPv4 CIDR strings"),
    ({"egress": "allowlist", "allowOut": [5]}, "must be a list of IPv4 CIDR strings"),
    ({"egress": "allowlist", "allowOut": ["192.0.2.0/33"]}, "allowOut[0]: '192.0.2.0/33' is not an IPv4 CIDR"),
    ({"egress": "allowlist", "allowOut": ["192.0.2.0/24", "10.0.0.1/8"]}, "allowOut[1]: '10.0.0.1/8'"),
    ({"egress": "allowlist", "allowOut": ["example.com"]}, "is not an IPv4 CIDR or address"),
    ({"egress": "allowlist", "allowOut": [" 192.0.2.1"]}, "is not an IPv4 CIDR or address"),
    ({"egress": "allowlist", "allowOut": ["2001:db8::/32"]}, "is not an IPv4 CIDR or address (guests have IPv4 only)"),
    ({"egress": "allowlist", "allowOut": ["1" * 100000]}, "is not an IPv4 CIDR"),
    ({"egress": "allowlist", "allowOut": [f"192.0.2.{i}" for i in range(65)]}, "at most 64"),
])
def test_bad_network_is_400(cfg, network, fragment):
    with pytest.raises(cbox.ApiError) as e:
        cbox.check_network(network, cfg)
    assert e.value.status == 400 and fragment in str(e.value)
    assert len(str(e.value)) < 400


def test_put_network_needs_egress(cfg):
    with pytest.raises(cbox.ApiError, match="missing required field: egress"):
        cbox.check_network({"allowOut": []}, cfg, require_egress=True)
    with pytest.raises(cbox.ApiError, match="network must be an object"):
        cbox.check_network(None, cfg, require_egress=True)


def test_policies_other_than_nat_need_the_firewall(tmp_path):
    cfg = cbox.load_config(write_config(tmp_path, ["firewall: false"]))
    assert cbox.check_network(None, cfg) == {"egress": "nat", "allowOut": []}
    with pytest.raises(cbox.ApiError, match="needs firewall: true"):
        cbox.check_network({"egress": "none"}, cfg)


@pytest.mark.parametrize("lines,fragment", [
    (["default_egress: allowlist"], "default_egress must be nat or none"),
    (["default_egress: open"], "default_egress must be nat or none"),
    (["default_egress: none", "firewall: false"], "needs firewall: true"),
])
def test_default_egress_config_checks(tmp_path, lines, fragment):
    with pytest.raises(cbox.ConfigError, match=fragment):
        cbox.load_config(write_config(tmp_path, lines))


# ---- the rules of a VM's chain --------------------------------------------------------

def strip_tag(rules):
    tag = ["-m", "comment", "--comment", cbox.FW_TAG]
    assert all(rule[-4:] == tag for rule in rules)
    return [rule[:-4] for rule in rules]


def test_chain_rules_per_mode():
    spoof = ["!", "-s", "10.20.1.2", "-j", "DROP"]
    reject = [["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
              ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]]
    [(chain, rules)] = cbox.egress_rules("cbt3", "10.20.1.2", {"egress": "nat", "allowOut": []}).items()
    assert chain == "CBOX-EG-cbt3" and strip_tag(rules) == [spoof, ["-j", "ACCEPT"]]
    [rules] = cbox.egress_rules("cbt3", "10.20.1.2", {"egress": "none", "allowOut": []}).values()
    assert strip_tag(rules) == [spoof, *reject]
    [rules] = cbox.egress_rules("cbt3", "10.20.1.2", {"egress": "allowlist",
                                                      "allowOut": ["192.0.2.7/32", "198.51.100.0/24"]}).values()
    assert strip_tag(rules) == [spoof, ["-d", "192.0.2.7/32", "-j", "ACCEPT"],
                                ["-d", "198.51.100.0/24", "-j", "ACCEPT"], *reject]
    longest = cbox.egress_chain(cbox.tap_name(cbox.MAX_CID))
    assert len(longest) <= 28, longest


# ---- from inside stand-in guests ---------------------------------------------------------

UPLINK = "192.0.2.1"            # the test namespace's end of the uplink (the "host's" public address)
WORLD_GW = "192.0.2.2"
ALLOWED, OTHER = "198.51.100.7", "198.51.100.8"
RESOLVER = "203.0.113.53"       # the guests' configured resolver (dns), in the world
PORT = 8080
ECHO_PORT = 8081                # echoes what arrives, for as long as the connection lasts
GATEWAY = "10.20.1.1"
EXEC_BOUND = 30.0               # a generous bound against hangs, not a speed check

# Runs in the guest: each argument "tcp:ADDR:PORT" or "udp:ADDR:PORT" (all at once) gives
# one line, "TARGET open <what the world answered>" or why not (ConnectionRefusedError,
# timeout, ...). UDP sockets are connected so an ICMP rejection is reported.
PROBE = r'''
import socket, sys, threading
out = {}
def attempt(target):
    proto, addr, port = target.split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(1.5)
    try:
        s.connect((addr, int(port)))
        if proto == "udp":
            s.send(b"ping")
        out[target] = "open " + s.recv(100).decode()
    except socket.timeout:
        out[target] = "timeout"
    except OSError as e:
        out[target] = type(e).__name__
threads = [threading.Thread(target=attempt, args=(t,)) for t in sys.argv[1:]]
for t in threads: t.start()
for t in threads: t.join()
for target in sys.argv[1:]:
    print(target, out[target])
'''


class World:
    """An outside world for the guests: a namespace joined to the test's namespace by a
    veth pair that is the test namespace's default route (nat_interface auto NATs out of
    it). Its addresses (TEST-NET ranges) exist only there. TCP PORT on every address
    answers "world <address it was reached at>"; UDP 53 on RESOLVER echoes like a resolver."""

    def __init__(self, netns):
        self.ns = NetNS(unique("cbtw"))
        run("ip", "netns", "add", self.ns.name)
        self.ns.run("ip", "link", "set", "lo", "up")
        netns.run("ip", "link", "add", "egup0", "type", "veth", "peer", "name", "egup1", "netns", self.ns.name)
        netns.run("ip", "addr", "add", f"{UPLINK}/24", "dev", "egup0")
        netns.run("ip", "link", "set", "egup0", "up")
        netns.run("ip", "route", "add", "default", "via", WORLD_GW)
        self.ns.run("ip", "addr", "add", f"{WORLD_GW}/24", "dev", "egup1")
        for addr in (ALLOWED, OTHER, RESOLVER):
            self.ns.run("ip", "addr", "add", f"{addr}/32", "dev", "lo")
        self.ns.run("ip", "link", "set", "egup1", "up")
        self.seen = []         # (proto, address reached, source) of every arrival
        self.tcp = self.ns.listen(("0.0.0.0", PORT))
        self.echo = self.ns.listen(("0.0.0.0", ECHO_PORT))
        self.udp = socket_in_netns(self.ns.name, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((RESOLVER, 53))
        for target in (self.serve_tcp, self.serve_udp, self.serve_echo):
            threading.Thread(target=target, daemon=True).start()

    def serve_tcp(self):
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            local = conn.getsockname()[0]
            self.seen.append(("tcp", local, peer[0]))
            with conn:
                conn.sendall(f"world {local}".encode())

    def serve_echo(self):
        while True:
            try:
                conn, peer = self.echo.accept()
            except OSError:
                return
            self.seen.append(("echo", conn.getsockname()[0], peer[0]))
            threading.Thread(target=self.echo_until_closed, args=(conn,), daemon=True).start()

    @staticmethod
    def echo_until_closed(conn):
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def serve_udp(self):
        while True:
            try:
                data, peer = self.udp.recvfrom(512)
            except OSError:
                return
            self.seen.append(("udp", RESOLVER, peer[0]))
            self.udp.sendto(b"answer " + data, peer)

    def close(self):
        for sock in (self.tcp, self.echo, self.udp):
            sock.close()
        for pid in self.ns.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        run("ip", "netns", "del", self.ns.name, check=False)


@pytest.fixture
def world(netns):
    w = World(netns)
    yield w
    w.close()


@pytest.fixture
def egress_cbox(cbox_factory, world):
    """cbox.py NATing out of the world's uplink, with the world's resolver as the guests' dns."""
    def make(**overrides):
        return cbox_factory(nat_interface="auto", dns=RESOLVER, **overrides)
    return make


def probe(api, vm, *targets):
    """{target: outcome} of connections the guest opens (PROBE)."""
    status, r = api.post(f"/v1/vms/{vm}/exec", {"cmd": "python3 -c \"$PROBE\" " + " ".join(targets),
                                                 "env": {"PROBE": PROBE}}, timeout=EXEC_BOUND)
    assert status == 200 and r["exitCode"] == 0, r
    out = dict(line.split(" ", 1) for line in r["stdout"].splitlines())
    assert sorted(out) == sorted(targets), r
    return out


def tcp(addr, port=PORT):
    return f"tcp:{addr}:{port}"


DNS = f"udp:{RESOLVER}:53"


def put_network(api, vm, network):
    return api.request("PUT", f"/v1/vms/{vm}/network", network)


def chains(ns):
    return ns.run("iptables", "-S").stdout


REFUSED = "ConnectionRefusedError"      # the policy's TCP reset: a program fails at once


def test_allowlist_lets_out_only_its_addresses_and_dns_follows_it(egress_cbox, world, netns):
    server = egress_cbox().start()
    api = server.api
    vm = api.start_vm("al", network={"egress": "allowlist", "allowOut": [ALLOWED]})
    assert vm["network"] == {"egress": "allowlist", "allowOut": [f"{ALLOWED}/32"]}
    assert api.get("/v1/vms/al")[1]["network"] == vm["network"]
    out = probe(api, "al", tcp(ALLOWED), tcp(OTHER), tcp(WORLD_GW), DNS)
    assert out[tcp(ALLOWED)] == f"open world {ALLOWED}"
    assert out[tcp(OTHER)] == REFUSED and out[tcp(WORLD_GW)] == REFUSED
    assert not out[DNS].startswith("open"), out            # the resolver is not in allowOut
    assert {seen[1] for seen in world.seen} == {ALLOWED}   # nothing else reached the world
    assert all(source == UPLINK for _, _, source in world.seen)   # NATed
    # the resolver in allowOut: DNS works
    vm2 = api.start_vm("al2", network={"egress": "allowlist", "allowOut": [ALLOWED, f"{RESOLVER}/32"]})
    out = probe(api, "al2", tcp(ALLOWED), tcp(OTHER), DNS)
    assert out == {tcp(ALLOWED): f"open world {ALLOWED}", tcp(OTHER): REFUSED, DNS: "open answer ping"}
    # each VM keeps its own policy
    assert probe(api, "al", DNS)[DNS] != "open answer ping"
    assert f"-i cbox0 -m physdev --physdev-in {vm2['tapDeviceName']}" in chains(netns)
    assert api.delete("/v1/vms")[0] == 200
    server.assert_clean()
    assert "CBOX-EG-" not in chains(netns)


def test_runtime_change_applies_to_new_connections_at_once(egress_cbox, world, netns):
    server = egress_cbox().start()
    api = server.api
    vm = api.start_vm("rt")
    assert vm["network"] == {"egress": "nat", "allowOut": []}           # default_egress
    everything = (tcp(ALLOWED), tcp(OTHER), DNS)
    assert all(v.startswith("open") for v in probe(api, "rt", *everything).values())

    status, body = put_network(api, "rt", {"egress": "none"})
    assert status == 200 and body["vmName"] == "rt" and body["network"] == {"egress": "none", "allowOut": []}
    out = probe(api, "rt", *everything)
    assert out[tcp(ALLOWED)] == REFUSED and out[tcp(OTHER)] == REFUSED and not out[DNS].startswith("open")

    status, body = put_network(api, "rt", {"egress": "allowlist", "allowOut": [f"{OTHER}/32"]})
    assert status == 200 and body["network"] == {"egress": "allowlist", "allowOut": [f"{OTHER}/32"]}
    out = probe(api, "rt", *everything)
    assert out[tcp(OTHER)] == f"open world {OTHER}" and out[tcp(ALLOWED)] == REFUSED

    # the object a GET shows can be sent back as it is
    assert put_network(api, "rt", api.get("/v1/vms/rt")[1]["network"])[0] == 200
    assert put_network(api, "rt", {"egress": "nat", "allowOut": []})[1]["network"]["egress"] == "nat"
    assert all(v.startswith("open") for v in probe(api, "rt", *everything).values())
    assert api.get("/v1/vms")[1]["vms"][0]["network"] == {"egress": "nat", "allowOut": []}


def test_a_change_cuts_connections_already_open(egress_cbox, world):
    """The chain sees every packet the guest sends, not only new connections: locking a
    VM down cuts what it has open (its next packet is answered with a reset)."""
    server = egress_cbox().start()
    api = server.api
    api.start_vm("cut")
    script = ("import socket, time\n"
              f"s = socket.create_connection(('{ALLOWED}', {ECHO_PORT}), timeout=5)\n"
              "try:\n"
              "    for i in range(400):\n"
              "        s.sendall(b'x'); assert s.recv(10) == b'x'\n"
              "        if i == 0: print('echoed', flush=True)\n"
              "        time.sleep(0.05)\n"
              "    print('never cut')\n"
              "except OSError as e:\n"
              "    print(type(e).__name__)\n")
    r = api.post("/v1/vms/cut/exec", {"cmd": "python3 -c \"$S\"", "env": {"S": script}, "blocking": False})
    assert r[0] == 200, r
    exec_id = r[1]["execId"]
    deadline = time.monotonic() + EXEC_BOUND
    while "echoed" not in api.get(f"/v1/vms/cut/exec/{exec_id}")[1]["stdout"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert put_network(api, "cut", {"egress": "none"})[0] == 200
    while api.get(f"/v1/vms/cut/exec/{exec_id}")[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    result = api.get(f"/v1/vms/cut/exec/{exec_id}")[1]
    assert result["stdout"].splitlines() == ["echoed", "ConnectionResetError"], result


def test_none_keeps_exec_and_callbacks(egress_cbox, world, netns):
    calls = []
    cb = CallbackURLServer(netns.listen(("127.0.0.1", 0)),
                           lambda body: (calls.append(body), (200, json.dumps({"result": "pong"}).encode()))[1])
    try:
        server = egress_cbox().start()
        api = server.api
        vm = api.start_vm("shut", callbackUrl=cb.url, network={"egress": "none"})
        assert vm["network"] == {"egress": "none", "allowOut": []}
        assert api.exec("shut", "echo exec works")["stdout"] == "exec works\n"
        r = api.exec("shut", "cbox_callback ping '{\"n\": 1}'")
        assert r["exitCode"] == 0 and json.loads(r["stdout"]) == "pong", r
        assert calls == [{"vmName": "shut", "method": "ping", "params": {"n": 1}, "execId": r["execId"]}]
        out = probe(api, "shut", tcp(ALLOWED), tcp(OTHER), DNS)
        assert out[tcp(ALLOWED)] == REFUSED and out[tcp(OTHER)] == REFUSED and not out[DNS].startswith("open")
        assert world.seen == []
    finally:
        cb.close()


# Runs in a guest: waits up to 6 s for UDP datagrams on port 9999, prints what came.
UDP_SINK = r'''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999)); s.settimeout(6)
print("listening", flush=True)
try:
    print("got", s.recvfrom(100)[0].decode())
except socket.timeout:
    print("nothing")
'''


def background(api, vm, script, ready=None):
    """Start `python3 -c script` in the guest in the background; returns its execId once
    its output contains `ready`."""
    status, r = api.post(f"/v1/vms/{vm}/exec", {"cmd": "python3 -c \"$S\"", "env": {"S": script},
                                                 "blocking": False})
    assert status == 200, r
    deadline = time.monotonic() + EXEC_BOUND
    while ready and ready not in api.get(f"/v1/vms/{vm}/exec/{r['execId']}")[1]["stdout"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return r["execId"]


def finished(api, vm, exec_id):
    deadline = time.monotonic() + EXEC_BOUND
    while (result := api.get(f"/v1/vms/{vm}/exec/{exec_id}")[1])["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return result


@pytest.mark.parametrize("network", [
    {"egress": "nat"},
    {"egress": "allowlist", "allowOut": ["0.0.0.0/0"]},
    {"egress": "allowlist", "allowOut": ["10.20.1.0/24", f"{UPLINK}/32", f"{GATEWAY}/32"]},
    {"egress": "none"},
])
def test_guest_to_host_and_guest_to_guest_stay_dropped_under_every_policy(egress_cbox, world, netns, network):
    """Whatever the policy lets out, the host's own addresses and the other guests stay
    out of reach: on-link (bridge port isolation) and routed through the host (a guest
    that routes another guest's address via its gateway meets CBOX-FORWARD's drop)."""
    server = egress_cbox().start()
    api = server.api
    host = netns.listen(("0.0.0.0", 0))        # a host service on every address of the host
    try:
        port = host.getsockname()[1]
        other = api.start_vm("other")
        other_ip = other["ip"].split("/")[0]
        api.start_vm("src", network=network)
        sink = background(api, "other", UDP_SINK, ready="listening")
        out = probe(api, "src", tcp(GATEWAY, port), tcp(UPLINK, port), tcp(other_ip, 4031), tcp(GATEWAY, 7000))
        assert set(out.values()) == {"timeout"}, out
        r = api.exec("src", f"ip route add {other_ip}/32 via {GATEWAY} dev eth0")
        assert r["exitCode"] == 0, r
        out = probe(api, "src", tcp(other_ip, 4031), f"udp:{other_ip}:9999")
        assert set(out.values()) == {"timeout"}, out
        assert finished(api, "other", sink)["stdout"] == "listening\nnothing\n"
        world_open = network["egress"] == "nat" or "0.0.0.0/0" in network.get("allowOut", [])
        assert probe(api, "src", tcp(ALLOWED))[tcp(ALLOWED)] == (f"open world {ALLOWED}" if world_open else REFUSED)
    finally:
        host.close()


def test_a_guest_cannot_send_from_an_address_not_its_own(egress_cbox, world):
    """A guest's packets leave only with its own address: one that takes another VM's (or
    any other) address gets nothing out with it, not even one-way UDP, whatever its policy."""
    server = egress_cbox().start()
    api = server.api
    api.start_vm("open")
    other = api.start_vm("other")
    for borrowed in (other["ip"].split("/")[0], "10.20.1.200", "192.0.2.99"):
        script = ("import socket\n"
                  "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  f"s.bind(('{borrowed}', 0)); s.sendto(b'leak', ('{RESOLVER}', 53)); print('sent')\n")
        r = api.exec("open", f"ip addr add {borrowed}/32 dev eth0 && python3 -c \"$S\"", env={"S": script})
        assert r["exitCode"] == 0 and r["stdout"] == "sent\n", r
    # from its own address it arrives; sent after the others on the same path, its answer
    # comes back only after any of theirs would have arrived
    assert probe(api, "open", DNS)[DNS] == "open answer ping"
    assert [what for what, _, _ in world.seen] == ["udp"] and world.seen[0][2] == UPLINK


def test_restart_keeps_and_reapplies_policies(egress_cbox, world, netns):
    server = egress_cbox().start()
    api = server.api
    kept = api.start_vm("kept", network={"egress": "allowlist", "allowOut": [ALLOWED]})
    lost = api.start_vm("lost", network={"egress": "none"})
    server.stop()                           # SIGTERM: VMs keep running
    before = chains(netns)
    assert f"CBOX-EG-{kept['tapDeviceName']}" in before
    # while cbox.py is down, one VM's chain disappears and a stray one appears
    lost_chain = f"CBOX-EG-{lost['tapDeviceName']}"
    jump = [l for l in before.splitlines() if l.startswith("-A CBOX-EGRESS") and l.endswith(lost_chain)][0]
    netns.run("iptables", "-D", *jump.split()[1:])
    netns.run("iptables", "-F", lost_chain)
    netns.run("iptables", "-X", lost_chain)
    netns.run("iptables", "-N", "CBOX-EG-cbt999")

    second = egress_cbox().start()
    api = second.api
    vms = {vm["vmName"]: vm for vm in api.get("/v1/vms")[1]["vms"]}
    assert vms["kept"]["network"] == {"egress": "allowlist", "allowOut": [f"{ALLOWED}/32"]}
    assert vms["lost"]["network"] == {"egress": "none", "allowOut": []}
    after = chains(netns)
    assert lost_chain in after and "CBOX-EG-cbt999" not in after
    out = probe(api, "kept", tcp(ALLOWED), tcp(OTHER))
    assert out == {tcp(ALLOWED): f"open world {ALLOWED}", tcp(OTHER): REFUSED}
    assert probe(api, "lost", tcp(ALLOWED))[tcp(ALLOWED)] == REFUSED
    assert put_network(api, "lost", {"egress": "nat"})[0] == 200
    assert probe(api, "lost", tcp(OTHER))[tcp(OTHER)] == f"open world {OTHER}"
    assert api.delete("/v1/vms")[0] == 200
    second.assert_clean()
    assert "CBOX-EG-" not in chains(netns)


@pytest.mark.parametrize("network,fragment", [
    ({"egress": "open"}, "network.egress must be one of"),
    ({"egress": "allowlist", "allowOut": ["198.51.100.300"]}, "allowOut[0]"),
    ({"egress": "nat", "allowOut": [ALLOWED]}, "only allowed with egress 'allowlist'"),
    ({"egress": "none", "extra": 1}, "unknown field(s): extra"),
    ({"egress": "allowlist", "allowOut": [f"198.51.100.{i}" for i in range(65)]}, "at most 64"),
    ([], "network must be an object"),
])
def test_bad_network_is_400_and_changes_nothing(egress_cbox, world, netns, network, fragment):
    server = egress_cbox().start()
    api = server.api
    status, body = api.post("/v1/vms", {"vmName": "bad", "network": network})
    assert status == 400 and fragment in body["error"], body
    assert api.get("/v1/vms") == (200, {"vms": []}) and "CBOX-EG-" not in chains(netns)
    vm = api.start_vm("good", network={"egress": "allowlist", "allowOut": [ALLOWED]})
    rules = netns.run("iptables", "-S", f"CBOX-EG-{vm['tapDeviceName']}").stdout
    status, body = put_network(api, "good", network)
    assert status == 400 and fragment in body["error"], body
    assert api.get("/v1/vms/good")[1]["network"] == vm["network"]
    assert netns.run("iptables", "-S", f"CBOX-EG-{vm['tapDeviceName']}").stdout == rules
    assert probe(api, "good", tcp(ALLOWED))[tcp(ALLOWED)] == f"open world {ALLOWED}"


def test_put_network_errors(egress_cbox, world):
    server = egress_cbox().start()
    api = server.api
    assert put_network(api, "nobody", {"egress": "none"})[0] == 404
    api.start_vm("v")
    status, body = put_network(api, "v", {"allowOut": []})
    assert status == 400 and "missing required field: egress" in body["error"]
    status, body = api.request("PUT", "/v1/vms/v/network", raw=b"{nope")
    assert status == 400 and "malformed JSON" in body["error"]
    assert api.request("GET", "/v1/vms/v/network")[0] == 405


def test_failed_start_and_destroy_leave_no_chain(egress_cbox, world, netns, tmp_path):
    server = egress_cbox(kernel=str(tmp_path / "missing-kernel")).start()
    status, body = server.api.post("/v1/vms", {"vmName": "broken", "network": {"egress": "none"}})
    assert status == 500, body
    server.assert_clean()
    assert "CBOX-EG-" not in chains(netns)


def test_cli_start_and_change_the_policy(egress_cbox, world, netns):
    server = egress_cbox().start()
    cli = [sys.executable, str(Path(cbox.__file__)), "--server", "http://127.0.0.1:7000"]
    r = netns.run(*cli, "vm", "start", "clivm", "--allow-out", ALLOWED, "--allow-out", "203.0.113.0/24")
    assert r.stdout.startswith("clivm RUNNING") and f"egress=allowlist,{ALLOWED}/32,203.0.113.0/24" in r.stdout, r
    assert server.api.get("/v1/vms/clivm")[1]["network"]["allowOut"] == [f"{ALLOWED}/32", "203.0.113.0/24"]
    assert netns.run(*cli, "vm", "network", "clivm", "--egress", "none").stdout == "clivm egress=none\n"
    assert probe(server.api, "clivm", tcp(ALLOWED))[tcp(ALLOWED)] == REFUSED
    r = netns.run(*cli, "vm", "network", "clivm", "--egress", "nat", "--allow-out", ALLOWED, check=False)
    assert r.returncode == 1 and "HTTP 400" in r.stderr and "only allowed with egress 'allowlist'" in r.stderr
    r = netns.run(*cli, "vm", "network", "clivm", check=False)
    assert r.returncode == 1 and "needs --egress or --allow-out" in r.stderr
    assert server.api.get("/v1/vms/clivm")[1]["network"] == {"egress": "none", "allowOut": []}


def test_guests_cannot_reach_the_host_over_ipv6(egress_cbox, world, netns):
    """The IPv4 rules do not see IPv6: the bridge has no IPv6 at all, so a guest cannot
    reach a host service listening on :: through the bridge's link-local address."""
    server = egress_cbox().start()
    api = server.api
    api.start_vm("v6")
    assert "inet6" not in netns.run("ip", "-6", "addr", "show", "dev", "cbox0").stdout
    host = socket_in_netns(netns.name, socket.AF_INET6)
    host.bind(("::", 0))
    host.listen(5)
    try:
        # the bridge's link-local address as it would be (EUI-64 of its fixed MAC 02:cb:0a:14:01:01)
        script = ("import socket, time\n"
                  "for attempt in range(5):\n"
                  "    s = socket.socket(socket.AF_INET6); s.settimeout(1)\n"
                  "    try:\n"
                  f"        s.connect(('fe80::cb:aff:fe14:101', {host.getsockname()[1]}, 0,"
                  " socket.if_nametoindex('eth0'))); print('CONNECTED'); break\n"
                  "    except OSError as e:\n"
                  "        last = type(e).__name__\n"
                  "        time.sleep(0.1)\n"
                  "else:\n"
                  "    print('failed', last)\n")
        r = api.exec("v6", "python3 -c \"$S\"", env={"S": script})
        assert r["exitCode"] == 0 and r["stdout"].startswith("failed"), r
    finally:
        host.close()


def test_a_vm_that_ends_by_itself_loses_its_chain(egress_cbox, world, netns):
    server = egress_cbox().start()
    api = server.api
    vm = api.start_vm("ends", network={"egress": "none"})
    chain = f"CBOX-EG-{vm['tapDeviceName']}"
    assert chain in chains(netns)
    [pid] = server.vmm_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: chain not in chains(netns) and not server.taps(), 10, what="the chain and tap to go")
    status, body = api.get("/v1/vms/ends")
    assert status == 200 and body["status"] == "FAILED" and body["network"] == {"egress": "none", "allowOut": []}
    status, body = put_network(api, "ends", {"egress": "nat"})
    assert status == 409 and "not running" in body["error"]
    assert chain not in chains(netns)
    assert api.delete("/v1/vms/ends")[0] == 200
    server.assert_clean()


def test_a_record_without_or_with_a_bad_policy(egress_cbox, world, netns):
    """A record of an older cbox.py (no network) keeps NAT; a policy in a record that does
    not pass the checks (its words become iptables rules) is replaced by none."""
    server = egress_cbox().start()
    api = server.api
    api.start_vm("old")
    api.start_vm("bad", network={"egress": "allowlist", "allowOut": [ALLOWED]})
    server.stop()
    for name, network in (("old", None), ("bad", {"egress": "allowlist", "allowOut": ["0.0.0.0/0 -j ACCEPT"]})):
        path = server.state_dir / "vms" / f"{name}.json"
        record = json.loads(path.read_text())
        record["network"] = network
        if network is None:
            del record["network"]
        path.write_text(json.dumps(record))
    second = egress_cbox().start()
    api = second.api
    assert api.get("/v1/vms/old")[1]["network"] == {"egress": "nat", "allowOut": []}
    assert api.get("/v1/vms/bad")[1]["network"] == {"egress": "none", "allowOut": []}
    assert "egress policy in the record is unusable" in second.log()
    assert probe(api, "old", tcp(OTHER))[tcp(OTHER)] == f"open world {OTHER}"
    assert probe(api, "bad", tcp(ALLOWED))[tcp(ALLOWED)] == REFUSED

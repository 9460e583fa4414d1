"""Metrics (GET /v1/metrics), stats (GET /v1/vms/{name}/stats) and events (events_url,
GET /v1/events): the exposition format parsed strictly, values checked after a stand-in
run (start, exec, callback, failed start), events delivered and long-polled."""
import asyncio
import hmac
import json
import math
import re
import threading
import time

import pytest

import cbox
import guest_agent


# ---- a strict parser of the Prometheus text format 0.0.4 ----------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT = re.compile(r"^[+-]?(Inf|NaN|[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?)$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class FormatError(Exception):
    pass


def parse_labels(text, pos, where):
    """Labels from text[pos] == '{' -> ({name: value}, index after '}')."""
    labels, pos = {}, pos + 1
    while True:
        if text[pos:pos + 1] == "}":
            return labels, pos + 1
        m = LABEL_NAME.match(text, pos)
        if not m or text[m.end():m.end() + 2] != '="':
            raise FormatError(f"{where}: bad label name at {text[pos:pos + 20]!r}")
        name, pos = m.group(), m.end() + 2
        value = []
        while True:
            if pos >= len(text):
                raise FormatError(f"{where}: unterminated label value")
            ch = text[pos]
            if ch == "\\":
                esc = text[pos + 1:pos + 2]
                if esc not in ("\\", '"', "n"):
                    raise FormatError(f"{where}: bad escape \\{esc} in a label value")
                value.append("\n" if esc == "n" else esc)
                pos += 2
            elif ch == '"':
                pos += 1
                break
            elif ch == "\n":
                raise FormatError(f"{where}: raw newline in a label value")
            else:
                value.append(ch)
                pos += 1
        if name in labels:
            raise FormatError(f"{where}: label {name} twice")
        labels[name] = "".join(value)
        if text[pos:pos + 1] == ",":
            pos += 1
        elif text[pos:pos + 1] != "}":
            raise FormatError(f"{where}: expected , or }} after a label")


def parse_value(text, where):
    if not FLOAT.match(text):
        raise FormatError(f"{where}: bad value {text!r}")
    return float(text)


def family_of(name, types):
    """The family a sample name belongs to (histogram samples carry suffixes)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and types.get(base) == "histogram":
            return base
    return name


def parse_exposition(text):
    """{family: {"type", "help", "samples": [(name, labels, value)]}}; FormatError on anything
    the format (or the conventions checked here) does not allow."""
    if not text.endswith("\n"):
        raise FormatError("the exposition must end with a newline")
    families, types, order, series = {}, {}, [], set()
    for lineno, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {lineno}"
        if not line:
            raise FormatError(f"{where}: empty line")
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not METRIC_NAME.fullmatch(name):
                    raise FormatError(f"{where}: bad metric name {name!r}")
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if fam["samples"]:
                    raise FormatError(f"{where}: {parts[1]} of {name} after its samples")
                if parts[1] == "TYPE":
                    if fam["type"] or len(parts) != 4 or parts[3] not in TYPES:
                        raise FormatError(f"{where}: bad or second TYPE line")
                    fam["type"] = types[name] = parts[3]
                else:
                    if fam["help"] is not None:
                        raise FormatError(f"{where}: second HELP line of {name}")
                    help_text = parts[3] if len(parts) == 4 else ""
                    if re.search(r"\\[^\\n]", help_text.replace("\\\\", "")):
                        raise FormatError(f"{where}: bad escape in HELP")
                    fam["help"] = help_text
                if not order or order[-1] != name:
                    if name in order:
                        raise FormatError(f"{where}: lines of {name} are not together")
                    order.append(name)
            continue
        m = METRIC_NAME.match(line)
        if not m:
            raise FormatError(f"{where}: bad sample line {line[:40]!r}")
        name, pos = m.group(), m.end()
        labels = {}
        if line[pos:pos + 1] == "{":
            labels, pos = parse_labels(line, pos, where)
        if line[pos:pos + 1] != " ":
            raise FormatError(f"{where}: expected a space before the value")
        rest = line[pos + 1:].split(" ")
        if len(rest) not in (1, 2) or (len(rest) == 2 and not re.fullmatch(r"-?[0-9]+", rest[1])):
            raise FormatError(f"{where}: expected 'value [timestamp]'")
        value = parse_value(rest[0], where)
        base = family_of(name, types)
        fam = families.get(base)
        if fam is None or fam["type"] is None:
            raise FormatError(f"{where}: sample of {base} before its TYPE line")
        if order[-1] != base:
            raise FormatError(f"{where}: samples of {base} are not together")
        key = (name, tuple(sorted(labels.items())))
        if key in series:
            raise FormatError(f"{where}: duplicate series {key}")
        series.add(key)
        fam["samples"].append((name, labels, value))
    for name, fam in families.items():
        check_family(name, fam)
    return families


def check_family(name, fam):
    kind = fam["type"]
    if kind is None or fam["help"] is None:
        raise FormatError(f"{name}: HELP and TYPE are both required here")
    if kind == "counter" and not name.endswith("_total"):
        raise FormatError(f"counter {name} does not end in _total")
    if kind in ("counter", "histogram") and any(v < 0 or math.isnan(v) for _, _, v in fam["samples"]):
        raise FormatError(f"{name}: negative or NaN {kind} value")
    if kind != "histogram":
        if any(s[0] != name for s in fam["samples"]):
            raise FormatError(f"{name}: a sample with another name")
        return
    groups = {}
    for sample, labels, value in fam["samples"]:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        group = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sample == name + "_bucket":
            if "le" not in labels:
                raise FormatError(f"{name}: a bucket without le")
            group["buckets"].append((parse_value(labels["le"], name), value))
        elif "le" in labels:
            raise FormatError(f"{name}: le on {sample}")
        else:
            group["sum" if sample.endswith("_sum") else "count"] = value
    for rest, group in groups.items():
        bounds = [b for b, _ in group["buckets"]]
        counts = [c for _, c in group["buckets"]]
        if not bounds or bounds[-1] != math.inf:
            raise FormatError(f"{name}{rest}: no +Inf bucket last")
        if bounds != sorted(set(bounds)):
            raise FormatError(f"{name}{rest}: bucket bounds not ascending")
        if counts != sorted(counts):
            raise FormatError(f"{name}{rest}: buckets not cumulative")
        if group["count"] is None or group["sum"] is None or counts[-1] != group["count"]:
            raise FormatError(f"{name}{rest}: +Inf bucket {counts[-1]} != _count {group['count']} (or no _sum)")


def value(families, name, **labels):
    """The value of one series (0 when absent), histogram _count/_sum by their sample name."""
    base = family_of(name, {k: v["type"] for k, v in families.items()})
    for sample, sample_labels, v in families.get(base, {"samples": []})["samples"]:
        if sample == name and sample_labels == labels:
            return v
    return 0.0


# ---- the parser and the registry, without a server ---------------------------------

GOOD = ('# HELP a_total things\n# TYPE a_total counter\na_total{x="1"} 3\na_total{x="2"} 0\n'
        '# HELP h_seconds times\n# TYPE h_seconds histogram\nh_seconds_bucket{le="0.5"} 1\n'
        'h_seconds_bucket{le="+Inf"} 2\nh_seconds_sum 1.7\nh_seconds_count 2\n')
BAD = {
    "no newline at the end": GOOD[:-1],
    "sample before TYPE": "a_total 1\n# TYPE a_total counter\n",
    "bad metric name": "# HELP 1a x\n# TYPE 1a gauge\n1a 1\n",
    "bad label escape": '# HELP g x\n# TYPE g gauge\ng{a="\\t"} 1\n',
    "unterminated label": '# HELP g x\n# TYPE g gauge\ng{a="x} 1\n',
    "duplicate series": '# HELP g x\n# TYPE g gauge\ng{a="1"} 1\ng{a="1"} 2\n',
    "bad value": "# HELP g x\n# TYPE g gauge\ng one\n",
    "counter without _total": "# HELP c x\n# TYPE c counter\nc 1\n",
    "family split": "# HELP g x\n# TYPE g gauge\ng 1\n# HELP f x\n# TYPE f gauge\nf 1\ng{a=\"b\"} 1\n",
    "buckets not cumulative": GOOD.replace('le="+Inf"} 2', 'le="+Inf"} 0').replace("count 2", "count 0"),
    "+Inf != count": GOOD.replace("h_seconds_count 2", "h_seconds_count 3"),
    "no +Inf bucket": GOOD.replace('h_seconds_bucket{le="+Inf"} 2\n', ""),
    "empty line": GOOD + "\n",
    "second TYPE": GOOD + "# TYPE a_total counter\n",
}


def test_the_parser_accepts_the_format_and_refuses_what_it_must():
    families = parse_exposition(GOOD)
    assert value(families, "a_total", x="1") == 3 and value(families, "h_seconds_count") == 2
    for what, text in BAD.items():
        with pytest.raises(FormatError):
            parse_exposition(text)
            pytest.fail(f"accepted: {what}")


def test_registry_escapes_labels_and_cumulates_buckets():
    reg = cbox.Registry()
    c = reg.counter("t_events_total", 'help with \\ and\nnewline', ("what",))
    odd = 'back\\slash "quoted"\nnewline'
    c.labels(odd).inc(2)
    c.labels("plain").inc()
    h = reg.histogram("t_seconds", "times", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):      # a value on a bound falls in that bucket (le)
        h.observe(v)
    reg.gauge("t_up", "up").value = 1
    families = parse_exposition(reg.expose().decode())
    assert value(families, "t_events_total", what=odd) == 2
    assert value(families, "t_events_total", what="plain") == 1
    assert families["t_events_total"]["help"] == "help with \\\\ and\\nnewline"
    assert [value(families, "t_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 4, 5]
    assert value(families, "t_seconds_sum") == pytest.approx(8.65) and value(families, "t_up") == 1
    with pytest.raises(ValueError):
        reg.counter("t_events_total", "again")


def test_process_metrics_parse_and_are_plausible():
    cbox.refresh_process_metrics()
    families = parse_exposition(cbox.METRICS.expose().decode())
    assert value(families, "cbox_process_resident_memory_bytes") > 1 << 20
    assert value(families, "cbox_process_open_fds") >= 3
    assert value(families, "cbox_process_start_time_seconds") <= time.time()
    assert all(name.startswith("cbox_") for name in families)


def test_guest_stats_passes_on_only_checked_fields():
    good = {"memTotalBytes": 1 << 30, "memAvailableBytes": 1 << 29, "load1": 0.5, "load5": 1, "load15": 0.0,
            "rootDisk": {"totalBytes": 10, "usedBytes": 5}, "stateDisk": None, "uptimeS": 3.5, "extra": "x" * 100}
    out = cbox.guest_stats(json.dumps(good).encode())
    assert out == {k: v for k, v in good.items() if k != "extra"}
    hostile = {"memTotalBytes": "1", "memAvailableBytes": -1, "load1": True, "load5": 1e400, "load15": 2 ** 70,
               "rootDisk": {"totalBytes": 1.5, "usedBytes": [1], "more": 1}, "stateDisk": "full", "uptimeS": None}
    out = cbox.guest_stats(json.dumps(hostile).encode().replace(b"1e400", b"Infinity"))
    assert out == {"memTotalBytes": None, "memAvailableBytes": None, "load1": None, "load5": None, "load15": None,
                   "rootDisk": {"totalBytes": None, "usedBytes": None}, "stateDisk": None, "uptimeS": None}
    for bad in (b"[1]", b"not json", b"[" * 100000 + b"]" * 100000, b'{"load1": NaN}'[:0] + b"\xff"):
        with pytest.raises(cbox.AgentError) as e:
            cbox.guest_stats(bad)
        assert e.value.status == 502


def test_agent_stats_outside_a_vm():
    stats = guest_agent.system_stats()
    assert stats["memTotalBytes"] > 0 and 0 < stats["memAvailableBytes"] <= stats["memTotalBytes"]
    assert min(stats["load1"], stats["load5"], stats["load15"]) >= 0 and stats["uptimeS"] > 0
    assert 0 < stats["rootDisk"]["usedBytes"] <= stats["rootDisk"]["totalBytes"]
    assert stats["stateDisk"] is None          # no disk with serial cbox-rootfs here: not a VM


def test_exec_fields_read_only_the_agents_keys():
    output = 'x\\"exitCode\\":99, "timedOut":true' * 3         # as the agent escapes it inside a string
    body = json.dumps({"execId": "e1", "running": False, "output": output, "stdout": output * 2000,
                       "exitCode": 3, "signal": None, "timedOut": False, "durationMs": 12.5,
                       "oomKilled": True}, separators=(",", ":")).encode()
    text = cbox.answer_text_for_fields(body)
    assert len(body) > 8192 and cbox.exec_fields(text) == {"execId": "e1", "exitCode": 3, "signal": None}
    assert not cbox.has_field(text, cbox.TIMED_OUT) and cbox.has_field(text, cbox.OOM_KILLED)
    assert cbox.has_field(text, cbox.NOT_RUNNING) and cbox.exec_duration_ms(text) == 12.5
    spaced = json.dumps({"exitCode": None, "signal": 9, "timedOut": True, "durationMs": 7}).encode()
    assert cbox.has_field(spaced, cbox.TIMED_OUT) and cbox.exec_duration_ms(spaced) == 7
    assert cbox.exec_fields(spaced) == {"exitCode": None, "signal": 9}


def test_event_log_ring_since_and_wait():
    log = cbox.EventLog(size=3)
    assert log.after(0) == ([], False, 0)
    for i in range(5):
        log.publish("exec.finished", "vm", n=i)
    events, missed, nxt = log.after(0)        # 1 and 2 left the ring
    assert [e["id"] for e in events] == [3, 4, 5] and missed and nxt == 5
    assert [e["id"] for e in log.after(3)[0]] == [4, 5] and not log.after(3)[1]
    assert log.after(5) == ([], False, 5)
    events, missed, nxt = log.after(77)       # not an id of this run: cbox.py restarted
    assert [e["id"] for e in events] == [3, 4, 5] and missed and nxt == 5
    assert set(events[0]) == {"id", "type", "vmName", "time", "n"} and events[0]["time"].endswith("Z")

    async def waiting():
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, log.publish, "vm.started", "w")
        t0 = time.monotonic()
        await log.wait(10)
        woke = time.monotonic() - t0
        await log.wait(0.05)                  # nothing published: the timeout ends it
        return woke
    assert asyncio.run(waiting()) < 5 and log.after(5)[0][0]["type"] == "vm.started" and not log.waiters


# ---- with cbox.py and the stand-in hypervisor ---------------------------------------

def scrape(api):
    status, text = api.get("/v1/metrics")
    assert status == 200, text
    return parse_exposition(text)


def callback_reply(body):
    if body["method"] == "fail":
        return 500, b"down for maintenance"
    return 200, json.dumps({"result": body["params"]}).encode()


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_metrics_and_events_of_a_run(cbox_factory, callback_server, netns):
    events_rx, cb = callback_server(), callback_server(callback_reply)
    server = cbox_factory(events_url=events_rx.url, api_token="s3cret", callback_secret="k3y").start()
    api = server.api
    status, _ = api.request("GET", "/v1/metrics", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    sock = netns.connect(("127.0.0.1", 7000))     # the content type, exactly
    sock.sendall(b"GET /v1/metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    sock.close()
    assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head
    before = scrape(api)

    api.start_vm("m1", callbackUrl=cb.url)
    assert api.exec("m1", "true")["exitCode"] == 0
    assert api.exec("m1", "exit 3")["exitCode"] == 3
    assert api.exec("m1", "sleep 10", timeout=0.5)["timedOut"] is True
    assert api.exec("m1", "head -c 300000 /dev/zero | tr '\\0' x; exit 4")["exitCode"] == 4   # a streamed answer
    r = api.exec("m1", """cbox_callback echo '{"n": 1}'; cbox_callback fail""")
    assert r["stdout"].strip() == '{"n": 1}' and "HTTP 500" in r["stderr"]
    status, bg = api.post("/v1/vms/m1/exec", {"cmd": "sleep 0.3; exit 7", "blocking": False})
    assert status == 200 and bg["running"] is True
    wait_for(lambda: api.get(f"/v1/vms/m1/exec/{bg['execId']}")[1]["running"] is False, what="background exec")
    assert api.get(f"/v1/vms/m1/exec/{bg['execId']}")[1]["exitCode"] == 7     # seen finished twice: counted once
    assert api.delete(f"/v1/vms/m1/exec/{bg['execId']}")[0] == 200

    netns.run("ip", "tuntap", "add", "dev", "cbt4", "mode", "tap")     # the next VM's tap name is taken
    status, body = api.post("/v1/vms", {"vmName": "broken"})
    assert status == 500 and "step tap" in body["error"]

    status, stats = api.get("/v1/vms/m1/stats")
    assert status == 200, stats
    guest, vmm = stats["guest"], stats["vmm"]
    assert guest["memTotalBytes"] > 0 and 0 < guest["memAvailableBytes"] <= guest["memTotalBytes"]
    assert guest["load1"] >= 0 and guest["uptimeS"] > 0 and guest["rootDisk"]["totalBytes"] > 0
    assert vmm["rssBytes"] > 1 << 20 and vmm["cpuSeconds"] > 0
    assert api.get("/v1/vms/nope/stats")[0] == 404

    after = scrape(api)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("cbox_vm_starts_total") == 2 and delta("cbox_vm_start_failures_total") == 1
    assert delta("cbox_vm_boot_seconds_count") == 1 and delta("cbox_vm_boot_seconds_sum") > 0
    assert value(after, "cbox_vms", status="RUNNING") == 1 and value(after, "cbox_vms", status="FAILED") == 0
    assert delta("cbox_execs_started_total") == 6
    assert delta("cbox_execs_finished_total") == 6 and delta("cbox_exec_duration_seconds_count") == 6
    assert delta("cbox_execs_timed_out_total") == 1 and delta("cbox_execs_oom_killed_total") == 0
    assert delta("cbox_callbacks_total", outcome="ok") == 1 and delta("cbox_callbacks_total", outcome="error") == 1
    assert delta("cbox_callback_duration_seconds_count") == 2
    assert delta("cbox_callback_bridge_events_total", event="callbacks") == 2
    exec_route = {"route": "/v1/vms/{name}/exec", "method": "POST"}
    assert delta("cbox_http_requests_total", status="200", **exec_route) == 6
    assert delta("cbox_http_requests_total", route="/v1/vms", method="POST", status="500") == 1
    assert delta("cbox_http_requests_total", route="/v1/vms/{name}/stats", method="GET", status="404") == 1
    assert value(after, "cbox_http_requests_total", route="/v1/metrics", method="GET", status="401") == 1
    assert value(after, "cbox_process_resident_memory_bytes") > 1 << 20
    assert value(after, "cbox_process_open_fds") > 3 and value(after, "cbox_process_uptime_seconds") > 0
    assert delta("cbox_events_total", type="exec.finished") == 6

    # the VM's hypervisor dies: vm.stopped; then DELETE: vm.destroyed
    record = json.loads((server.state_dir / "vms" / "m1.json").read_text())
    netns.run("kill", "-9", str(record["pid"]))
    wait_for(lambda: api.get("/v1/vms/m1")[1]["status"] == "FAILED", what="the VM to stop")
    assert api.delete("/v1/vms/m1")[0] == 200

    status, polled = api.get("/v1/events?since=0")
    assert status == 200 and polled["missed"] is False
    events = polled["events"]
    assert polled["next"] == events[-1]["id"] and [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == ["vm.started"] + ["exec.finished"] * 4 + ["callback.failed"] + \
        ["exec.finished"] * 2 + ["vm.stopped", "vm.destroyed"]
    assert all(e["vmName"] == "m1" and e["time"].endswith("Z") for e in events)
    finished = [e for e in events if e["type"] == "exec.finished"]
    assert [(e["exitCode"], e["timedOut"]) for e in finished] == [(0, False), (3, False), (None, True), (4, False),
                                                                   (1, False), (7, False)]
    assert finished[-1]["execId"] == bg["execId"] and all(e["execId"] for e in finished)
    assert all(isinstance(e["durationMs"], (int, float)) for e in finished)
    failed = next(e for e in events if e["type"] == "callback.failed")
    assert failed["method"] == "fail" and "HTTP 500" in failed["error"]
    stopped = next(e for e in events if e["type"] == "vm.stopped")
    assert stopped["stopReason"] == "killed" and stopped["status"] == "FAILED"
    assert events[-1]["stopReason"] == "killed"
    assert events[0]["ip"] == "10.20.1.2/24" and events[0]["bootMs"] > 0
    wait_for(lambda: len(events_rx.calls) == len(events), what="delivery to events_url")
    assert events_rx.calls == events          # one POST per event, in order
    ids = set()
    for (headers, raw), event in zip(events_rx.requests, events):    # signed as callbacks are
        expected = hmac.new(b"k3y", headers["X-CBox-Timestamp"].encode() + b"." + raw, "sha256").hexdigest()
        assert headers["X-CBox-Signature"] == f"sha256={expected}" and headers["X-CBox-VM"] == event["vmName"]
        ids.add(headers["X-CBox-Callback-Id"])
    assert len(ids) == len(events)
    final = scrape(api)
    assert value(final, "cbox_events_delivered_total") == len(events)
    assert value(final, "cbox_events_dropped_total") == 0 and value(final, "cbox_events_queued") == 0
    assert value(final, "cbox_vm_stops_total", reason="killed") == 1
    server.assert_clean()


def test_events_long_poll_and_bad_parameters(cbox_factory, netns):
    server = cbox_factory(events_ring_size=2).start()
    api = server.api
    for query in ("since=x", "since=-1", "wait=61", "wait=-1", "wait=nan", "wait=abc", "foo=1",
                  "since=1&since=2"):
        status, body = api.get(f"/v1/events?{query}")
        assert status == 400 and body["error"], query
    assert api.get("/v1/events") == (200, {"events": [], "next": 0, "missed": False})

    answers = []
    poll = threading.Thread(target=lambda: answers.append(api.get("/v1/events?since=0&wait=30")))
    t0 = time.monotonic()
    poll.start()
    time.sleep(0.3)
    assert not answers                          # waiting for the first event
    api.start_vm("p1")
    poll.join(30)
    status, body = answers[0]
    assert status == 200 and [e["type"] for e in body["events"]] == ["vm.started"] and body["next"] == 1
    assert time.monotonic() - t0 < 25
    t0 = time.monotonic()
    assert api.get("/v1/events?since=1&wait=0.3") == (200, {"events": [], "next": 1, "missed": False})
    assert time.monotonic() - t0 >= 0.25
    api.exec("p1", "true")
    api.exec("p1", "true")                      # 3 events, the ring keeps 2
    status, body = api.get("/v1/events?since=0")
    assert [e["id"] for e in body["events"]] == [2, 3] and body["missed"] is True and body["next"] == 3
    status, body = api.get("/v1/events?since=1000")     # an id of an earlier run of cbox.py
    assert [e["id"] for e in body["events"]] == [2, 3] and body["missed"] is True
    assert api.delete("/v1/vms/p1")[0] == 200


def test_events_url_down_is_retried_then_dropped_without_blocking(cbox_factory, callback_server, netns):
    spare = netns.listen(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()                                # nothing listens there for now
    server = cbox_factory(events_url=f"http://127.0.0.1:{port}/events", events_retry_s=1).start()
    api = server.api
    api.start_vm("d1")                           # vm.started: retried, then dropped
    assert api.exec("d1", "echo fine")["stdout"] == "fine\n"      # the API does not wait for the receiver
    wait_for(lambda: value(scrape(api), "cbox_events_dropped_total") == 2, what="the drop")
    families = scrape(api)
    assert value(families, "cbox_events_delivery_failures_total") >= 2
    assert value(families, "cbox_events_delivered_total") == 0
    assert "events_url failed; retrying" in server.log() and "events dropped" in server.log()
    rx = callback_server(listener=netns.listen(("127.0.0.1", port)))   # the receiver comes back
    api.exec("d1", "exit 5")
    wait_for(lambda: rx.calls, what="delivery after the receiver came back")
    assert [(e["type"], e["exitCode"]) for e in rx.calls] == [("exec.finished", 5)]
    assert api.delete("/v1/vms/d1")[0] == 200
    wait_for(lambda: len(rx.calls) == 2, what="vm.destroyed")
    assert value(scrape(api), "cbox_events_dropped_total") == 2


async def send_events(receiver, count, secret="", batch=1):
    """Events 1..count through an EventSender to `receiver` (an asyncio server's handler),
    until all were delivered (or 10 s); (how many were delivered, the sender's run id)."""
    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = type("Cfg", (), {"events_url": f"http://127.0.0.1:{port}/ev", "events_retry_s": 30.0,
                           "callback_timeout_s": 5.0, "callback_secret": secret, "events_batch": batch})()
    sender = cbox.EventSender(cfg)
    delivered0 = cbox.M_EVENTS_DELIVERED.value
    for i in range(1, count + 1):
        sender.put({"id": i, "type": "t", "vmName": f"v{i}"})
    for _ in range(200):
        if cbox.M_EVENTS_DELIVERED.value - delivered0 == count and not sender.queue:
            break
        await asyncio.sleep(0.05)
    await sender.finish(0)
    server.close()
    return cbox.M_EVENTS_DELIVERED.value - delivered0, sender.run_id


def test_event_sender_pipelines_and_resends_what_was_not_answered():
    """Events go out pipelined; a receiver that closes midway or answers 500 gets the rest
    again, in order (at least once), and the 500 costs one retry pause."""
    received, refused = [], set()

    async def receiver(reader, writer):
        answered = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head.lower()).group(1))
            event = json.loads(await reader.readexactly(length))
            received.append(event["id"])
            answered += 1
            if event["id"] == 4 and 4 not in refused:
                refused.add(4)
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            elif len(received) == 2:        # the first connection ends after two answers
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    delivered, _ = asyncio.run(send_events(receiver, 6))
    assert delivered == 6
    first = [i for n, i in enumerate(received) if i not in received[:n]]
    assert first == [1, 2, 3, 4, 5, 6] and received.count(4) == 2 and received[:2] == [1, 2]
    assert set(received) == set(range(1, 7))


def test_event_sender_batches_signs_and_resends_whole_batches():
    """events_batch 3: {"events": [...]} bodies of up to 3 events, in order, signed, an id
    naming the first and last event and no X-CBox-VM; a refused batch goes again whole."""
    bodies, refused = [], []

    async def receiver(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if line)
            body = await reader.readexactly(int(headers["Content-Length"]))
            ids = [e["id"] for e in json.loads(body)["events"]]
            bodies.append((ids, headers, body))
            if 4 in ids and not refused:
                refused.append(ids)
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    delivered, run_id = asyncio.run(send_events(receiver, 10, secret="s3cret", batch=3))
    assert delivered == 10
    assert [ids for ids, _, _ in bodies] == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10], [4, 5, 6], [7, 8, 9], [10]]
    assert refused == [[4, 5, 6]]
    for ids, headers, body in bodies:
        assert "X-CBox-VM" not in headers
        assert headers["X-CBox-Callback-Id"] == f"{run_id}-{ids[0]}-{ids[-1]}"
        signed = headers["X-CBox-Timestamp"].encode() + b"." + body
        assert headers["X-CBox-Signature"] == "sha256=" + hmac.new(b"s3cret", signed, "sha256").hexdigest()


def test_events_of_destroy_on_exit_go_out_before_cbox_stops(cbox_factory, callback_server):
    rx = callback_server()
    server = cbox_factory(events_url=rx.url, destroy_on_exit=True).start()
    server.api.start_vm("last")
    server.stop()                                # SIGTERM: destroys the VM, then stops
    assert [(e["type"], e["vmName"]) for e in rx.calls] == [("vm.started", "last"), ("vm.destroyed", "last")]
    server.assert_clean()

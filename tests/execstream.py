"""A client of the guest agent's exec API v2 (stdlib only), for tests over any socket.

    api = AgentApi(connect)          # connect(): a connected TCP socket to the agent
    status, body = api.request("POST", "/exec", {...})
    with api.stream(exec_id, since=0) as s:   # GET /exec/{id}/stream
        for event in s: ...                  # dicts, one per NDJSON line
"""
import http.client
import json


class EventStream:
    """An open GET /exec/{id}/stream response: iterate for events, close() to disconnect."""

    def __init__(self, conn, response):
        self.conn, self.response = conn, response
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.error = None
        if self.status != 200:
            self.error = json.loads(response.read())
        self.ended = False           # the chunked body ended (terminating chunk read)

    def __iter__(self):
        for line in iter(self.response.readline, b""):
            yield json.loads(line)
        self.ended = True

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AgentApi:
    def __init__(self, connect, timeout=60.0):
        self.connect = connect
        self.timeout = timeout

    def _connection(self, timeout):
        conn = http.client.HTTPConnection("agent", timeout=timeout)
        conn.sock = self.connect()
        conn.sock.settimeout(timeout)
        return conn

    def request(self, method, path, body=None, timeout=None):
        conn = self._connection(timeout or self.timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def exec(self, **fields):
        status, result = self.request("POST", "/exec", fields)
        assert status == 200, result
        return result

    def stream(self, exec_id, since=None, timeout=None):
        conn = self._connection(timeout or self.timeout)
        path = f"/exec/{exec_id}/stream" + ("" if since is None else f"?since={since}")
        conn.request("GET", path)
        return EventStream(conn, conn.getresponse())

    def events(self, exec_id, since=None, timeout=None):
        """Every event of a stream until it ends (the exec ended)."""
        with self.stream(exec_id, since, timeout) as s:
            assert s.status == 200, s.error
            events = list(s)
            assert s.ended
            return events


def check_sequence(events, first=0):
    """seq grows by one from `first`, a "dropped" event standing in for the `missed`
    events fromSeq..seq; exactly one exit event, the last. Returns the events missed."""
    expected, missed = first, 0
    for e in events:
        if e["type"] == "dropped":
            assert e["fromSeq"] == expected and e["seq"] == expected + e["missed"] - 1 and e["missed"] > 0, e
            missed += e["missed"]
        else:
            assert e["seq"] == expected, (e, expected)
        expected = e["seq"] + 1
    assert [e["type"] for e in events].count("exit") == 1 and events[-1]["type"] == "exit", events[-3:]
    return missed


def joined(events, kind):
    """The bytes of every `kind` (stdout/stderr) event, raw bytes where the event carries them."""
    import base64
    out = b""
    for e in events:
        if e["type"] == kind:
            out += base64.b64decode(e["dataBase64"]) if "dataBase64" in e else e["data"].encode()
    return out

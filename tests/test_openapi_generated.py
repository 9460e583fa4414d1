"""The API document is exact: requests generated from GET /v1/openapi.json (a small stdlib
generator with a fixed seed, nothing hand-picked) sent to a stand-in server (cbox.py's
RestServer with a stand-in VM manager that knows one running VM, "v1") are accepted (2xx) or
refused with a 4xx the operation's document lists, for a reason it states: a 404 for a VM
the stand-in does not know, a 400 only for a rule the document keeps in prose (an
"x-check": its description says it) on a value the request carries. Never a 5xx; a method
the document does not list for a path is answered 405 with the Allow header (RFC 9110).

No network: each request goes over a socketpair to the server's connection handler."""
import asyncio
import json
import random
import re
import socket
import types
import urllib.parse

try:
    import re._parser as sre_parse        # Python 3.11+
except ImportError:                       # Python 3.10
    import sre_parse

import pytest

import cbox

SEED = 21
REQUESTS_PER_OPERATION = 120
KNOWN_VM = "v1"
KNOWN = {"name": KNOWN_VM, "image": "default"}     # path parameters naming what the stand-in has
PRINTABLE = [chr(c) for c in range(0x20, 0x7f)] + ["é", "ü", "漢", "\u00a0", "\n", "\t", "\x00", "\u200b"]


def write_config(tmp_path, lines):
    path = tmp_path / "config.yaml"
    path.write_text("hostservices:\n  restserver:\n" + "".join(f"    {line}\n" for line in lines))
    return path


# ---- values from a schema ----------------------------------------------------------------------

class Generator:
    """Values a schema of the document allows, by its standard keywords only (x-check is prose:
    a generated value may break it; `touched` collects the x-checks a request's values met)."""

    def __init__(self, document, rng):
        self.document, self.rng = document, rng
        self.touched = []

    def resolve(self, schema):
        while "$ref" in schema:
            node = self.document
            for part in schema["$ref"][2:].split("/"):
                node = node[part]
            schema = node
        return schema

    def value(self, schema, name="", depth=0):
        schema = self.resolve(schema)
        if "x-check" in schema:
            self.touched.append((name, schema["x-check"]))
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema and not all(set(s) == {"required"} for s in schema[keyword]):
                branch = self.resolve(self.rng.choice(schema[keyword]))
                rest = {k: v for k, v in schema.items() if k != keyword}
                return self.value(both(rest, branch), name, depth)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        kinds = schema.get("type", ["null", "boolean", "integer", "string"])
        kind = self.rng.choice(kinds if isinstance(kinds, list) else [kinds])
        return getattr(self, kind)(schema, name, depth)

    def null(self, schema, name, depth):
        return None

    def boolean(self, schema, name, depth):
        return self.rng.random() < 0.5

    def integer(self, schema, name, depth):
        low = schema.get("minimum", -2 ** 31)
        high = schema.get("maximum", 2 ** 31)
        value = self.rng.choice([low, high, self.rng.randint(low, high), self.rng.randint(low, min(high, low + 10))])
        return float(value) if self.rng.random() < 0.2 and abs(value) < 2 ** 53 else value   # 430.0 is an integer

    def number(self, schema, name, depth):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1e6))
        high = schema.get("maximum", 1e6)
        candidates = [high, self.rng.uniform(low, high), low + 1.29e-69, low + 1e-9 * (high - low)]
        if "exclusiveMinimum" not in schema:
            candidates.append(low)
        value = self.rng.choice(candidates)
        return int(value) if self.rng.random() < 0.2 and float(int(value)) == value and value > low else value

    def string(self, schema, name, depth):
        shortest, longest = schema.get("minLength", 0), min(schema.get("maxLength", 24), 24)
        for _ in range(50):
            if "pattern" in schema:
                text = regex_text(schema["pattern"], self.rng)
            else:
                text = "".join(self.rng.choice(PRINTABLE) for _ in range(self.rng.randint(shortest, max(shortest, longest))))
            if shortest <= len(text) <= schema.get("maxLength", len(text)):
                return text
        pytest.fail(f"no string found for {schema}")

    def array(self, schema, name, depth):
        prefix = schema.get("prefixItems", [])
        fewest, most = schema.get("minItems", 0), min(schema.get("maxItems", 4), 4)
        count = self.rng.randint(fewest, max(fewest, most))
        return [self.value(prefix[i] if i < len(prefix) else schema.get("items", {}), f"{name}[{i}]", depth + 1)
                for i in range(count)]

    def object(self, schema, name, depth):
        properties = schema.get("properties", {})
        required = list(schema.get("required", []))
        for keyword in ("oneOf", "anyOf"):        # branches that only require fields: pick one
            if keyword in schema and all(set(s) == {"required"} for s in schema[keyword]):
                chosen = self.rng.choice(schema[keyword])["required"]
                required += chosen
                others = {k for s in schema[keyword] for k in s["required"]} - set(chosen)
                properties = {k: v for k, v in properties.items() if k not in others or keyword == "anyOf"}
        keys = required + [k for k in properties if k not in required and self.rng.random() < 0.4]
        out = {key: self.value(properties.get(key, {}), f"{name}.{key}" if name else key, depth + 1) for key in keys}
        self.dependent(out, schema.get("dependentSchemas", {}), properties, name, depth)
        extra = schema.get("additionalProperties", True)
        if isinstance(extra, dict) and depth < 4:
            names = schema.get("propertyNames", {"type": "string", "minLength": 1})
            most = min(schema.get("maxProperties", 3), 3)
            for _ in range(self.rng.randint(schema.get("minProperties", 0), most)):
                key = self.string(self.resolve(names), name, depth)
                out[key] = self.value(extra, f"{name}.{key}" if name else key, depth + 1)
                if "x-check" in names:
                    self.touched.append((name, names["x-check"]))
        return out


    def dependent(self, out, rules, properties, name, depth):
        """dependentSchemas: each key the object has makes it fit that key's schema too (its
        required keys added, its properties narrowed; an anyOf's branch chosen among those that
        leave alone what an earlier rule fixed)."""
        fixed = set()
        for key, rule in sorted(rules.items(), key=lambda item: "anyOf" in item[1]):
            if key not in out:
                continue
            rule = self.resolve(rule)
            if "anyOf" in rule:
                free = [b for b in map(self.resolve, rule["anyOf"]) if not set(b.get("properties", {})) & fixed]
                rule = both({k: v for k, v in rule.items() if k != "anyOf"}, self.rng.choice(free or rule["anyOf"]))
            narrowed = rule.get("properties", {})
            for field in list(rule.get("required", [])) + [f for f in narrowed if f in out]:
                if field not in fixed:
                    label = f"{name}.{field}" if name else field
                    out[field] = self.value(both(properties.get(field, {}), narrowed.get(field, {})), label, depth + 1)
                    fixed.add(field)


def both(schema, branch):
    """A schema of the values both allow (the branch narrows: its keywords win, properties merge)."""
    out = dict(schema)
    for key, value in branch.items():
        if key == "properties":
            out[key] = {name: both(schema.get(key, {}).get(name, {}), value.get(name, {}))
                        for name in {**schema.get(key, {}), **value}}
        elif key == "required":
            out[key] = list(dict.fromkeys(schema.get(key, []) + value))
        elif key == "type" and "type" in schema:
            kinds = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
            out[key] = [kind for kind in ([value] if isinstance(value, str) else value) if kind in kinds]
        else:
            out[key] = value
    return out


def regex_text(pattern, rng):
    """A text the (ECMA-262 common subset) pattern matches: made from its parse tree."""
    return "".join(parsed_text(sre_parse.parse(pattern), rng))


def parsed_text(items, rng):
    out = []
    for op, arg in items:
        kind = op.name
        if kind == "LITERAL":
            out.append(chr(arg))
        elif kind in ("NOT_LITERAL", "ANY", "IN"):
            out.append(class_char([(op, arg)] if kind != "IN" else arg, rng))
        elif kind in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, sub = arg
            for _ in range(rng.randint(low, min(high, low + 6))):
                out += parsed_text(sub, rng)
        elif kind == "SUBPATTERN":
            out += parsed_text(arg[-1], rng)
        elif kind == "BRANCH":
            out += parsed_text(rng.choice(arg[1]), rng)
        elif kind != "AT":             # anchors make no text
            raise AssertionError(f"pattern element {kind} is not generated")
    return out


CATEGORIES = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
              "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W"}


def class_char(items, rng):
    """A character of a class (its parse: literals, ranges, categories, negated or not)."""
    candidates = list(PRINTABLE) + [chr(arg) for op, arg in items if op.name in ("LITERAL", "NOT_LITERAL")]
    candidates += [chr(rng.randint(*arg)) for op, arg in items if op.name == "RANGE" for _ in range(8)]
    for _ in range(1000):
        char = rng.choice(candidates)
        if in_class(items, char):
            return char
    raise AssertionError(f"no character found for class {items}")


def in_class(items, char):
    hit, negate = False, False
    for op, arg in items:
        kind = op.name
        if kind == "NEGATE":
            negate = True
        elif kind == "LITERAL":
            hit |= ord(char) == arg
        elif kind == "NOT_LITERAL":
            hit |= ord(char) != arg
        elif kind == "ANY":
            hit |= char != "\n"
        elif kind == "RANGE":
            hit |= arg[0] <= ord(char) <= arg[1]
        elif kind == "CATEGORY":
            hit |= re.fullmatch(CATEGORIES[arg.name], char) is not None
        else:
            raise AssertionError(f"class element {kind} is not generated")
    return hit != negate


# ---- the stand-in server -------------------------------------------------------------------------

class StandInEvents:
    """An exec's event stream as EventRelay reads it: one stdout event, then the exit."""

    def __init__(self, vm_name, exec_id="e1"):
        self.vm_name, self.exec_id, self.next_seq, self.finished = vm_name, exec_id, 0, False

    async def next_events(self):
        self.finished, self.next_seq = True, 2
        events = [{"seq": 0, "type": "stdout", "data": "hi\n"}, {"seq": 1, "type": "exit", "exitCode": 0}]
        return [(json.dumps(event).encode() + b"\n", event) for event in events]

    async def result(self, timeout):
        return json.dumps({"execId": self.exec_id, "running": False, "exitCode": 0, "output": "hi\n"}).encode()

    def close(self):
        pass


class StandInVM:
    def __init__(self, name, **fields):
        self.fields = {"vmName": name, "status": "RUNNING", "image": "default", **fields}
        self.status, self.labels, self.image = "RUNNING", fields.get("labels", {}), self.fields["image"]
        self.vmName = name

    def api(self):
        return self.fields


class StandInManager:
    """The VM manager's homes RestServer calls (registry, starter, egress, deadlines, teardown,
    execs, pool, failed starts), answering as the real ones do for one running VM (KNOWN_VM);
    any other VM is unknown (404)."""

    def __init__(self, cfg):
        self.vms = {KNOWN_VM: StandInVM(KNOWN_VM)}
        self.registry = self.starter = self.egress = self.deadlines = self.teardown = self.execs = self
        self.pool = self.failed_starts = self
        no_pool = types.SimpleNamespace(vms=lambda: [], sizes={})
        self.images = cbox.ImageKeeper(cbox.Images(cfg), self, no_pool)   # the real one: "default" only

    # the registry, the pool and the failed starts
    def get(self, name):
        if name not in self.vms:
            raise cbox.ApiError(404, f"VM '{name}' not found")
        return self.vms[name]

    def select(self, matches):
        return [vm for vm in self.vms.values() if matches(vm)]

    @staticmethod
    def state():
        return {"size": 0, "ready": 0, "booting": 0, "lastError": None}

    @staticmethod
    def listing():
        return []

    # starter, egress, deadlines, teardown
    async def start(self, spec):
        return StandInVM(spec["vmName"], network=spec["network"], labels=spec["labels"], image=spec["image"])

    async def set(self, name, policy):
        return self.get(name)

    def set_ttl(self, name, ttl):
        return self.get(name)

    async def destroy(self, name):
        self.get(name)

    async def destroy_all(self, matches):
        return []

    # execs
    async def exec(self, name, body, blocking, timeout, stream):
        self.get(name)
        if stream:
            return StandInEvents(name)
        return json.dumps({"execId": "e1", "running": not blocking, "exitCode": 0}).encode()

    async def events(self, name, exec_id, since):
        self.get(name)
        return StandInEvents(name, exec_id)

    async def status(self, name, exec_id):
        self.get(name)
        return {"execId": exec_id, "running": False}

    async def kill(self, name, exec_id, grace):
        return await self.status(name, exec_id)

    async def kill_all(self, name, grace):
        self.get(name)
        return {"killed": []}

    async def list(self, name):
        self.get(name)
        return {"execs": []}

    async def signal(self, name, exec_id, body):
        self.get(name)
        return {"execId": exec_id, "signal": body["signal"]}

    async def stdin(self, name, exec_id, body):
        self.get(name)
        return {"written": len(body["data"])}

    def console_text(self, name):
        self.get(name)
        return b"console\n"

    async def stats(self, name):
        self.get(name)
        return {"guest": {}, "vmm": {"rssBytes": None, "cpuSeconds": None}}


async def exchange(server, raw):
    """One request over a socketpair to the server's connection handler -> the raw answer."""
    ours, theirs = socket.socketpair()
    server_side = asyncio.ensure_future(server.connection(*await asyncio.open_connection(sock=theirs)))
    reader, writer = await asyncio.open_connection(sock=ours)
    writer.write(raw)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    if not answer.startswith(b"HTTP/1.1 101 "):     # a WebSocket stays open: its head is the answer
        length = re.search(rb"\r\ncontent-length: *([0-9]+)", answer, re.I)
        answer += await asyncio.wait_for(reader.readexactly(int(length.group(1))) if length else reader.read(), 30)
    writer.close()
    await asyncio.wait_for(server_side, 30)
    return answer


def parse_answer(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# ---- requests from the document ------------------------------------------------------------------

def generated_request(document, path, method, operation, rng):
    """(raw request, x-checks its values met, whether it names a VM the stand-in knows)."""
    gen = Generator(document, rng)
    params = operation.get("parameters", [])
    target, known = path, True
    for param in params:
        if param["in"] == "path":
            value = KNOWN[param["name"]] if param["name"] in KNOWN and rng.random() < 0.7 \
                else gen.value(param["schema"], param["name"])
            known &= param["name"] not in KNOWN or value == KNOWN[param["name"]]
            target = target.replace("{%s}" % param["name"], urllib.parse.quote(str(value), safe=""))
    query = []
    for param in params:
        if param["in"] == "query" and rng.random() < 0.6:
            value = gen.value(param["schema"], param["name"])
            for item in value if isinstance(value, list) else [value]:
                query.append((param["name"], item if isinstance(item, str) else json.dumps(item)))
    if query:
        target += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    named = {param["name"]: gen.value(param["schema"], param["name"]) for param in params if param["in"] == "header"}
    headers = "".join(f"{key}: {value}\r\n" for key, value in {"Connection": "close", **named}.items())
    body = b""
    if "requestBody" in operation:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        body = json.dumps(gen.value(schema)).encode()
    raw = (f"{method.upper()} {target} HTTP/1.1\r\nHost: cbox\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body
    return raw, gen.touched, known


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    async def no_wait(seconds):           # GET /v1/events?wait=: no event comes in the stand-in
        pass
    monkeypatch.setattr(cbox.EVENTS, "wait", no_wait)
    cfg = cbox.load_config(write_config(tmp_path, ["firewall: true", "max_ttl_s: 86400", f"state_dir: {tmp_path}"]))
    server = cbox.RestServer(cfg, StandInManager(cfg))
    return server, cbox.openapi_document(cfg, server.routes)


def test_generated_requests_get_answers_the_document_states(stand_in):
    server, document = stand_in
    rng = random.Random(SEED)
    outcomes, problems = {}, []

    async def run():
        for path, item in document["paths"].items():
            for method, operation in item.items():
                for _ in range(REQUESTS_PER_OPERATION):
                    raw, touched, known = generated_request(document, path, method, operation, rng)
                    status, headers, body = parse_answer(await exchange(server, raw))
                    outcomes[status] = outcomes.get(status, 0) + 1
                    problem = judge(status, body, operation, touched, known)
                    if problem:
                        problems.append(f"{raw[:300]!r} -> {status} {body[:300]!r}: {problem}")

    asyncio.run(run())
    print("\nanswers by status:", dict(sorted(outcomes.items())))
    assert not problems, f"{len(problems)} answers the document does not state:\n" + "\n".join(problems[:15])
    assert sum(n for status, n in outcomes.items() if status < 300) > 0.7 * sum(outcomes.values()), outcomes


def judge(status, body, operation, touched, known):
    """Why an answer is not one the document states for a request it allows (None: it is)."""
    if status < 300:
        return None
    if status >= 500:
        return "a 5xx"
    if str(status) not in operation["responses"]:
        return f"{status} is not among the operation's responses"
    if status == 404 and not known:
        return None
    if status == 409 and "never" in operation["summary"]:
        return None                     # a state the summary names: DELETE /v1/images/default ("default" never)
    if status == 400 and any(part in json.loads(body)["error"] for name, _ in touched
                             for part in re.sub(r"\[[0-9]+\]", "", name).split(".") if part):
        return None                     # a rule the document states in prose (x-check's description)
    return "refused, yet the document allows it"


def test_methods_the_document_does_not_list_are_405_with_allow(stand_in):
    server, document = stand_in
    for path, item in document["paths"].items():
        target = path.replace("{name}", KNOWN_VM).replace("{exec_id}", "e1")
        listed = {method.upper() for method in item}
        for method in {"GET", "POST", "PUT", "DELETE", "PATCH"} - listed:
            raw = f"{method} {target} HTTP/1.1\r\nHost: cbox\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            status, headers, _ = parse_answer(asyncio.run(exchange(server, raw)))
            assert status == 405, (method, path, status)
            assert set(headers.get("Allow", "").split(", ")) == listed, (method, path, headers)

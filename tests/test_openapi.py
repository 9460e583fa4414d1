"""GET /v1/openapi.json: the OpenAPI 3.1 description made from cbox.py's route and schema
tables. The document is checked structurally (a small strict checker of the parts it uses),
every route the server answers is in it and every operation in it is answered, real
answers of a stand-in server validate against its response schemas (a minimal JSON
Schema validator of the subset it uses, itself tested on failing cases), and requests the
document calls invalid are refused with 400.

Everything live runs inside a network namespace created per test (contract section 5).
"""
import copy
import http.client
import json
import re

import pytest

import cbox
from procutil import wait_for


def write_config(tmp_path, lines):
    path = tmp_path / "config.yaml"
    path.write_text("hostservices:\n  restserver:\n" + "".join(f"    {line}\n" for line in lines))
    return path


# ---- a minimal JSON Schema (2020-12) validator for the subset the document uses ------------------

ANNOTATIONS = {"description", "default", "format", "title", "examples", "x-check"}
TYPES = {"null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool),
         "integer": lambda v: not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and v.is_integer()),
         "number": lambda v: not isinstance(v, bool) and isinstance(v, (int, float)),
         "string": lambda v: isinstance(v, str), "array": lambda v: isinstance(v, list),
         "object": lambda v: isinstance(v, dict)}


class Invalid(Exception):
    pass


def ecma_regex(pattern):
    """An ECMA-262 pattern of the common subset as a Python regex: '$' is the end of the text
    (Python's would also match before a final newline). Python-only syntax is refused."""
    for python_only in ("\\Z", "\\A", "(?P", "(?<", "(?i", "\\h"):
        if python_only in pattern:
            raise Invalid(f"pattern {pattern!r} uses {python_only!r}, which is not ECMA-262")
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


def resolve(ref, root):
    if not ref.startswith("#/"):
        raise Invalid(f"$ref {ref!r} is not local")
    node = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            raise Invalid(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node


def validate(value, schema, root, at="$"):
    """Raise Invalid naming the first place where `value` does not fit `schema`."""
    def fail(msg):
        raise Invalid(f"{at}: {msg} (value {json.dumps(value)[:80]})")

    if not isinstance(schema, dict):
        raise Invalid(f"{at}: schema is no object")
    known = ANNOTATIONS | {"$ref", "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "minLength",
                           "maxLength", "pattern", "items", "prefixItems", "minItems", "maxItems", "properties",
                           "required", "additionalProperties", "propertyNames", "maxProperties", "anyOf", "oneOf",
                           "allOf", "dependentSchemas"}
    unknown = set(schema) - known
    if unknown:
        raise Invalid(f"{at}: unknown schema keyword(s) {sorted(unknown)}")
    if "$ref" in schema:
        validate(value, resolve(schema["$ref"], root), root, at)
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(TYPES[t](value) for t in types):
            fail(f"not of type {types}")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        fail(f"not one of {schema['enum']}")
    if "const" in schema and not (value == schema["const"] and type(value) is type(schema["const"])):
        fail(f"not {schema['const']!r}")
    for keyword, n_ok in (("anyOf", lambda n, k: n >= 1), ("oneOf", lambda n, k: n == 1),
                          ("allOf", lambda n, k: n == k)):
        if keyword in schema:
            passed = 0
            for sub in schema[keyword]:
                try:
                    validate(value, sub, root, at)
                    passed += 1
                except Invalid:
                    pass
            if not n_ok(passed, len(schema[keyword])):
                fail(f"{passed} of {len(schema[keyword])} {keyword} branches fit")
    if TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            fail(f"below {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            fail(f"not above {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            fail(f"above {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            fail("length out of range")
        if "pattern" in schema and not ecma_regex(schema["pattern"]).search(value):
            fail(f"does not match {schema['pattern']!r}")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            fail("item count out of range")
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if sub is not None:
                validate(item, sub, root, f"{at}[{i}]")
    if isinstance(value, dict):
        for key, sub in schema.get("dependentSchemas", {}).items():
            if key in value:
                validate(value, sub, root, at)
        if len(value) > schema.get("maxProperties", len(value)):
            fail("too many properties")
        for key in schema.get("required", []):
            if key not in value:
                fail(f"missing required {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if "propertyNames" in schema:
                validate(key, schema["propertyNames"], root, f"{at}.{key}(name)")
            if key in props:
                validate(item, props[key], root, f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                fail(f"property {key!r} is not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(item, schema["additionalProperties"], root, f"{at}.{key}")


def fits(value, schema, root):
    try:
        validate(value, schema, root)
        return True
    except Invalid:
        return False


@pytest.mark.parametrize("value, schema", [
    ("x", {"type": "integer"}),
    (True, {"type": "integer"}),
    (1.5, {"type": ["integer", "null"]}),
    ({}, {"type": "object", "required": ["a"]}),
    ({"a": 1, "b": 2}, {"type": "object", "properties": {"a": {}}, "additionalProperties": False}),
    ({"a": "x"}, {"additionalProperties": {"type": "integer"}}),
    ({"bad key": "x"}, {"propertyNames": {"pattern": "^[a-z]+$"}}),
    ("name\n", {"pattern": "^[a-z]+$"}),
    (0, {"minimum": 1}), (5, {"maximum": 4}), (0, {"exclusiveMinimum": 0}),
    ("c", {"enum": ["a", "b"]}), (1, {"enum": [True]}), (False, {"const": 0}),
    ("", {"minLength": 1}), ("abc", {"maxLength": 2}),
    ([1, "x"], {"items": {"type": "integer"}}), (["", "x"], {"prefixItems": [{"minLength": 1}]}),
    ([], {"minItems": 1}), ([1, 2], {"maxItems": 1}), ({"a": 1, "b": 1}, {"maxProperties": 1}),
    ("x", {"anyOf": [{"type": "integer"}, {"type": "null"}]}),
    (1, {"oneOf": [{"type": "integer"}, {"type": "number"}]}),
    ("", {"allOf": [{"type": "string"}, {"minLength": 1}]}),
    ({"a": 1}, {"dependentSchemas": {"a": {"required": ["b"]}}}),
    ({"a": "x"}, {"$ref": "#/defs/A", "unused": 1}),
    ({"a": "x"}, {"$ref": "#/defs/A"}),
    ({"a": 1}, {"$ref": "#/defs/missing"}),
    ("x", {"pattern": "x\\Z"}),
])
def test_the_validator_can_fail(value, schema):
    root = {"defs": {"A": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    with pytest.raises(Invalid):
        validate(value, schema, root)


def test_the_validator_accepts():
    root = {"defs": {"A": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    for value, schema in [(1, {"type": "integer"}), (1.0, {"type": "integer"}), (None, {"type": ["string", "null"]}),
                          ({"a": 2}, {"$ref": "#/defs/A"}), ("ab", {"pattern": "^[a-z]+$"}),
                          ("x", {"anyOf": [{"type": "integer"}, {"type": "string"}]}), ([], {"items": {}}),
                          ({"k": "v"}, {"additionalProperties": {"type": "string"}, "propertyNames": {"minLength": 1}})]:
        validate(value, schema, root)


# ---- a strict structural checker of the OpenAPI 3.1 parts the document uses ---------------------

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def openapi_problems(doc):
    """What is wrong with `doc` as an OpenAPI 3.1.0 document (the parts cbox.py uses)."""
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    def check_keys(obj, allowed, required, where):
        if not isinstance(obj, dict):
            problems.append(f"{where}: not an object")
            return False
        extra = {k for k in obj if not k.startswith("x-")} - set(allowed)
        need(not extra, f"{where}: unknown field(s) {sorted(extra)}")
        need(set(required) <= set(obj), f"{where}: missing {sorted(set(required) - set(obj))}")
        return True

    def check_schema_object(schema, where):
        try:
            validate(None, {"anyOf": [schema, {}]}, doc, where)    # runs the keyword check on every branch it reaches
        except Invalid as e:
            problems.append(f"{where}: {e}")
        walk_schema(schema, where)

    def walk_schema(schema, where):
        if not isinstance(schema, dict):
            problems.append(f"{where}: schema is no object")
            return
        bad = set(schema) - (ANNOTATIONS | {"$ref", "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
                                            "minLength", "maxLength", "pattern", "items", "prefixItems", "minItems",
                                            "maxItems", "properties", "required", "additionalProperties",
                                            "propertyNames", "maxProperties", "anyOf", "oneOf", "allOf",
                                            "dependentSchemas"})
        need(not bad, f"{where}: unknown schema keyword(s) {sorted(bad)}")
        if "$ref" in schema:
            try:
                resolve(schema["$ref"], doc)
            except Invalid as e:
                problems.append(f"{where}: {e}")
        if "type" in schema:
            types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
            need(all(t in TYPES for t in types) and len(set(types)) == len(types), f"{where}: bad type {types}")
        if "pattern" in schema:
            try:
                ecma_regex(schema["pattern"])
            except (Invalid, re.error) as e:
                problems.append(f"{where}: {e}")
        if "required" in schema:
            need(isinstance(schema["required"], list) and schema["required"]
                 and all(isinstance(r, str) for r in schema["required"]), f"{where}: bad required")
        if "enum" in schema:
            need(isinstance(schema["enum"], list) and schema["enum"], f"{where}: bad enum")
        for key in ("items", "additionalProperties", "propertyNames"):
            if isinstance(schema.get(key), dict):
                walk_schema(schema[key], f"{where}.{key}")
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for i, sub in enumerate(schema.get(key, [])):
                walk_schema(sub, f"{where}.{key}[{i}]")
        for key, sub in schema.get("properties", {}).items():
            walk_schema(sub, f"{where}.properties.{key}")
        for key, sub in schema.get("dependentSchemas", {}).items():
            walk_schema(sub, f"{where}.dependentSchemas.{key}")

    if not check_keys(doc, ("openapi", "info", "servers", "paths", "components", "security"), ("openapi", "info", "paths"), "$"):
        return problems
    need(doc["openapi"] == "3.1.0", "openapi is not 3.1.0")
    if check_keys(doc["info"], ("title", "version", "description"), ("title", "version"), "info"):
        need(all(isinstance(doc["info"][k], str) for k in doc["info"]), "info: fields must be strings")
    for i, server in enumerate(doc.get("servers", [])):
        if check_keys(server, ("url", "description"), ("url",), f"servers[{i}]"):
            need(re.match(r"^https?://[^/]+$", server["url"]), f"servers[{i}]: bad url")
    components = doc.get("components", {})
    check_keys(components, ("schemas", "securitySchemes"), (), "components")
    for name, schema in components.get("schemas", {}).items():
        need(re.match(r"^[A-Za-z0-9._-]+$", name), f"components.schemas: bad name {name!r}")
        walk_schema(schema, f"components.schemas.{name}")
    for name, scheme in components.get("securitySchemes", {}).items():
        if check_keys(scheme, ("type", "scheme", "description", "bearerFormat"), ("type",), f"securitySchemes.{name}"):
            need(scheme["type"] == "http" and scheme.get("scheme") == "bearer", f"securitySchemes.{name}: not http bearer")

    def check_security(requirements, where):
        need(isinstance(requirements, list), f"{where}: security must be a list")
        for req in requirements if isinstance(requirements, list) else []:
            for name, scopes in req.items():
                need(name in components.get("securitySchemes", {}) and scopes == [], f"{where}: bad security {req}")

    if "security" in doc:
        check_security(doc["security"], "security")
    operation_ids = set()
    for path, item in doc["paths"].items():
        need(path.startswith("/") and "\\" not in path, f"paths: bad path {path!r}")
        template = re.findall(r"{(\w+)}", path)
        need(set(item) <= METHODS and item, f"{path}: bad path item fields {sorted(item)}")
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            if not check_keys(op, ("operationId", "summary", "description", "parameters", "requestBody", "responses",
                                   "security", "tags"), ("operationId", "responses"), where):
                continue
            need(isinstance(op["operationId"], str) and op["operationId"] not in operation_ids,
                 f"{where}: operationId missing or not unique")
            operation_ids.add(op.get("operationId"))
            seen = set()
            for param in op.get("parameters", []):
                if not check_keys(param, ("name", "in", "required", "schema", "description", "style", "explode"),
                                  ("name", "in", "schema"), f"{where} parameter"):
                    continue
                need((param["name"], param["in"]) not in seen, f"{where}: parameter {param['name']} twice")
                seen.add((param["name"], param["in"]))
                need(param["in"] in ("path", "query", "header"), f"{where}: parameter in {param['in']}")
                need(param["in"] != "header" or param["name"].lower() not in ("accept", "content-type", "authorization"),
                     f"{where}: header {param['name']} is one OpenAPI ignores as a parameter")
                if param["in"] == "path":
                    need(param.get("required") is True and param["name"] in template,
                         f"{where}: path parameter {param['name']} not required or not in the path")
                check_schema_object(param["schema"], f"{where} parameter {param['name']}")
            need({n for n, place in seen if place == "path"} == set(template), f"{where}: path parameters undeclared")
            if "requestBody" in op and check_keys(op["requestBody"], ("required", "content", "description"),
                                                  ("content",), f"{where} requestBody"):
                for media, content in op["requestBody"]["content"].items():
                    if check_keys(content, ("schema",), ("schema",), f"{where} requestBody {media}"):
                        check_schema_object(content["schema"], f"{where} requestBody {media}")
            need(isinstance(op["responses"], dict) and op["responses"], f"{where}: no responses")
            for status, response in op["responses"].items():
                need(re.match(r"^[1-5][0-9][0-9]$", status), f"{where}: bad status {status!r}")
                if check_keys(response, ("description", "content", "headers"), ("description",), f"{where} {status}"):
                    for media, content in response.get("content", {}).items():
                        need(re.match(r"^[a-z]+/[a-z0-9.+-]+(;.*)?$", media), f"{where} {status}: bad media {media!r}")
                        if check_keys(content, ("schema",), ("schema",), f"{where} {status} {media}"):
                            check_schema_object(content["schema"], f"{where} {status} {media}")
            if "security" in op:
                check_security(op["security"], where)
    return problems


@pytest.fixture
def cfg(tmp_path):
    return cbox.load_config(write_config(tmp_path, []))


def document(cfg):
    return cbox.openapi_document(cfg, cbox.RestServer(cfg, None).routes)


def test_document_is_openapi_3_1(cfg):
    doc = document(cfg)
    assert openapi_problems(doc) == []
    assert doc["info"]["version"] == cbox.VERSION and doc["servers"] == [{"url": f"http://{cfg.host}:{cfg.port}"}]
    assert json.loads(json.dumps(doc)) == doc                   # plain JSON: no Python objects left in it
    assert "x-errors" not in json.dumps(doc)
    assert "security" not in doc                                # no api_token: nothing to send


@pytest.mark.parametrize("spoil, words", [
    (lambda d: d.update(openapi="3.0.3"), "3.1.0"),
    (lambda d: d["paths"]["/v1/vms"]["get"].update(operationId="startVm"), "operationId"),
    (lambda d: d["components"]["schemas"]["VM"].update(nullable=True), "nullable"),
    (lambda d: d["components"]["schemas"]["VmList"]["properties"]["vms"]["items"].update({"$ref": "#/nope"}), "resolve"),
    (lambda d: d["paths"]["/v1/vms/{name}"]["get"].pop("parameters"), "path parameters"),
    (lambda d: d["paths"]["/v1/vms"]["post"]["responses"].update({"2XX": {"description": "x"}}), "bad status"),
    (lambda d: d["paths"]["/v1/health"]["get"]["responses"]["200"].pop("description"), "missing"),
    (lambda d: d["components"]["schemas"]["ExecRequest"]["properties"]["tag"].update(pattern="^a\\Z"), "ECMA"),
])
def test_the_openapi_checker_can_fail(cfg, spoil, words):
    doc = copy.deepcopy(document(cfg))
    spoil(doc)
    assert any(words in p for p in openapi_problems(doc)), openapi_problems(doc)


def test_config_is_in_the_document(tmp_path):
    cfg = cbox.load_config(write_config(tmp_path, ["max_vcpus: 3", "max_ttl_s: 100", "api_token: s3cret",
                                                   "host: 127.0.0.2", "port: 7123"]))
    doc = document(cfg)
    assert openapi_problems(doc) == []
    start = doc["components"]["schemas"]["StartRequest"]["properties"]
    assert start["vcpus"]["maximum"] == 3 and start["ttlSeconds"]["minimum"] == 1 and start["ttlSeconds"]["maximum"] == 100
    assert doc["security"] == [{"bearer": []}] and doc["servers"] == [{"url": "http://127.0.0.2:7123"}]
    assert "s3cret" not in json.dumps(doc)
    for path in ("/v1/health", "/v1/openapi.json"):
        assert doc["paths"][path]["get"]["security"] == [] and "401" not in doc["paths"][path]["get"]["responses"]
    assert "401" in doc["paths"]["/v1/vms"]["get"]["responses"]


def test_every_route_is_described_and_nothing_else(cfg):
    doc = document(cfg)
    routes = {(cbox.route_name(pattern), method.lower())
              for pattern, methods in cbox.RestServer(cfg, None).routes for method in methods}
    described = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == described
    assert len(routes) == 26        # 23 + GET /v1/images, GET and DELETE /v1/images/{image}


def test_cli_prints_the_document(cfg, tmp_path):
    import subprocess
    import sys
    config = write_config(tmp_path, [])
    out = subprocess.run([sys.executable, str(cbox.__file__), "openapi", "--config", str(config)],
                         capture_output=True, check=True, timeout=60).stdout
    assert json.loads(out) == document(cbox.load_config(config))


# ---- the rules in the document are the rules the validators run ------------------------------------

def edge_values(schema):
    """(accepted, refused) values at a numeric property's bounds."""
    good, bad = [], []
    whole = "integer" in ([schema.get("type")] if isinstance(schema.get("type"), str) else schema.get("type", []))
    if "minimum" in schema:
        good.append(schema["minimum"])
        bad.append(schema["minimum"] - 1 if whole else schema["minimum"] - 0.5)
    if "exclusiveMinimum" in schema:
        bad.append(schema["exclusiveMinimum"])
        good.append(schema["exclusiveMinimum"] + (1 if whole else 0.001))
    if "maximum" in schema:
        good.append(schema["maximum"])
        bad.append(schema["maximum"] + 1)
    return good, bad


BASE_BODIES = {"StartRequest": {"vmName": "a"}, "ExecRequest": {"cmd": "true"}, "TtlRequest": {"ttlSeconds": 5},
               "NetworkRequest": {"egress": "nat"}, "SignalRequest": {"signal": "TERM"}, "StdinRequest": {"eof": True}}
WITH_FIELDS = {("ExecRequest", key): {"tty": True} for key in ("cols", "rows", "term")}   # what a field needs
RULE_CASES = [("ExecRequest", {"cmd": "true", "cols": 80}, False), ("ExecRequest", {"cmd": "x", "tty": False,
              "term": "vt100"}, False), ("ExecRequest", {"cmd": "x", "tty": True, "stdin": "text"}, False),
              ("ExecRequest", {"cmd": "x", "tty": True, "stdin": "pipe", "cols": 9, "rows": 3, "term": "vt100"}, True)]


def request_cases(doc):
    """(schema name, body, the document says it is valid) for bodies at and beyond the bounds,
    of wrong types, unknown fields, values outside enums and patterns."""
    schemas = doc["components"]["schemas"]
    yield from RULE_CASES
    for name, plain in BASE_BODIES.items():
        schema = schemas[name]
        yield name, plain, True
        yield name, dict(plain, unknownField=1), False
        for key, prop in schema["properties"].items():
            base = dict(plain, **WITH_FIELDS.get((name, key), {}))
            good, bad = edge_values(prop)
            for value in good:
                yield name, dict(base, **{key: value}), True
            for value in bad:
                yield name, dict(base, **{key: value}), False
            if "enum" in prop:
                yield name, dict(base, **{key: "no-such-value"}), False
            if "pattern" in prop:      # a string its pattern refuses
                bad = next(v for v in ("-bad value\n", "a\0b", " ") if not ecma_regex(prop["pattern"]).search(v))
                yield name, dict(base, **{key: bad}), False
            if "maxProperties" in prop:
                yield name, dict(base, **{key: {f"k{i}": "v" for i in range(prop["maxProperties"] + 1)}}), False
            yield name, dict(base, **{key: {"an": "object"} if prop.get("type") not in ("object", ["object", "null"])
                                       else "a string"}), False


def test_validators_follow_the_document(cfg):
    doc = document(cfg)
    checks = {"StartRequest": lambda b: cbox.validate_start_request(b, cfg),
              "ExecRequest": lambda b: cbox.validate_exec_request(b, cfg),
              "TtlRequest": lambda b: cbox.check_schema(b, cbox.request_schemas(cfg)["TtlRequest"]),
              "NetworkRequest": lambda b: cbox.check_network(b, cfg, require_egress=True),
              "SignalRequest": lambda b: cbox.check_schema(b, cbox.SIGNAL_REQUEST),
              "StdinRequest": lambda b: cbox.check_schema(b, cbox.STDIN_REQUEST)}
    cases = list(request_cases(doc))
    assert len(cases) > 60
    for name, body, valid in cases:
        assert fits(body, doc["components"]["schemas"][name], doc) == valid, (name, body)
        if valid:
            checks[name](body)
        else:
            with pytest.raises(cbox.ApiError) as e:
                checks[name](body)
            assert e.value.status == 400 and e.value.body()["error"], (name, body)


# ---- live: real answers validate; every operation answers -------------------------------------------

class Recorder:
    """Requests to the server, each answer kept with its status and media type."""

    def __init__(self, server):
        self.server, self.answers = server, []

    def send(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.settings["port"], timeout=60)
        conn.sock = self.server.ns.connect(("127.0.0.1", self.server.settings["port"]), 60)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=dict({"Content-Type": "application/json"}, **(headers or {})))
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        self.answers.append((method, path, resp.status, ctype, raw))
        return resp.status, json.loads(raw) if ctype == "application/json" else raw.decode()


def operation_for(doc, method, path):
    """The documented path template and operation that answers this request path."""
    path = path.split("?")[0]
    for template, item in doc["paths"].items():
        if re.fullmatch(re.sub(r"\\{\w+\\}", "[^/]+", re.escape(template)), path) and method.lower() in item:
            return template, item[method.lower()]
    return None, None


def bodies(ctype, raw):
    """The JSON values in an answer: the object, or one per NDJSON line or SSE event."""
    if ctype.startswith("application/json"):
        return [json.loads(raw)]
    if ctype == "application/x-ndjson":
        return [json.loads(line) for line in raw.splitlines()]
    if ctype == "text/event-stream":
        events = []
        for block in raw.decode().split("\n\n"):
            if block:
                fields = dict(line.split(": ", 1) for line in block.split("\n"))
                event = json.loads(fields["data"])
                assert int(fields["id"]) == event["seq"]
                events.append(event)
        return events
    return [raw.decode()]


def check_answer(doc, method, path, status, ctype, raw):
    template, op = operation_for(doc, method, path)
    if op is None:     # no route (404) or wrong method (405): the error shape all the same
        assert status in (404, 405)
        validate(json.loads(raw), {"$ref": "#/components/schemas/Error"}, doc)
        return None
    response = op["responses"].get(str(status))
    assert response is not None, f"{method} {template} answered {status}, not in the document"
    media = next((m for m in response["content"] if m == ctype or m == ctype.split(";")[0]), None)
    assert media is not None, f"{method} {template} {status} answered {ctype}, not in {list(response['content'])}"
    values = bodies(ctype, raw)
    assert values, (method, path, status)
    for value in values:
        try:
            validate(value, response["content"][media]["schema"], doc)
        except Invalid as e:
            raise AssertionError(f"{method} {path} {status} {ctype}: {e}") from None
    return template


def test_real_answers_fit_the_document(cbox_server):
    server = cbox_server
    r = Recorder(server)
    status, doc = r.send("GET", "/v1/openapi.json")
    assert status == 200 and openapi_problems(doc) == []
    assert r.send("GET", "/v1/openapi.json")[1] == doc            # made once, the same every time
    r.send("GET", "/v1/health")
    assert r.send("POST", "/v1/vms", {"vmName": "doc", "labels": {"team": "a"}, "ttlSeconds": 600,
                                      "callbackMethods": ["m"], "callbackUrl": "http://127.0.0.1:9/cb"})[0] == 200
    assert r.send("POST", "/v1/vms", {"vmName": "doc"})[0] == 409
    assert r.send("POST", "/v1/vms", {"vmName": "x", "bogus": 1})[0] == 400
    assert r.send("POST", "/v1/vms", {"vmName": "bad name"})[0] == 400
    for query in ("", "?label=team=a", "?label=team&status=RUNNING", "?status=STOPPED", "?label=bad%20key"):
        r.send("GET", "/v1/vms" + query)
    assert r.send("GET", "/v1/vms/doc")[0] == 200 and r.send("GET", "/v1/vms/nope")[0] == 404
    base = "/v1/vms/doc/exec"
    assert r.send("POST", base, {"cmd": "echo out; echo err >&2; exit 3"})[1]["exitCode"] == 3
    assert r.send("POST", base, {"argv": ["sh", "-c", "sleep 30"], "blocking": False, "tag": "sleeper"})[0] == 200
    assert r.send("POST", base, {"cmd": "sleep 30", "blocking": False, "tag": "other"})[0] == 200
    assert r.send("POST", base, {"cmd": "cat", "stdin": "pipe", "blocking": False, "tag": "cat"})[0] == 200
    assert r.send("POST", base, {"cmd": "x", "argv": ["x"]})[0] == 400
    assert r.send("POST", base, {"cmd": "true", "tag": "sleeper"})[0] == 409        # the tag is in use
    assert r.send("POST", f"{base}/cat/stdin", {"data": "hello", "eof": True})[0] == 200
    assert r.send("POST", f"{base}/sleeper/stdin", {"data": "x"})[0] == 409           # no pipe
    assert r.send("GET", f"{base}/sleeper")[1]["running"] is True
    assert r.send("GET", f"{base}/nope")[0] == 404
    assert r.send("POST", f"{base}/other/signal", {"signal": "TERM"})[0] == 200
    assert r.send("POST", f"{base}/other/signal", {"signal": "NOPE"})[0] == 400
    wait_for(lambda: r.send("GET", f"{base}/cat")[1]["running"] is False, 10, what="cat's end")
    assert r.send("GET", base)[0] == 200
    status, _ = r.send("POST", base, {"cmd": "echo a; echo b >&2; printf '\\377'", "stream": True})
    assert status == 200
    status, _ = r.send("POST", base, {"cmd": "echo sse", "stream": True}, headers={"Accept": "text/event-stream"})
    assert status == 200
    exec_id = r.send("POST", base, {"cmd": "echo bg", "blocking": False})[1]["execId"]
    assert r.send("GET", f"{base}/{exec_id}/stream?since=0")[0] == 200
    assert r.send("GET", f"{base}/{exec_id}/stream?since=x")[0] == 400
    assert r.send("GET", f"{base}/{exec_id}/stream?since=999")[0] == 400               # beyond the last event
    assert r.send("GET", f"{base}/{exec_id}/attach")[0] == 400          # a WebSocket only (test_terminal.py)
    assert r.send("DELETE", f"{base}/sleeper?grace=1")[0] == 200
    assert r.send("DELETE", f"{base}/sleeper?grace=x")[0] == 400
    r.send("POST", base, {"cmd": "sleep 30", "blocking": False})
    assert r.send("DELETE", f"{base}?grace=0")[0] == 200
    assert r.send("GET", "/v1/vms/doc/logs")[0] == 200
    assert r.send("PUT", "/v1/vms/doc/ttl", {"ttlSeconds": 300})[0] == 200
    assert r.send("PUT", "/v1/vms/doc/ttl", {"ttlSeconds": -1})[0] == 400
    assert r.send("PUT", "/v1/vms/doc/network", {"egress": "nat", "allowOut": []})[0] == 200
    assert r.send("PUT", "/v1/vms/doc/network", {"egress": "open"})[0] == 400
    assert r.send("GET", "/v1/vms/doc/stats")[0] == 200
    assert r.send("GET", "/v1/metrics")[0] == 200
    assert r.send("GET", "/v1/events?since=0")[0] == 200
    assert r.send("GET", "/v1/events?wait=61")[0] == 400
    assert r.send("GET", "/v1/failed-starts")[0] == 200
    assert r.send("GET", "/v1/images")[0] == 200 and r.send("GET", "/v1/vms?image=default")[0] == 200
    assert r.send("GET", "/v1/images/default")[0] == 200 and r.send("GET", "/v1/images/nope")[0] == 404
    assert r.send("DELETE", "/v1/images/default")[0] == 409 and r.send("DELETE", "/v1/images/a%2Fb")[0] == 400
    assert r.send("POST", "/v1/vms", {"vmName": "x", "image": "nope"})[0] == 400
    assert r.send("GET", "/v1/vms/doc/logs?lines=5")[0] == 400                        # a query it does not take
    assert r.send("GET", "/v1/nothing")[0] == 404 and r.send("PUT", "/v1/vms")[0] == 405
    r.send("POST", "/v1/vms", {"vmName": "short", "ttlSeconds": 1, "labels": {"team": "b"}})
    wait_for(lambda: r.send("GET", "/v1/vms/short")[0] == 404, 15, what="the TTL's end")
    assert "stopReason" in r.send("GET", "/v1/vms/short")[1]                          # a tombstone
    assert r.send("DELETE", "/v1/vms/doc")[0] == 200 and r.send("DELETE", "/v1/vms/doc")[0] == 404
    r.send("POST", "/v1/vms", {"vmName": "last", "labels": {"team": "c"}})
    assert r.send("POST", "/v1/vms/last/exec", {"cmd": "true", "timeout": 10 ** 9})[0] == 400
    assert r.send("DELETE", "/v1/vms?label=team=c")[1]["destroyed"] == ["last"]

    answered = {check_answer(doc, *answer) for answer in r.answers}
    described = {(template, method.upper()) for template, item in doc["paths"].items() for method in item}
    seen = {(operation_for(doc, m, p)[0], m) for m, p, *_ in r.answers} - {(None, "GET"), (None, "PUT")}
    assert seen == described                       # every operation answered (none only 404/405)
    assert None in answered and len(answered) == len({t for t, _ in described}) + 1
    statuses = {(m, operation_for(doc, m, p)[0], s) for m, p, s, *_ in r.answers}
    assert {("POST", "/v1/vms", 409), ("GET", "/v1/vms/{name}", 404), ("POST", "/v1/vms/{name}/exec", 400),
            ("POST", "/v1/vms/{name}/exec/{exec_id}/stdin", 409)} <= statuses
    ndjson = [a for a in r.answers if a[3] == "application/x-ndjson"]
    types = {e["type"] for a in ndjson for e in bodies(a[3], a[4])}
    assert {"start", "stdout", "stderr", "exit"} <= types


def test_requests_the_document_refuses_are_refused(cbox_server):
    server = cbox_server
    r = Recorder(server)
    doc = r.send("GET", "/v1/openapi.json")[1]
    server.api.start_vm("rq")
    exec_id = server.api.exec("rq", "sleep 60", blocking=False)["execId"]
    paths = {"StartRequest": ("POST", "/v1/vms"), "ExecRequest": ("POST", "/v1/vms/rq/exec"),
             "TtlRequest": ("PUT", "/v1/vms/rq/ttl"), "NetworkRequest": ("PUT", "/v1/vms/rq/network"),
             "SignalRequest": ("POST", f"/v1/vms/rq/exec/{exec_id}/signal"),
             "StdinRequest": ("POST", f"/v1/vms/rq/exec/{exec_id}/stdin")}
    refused = [(name, body) for name, body, valid in request_cases(doc) if not valid]
    assert len(refused) > 40
    for name, body in refused:
        method, path = paths[name]
        status, answer = r.send(method, path, body)
        assert status == 400 and answer["error"], (name, body, answer)
        if "unknownField" in body:
            assert "unknown field(s): unknownField" in answer["error"]
    for param, bad in (("grace", "-1"), ("grace", "3601"), ("since", "1.5")):
        path = f"/v1/vms/rq/exec/{exec_id}" + ("/stream" if param == "since" else "")
        assert r.send("DELETE" if param == "grace" else "GET", f"{path}?{param}={bad}")[0] == 400
    for answer in r.answers:
        check_answer(doc, *answer)
    assert [vm["vmName"] for vm in server.api.get("/v1/vms")[1]["vms"]] == ["rq"]      # no refused start made a VM

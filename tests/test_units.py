"""Unit tests of cbox.py's pure parts: config parser, allocators, request validation."""
import ipaddress
import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cbox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def signal_request(body):
    """POST .../signal's body, checked as cbox.py checks it (400: ApiError)."""
    return cbox.check_schema(body, cbox.SIGNAL_REQUEST)


def stdin_request(body):
    return cbox.check_schema(body, cbox.STDIN_REQUEST)


# ---- config parser -------------------------------------------------------------

def test_shipped_config_parses_with_loopback_host():
    cfg = cbox.load_config(REPO / "config.yaml")
    assert cfg.host == "127.0.0.1"
    assert cfg.api_token == ""
    assert cfg.bridge_subnet == "10.20.1.0/24"


def test_parser_scalars_and_nesting():
    tree, lines = cbox.parse_yaml_subset(
        'a:\n  b: 1\n  c: "x # y"  # comment\n  d: true\n  e: 2.5\n  f: null\n  g: plain text\n  h: \'it\'\'s\'\nz: -3\n')
    assert tree == {"a": {"b": 1, "c": "x # y", "d": True, "e": 2.5, "f": None, "g": "plain text", "h": "it's"},
                    "z": -3}
    assert lines["a.c"] == 3 and lines["z"] == 9


@pytest.mark.parametrize("text,line,fragment", [
    ("a:\n  - 1\n", 2, "lists are not supported"),
    ("a: [1, 2]\n", 1, "unsupported YAML construct"),
    ("a: {b: 1}\n", 1, "unsupported YAML construct"),
    ("a: &x 1\n", 1, "unsupported YAML construct"),
    ("a: |\n  text\n", 1, "unsupported YAML construct"),
    ("a:\n\tb: 1\n", 2, "tabs"),
    ("a: 1\na: 2\n", 2, "duplicate key"),
    ("a:\n  b: 1\n c: 2\n", 3, "inconsistent indentation"),
    ("just text\n", 1, "expected 'key: value'"),
    ('a: "unterminated\n', 1, "double-quoted"),
    ("---\na: 1\n", 1, "multiple YAML documents"),
])
def test_parser_rejects_unsupported_constructs_naming_the_line(text, line, fragment):
    with pytest.raises(cbox.ConfigError) as e:
        cbox.parse_yaml_subset(text, "c.yaml")
    assert f"line {line}" in str(e.value) and fragment in str(e.value)


def test_key_without_value_is_null():
    assert cbox.parse_yaml_subset("a:\nb: 1\nc:\n")[0] == {"a": None, "b": 1, "c": None}


def write_config(tmp_path, body):
    path = tmp_path / "config.yaml"
    path.write_text("hostservices:\n  restserver:\n" + "".join(f"    {line}\n" for line in body))
    return path


def test_unknown_key_is_an_error_naming_the_line(tmp_path):
    path = write_config(tmp_path, ["port: 7000", "prot: 7001"])
    with pytest.raises(cbox.ConfigError, match=r"line 4: unknown key 'prot'"):
        cbox.load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hostservices:\n  restserver:\n    port: 1\n  other:\n    x: 1\n")
    with pytest.raises(cbox.ConfigError, match=r"line 4: unknown key 'hostservices.other'"):
        cbox.load_config(path)


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(cbox.ConfigError, match=r"'port' must be int"):
        cbox.load_config(write_config(tmp_path, ['port: "seven"']))
    with pytest.raises(cbox.ConfigError, match=r"'firewall' must be bool"):
        cbox.load_config(write_config(tmp_path, ["firewall: 1"]))
    with pytest.raises(cbox.ConfigError, match=r"'firewall' must be bool"):
        cbox.load_config(write_config(tmp_path, ['firewall: "true"']))



@pytest.mark.parametrize("line, words", [("events_batch: 0", "events_batch must be 1..1000"),
                                         ("events_batch: 1001", "events_batch must be 1..1000")])
def test_out_of_range_is_an_error(tmp_path, line, words):
    with pytest.raises(cbox.ConfigError, match=re.escape(words)):
        cbox.load_config(write_config(tmp_path, [line]))
    assert cbox.load_config(write_config(tmp_path, ['events_batch: "50"'])).events_batch == 50


# The original CBox's documented config (issue 8), verbatim: every number quoted.
SEED_CONFIG = """\
hostservices:
  restserver:
    host: "0.0.0.0"
    port: "7000"
    state_dir: "./vm-state"
    bridge_name: "br0"
    bridge_ip: "10.20.1.1/24"
    bridge_subnet: "10.20.1.0/24"
    chv_bin: "./resources/bin/cloud-hypervisor"
    kernel: "./resources/bin/vmlinux.bin"
    rootfs: "./out/cbox-guestrootfs-ext4.img"
    initramfs: "./out/initramfs.cpio.gz"
    stateful_size_in_mb: "2048"
    guest_mem_percentage: "30"
"""


def test_seed_config_loads_as_it_is(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SEED_CONFIG)
    cfg = cbox.load_config(path)
    assert (cfg.host, cfg.port, cfg.stateful_size_in_mb, cfg.guest_mem_percentage) == ("0.0.0.0", 7000, 2048, 30)
    assert cfg.bridge_name == "br0" and cfg.bridge_ip == "10.20.1.1/24"
    # relative paths are relative to the config file's directory (they need not exist to load)
    assert cfg.path(cfg.state_dir) == str(tmp_path / "vm-state")
    assert cfg.path(cfg.kernel) == str(tmp_path / "resources/bin/vmlinux.bin")
    assert cfg.path(cfg.rootfs) == str(tmp_path / "out/cbox-guestrootfs-ext4.img")
    with pytest.raises(cbox.CommandError, match="resources/bin/cloud-hypervisor"):
        cbox.resolve_chv_bin(cfg)
    r = subprocess.run([sys.executable, str(REPO / "cbox.py"), "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    printed = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert printed["port"] == "7000" and printed["stateful_size_in_mb"] == "2048"
    assert printed["guest_mem_percentage"] == "30" and printed["host"] == "'0.0.0.0'"


@pytest.mark.parametrize("line,value", [
    ('port: "7000"', 7000), ("port: '7001'", 7001), ('max_vms: "007"', 7), ('pool_size: "3"', 3),
    ('boot_timeout_s: "60"', 60.0), ('boot_timeout_s: "2.5"', 2.5), ("boot_timeout_s: 2.5", 2.5),
])
def test_number_keys_accept_quoted_decimal_numbers(tmp_path, line, value):
    cfg = cbox.load_config(write_config(tmp_path, [line]))
    key = line.split(":")[0]
    assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)


@pytest.mark.parametrize("line", [
    'port: "7000 "', 'port: " 7000"', 'port: "+7000"', 'port: "-1"', 'port: "7_000"', 'port: "0x1b58"',
    'port: "7000.0"', 'port: "\u0667\u0660\u0660\u0660"', 'port: ""', 'max_vms: "1e3"',
    'boot_timeout_s: "2."', 'boot_timeout_s: ".5"', 'boot_timeout_s: "1e3"', 'boot_timeout_s: "inf"',
    'boot_timeout_s: "nan"', 'boot_timeout_s: "-1"', 'boot_timeout_s: "1.2.3"',
])
def test_other_quoted_values_of_number_keys_are_errors_naming_the_line(tmp_path, line):
    with pytest.raises(cbox.ConfigError, match=r"config.yaml line 3: '\w+' must be (int|float)"):
        cbox.load_config(write_config(tmp_path, [line]))


def test_defaults_and_relative_paths(tmp_path):
    cfg = cbox.load_config(write_config(tmp_path, ["kernel: k/vmlinux"]))
    assert cfg.port == 7000 and cfg.callback_timeout_s == 30.0
    assert cfg.path(cfg.kernel) == str(tmp_path / "k" / "vmlinux")
    assert cfg.path("/abs") == "/abs"


def test_semantic_checks(tmp_path):
    with pytest.raises(cbox.ConfigError, match="inside bridge_subnet"):
        cbox.load_config(write_config(tmp_path, ['bridge_ip: "10.9.0.1/24"', 'bridge_subnet: "10.8.0.0/24"']))
    with pytest.raises(cbox.ConfigError, match="too long"):
        cbox.load_config(write_config(tmp_path, [f'run_dir: "/{"x" * 90}"']))
    with pytest.raises(cbox.ConfigError, match="guest_mem_percentage"):
        cbox.load_config(write_config(tmp_path, ["guest_mem_percentage: 0"]))
    with pytest.raises(cbox.ConfigError, match="pool_size must be 0..max_vms"):
        cbox.load_config(write_config(tmp_path, ["pool_size: 3", "max_vms: 2"]))
    with pytest.raises(cbox.ConfigError, match="pool_size must be 0..max_vms"):
        cbox.load_config(write_config(tmp_path, ["pool_size: -1"]))


def test_config_is_read_only_once_loaded(tmp_path):
    """Nothing sets or caches on a loaded config: a change is a copy (replace), and what is
    derived from it (the request schemas) is kept beside it, made once."""
    cfg = cbox.load_config(write_config(tmp_path, ["max_vcpus: 3"]))
    keys = set(vars(cfg))
    with pytest.raises(AttributeError, match="read-only"):
        cfg.chv_bin = "/bin/true"
    with pytest.raises(AttributeError, match="read-only"):
        del cfg.port
    schemas = cbox.request_schemas(cfg)
    assert cbox.request_schemas(cfg) is schemas and set(vars(cfg)) == keys
    assert schemas["StartRequest"]["properties"]["vcpus"]["maximum"] == 3
    changed = cfg.replace(chv_bin="/bin/true", max_vcpus=5)
    assert (changed.chv_bin, changed.max_vcpus, changed.base_dir) == ("/bin/true", 5, cfg.base_dir)
    assert cfg.chv_bin != "/bin/true" and cfg.max_vcpus == 3
    assert cbox.request_schemas(changed)["StartRequest"]["properties"]["vcpus"]["maximum"] == 5


# ---- allocators ------------------------------------------------------------------

def test_ip_allocator_skips_bridge_and_reuses_freed():
    a = cbox.Allocator("10.5.0.0/29", ipaddress.ip_address("10.5.0.1"))
    ips = [str(a.take_ip()) for _ in range(5)]
    assert ips == ["10.5.0.2", "10.5.0.3", "10.5.0.4", "10.5.0.5", "10.5.0.6"]
    with pytest.raises(cbox.ApiError) as e:
        a.take_ip()
    assert e.value.status == 503
    a.release("10.5.0.4", 99)
    assert str(a.take_ip()) == "10.5.0.4"


def test_cid_allocator_starts_at_3_and_reuses():
    a = cbox.Allocator("10.5.0.0/24", ipaddress.ip_address("10.5.0.1"))
    assert [a.take_cid() for _ in range(3)] == [3, 4, 5]
    a.release("10.5.0.9", 4)
    assert a.take_cid() == 4


def test_claim_rejects_duplicates_and_foreign_ips():
    a = cbox.Allocator("10.5.0.0/24", ipaddress.ip_address("10.5.0.1"))
    a.claim("10.5.0.7", 9)
    with pytest.raises(ValueError):
        a.claim("10.5.0.7", 10)
    with pytest.raises(ValueError):
        a.claim("10.6.0.7", 11)


def test_full_slash24_gives_253_guests():
    a = cbox.Allocator("10.5.0.0/24", ipaddress.ip_address("10.5.0.1"))
    assert len({a.take_ip() for _ in range(253)}) == 253


def test_tap_name_and_mac():
    assert len(cbox.tap_name(4294967294)) <= 15
    assert cbox.mac_for("10.20.1.2") == "02:cb:0a:14:01:02"


# ---- request validation --------------------------------------------------------

@pytest.fixture
def cfg(tmp_path):
    return cbox.load_config(write_config(tmp_path, []))


@pytest.mark.parametrize("name", ["a", "A1", "vm-1.x_y", "9" * 63])
def test_good_names(name):
    assert cbox.check_vm_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "_a", "a/b", "..", "../x", "a b", "a\0b", "x" * 64, "é", 5, None])
def test_bad_names(name):
    with pytest.raises(cbox.ApiError) as e:
        cbox.check_vm_name(name)
    assert e.value.status == 400


def test_start_request(cfg):
    spec = cbox.validate_start_request({"vmName": "a", "callbackUrl": "http://127.0.0.1:9/cb"}, cfg)
    assert spec == {"vmName": "a", "callbackUrl": "http://127.0.0.1:9/cb", "callbackMethods": None,
                    "vcpus": 1, "memoryMb": 512, "network": {"egress": "nat", "allowOut": []},
                    "expiresAt": None, "idleTimeoutSeconds": None, "labels": {}, "image": "default",
                    "diskMb": cfg.stateful_size_in_mb}
    spec = cbox.validate_start_request({"vmName": "a", "image": None, "diskMb": None}, cfg)
    assert (spec["image"], spec["diskMb"]) == ("default", cfg.stateful_size_in_mb)
    spec = cbox.validate_start_request({"vmName": "a", "callbackMethods": ["m", "n", "m"]}, cfg)
    assert spec["callbackMethods"] == ["m", "n"]


@pytest.mark.parametrize("body,fragment", [
    ({}, "missing required field(s): vmName"),
    ({"vmName": "a", "extra": 1, "zz": 2}, "unknown field(s): extra, zz"),
    ({"vmName": "a", "vcpus": "2"}, "'vcpus' must be an integer"),
    ({"vmName": "a", "vcpus": True}, "'vcpus' must be an integer"),
    ({"vmName": "a", "vcpus": 0}, "vcpus must be"),
    ({"vmName": "a", "memoryMb": 10**9}, "memoryMb must be"),
    ({"vmName": "a", "callbackUrl": "ftp://x"}, "callbackUrl"),
    ({"vmName": "a", "callbackUrl": 5}, "'callbackUrl' must be a string"),
    ({"vmName": "a", "callbackMethods": "m"}, "'callbackMethods' must be a list"),
    ({"vmName": "a", "callbackMethods": [""]}, "'callbackMethods' entries"),
    ({"vmName": "a", "image": "../x"}, "invalid image name"),
    ({"vmName": "a", "image": 5}, "invalid image name"),
    ({"vmName": "a", "diskMb": 63}, "diskMb must be 64.."),
    ({"vmName": "a", "diskMb": 10**9}, "diskMb must be 64.."),
    ([1], "JSON object"),
])
def test_start_request_errors(cfg, body, fragment):
    with pytest.raises(cbox.ApiError) as e:
        cbox.validate_start_request(body, cfg)
    assert e.value.status == 400 and fragment in str(e.value)


def test_exec_request(cfg):
    agent, blocking, timeout, stream = cbox.validate_exec_request({"cmd": "ls", "env": {"A": "1"}, "timeout": 2.5}, cfg)
    assert blocking is True and timeout == 2.5 and stream is False
    assert agent["maxOutput"] == cfg.exec_output_limit_bytes and agent["env"] == {"A": "1"}
    assert "keepaliveS" not in agent and "argv" not in agent
    _, _, timeout, _ = cbox.validate_exec_request({"cmd": "ls"}, cfg)
    assert timeout == cfg.exec_timeout_s
    agent, blocking, _, stream = cbox.validate_exec_request(
        {"argv": ["ls", ""], "stream": True, "tag": "t.1", "user": "nobody", "stdin": "pipe",
         "memoryLimitMb": 64, "pidsLimit": 10}, cfg)
    assert blocking is False and stream is True and agent["blocking"] is False
    assert agent["keepaliveS"] == cfg.stream_keepalive_s and agent["argv"] == ["ls", ""]
    assert (agent["tag"], agent["user"], agent["stdin"], agent["memoryLimitMb"], agent["pidsLimit"]) == \
        ("t.1", "nobody", "pipe", 64, 10)


@pytest.mark.parametrize("body,fragment", [
    ({}, "exactly one of 'cmd'"),
    ({"cmd": ""}, "non-empty"),
    ({"cmd": 5}, "'cmd' must be a string"),
    ({"cmd": "x", "blocking": "yes"}, "'blocking' must be a boolean"),
    ({"cmd": "x", "timeout": 0}, "'timeout' must be"),
    ({"cmd": "x", "timeout": "5"}, "'timeout' must be a number"),
    ({"cmd": "x", "env": {"A": 1}}, "'env'"),
    ({"cmd": "x", "env": []}, "'env' must be an object"),
    ({"cmd": "x", "shell": "bash"}, "unknown field(s): shell"),
])
def test_exec_request_errors(cfg, body, fragment):
    with pytest.raises(cbox.ApiError) as e:
        cbox.validate_exec_request(body, cfg)
    assert e.value.status == 400 and fragment in str(e.value)


@pytest.mark.parametrize("body", [
    {"cmd": "true"}, {"cmd": "echo 'a b' | wc -c"}, {"cmd": " \tls"}, {"cmd": "x\n"}, {"cmd": "\u3000x"},
    {"cmd": "é\u2028"}, {"cmd": "a" * 100_000},
    {"cmd": ""}, {"cmd": " "}, {"cmd": "\t\n\u3000\u2029"}, {"cmd": "a\x00"}, {"cmd": "\x00"}, {"cmd": 5},
    {"cmd": None}, {"cmd": True}, {"cmd": ["ls"]}, {"cmd": {"a": 1}}, {"argv": ["ls"]}, {"cmd": "x", "argv": ["ls"]},
    {"cmd": "x", "timeout": 1}, {"cmd": "x", "env": None}, {"cmd": "x", "tty": True}, {"Cmd": "x"}, {},
    [], ["cmd"], "cmd", None, 7, [{"cmd": "x"}],
])
def test_the_usual_exec_body_shortcut_gives_what_the_schema_gives(cfg, body):
    """check_input's shortcut for {"cmd": ...} alone: for every body, None (the schema checks it) or
    exactly what check_schema makes of it; never a body the schema refuses."""
    schema = cbox.request_schemas(cfg)["ExecRequest"]
    shortcut = cbox.usual_exec_check(schema)(body)
    try:
        expected = cbox.check_schema(body, schema)
    except cbox.ApiError:
        assert shortcut is None
        return
    if shortcut is not None:
        assert shortcut == expected and list(shortcut) == list(expected)      # the order too: the agent's body
        assert [type(v) for v in shortcut.values()] == [type(v) for v in expected.values()]
    if isinstance(body, dict) and list(body) == ["cmd"]:
        assert shortcut is not None          # the usual body takes the shortcut


def test_the_usual_exec_body_shortcut_makes_a_new_env_each_time(cfg):
    check = cbox.usual_exec_check(cbox.request_schemas(cfg)["ExecRequest"])
    first = check({"cmd": "true"})
    first["env"]["A"] = "1"
    assert check({"cmd": "true"})["env"] == {}


def test_a_long_command_with_a_nul_is_refused_in_linear_time():
    """cmd's pattern (not blank, no NUL) must not backtrack quadratically: a 4 MB command
    ending in NUL would then take hours. A regex holds the GIL, so the check runs in a
    process of its own that a regression makes time out (a failure, not a hang)."""
    check = ("import cbox\n"
             "cfg = cbox.load_config(cbox.Path('config.yaml'))\n"
             "try:\n"
             "    cbox.validate_exec_request({'cmd': 'a' * 4_000_000 + '\\x00'}, cfg)\n"
             "except cbox.ApiError as e:\n"
             "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "without NUL" in done.stdout, done.stderr


@pytest.mark.parametrize("given, sent", [("TERM", 15), ("sigkill", 9), ("SIGUSR1", 10), ("CLD", 17), (15, 15),
                                         ("15", 15), (64, 64)])
def test_signal_request(given, sent):
    assert signal_request({"signal": given}) == {"signal": sent}


@pytest.mark.parametrize("body", [{"signal": "NOPE"}, {"signal": 0}, {"signal": 65}, {"signal": True},
                                  {"signal": None}, {}, {"signal": "TERM", "x": 1}, {"signal": "SIG_DFL"},
                                  {"signal": "Signals"}, {"signal": "-1"}, {"signal": "TERM "}])
def test_signal_request_errors(body):
    with pytest.raises(cbox.ApiError) as e:
        signal_request(body)
    assert e.value.status == 400


def test_stdin_request_and_query_numbers():
    assert stdin_request({"data": "x"}) == {"data": "x", "eof": False}
    assert stdin_request({"eof": True}) == {"data": "", "eof": True}
    for bad in ({}, {"data": 1}, {"eof": "yes"}, {"data": "x", "more": 1}):
        with pytest.raises(cbox.ApiError):
            stdin_request(bad)
    since = {"since": {"type": "integer", "minimum": 0, "maximum": 100}}
    grace = {"grace": {"type": "number", "minimum": 0, "maximum": 100, "default": 0.0}}
    assert cbox.check_query({"since": ["12"]}, since) == {"since": 12}
    assert cbox.check_query({}, since) == {} and cbox.check_query({}, grace) == {"grace": 0.0}
    assert cbox.check_query({"grace": ["2.5"]}, grace) == {"grace": 2.5}
    for bad in ("-1", "1.5", "x", "", "1e3", "101", "²"):
        with pytest.raises(cbox.ApiError):
            cbox.check_query({"since": [bad]}, since)
    for bad in ({"since": ["1", "2"]}, {"other": ["1"]}):        # given twice; unknown
        with pytest.raises(cbox.ApiError):
            cbox.check_query(bad, since)


def test_exec_ids_and_tags_in_paths():
    for good in ("a1b2c3d4e5f60718", "web.1", "job_2", "_old-style", "A" * 64):
        assert cbox.check_exec_id(good) == good
    for bad in (".", "..", ".hidden", "a/b", "a" * 65, "", "a b", "é"):
        with pytest.raises(cbox.ApiError):
            cbox.check_exec_id(bad)


def test_callback_line_carries_the_exec_id():
    method, body = cbox.parse_callback_line(b'{"method":"m","params":1,"execId":"abc123"}', "vm1")
    assert method == "m" and json.loads(body) == {"vmName": "vm1", "method": "m", "params": 1, "execId": "abc123"}
    assert "execId" not in json.loads(cbox.parse_callback_line(b'{"method":"m"}', "vm1")[1])
    assert cbox.parse_callback_line(b'{"method":"m","execId":"../x"}', "vm1")[0] is None


def test_background_execs_one_record_two_bounds():
    """A background exec is noted once: the newest 64 keep the VM from being idle (saved in
    the record), the newest 1024 wait to be seen finished (exec.finished once)."""
    execs = cbox.BackgroundExecs(["r1", "r1", "r2"])        # from a record: idle only
    assert execs.ids() == ["r1", "r2"] and not execs.is_awaited("r1")
    for i in range(1100):
        execs.note(f"e{i}")
    assert execs.ids() == [f"e{i}" for i in range(1100 - 64, 1100)]
    assert not execs.is_awaited("e75") and execs.is_awaited("e76") and execs.is_awaited("e1099")
    assert len(execs.execs) == 1024
    assert execs.seen_finished("e76") and not execs.seen_finished("e76")
    assert execs.forget_idle(["e1099", "e76"]) and not execs.forget_idle(["e1099"])
    assert execs.ids() == [f"e{i}" for i in range(1100 - 64, 1099)] and "e76" not in execs.execs
    execs.note("e1050")                                       # seen again: the newest
    assert execs.ids()[-1] == "e1050" and len(execs.ids()) == 63


def test_parse_json_body():
    assert cbox.parse_json_body(b'{"a":1}') == {"a": 1}
    for bad in (b"", b"{", b"\xff"):
        with pytest.raises(cbox.ApiError):
            cbox.parse_json_body(bad)


@pytest.mark.parametrize("body", [
    b'{"cmd":"true"}', b'{"a":{"b":[1,2.5,null,true]}}', b'{}', b'{"a":1} ', b' {"a":1}', b'{"a":1}{"b":2}',
    b'{"a":1,}', b'{"a":"\xff"}', b'{\x00"\x00}', b'{"a":NaN}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\x01"}',
    b'\xef\xbb\xbf{"a":1}', b'{"a":"\\ud800"}', b"{" + b"[" * 100000 + b"}"])
def test_parse_json_body_is_json_loads(body):
    """The fast path (json.loads's scanner without its wrappers) gives json.loads's value or its error."""
    try:
        expected = ("value", json.loads(body))
    except RecursionError:
        expected = ("error", "malformed JSON: nested too deeply")
    except ValueError as e:
        expected = ("error", f"malformed JSON: {e}")
    try:
        got = ("value", cbox.parse_json_body(body))
    except cbox.ApiError as e:
        got = ("error", str(e))
    assert repr(got) == repr(expected)      # repr: NaN is not equal to itself


def test_empty_container_default_is_new_each_time():
    exec_schema = {"type": "object", "properties": {"env": {"type": ["object", "null"], "default": {},
                                                            "additionalProperties": {"type": "string"}}}}
    first, second = cbox.check_schema({}, exec_schema), cbox.check_schema({}, exec_schema)
    assert first == second == {"env": {}}
    first["env"]["X"] = "1"                  # a handler changing its body's env changes no other request's
    assert cbox.check_schema({}, exec_schema) == {"env": {}}
    assert exec_schema["properties"]["env"]["default"] == {}


def test_hypervisor_error_text_formats():
    assert cbox.CloudHypervisor.error_text(json.dumps(["outer", "root cause"]).encode()) == "outer: root cause"
    assert cbox.CloudHypervisor.error_text(b"plain failure") == "plain failure"


def vm_create_config_of(tmp_path, lines, vcpus=1):
    """(cfg, vm_create_config of a VM "v1" at 10.20.1.2 with CID 3) under a config of `lines`."""
    cfg = cbox.load_config(write_config(tmp_path, lines))
    manager = cbox.VMManager(cfg, network=None)
    vm = cbox.VM(cfg, vmName="v1", ip="10.20.1.2/24", tapDeviceName="cbt3", cid=3, vcpus=vcpus, memoryMb=256,
                 mac=cbox.mac_for("10.20.1.2"))
    vm.boot_image = cbox.Images(cfg).get("default")          # the manager sets it (VmBooter.new_vm)
    return cfg, cbox.vm_create_config(vm, manager.booter.gateway, manager.booter.dns)


def test_vm_config_validates_against_cloud_hypervisor_openapi(tmp_path, chv_schema):
    import fake_chv
    cfg, config = vm_create_config_of(tmp_path, ['cmdline_extra: "quiet"'], vcpus=2)
    validator = fake_chv.SchemaValidator.load(chv_schema)
    assert validator.validate(config) == []
    assert fake_chv.semantic_errors(config) == []
    assert config["memory"]["size"] == 256 * 1024 * 1024 and config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert config["disks"][0]["readonly"] is True and config["disks"][1]["readonly"] is False
    # every disk Raw (an autodetected raw disk refuses sector-0 writes on CHV v51+) and
    # named by a serial of at most 20 bytes that the initramfs looks the disks up by
    assert [d["image_type"] for d in config["disks"]] == ["Raw", "Raw"]
    assert [d["serial"] for d in config["disks"]] == ["cbox-rootfs", "cbox-state"]
    assert all(len(d["serial"].encode()) <= 20 for d in config["disks"])
    assert config["serial"] == {"mode": "Socket", "socket": f"{cfg.run_dir}/3/serial.sock"}
    assert config["pvpanic"] is True
    cmdline = config["payload"]["cmdline"]
    for key in ("cbox.vm=v1", "cbox.ip=10.20.1.2/24", "cbox.gw=10.20.1.1", "cbox.callback_port=4032", "quiet",
                "cbox.state=cbox-state"):
        assert key in cmdline.split()
    # the validator is strict: a misspelt field is reported with its path
    config["net"][0]["macc"] = config["net"][0].pop("mac")
    assert any("$.net[0].macc" in e for e in validator.validate(config))


@pytest.mark.parametrize("lines, disks, net", [
    ([], {"bandwidth": {"size": 200 * 1024 * 1024, "refill_time": 1000}, "ops": {"size": 4000, "refill_time": 1000}},
     {"bandwidth": {"size": 125_000_000, "refill_time": 1000}}),                  # the defaults
    (["vm_disk_mb_per_s: 0", "vm_disk_ops_per_s: 0", "vm_net_mbit_per_s: 0"], None, None),
    (["vm_disk_mb_per_s: 0", "vm_net_mbit_per_s: 8"], {"ops": {"size": 4000, "refill_time": 1000}},
     {"bandwidth": {"size": 1_000_000, "refill_time": 1000}}),
])
def test_vm_io_limits_are_cloud_hypervisor_rate_limiters(tmp_path, chv_schema, lines, disks, net):
    """A VM's disks share one rate limit group (one budget for all of them), its net device
    has a limiter (Cloud Hypervisor applies it to each direction); a limit of 0 sends no bucket."""
    import fake_chv
    _, config = vm_create_config_of(tmp_path, lines)
    assert fake_chv.SchemaValidator.load(chv_schema).validate(config) == []
    assert fake_chv.semantic_errors(config) == []
    groups = config.get("rate_limit_groups")
    if disks is None:
        assert groups is None and not any("rate_limit_group" in d for d in config["disks"])
    else:
        assert groups == [{"id": "disks", "rate_limiter_config": disks}]
        assert [d["rate_limit_group"] for d in config["disks"]] == ["disks", "disks"]
        assert "disks" not in [d["id"] for d in config["disks"]] + [n["id"] for n in config["net"]]
    assert config["net"][0].get("rate_limiter_config") == net


@pytest.mark.parametrize("line", ["vm_disk_mb_per_s: -1", "vm_net_mbit_per_s: 9000000", "vm_disk_ops_per_s: -5",
                                  "vcpu_overcommit: -1", "vcpu_overcommit: 1001"])
def test_io_and_cpu_limits_out_of_range_are_config_errors(tmp_path, line):
    with pytest.raises(cbox.ConfigError, match=line.split(":")[0]):
        cbox.load_config(write_config(tmp_path, [line]))


def test_copy_sparse_keeps_data_and_holes(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    with open(src, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(4096)
        f.write(b"head")
        f.seek(40 * 1024 * 1024)
        f.write(b"middle" * 1000)
    cbox.copy_sparse(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_blocks * 512 < 1024 * 1024          # still sparse


def test_preflight_names_what_is_missing(tmp_path):
    import subprocess
    path = write_config(tmp_path, [f'chv_bin: "{tmp_path}/no-such-cloud-hypervisor"'])
    r = subprocess.run([sys.executable, str(REPO / "cbox.py"), "preflight", "--config", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cloud-hypervisor binary not found" in r.stderr
    cfg = cbox.load_config(write_config(tmp_path, [f'chv_bin: "{REPO}/tests/fake_chv.py"']))
    problems = cbox.preflight(cfg)
    assert not any("cloud-hypervisor" in p for p in problems)
    assert any("/dev/kvm" in p for p in problems) == (not Path("/dev/kvm").exists())


# ---- console log and hypervisor events -------------------------------------------

def test_console_log_keeps_boot_lines_and_newest_within_budget(tmp_path):
    log = cbox.ConsoleLog(tmp_path, max_bytes=8192)
    boot = b"".join(b"boot line %05d\n" % i for i in range(cbox.ConsoleLog.BOOT_BYTES // 16))
    assert len(boot) == cbox.ConsoleLog.BOOT_BYTES
    log.append(boot[:1000])
    log.append(boot[1000:] + b"after boot\n")
    assert (tmp_path / "console.boot.log").read_bytes() == boot
    assert log.text() == boot + b"after boot\n"
    for i in range(2000):          # 34 KB more: rotations drop the oldest
        log.append(b"newer %010d\n" % i)
    sizes = [f.stat().st_size for f in tmp_path.glob("console.log*")]
    assert sum(sizes) <= 8192 and len(sizes) == 2
    text = log.text()
    dropped = int((tmp_path / "console.dropped").read_bytes())
    assert text.startswith(boot)
    assert f"[cbox: {dropped} bytes of console output dropped here".encode() in text
    assert text.endswith(b"newer 0000001999\n")
    assert dropped + sum(sizes) == len(b"after boot\n") + 2000 * 17
    assert "newer 0000001999" in cbox.console_tail(log)
    log.close()
    again = cbox.ConsoleLog(tmp_path, max_bytes=8192)      # after a restart: sizes from the files
    again.append(b"x" * 10000)
    assert sum(f.stat().st_size for f in tmp_path.glob("console.log*")) <= 8192
    assert again.text().endswith(b"x" * 4096)
    again.close()


def test_event_monitor_parses_events_and_skips_truncated_ones(tmp_path):
    import asyncio
    import os

    def event(source, name, props=None):
        return json.dumps({"timestamp": {"secs": 1, "nanos": 2}, "source": source, "event": name,
                           "properties": props}, indent=2).encode()

    async def run():
        fifo = tmp_path / "events.fifo"
        cbox.EventMonitor.make_fifo(fifo)
        seen = []
        monitor = cbox.EventMonitor(fifo, lambda s, e, p: seen.append((s, e, p)))
        writer = os.open(fifo, os.O_WRONLY)
        stream = (event("vmm", "starting") + b"\n\n"
                  + event("virtio-device", "activated", {"id": "net0"}) + b"\n\n"
                  + event("vm", "booted")[:20]                 # cut short by EAGAIN, then the next one
                  + event("guest", "panic", {"event": "panic"}) + b"\n\n"
                  + event("vm", "rebooting")[:30] + b"\n\n"  # cut short, separator written
                  + b"not json at all, mentions \"source\": \"vm\"\n\n"
                  + event("vm", "rebooting"))
        for i in range(0, len(stream), 7):                     # arrives in small pieces
            os.write(writer, stream[i:i + 7])
            await asyncio.sleep(0)
        os.write(writer, b"\n\n")
        os.close(writer)
        await monitor.wait_end(5)
        return seen

    seen = asyncio.run(run())
    assert seen == [("vmm", "starting", {}), ("guest", "panic", {"event": "panic"}), ("vm", "rebooting", {})]


def test_reset_found_in_the_vmm_log(tmp_path):
    path = tmp_path / "chv.log"
    path.write_text("cloud-hypervisor: 0.1s: <vmm> INFO:event_monitor/src/lib.rs:113 -- Event: source = vm event = booted \n")
    assert cbox.reset_in_vmm_log(path) is None
    with open(path, "a") as f:
        f.write("cloud-hypervisor: 9.0s: <vmm> INFO:event_monitor/src/lib.rs:113 -- Event: source = vm event = rebooting \n")
    assert cbox.reset_in_vmm_log(path)[0] == "guest-reboot"
    with open(path, "a") as f:
        f.write("cloud-hypervisor: 8.0s: <vcpu0> INFO:event_monitor/src/lib.rs:113 -- "
                "Event: source = guest event = panic event = panic\n")
    assert cbox.reset_in_vmm_log(path)[0] == "guest-panic"


def test_event_monitor_parses_a_bounded_number_of_events_a_second(tmp_path):
    import asyncio
    import os

    async def run():
        fifo = tmp_path / "events.fifo"
        cbox.EventMonitor.make_fifo(fifo)
        seen = []
        monitor = cbox.EventMonitor(fifo, lambda s, e, p: seen.append(e))
        writer = os.open(fifo, os.O_WRONLY)
        event = json.dumps({"timestamp": {"secs": 1, "nanos": 2}, "source": "guest", "event": "panic",
                            "properties": {"event": "unknown_event"}}, indent=2).encode() + b"\n\n"
        t0 = time.monotonic()
        for _ in range(400):           # ~55 KB: a guest writing to its pvpanic device in a loop
            os.write(writer, event)
        os.close(writer)
        await monitor.wait_end(5)
        return seen, time.monotonic() - t0

    seen, took = asyncio.run(run())
    limit = cbox.EventMonitor.EVENT_BURST + cbox.EventMonitor.EVENT_RATE * took + 1
    assert cbox.EventMonitor.EVENT_BURST <= len(seen) <= limit, (len(seen), took)


def test_serial_console_reads_at_a_bounded_rate(tmp_path):
    import asyncio
    import socket
    import threading

    async def run():
        path = tmp_path / "serial.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(1)
        got = []
        console = cbox.SerialConsole(path, lambda data: got.append(len(data)))
        peer, _ = listener.accept()
        stop = threading.Event()

        def flood():            # like the VMM: non-blocking writes, dropped when we do not read
            peer.setblocking(False)
            while not stop.is_set():
                try:
                    peer.send(b"x" * 65536)
                except BlockingIOError:
                    time.sleep(0.001)

        thread = threading.Thread(target=flood)
        thread.start()
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        took = time.monotonic() - t0
        stop.set()
        thread.join()
        console.close()
        peer.close()
        listener.close()
        return sum(got), took

    total, took = asyncio.run(run())
    rate, burst = cbox.SerialConsole.RATE, cbox.SerialConsole.BURST
    assert burst <= total <= burst + rate * took + cbox.BoundedReader.CHUNK, (total, took)


def test_punch_out_head_frees_all_but_the_tail(tmp_path):
    path = tmp_path / "vmm.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)      # a writer at its own offset, as Cloud Hypervisor
    try:
        for i in range(16):
            os.write(fd, bytes([65 + i]) * (1024 * 1024))
        assert cbox.punch_out_head(path, 4 * 1024 * 1024) > 10 * 1024 * 1024
        st = os.stat(path)
        assert st.st_size == 16 * 1024 * 1024 and st.st_blocks * 512 <= 4 * 1024 * 1024 + 4096
        assert cbox.tail_bytes(path, 4 * 1024 * 1024) == b"".join(bytes([65 + i]) * (1024 * 1024) for i in range(12, 16))
        assert cbox.punch_out_head(path, 4 * 1024 * 1024) == 0          # within the budget now
        os.write(fd, b"next\n")                                           # the writer goes on where it was
        assert os.stat(path).st_size == 16 * 1024 * 1024 + 5
    finally:
        os.close(fd)
    assert cbox.punch_out_head(tmp_path / "missing.log", 1) == 0


@pytest.mark.parametrize("filename", ["cbox.py", "guest_agent.py"])
def test_no_top_level_name_is_used_before_its_definition(filename):
    """Each section uses only what comes before it (the module docstrings' promise):
    no top-level code refers to a module-level name defined further down."""
    import ast
    tree = ast.parse((REPO / filename).read_text())
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:
            defined.setdefault(name, node.lineno)
    late = [f"line {sub.lineno}: {sub.id} (defined at line {defined[sub.id]})"
            for node in tree.body for sub in ast.walk(node)
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
            and defined.get(sub.id, 0) > node.lineno]
    assert late == []


# ---- Batcher: teardowns of VMs going away together share one command ----------

def test_batcher_runs_requests_arriving_together_as_one_batch():
    import asyncio
    batches = []

    async def run_batch(items):
        batches.append(list(items))
        await asyncio.sleep(0.01)
        if "bad" in items:
            raise RuntimeError("batch failed")

    async def scenario():
        batcher = cbox.Batcher(run_batch)
        first = asyncio.ensure_future(batcher.submit("a"))      # starts a batch at once
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bcd"]   # wait for the next one
        await asyncio.gather(first, *rest)
        failing = [asyncio.ensure_future(batcher.submit(x)) for x in ("e", "bad")]
        results = await asyncio.gather(*failing, return_exceptions=True)
        after = await batcher.submit("f")                  # a failed batch leaves it usable
        return results, after

    results, after = asyncio.run(scenario())
    assert batches == [["a"], ["b", "c", "d"], ["e", "bad"], ["f"]]
    assert [str(r) for r in results] == ["batch failed", "batch failed"] and after is None


def test_bodies_refused_unread_are_drained_within_a_host_wide_budget(tmp_path):
    """After a 401 (or 503) the body is read and dropped only up to LINGER_BYTES a connection
    and LINGER_BYTES_PER_S for all together; past that the connection is closed at once."""
    import asyncio
    cfg = cbox.load_config(write_config(tmp_path, []))
    server = cbox.RestServer(cfg, None)
    server.HOLD_MAX = 0            # no 401 held unread (test_rest_hardening tests the hold)

    class Writer:
        def write_eof(self):
            pass

    async def drained(budget_left):
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * (8 << 20))
        server.linger_budget.tokens = budget_left
        server.linger_budget.stamp = time.monotonic()
        await server.drop_refused_body(reader, Writer(), {"content-length": str(8 << 20)}, 401)
        return (8 << 20) - len(reader._buffer)

    assert asyncio.run(drained(server.LINGER_BYTES_PER_S)) == server.LINGER_BYTES
    assert asyncio.run(drained(0)) == 0


# ---- twins: functions cbox.py and guest_agent.py each keep (both files stay standalone) ----

def test_fmt_seconds_twins_agree():
    import guest_agent
    for seconds in (0, 0.001, 0.5, 1, 2.5, 30, 30.0, 3600.0, 1e6, 123456789, 1.5e7, 86400 * 365):
        assert cbox.fmt_seconds(seconds) == guest_agent.fmt_seconds(seconds), seconds
    assert cbox.fmt_seconds(1e6) == "1000000s" and cbox.fmt_seconds(0.25) == "0.25s"


def test_signal_name_twins_agree():
    import guest_agent
    for number in [*range(-1, 70), 999]:
        assert cbox.signal_name(number) == guest_agent.signal_name(number), number
    assert cbox.signal_name(9) == "SIGKILL" and cbox.signal_name(999) == "signal 999"


def test_write_atomically_twins_replace_through_a_temporary_beside_the_file(tmp_path, monkeypatch):
    """A reader sees the old file or the whole new one: both write a temporary in the same
    directory (same filesystem) and rename it over the file; nothing else is left."""
    import guest_agent
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))),
                                                         real_replace(src, dst))[1])
    host, guest = tmp_path / "host.json", tmp_path / "guest.json"
    for path in (host, guest):
        path.write_text("old")
    cbox.write_atomically(host, b"new text")
    guest_agent.write_atomically(str(guest), "new text", 0o644)
    assert host.read_text() == guest.read_text() == "new text"
    assert [dst for _, dst in renames] == [host, guest]
    assert all(src.parent == dst.parent and src != dst for src, dst in renames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.json", "host.json"]


def test_record_writes_happen_off_the_loop_and_the_newest_content_wins(tmp_path, monkeypatch):
    """later() hands the write to a thread (the loop runs on while it waits on the disk);
    of several queued contents only the newest is written; a now() or remove() after a
    later() wins even against a write already in the thread."""
    import threading
    writes, entered, release = [], threading.Event(), threading.Event()
    real = cbox.write_atomically

    def slow_write(path, data):
        writes.append((path.name, data, threading.current_thread() is threading.main_thread()))
        if data == b"slow":
            entered.set()
            assert release.wait(10), "the loop was blocked while the thread wrote"
        real(path, data)
    monkeypatch.setattr(cbox, "write_atomically", slow_write)
    files = cbox.RecordWrites()
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"

    async def scenario():
        files.later(a, b"slow")                      # in the thread, waiting on `release`
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        files.later(b, b"1")
        files.later(b, b"2")                         # queued twice: only the newest is written
        files.later(c, b"gone")
        files.remove(c)                              # removed before its write came: not written
        release.set()                                # the loop ran meanwhile: it released the thread
        while files.worker is not None:
            await asyncio.sleep(0.01)

    import asyncio
    asyncio.run(scenario())
    assert a.read_bytes() == b"slow" and b.read_bytes() == b"2" and not c.exists()
    assert [(name, data) for name, data, _ in writes] == [("a.json", b"slow"), ("b.json", b"2")]
    assert not any(on_main for _, _, on_main in writes)

    writes.clear()
    entered.clear()
    release.clear()

    async def overtaken():
        files.later(a, b"slow")
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        files.later(a, b"older")                     # queued behind the one in the thread
        threading.Timer(0.2, release.set).start()
        files.now(a, b"newest")                      # waits for the thread's write, then wins
        while files.worker is not None:
            await asyncio.sleep(0.01)
    asyncio.run(overtaken())
    assert a.read_bytes() == b"newest"
    assert [data for _, data, _ in writes] == [b"slow", b"newest"]
    writes.clear()

    async def awaited():
        files.later(b, b"queued")
        await files.write(b, b"awaited")             # on disk when it returns, the queued one superseded
        assert b.read_bytes() == b"awaited"
        while files.worker is not None:
            await asyncio.sleep(0.01)
    asyncio.run(awaited())
    assert [(data, on_main) for _, data, on_main in writes] == [(b"awaited", False)]
    files.later(b, b"no loop")                       # no loop running: written at once
    assert b.read_bytes() == b"no loop" and not files.queued
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_log_twins_write_lines_of_one_shape(capfd):
    import guest_agent
    cbox.log("twin check", a=1)
    guest_agent.log("twin check")
    lines = capfd.readouterr().err.splitlines(keepends=True)
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} cbox: twin check a=1\n", lines[0])
    assert lines[1] == "cbox-agent: twin check\n"


# ---- the API document is exact (issue 21): what it allows, the server accepts ------------------------

def test_integers_with_a_zero_fraction_are_integers(cfg):
    """JSON Schema 2020-12: 430.0 is an integer; it is used as 430."""
    spec = cbox.validate_start_request({"vmName": "a", "memoryMb": 512.0, "vcpus": 1.0, "ttlSeconds": 60.0}, cfg)
    assert (spec["memoryMb"], spec["vcpus"]) == (512, 1) and type(spec["memoryMb"]) is int
    agent, _, _, _ = cbox.validate_exec_request({"cmd": "id", "user": 430.0, "pidsLimit": 8.0}, cfg)
    assert agent["user"] == 430 and type(agent["user"]) is int and type(agent["pidsLimit"]) is int
    assert signal_request({"signal": 9.0}) == {"signal": 9}
    for body in ({"vmName": "a", "memoryMb": 512.5}, {"vmName": "a", "vcpus": float("inf")}):
        with pytest.raises(cbox.ApiError, match="must be an integer"):
            cbox.validate_start_request(body, cfg)


def test_query_numbers_as_json_writes_them():
    grace = {"grace": {"type": "number", "minimum": 0, "maximum": 100, "default": 0.0}}
    since = {"since": {"type": "integer", "minimum": 0, "maximum": 100}}
    assert cbox.check_query({"grace": ["1.29e-69"]}, grace) == {"grace": 1.29e-69}
    assert cbox.check_query({"grace": ["2E1"]}, grace) == {"grace": 20.0}
    assert cbox.check_query({"since": ["5.0"]}, since) == {"since": 5}
    assert cbox.check_query({"since": ["1e1"]}, since) == {"since": 10}
    for bad in ("1e3", "-1", "5.5", "0x10", "nan", "Infinity", "+1", "1.", ".5", "01", " 1"):
        with pytest.raises(cbox.ApiError):
            cbox.check_query({"since": [bad]}, since)


@pytest.mark.parametrize("text, allowed", [("1", True), ("64", True), ("015", True), ("0", False), ("00", False),
                                           ("65", False), ("0001", False), ("1a", False)])
def test_signal_numbers_the_document_allows_are_accepted(text, allowed):
    branch = cbox.SIGNAL_SCHEMA["anyOf"][1]
    assert bool(cbox.schema_regex(branch["pattern"]).search(text)) == allowed
    if allowed:
        assert signal_request({"signal": text}) == {"signal": int(text)}
    else:
        with pytest.raises(cbox.ApiError):
            signal_request({"signal": text})


def test_a_bad_host_in_a_callback_url_is_400(cfg):
    for url in ("http://[:]/cb", "http://[1:2/cb", "http://x:99999/cb", "http://x:port/"):
        with pytest.raises(cbox.ApiError, match="callbackUrl") as e:
            cbox.validate_start_request({"vmName": "a", "callbackUrl": url}, cfg)
        assert e.value.status == 400


def test_a_guest_chosen_word_cannot_pass_for_more_fields_of_a_log_line(capfd):
    cbox.log("callback", method=cbox.log_word("x ok=True"), ok=False)
    cbox.log("callback", method=cbox.log_word("sum"), ok=True)
    first, second = capfd.readouterr().err.splitlines()
    assert first.endswith("cbox: callback method='x ok=True' ok=False")
    assert second.endswith("cbox: callback method=sum ok=True")
    assert cbox.log_word("a=b") == "'a=b'" and cbox.log_word("a\nb") == repr("a\nb")


# ---- StderrNoWait: the server's log lines never wait for stderr's reader ----------------------

import asyncio  # noqa: E402
import fcntl  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

F_SETPIPE_SZ = 1031


def drain_into(loop, sink, read_some):
    """Run `loop` until the sink's backlog is written, `read_some()` taking what it can each turn."""
    received = bytearray()
    deadline = time.monotonic() + 10
    while sink.backlog or sink.watching:
        assert time.monotonic() < deadline, "the backlog was not written"
        received += read_some()
        loop.run_until_complete(asyncio.sleep(0.01))
    return received + read_some()


def log_lines(n):
    return [b"%05d %s\n" % (i, b"x" * 90) for i in range(n)]


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_stderr_lines_wait_in_a_bounded_backlog_and_the_drops_are_counted(kind):
    loop = asyncio.new_event_loop()
    if kind == "pipe":
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        os.set_blocking(r, False)
        ends = (r, w)

        def read_some():
            try:
                return os.read(r, 1 << 20)
            except BlockingIOError:
                return b""
    else:
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setblocking(False)
        w, ends = a.fileno(), (a, b)

        def read_some():
            try:
                return b.recv(1 << 20)
            except BlockingIOError:
                return b""
    try:
        before = cbox.M_LOG_DROPPED.value
        sink = cbox.StderrNoWait(loop, fd=w, backlog_bytes=8192)
        assert not sink.waits
        lines = log_lines(400)
        t = time.monotonic()
        for line in lines:                  # nobody reads: the pipe fills, then the backlog
            sink.write(line)
        assert time.monotonic() - t < 1.0   # (a write that waited would never return)
        assert sink.dropped > 0 and len(sink.backlog) <= 8192 + len(lines[0])
        dropped = sink.dropped
        assert cbox.M_LOG_DROPPED.value - before == dropped
        received = drain_into(loop, sink, read_some).splitlines(keepends=True)
        # whole lines, in order, the first ones (a line is dropped whole, never in part),
        # then one line that says how many were dropped
        assert received[:-1] == lines[:len(received) - 1]
        assert re.fullmatch(rb"\S+ cbox: log lines dropped count=%d why=stderr's reader fell behind\n" % dropped,
                            received[-1]), received[-1]
        assert len(received) - 1 + dropped == len(lines)
        sink.write(b"after\n")              # written at once again
        assert read_some() == b"after\n" and not sink.backlog and sink.dropped == 0
        sink.close()
    finally:
        loop.close()
        for end in ends:
            end.close() if hasattr(end, "close") else os.close(end)


def test_stderr_as_a_file_is_written_at_once(tmp_path):
    loop = asyncio.new_event_loop()
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        sink = cbox.StderrNoWait(loop, fd=fd, backlog_bytes=10)
        for line in log_lines(100):
            sink.write(line)
        assert path.read_bytes() == b"".join(log_lines(100)) and not sink.backlog and not sink.watching
        sink.close()
    finally:
        os.close(fd)
        loop.close()


def test_close_writes_the_backlog_when_stderr_takes_it_and_gives_up_when_it_does_not():
    loop = asyncio.new_event_loop()
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    try:
        sink = cbox.StderrNoWait(loop, fd=w)
        for line in log_lines(100):
            sink.write(line)
        assert sink.backlog
        t = time.monotonic()
        sink.close(timeout=0.3)                 # nobody reads: it gives up after the timeout
        assert 0.25 < time.monotonic() - t < 2.0
        sink = cbox.StderrNoWait(loop, fd=w)
        os.read(r, 1 << 20)
        for line in log_lines(100):
            sink.write(line)
        received = bytearray()

        def read_all():
            while len(received) < len(b"".join(log_lines(100))):
                received.extend(os.read(r, 1 << 20))
        reader = threading.Thread(target=read_all)
        reader.start()
        sink.close(timeout=5)
        reader.join(5)
        assert not sink.backlog and bytes(received) == b"".join(log_lines(100))
    finally:
        os.close(r)
        os.close(w)
        loop.close()


def test_the_heap_trim_runs_beside_the_loop_not_on_it(monkeypatch):
    """malloc_trim after an attack walks a large heap: the loop keeps running meanwhile."""
    trims = []

    def slow_trim(pad):
        trims.append(threading.get_ident())
        time.sleep(0.3)
    monkeypatch.setattr(cbox, "HEAP_TRIM_INTERVAL_S", 0.01)
    monkeypatch.setattr(cbox, "glibc_malloc_trim", lambda: slow_trim)

    async def ticks_during_a_trim():
        task = asyncio.create_task(cbox.give_memory_back())
        while not trims:
            await asyncio.sleep(0.001)
        ticks, t = 0, time.monotonic()
        while time.monotonic() - t < 0.2:
            await asyncio.sleep(0.005)
            ticks += 1
        task.cancel()
        return ticks
    assert asyncio.run(ticks_during_a_trim()) >= 10
    assert threading.get_ident() not in trims


def rounds_of_memory_give_back(rss_per_trim, collect):
    """MemoryGiveBack's rounds on a fake RSS: rss_per_trim is each round's (before, after) of
    its trim, in MiB; `collect` stands in for gc.collect. Which rounds collected."""
    readings = iter([mib << 20 for pair in rss_per_trim for mib in pair])
    memory = cbox.MemoryGiveBack(lambda pad: None, rss=lambda: next(readings))
    collected = []
    for _ in rss_per_trim:
        before = len(collect.calls)
        asyncio.run(memory.round())
        collected.append(len(collect.calls) > before)
    return collected


class CountCalls:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)
        return 0


def test_after_a_trim_that_gives_back_a_burst_the_next_two_rounds_collect_first(monkeypatch):
    collect = CountCalls()
    monkeypatch.setattr(cbox.gc, "collect", collect)
    # quiet, quiet, an attack ends (250 -> 60 MiB), two rounds collect, quiet again
    assert rounds_of_memory_give_back([(55, 55), (56, 55), (250, 60), (60, 57), (57, 57), (57, 57)], collect) \
        == [False, False, False, True, True, False]
    # less than BURST_END (16 MiB) given back: no burst
    collect.calls.clear()
    assert rounds_of_memory_give_back([(30, 16), (65, 50), (254, 240), (254, 239)], collect) \
        == [False, False, False, False]
    # an attack that goes on, then ends: every round that gives back 16 MiB, however small a
    # part of the RSS, has the next two collect
    collect.calls.clear()
    assert rounds_of_memory_give_back([(900, 850), (890, 620), (620, 534), (534, 534), (534, 534), (534, 534)],
                                      collect) == [False, True, True, True, True, False]
    # a collecting round whose trim gives back a burst again asks for two more
    collect.calls.clear()
    assert rounds_of_memory_give_back([(250, 100), (200, 60), (60, 60), (60, 60), (60, 60)], collect) \
        == [False, True, True, True, False]


def test_the_round_after_a_burst_frees_a_cycle_young_collections_leave():
    """What a hung-up exec stream leaves: a cycle among objects that lived long enough to
    reach the oldest generation. Young collections leave it; the round after a burst frees it."""
    import gc
    import weakref

    class Held:
        pass
    held = Held()
    held.cycle, held.buffer = held, bytearray(1 << 20)
    gone = weakref.ref(held)
    gc.collect()                       # survivors of a full collection are in the oldest generation
    del held
    if sys.version_info < (3, 14):     # 3.14's incremental collector: collect(1) is an increment of the old
        gc.collect(1)
        assert gone() is not None      # garbage, but only a full collection finds it
    readings = iter([300 << 20, 60 << 20, 60 << 20, 60 << 20])
    memory = cbox.MemoryGiveBack(lambda pad: None, rss=lambda: next(readings))
    asyncio.run(memory.round())        # the trim gave back 240 MiB: a burst ended
    assert memory.collect == 2
    asyncio.run(memory.round())
    assert gone() is None


def test_what_python_writes_to_stderr_while_serving_takes_the_same_path(tmp_path):
    """A warning or a traceback (the asyncio exception handler's) written to sys.stderr goes
    through StderrNoWait as log lines do; the rest of the stream's attributes are the original's."""
    loop = asyncio.new_event_loop()
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    os.set_blocking(r, False)
    try:
        sink = cbox.StderrNoWait(loop, fd=w)
        text = cbox.StderrText(sink, sys.__stderr__)
        for i in range(200):                               # ~20 kB into a 4 kB pipe nobody reads
            print(f"Traceback line {i:03d} " + "y" * 80, file=text)
        assert sink.backlog and text.fileno() == sys.__stderr__.fileno()
        got = drain_into(loop, sink, lambda: os.read(r, 1 << 20) if select_readable(r) else b"")
        assert got.decode().splitlines() == [f"Traceback line {i:03d} " + "y" * 80 for i in range(200)]
        sink.close()
    finally:
        os.close(r)
        os.close(w)
        loop.close()


def select_readable(fd):
    import select
    return bool(select.select([fd], [], [], 0)[0])


def test_the_objects_there_when_the_server_starts_are_frozen_out_of_full_collections():
    """freeze_startup_objects() leaves full collections only what came after it."""
    import gc
    try:
        cbox.freeze_startup_objects()
        assert gc.get_freeze_count() > 10_000          # the code's and the modules' objects
        assert len(gc.get_objects()) < gc.get_freeze_count() // 2
    finally:
        gc.unfreeze()

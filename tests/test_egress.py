"""Egress policy per VM (issue 12, "Egress policy"): request validation, the rules of a
VM's chain, and, from inside stand-in guests, what the policy lets out.

Guest traffic goes only to an "outside world" namespace the test makes (the `world`
fixture, TEST-NET addresses that exist only there), never beyond the test's namespaces.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    ({"egress": "allowlist", "allowOut": ["2001:db8::/32"]}, "IPv6; guests have IPv4 only"),
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

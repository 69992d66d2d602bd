"""Unit tests for the pure functions on the request path and in config parsing.

No mocks: strip runs on mitmproxy's real ``http.Request``; everything else takes plain values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http

from proxy.authority import check_authority, parse_authority, target
from proxy.config import DEFAULT_STRIP_HEADERS, StripConfig, load_config, parse_config
from proxy.confread import Section
from proxy.credentials import render
from proxy.credentials.static import SecretError, check_secret
from proxy.errors import ConfigError, KeylessError
from proxy.model import ANONYMOUS, Attestation, Decision, Identity, Source
from proxy.paths import check_path
from proxy.policy.input import build_input
from proxy.policy.result import parse_decision
from proxy.strip import strip_credentials
from tests.harness import REPO

# --- check_authority ---------------------------------------------------------------------------


def authority(**kw: Any) -> None:
    args: dict[str, Any] = {"scheme": "https", "host": "api.example", "port": 443, "host_header": "api.example",
                            "connect": "api.example:443", "tls": True, "sni": "api.example"}
    args.update(kw)
    host, port, connect = args.pop("host"), args.pop("port"), args.pop("connect")
    check_authority(target=target(host, port), connect=None if connect is None else parse_authority(connect, 443),
                    **args)


def refused(code: str, **kw: Any) -> str:
    with pytest.raises(KeylessError) as e:
        authority(**kw)
    assert e.value.code == code
    return e.value.message


def test_authority_all_agree() -> None:
    authority()
    authority(host_header="API.Example:443", sni="Api.Example.", connect="api.example.:443")
    authority(host_header=None)  # HTTP/2 without :authority mismatch has no Host header to compare


def test_authority_plain_http() -> None:
    authority(scheme="http", port=80, connect=None, tls=False, sni=None, host_header="api.example")
    authority(scheme="http", port=8080, connect=None, tls=False, sni=None, host_header="api.example:8080")
    assert "Host header" in refused("misdirected_request", scheme="http", port=80, connect=None, tls=False,
                                    sni=None, host_header="evil.example")
    # The default port of the scheme is implied: "api.example" on port 8080 is a different authority.
    refused("misdirected_request", scheme="http", port=8080, connect=None, tls=False, sni=None)


def test_authority_connect_mismatch() -> None:
    assert "tunnel" in refused("misdirected_request", connect="other.example:443")
    refused("misdirected_request", connect="api.example:8443")


def test_authority_sni_mismatch() -> None:
    assert "SNI" in refused("misdirected_request", sni="evil.example")


def test_authority_missing_sni() -> None:
    refused("misdirected_request", sni=None)
    # Clients send no SNI for an IP address; that is fine when the destination is an IP.
    authority(host="10.0.0.1", connect="10.0.0.1:443", sni=None, host_header="10.0.0.1")
    authority(host="::1", connect="[::1]:443", sni=None, host_header="[::1]:443")


def test_authority_host_header_mismatch_inside_tunnel() -> None:
    refused("misdirected_request", host_header="evil.example")
    refused("misdirected_request", host_header="api.example:444")


def test_authority_malformed_host_header() -> None:
    refused("bad_request", host_header="api.example:notaport")
    refused("bad_request", host_header="[::1")


# --- parse_decision ----------------------------------------------------------------------------


def test_parse_decision_accepts_the_contract() -> None:
    assert parse_decision({"allow": False}, "t") == Decision(False)
    d = parse_decision({"allow": True, "reason": "ok", "credential": "github", "params": {"audience": "x"}}, "t")
    assert d == Decision(True, "ok", "github", {"audience": "x"})
    assert parse_decision({"allow": True, "credential": None}, "t").credential is None
    # Extra members are the policy author's business; they do not change the decision.
    assert parse_decision({"allow": True, "extra": [1]}, "t").allow is True


@pytest.mark.parametrize("value", [
    True, "allow", None, 1, [], [{"allow": True}],
    {}, {"allow": "yes"}, {"allow": 1}, {"allow": None}, {"Allow": True},
    {"allow": True, "reason": 3}, {"allow": True, "credential": ""}, {"allow": True, "credential": 5},
    {"allow": True, "credential": ["a"]}, {"allow": True, "params": []}, {"allow": True, "params": "x"},
])
def test_parse_decision_rejects_everything_else(value: Any) -> None:
    with pytest.raises(KeylessError) as e:
        parse_decision(value, "policy(test)")
    assert e.value.code == "policy_unavailable" and e.value.status == 503
    assert e.value.message.startswith("policy(test): malformed decision")


# --- build_input -------------------------------------------------------------------------------

SECRET = "canary-input-secret"


def make_input(identity: Identity = ANONYMOUS) -> dict[str, Any]:
    return build_input(
        source=Source("10.0.3.7", 50312), identity=identity, method="GET", scheme="https",
        host="api.example", port=443, path="/repos/acme",
        query=[("page", "2"), ("api_key", SECRET), ("page", "3"), ("token", SECRET)],
        headers=[("User-Agent", "curl/8"), ("Authorization", f"Bearer {SECRET}"),
                 ("Proxy-Authorization", f"Basic {SECRET}"), ("Cookie", f"s={SECRET}"),
                 ("X-Api-Key", SECRET), ("X-Custom-Key", SECRET), ("Accept", "a"), ("accept", "b")],
        secret_headers=frozenset({"x-api-key", "x-custom-key"}),
        secret_params=frozenset({"api_key", "token"}),
        time="2026-11-22T10:00:00Z", mode="regular",
    )


def test_build_input_shape() -> None:
    ident = Identity("spiffe://x/y", (Attestation("lo", "source_ip", "spiffe://x/y", {"cidr": "10.0.0.0/8"}),))
    doc = make_input(ident)
    assert doc["source"] == {"address": "10.0.3.7", "port": 50312}
    assert doc["identity"] == {"id": "spiffe://x/y", "attestations": [
        {"provider": "lo", "type": "source_ip", "id": "spiffe://x/y", "facts": {"cidr": "10.0.0.0/8"}}],
        "revoked": False}
    assert doc["request"] == {"method": "GET", "scheme": "https", "host": "api.example", "port": 443,
                              "path": "/repos/acme", "path_template": "/repos/acme", "query": {"page": ["2", "3"]},
                              "headers": {"user-agent": "curl/8", "accept": "a, b"}}
    assert doc["context"] == {"time": "2026-11-22T10:00:00Z", "mode": "regular"}
    json.dumps(doc)  # plain JSON, ready for any engine


def test_build_input_never_carries_credentials() -> None:
    doc = make_input()
    assert SECRET not in json.dumps(doc)
    for name in ("authorization", "proxy-authorization", "cookie", "x-api-key", "x-custom-key"):
        assert name not in doc["request"]["headers"]


def test_build_input_withholds_authorization_even_if_strip_list_is_empty() -> None:
    doc = build_input(source=Source("a", 1), identity=ANONYMOUS, method="GET", scheme="http", host="h", port=80,
                      path="/", query=[], headers=[("AUTHORIZATION", SECRET), ("cookie", SECRET)],
                      secret_headers=frozenset(), secret_params=frozenset(), time="t", mode="regular")
    assert doc["identity"] == {"id": None, "attestations": [], "revoked": False}
    assert doc["request"]["headers"] == {}


# --- strip_credentials -------------------------------------------------------------------------


def request(url: str, headers: dict[str, str]) -> http.Request:
    return http.Request.make("GET", url, b"", http.Headers([(k.encode(), v.encode()) for k, v in headers.items()]))


def test_strip_defaults() -> None:
    r = request("https://api.example/v1/x?page=2&api_key=k1&api_key=k2&token=t",
                {"Authorization": "Bearer a", "PROXY-AUTHORIZATION": "Basic b", "X-API-Key": "c",
                 "Cookie": "s=1", "User-Agent": "ua", "X-Goog-Api-Key": "g"})
    removed = strip_credentials(r, StripConfig())
    assert set(removed) == {"authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "cookie",
                            "?api_key", "?token"}
    assert dict(r.headers) == {"User-Agent": "ua", "content-length": "0"}
    assert list(r.query.items(multi=True)) == [("page", "2")]
    assert r.path == "/v1/x?page=2"


def test_strip_keeps_cookie_when_configured_and_uses_custom_lists() -> None:
    r = request("http://api.example/x?sig=s&api_key=keep", {"Cookie": "s=1", "X-Secret": "x",
                                                             "Authorization": "a"})
    removed = strip_credentials(r, StripConfig(headers=("x-secret",), query_params=("sig",), cookies=False))
    assert removed == ["x-secret", "?sig"]
    assert r.headers["cookie"] == "s=1" and r.headers["authorization"] == "a"
    assert r.path == "/x?api_key=keep"


def test_strip_nothing_to_strip() -> None:
    r = request("https://api.example/x", {"Accept": "*/*"})
    assert strip_credentials(r, StripConfig()) == []
    assert r.path == "/x"


def test_default_strip_list_covers_the_issue() -> None:
    for name in ("authorization", "proxy-authorization", "x-api-key"):
        assert name in DEFAULT_STRIP_HEADERS


# --- static secrets ----------------------------------------------------------------------------


def test_check_secret() -> None:
    assert check_secret("abc\n") == "abc"
    assert check_secret("abc\r\n") == "abc"
    assert check_secret("abc") == "abc"
    for bad in ("", "\n", "a\nb", "a\rb\n", "a\0b", "abc\n\n"):
        with pytest.raises(SecretError) as e:
            check_secret(bad)
        assert bad.strip() == "" or bad not in str(e.value)


def test_render_does_not_interpret_braces() -> None:
    assert render("Bearer {secret}", "x{0}{secret}y") == "Bearer x{0}{secret}y"
    assert render("{secret}", "k") == "k"


# --- Section and parse_config ------------------------------------------------------------------


def test_section_collects_every_problem_with_key_paths(tmp_path: Path) -> None:
    problems: list[str] = []
    s = Section({"port": "80", "on": "yes", "name": "", "mode": "x", "cidr": "10.0.0.1/8", "extra": 1,
                 "nested": {"portt": 1}}, "listen", problems, tmp_path)
    assert s.integer("port", 8080, lo=1, hi=65535) == 8080
    assert s.flag("on", True) is True
    assert s.text("name", "d") == "d"
    assert s.choice("mode", ("regular",), "regular") == "regular"
    assert s.cidr(s.raw["cidr"], "cidr") is None
    s.has("cidr")
    assert s.text("required") is None
    n = s.section("nested")
    n.integer("port", 1)
    n.done()
    s.done()
    assert problems == [
        "listen.port: must be an integer from 1 to 65535, got '80'",
        "listen.on: must be true or false, got 'yes'",
        "listen.name: must be a non-empty string, got ''",
        "listen.mode: must be one of regular, got 'x'",
        "listen.cidr: is not a valid CIDR (10.0.0.1/8 has host bits set)",
        "listen.required: is required (a non-empty string)",
        "listen.nested.portt: unknown key (did you mean 'port'?)",
        "listen.extra: unknown key",
    ]


def test_section_relative_paths_and_non_mapping(tmp_path: Path) -> None:
    problems: list[str] = []
    s = Section({"dir": "policies", "abs": "/etc/x"}, "policy", problems, tmp_path)
    assert s.path_value("dir") == tmp_path / "policies"
    assert s.path_value("abs") == Path("/etc/x")
    Section(["a"], "trust[0]", problems, tmp_path)
    assert problems == ["trust[0]: must be a mapping, got a list"]
    # Booleans are not integers, whatever Python thinks.
    Section({"port": True}, "l", problems, tmp_path).integer("port", 1)
    assert problems[-1] == "l.port: must be an integer from 0 to 2147483648, got True"


def minimal(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"tls": {"ca_dir": str(tmp_path / "ca")}, "policy": {"dir": str(REPO / "policies")}, **extra}


def test_parse_config_good_and_frozen(tmp_path: Path) -> None:
    cfg = parse_config(minimal(tmp_path, credentials={"j": {"type": "jwt"}},
                               strip={"extra_headers": ["X-My-Key"], "extra_query_params": ["sig"]}),
                       tmp_path / "keyless.yaml")
    assert cfg.listen.port == 8080 and cfg.audit.path == "-"
    assert "x-my-key" in cfg.strip.headers and "authorization" in cfg.strip.headers
    assert cfg.strip.query_params[-1] == "sig"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.credentials["x"] = cfg.credentials["j"]  # type: ignore[index]


def test_parse_config_reports_all_problems(tmp_path: Path) -> None:
    raw = minimal(tmp_path, listen={"prot": 1, "mode": "socks5"},
                  tls={"ca_dir": str(tmp_path), "verify_upstream": False},
                  trust=[{"name": "a", "type": "source_ip", "workloads": [{"cidr": "300.0.0.0/8", "id": "x"}]},
                         {"name": "a", "type": "nope"}],
                  credentials={"s": {"type": "static", "from": "env", "env": "X", "template": "Bearer"}},
                  signing={"algorithm": "HS256"})
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "keyless.yaml")
    problems = e.value.problems
    expected_paths = ["listen.prot", "listen.mode", "tls.verify_upstream", "trust[0].workloads[0].cidr",
                      "trust[1].name", "trust[1].type", "credentials.s.template", "signing.algorithm"]
    for path in expected_paths:
        assert any(p.startswith(path + ":") for p in problems), (path, problems)
    assert len(problems) == len(expected_paths), problems
    assert all("\n" not in p for p in problems)


def test_parse_config_rejects_non_mapping_and_bad_trust(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(tmp_path, trust={"name": "x"}), tmp_path / "k.yaml")
    assert e.value.problems == ["trust: must be a list of trust providers"]
    with pytest.raises(ConfigError) as e:
        parse_config("just a string", tmp_path / "k.yaml")
    assert e.value.problems[0] == "(top level): must be a mapping, got a string"


def test_load_config_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "keyless.yaml"
    f.write_text("listen:\n  port: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"{f}:3:1: malformed YAML")


# --- check_path --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/..", "/..", "/v1/./x", "/v1/%2e%2e/admin", "/v1/%2E./a",
                                  "/v1/..%2fadmin", "/v1/..%5Cadmin", "/v1\\..\\admin", "/v1/..;x=1/admin",
                                  "/v1/.;/x", "/v1/../admin?x=1"])
def test_check_path_refuses_dot_segments(path: str) -> None:
    with pytest.raises(KeylessError) as e:
        check_path(path)
    assert e.value.code == "bad_request" and e.value.status == 400


@pytest.mark.parametrize("path", ["/", "/v1/x", "/v1/...", "/v1/.well-known/x", "/v1/a..b", "/v1/x.json",
                                  "/projects/group%2Fproject", "/v1/x?next=../admin", "/v1/%252e%252e/x", "*"])
def test_check_path_accepts_ordinary_paths(path: str) -> None:
    check_path(path)

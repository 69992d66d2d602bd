"""Static-secret discovery (proxy/governance/discover.py) on real mitmproxy requests: what it finds,
where, what it must not find (UUIDs, git SHAs, ids, cursors, nonces), body buffering rules, config.

The end-to-end path (a real Keyless, curl, the audit record, the report) is tests/test_governance.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
import uuid
from pathlib import Path

import pytest
from mitmproxy import http

from proxy.audit.event import AuditEvent, Outcome, RequestRecord
from proxy.config import StripConfig, parse_config
from proxy.errors import ConfigError
from proxy.governance.discover import STRIP_LIST, Discovery, scrub_query
from proxy.governance.finding import Finding
from proxy.governance.inventory import aggregate
from proxy.governance.options import DiscoveryConfig
from proxy.model import ANONYMOUS, Source, fingerprint

GH = "ghp_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(36))
AKIA = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
SHA = hashlib.sha1(b"x").hexdigest()  # noqa: S324 - a git-style object id
UUID = str(uuid.uuid4())


@pytest.fixture(scope="module")
def d() -> Discovery:
    return Discovery(DiscoveryConfig(), StripConfig())


def req(path: str, headers: dict[str, str] | None = None, body: bytes = b"", method: str = "GET") -> http.Request:
    return http.Request.make(method, "https://api.example.com" + path, body, headers or {})


def shape(found: tuple[Finding, ...]) -> list[tuple[str, str, bool]]:
    return sorted((f.location, f.detector, f.stripped) for f in found)


def test_header_query_cookie_and_body_findings(d: Discovery) -> None:
    body = json.dumps({"db": {"password": "hunter2-correct-horse"}, "tags": [AKIA]}).encode()
    r = req(f"/x?page=2&key={AKIA}&api_key=plain-app-key", {
        "Authorization": f"token {GH}", "X-Custom": f"prefix {GH}", "Cookie": "theme=dark; secret_token=s3cr3t-v4lue",
        "Content-Type": "application/json"}, body, "POST")
    assert shape(d.inspect(r, body=True)) == [
        ("body:$.db.password", "KeywordDetector", False),
        ("body:$.tags[0]", "AWSKeyDetector", False),
        ("cookie:secret_token", "KeywordDetector", True),
        ("header:authorization", "GitHubTokenDetector", True),
        # Not a credential header by name: forwarded as sent (the strip list does not cover it).
        ("header:x-custom", "GitHubTokenDetector", False),
        # In strip.query_params (and a secret-sounding name).
        ("query:api_key", "KeywordDetector", True),
        ("query:key", "AWSKeyDetector", False),
    ]


def test_a_repeated_request_gets_the_findings_of_a_first_scan(d: Discovery) -> None:
    """The scan memo answers a header set seen before as a fresh scan would, whatever came in
    between; a value seen beside other values is scanned again (patterns anchor on the joined
    text, so a value's findings can depend on its neighbours)."""
    sequence = [
        {"User-Agent": "sdk/1.0", "X-Custom": f"prefix {GH}"},
        {"User-Agent": "sdk/1.0", "X-Custom": f"prefix {GH}"},
        {"X-Artifactory": "AKCp8abcdefghijkl"},
        {"User-Agent": "curl/8.4.0 something", "X-Artifactory": "AKCp8abcdefghijkl"},
        {"User-Agent": "sdk/1.0", "X-Artifactory": "AKCp8abcdefghijkl"},
        {"X-Artifactory": "AKCp8abcdefghijkl"},
        {"User-Agent": "sdk/1.0", "X-Custom": f"prefix {GH}"},
    ]
    for headers in sequence:
        fresh = Discovery(DiscoveryConfig(), StripConfig())
        assert d.inspect(req("/x", headers)) == fresh.inspect(req("/x", headers)), headers
    assert d._memo, "the memo was never used"


def test_fingerprint_is_keyed_over_the_secret_not_the_header(d: Discovery) -> None:
    a = d.inspect(req("/", {"Authorization": f"token {GH}"}))
    b = d.inspect(req("/", {"Authorization": f"Bearer {GH}"}))
    assert a[0].fingerprint == b[0].fingerprint == fingerprint(GH)
    assert a[0].fingerprint != "sha256:" + hashlib.sha256(GH.encode()).hexdigest()
    # Two GitHub tokens, two fingerprints (detect-secrets' own analyze_string yields "ghp" for both).
    other = "ghp_" + "".join(secrets.choice(string.ascii_letters) for _ in range(36))
    c = d.inspect(req("/", {"Authorization": f"token {other}"}))
    assert c[0].fingerprint == fingerprint(other) != a[0].fingerprint
    gl = "glpat-" + secrets.token_hex(10)
    assert d.inspect(req("/", {"Private-Token": gl}))[0].fingerprint == fingerprint(gl)
    # A query parameter the strip list names, with nothing secret-shaped about its value or name.
    assert shape(d.inspect(req("/?token=abc"))) == [("query:token", STRIP_LIST, True)]
    opaque = d.inspect(req("/", {"X-Api-Key": "opaque-app-key-1"}))
    assert shape(opaque) == [("header:x-api-key", STRIP_LIST, True)]
    assert opaque[0].fingerprint == fingerprint("opaque-app-key-1")


NOISE = [
    UUID, UUID.upper(), UUID.replace("-", ""), SHA, SHA[:12], "12345", "987654321", "ord_8f3k2j4h5g6",
    "user-42", "2026-11-22T10:00:00Z", "python-requests/2.32.3", "Mozilla/5.0 (X11; Linux x86_64)",
    base64.urlsafe_b64encode(secrets.token_bytes(24)).decode(),  # a pagination cursor
    secrets.token_hex(16), secrets.token_hex(32),  # nonces, ETags, content hashes
    "sha256:" + hashlib.sha256(b"y").hexdigest(), "W/\"" + SHA + "\"", "en-GB,en;q=0.9", "203.0.113.7",
]


@pytest.mark.parametrize("value", NOISE)
def test_no_false_positive_on_ids_hashes_and_cursors(d: Discovery, value: str) -> None:
    r = req(f"/v1/items/{value}?id={value}&sha={value}&cursor={value}&request_id={value}&secret_id={value}",
            {"X-Request-Id": value, "If-None-Match": value, "X-Commit": value, "User-Agent": value,
             "Content-Type": "application/json", "Cookie": f"sid={value}; csrftoken={value}"},
            json.dumps({"id": value, "commit": value, "order_id": value, "items": [{"sku": value}],
                        "token_id": value, "secret_id": value}).encode(), "POST")
    assert d.inspect(r, body=True) == ()


def test_proxy_authorization_and_identity_headers_are_keylesss_not_the_apps(d: Discovery) -> None:
    r = req("/", {"Proxy-Authorization": f"Bearer {GH}", "X-Forwarded-For": "10.0.0.1"})
    assert d.inspect(r) == ()


def test_body_is_read_only_when_buffered_small_and_structured(d: Discovery) -> None:
    body = json.dumps({"password": "hunter2-correct-horse"}).encode()
    small = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    assert d.wants_body(small)
    assert d.wants_body([("content-type", "application/merge-patch+json"), ("content-length", "10")])
    assert d.wants_body([("content-type", "application/x-www-form-urlencoded; charset=utf-8"),
                         ("content-length", "10")])
    assert not d.wants_body([("Content-Type", "application/json")])  # chunked: no declared length
    assert not d.wants_body([("Content-Type", "application/json"), ("Content-Length", "65537")])
    assert not d.wants_body([("Content-Type", "application/octet-stream"), ("Content-Length", "10")])
    assert not d.wants_body([*small, ("Content-Encoding", "gzip")])
    r = req("/", dict(small), body, "POST")
    assert d.inspect(r, body=False) == ()  # a streamed body is never read
    assert shape(d.inspect(r, body=True)) == [("body:$.password", "KeywordDetector", False)]
    form = req("/", {"Content-Type": "application/x-www-form-urlencoded"}, b"user=a&client_secret=Zx81-kq0Lm", "POST")
    assert shape(d.inspect(form, body=True)) == [("body:$.client_secret", "KeywordDetector", False)]
    off = Discovery(DiscoveryConfig(max_body=0), StripConfig())
    assert not off.wants_body(small) and off.inspect(r, body=True) == ()


def test_entropy_detectors_can_be_chosen_and_then_flag_hashes() -> None:
    # Why they are off by default: on HTTP traffic they report every git SHA.
    hexy = Discovery(DiscoveryConfig(detectors=("HexHighEntropyString",)), StripConfig())
    assert shape(hexy.inspect(req(f"/?commit={SHA}"))) == [("query:commit", "HexHighEntropyString", False)]


def test_findings_are_bounded(d: Discovery) -> None:
    r = req("/?" + "&".join(f"k{i}={AKIA[:-2]}{i:02d}" for i in range(60)))
    assert len(d.inspect(r)) == 32


def test_config_keys_are_validated(tmp_path: Path) -> None:
    base = {"listen": {"port": 1}, "tls": {"ca_dir": str(tmp_path / "ca")}}
    cfg = parse_config({**base, "discovery": {"max_body": "16k", "detectors": ["GitHubTokenDetector"],
                                              "keywords": False}}, tmp_path / "k.yaml")
    assert cfg.discovery == DiscoveryConfig(True, ("GitHubTokenDetector",), False, 16384)
    assert parse_config(base, tmp_path / "k.yaml").discovery == DiscoveryConfig()
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "discovery": {"max_body": "lots", "detectors": ["NoSuchDetector"], "enabled": "yes",
                                            "extra": 1}}, tmp_path / "k.yaml")
    text = "\n".join(e.value.problems)
    for key in ("discovery.max_body", "discovery.detectors", "discovery.enabled", "discovery.extra"):
        assert key in text


def test_audit_record_and_scrubbed_input() -> None:
    found = (Finding("query:key", "AWSKeyDetector", fingerprint(AKIA), False),)
    ev = AuditEvent("id", "2026-12-01T00:00:00.000Z", Source("127.0.0.1", 1), ANONYMOUS,
                    RequestRecord("GET", "https", "h", 443, "/"), None, "data.x", "r", None, Outcome(200), 1.0,
                    found=found)
    rec = ev.as_record()
    assert rec["found"] == [{"location": "query:key", "detector": "AWSKeyDetector",
                             "fingerprint": fingerprint(AKIA), "action": "forwarded"}]
    assert AKIA not in json.dumps(rec)
    doc = {"request": {"query": {"key": [AKIA], "page": ["2"]}}}
    assert scrub_query(doc, found) == {"request": {"query": {"page": ["2"]}}}
    assert doc["request"]["query"]["key"] == [AKIA]  # the decision's own input is untouched


def test_a_long_parameter_name_does_not_keep_its_secret(d: Discovery) -> None:
    """Locations keep the first 100 characters of a name; the scrub compares the same."""
    name = "k" * 150
    found = d.inspect(req(f"/x?{name}={AKIA}&page=2"))
    assert [f.detector for f in found] == ["AWSKeyDetector"]
    doc = {"request": {"query": {name: [AKIA], "page": ["2"]}}}
    assert scrub_query(doc, found) == {"request": {"query": {"page": ["2"]}}}


def test_aggregate_marks_reuse_across_identities() -> None:
    def rec(ident: str, t: str) -> dict[str, object]:
        return {"time": t, "identity": {"id": ident}, "request": {"host": "api.github.com", "method": "GET",
                                                                  "path": "/repos/acme/app/pulls"},
                "found": [{"location": "header:authorization", "detector": "GitHubTokenDetector",
                           "fingerprint": "hmac-sha256:aa", "action": "stripped"}]}

    out = aggregate([rec("a", "2026-01-02"), rec("b", "2026-01-01"), rec("a", "2026-01-03")])
    assert len(out) == 1 and out[0]["reuse"] is True
    assert out[0]["identities"] == [{"id": "a", "count": 2}, {"id": "b", "count": 1}]
    assert (out[0]["first_seen"], out[0]["last_seen"]) == ("2026-01-01", "2026-01-03")
    m = out[0]["migration"]
    assert m["credential"] == {"github": {"type": "github_app", "app_id": "<app id>",
                                          "private_key_file": "/run/secrets/github-app.pem",
                                          "repositories": ["<repository>"], "permissions": {"contents": "read"}}}
    assert m["grant"]["path_prefix"] == "/repos/acme/app/" and m["grant"]["credential"] == "github"


def test_report_credential_scope_from_parsed_config(tmp_path: Path) -> None:
    from proxy.governance.report import credential_scope

    (tmp_path / "app.pem").write_text("not read at parse time\n")
    raw = {"listen": {"port": 1}, "tls": {"ca_dir": str(tmp_path / "ca")}, "credentials": {
        "gh": {"type": "github_app", "app_id": "123", "private_key_file": str(tmp_path / "app.pem"),
               "installation_id": 9, "repositories": ["billing"], "permissions": {"contents": "read"}},
        "aws": {"type": "aws_sigv4", "role_arn": "arn:aws:iam::123456789012:role/invoices", "region": "eu-west-1",
                "endpoints": [{"host": "s3.eu-west-1.amazonaws.com", "service": "s3"}]},
        "o": {"type": "oauth2", "token_url": "https://issuer.example/token", "client_id": "c",
              "client_secret_env": "X", "scopes": ["reports:read"], "audience": "https://api.example"},
        "t": {"type": "token_exchange", "token_url": "https://issuer.example/token", "client_id": "c",
              "client_secret_env": "X", "audience": "https://ledger.example", "scopes": ["ledger:write"]},
        "s": {"type": "static", "from": "env", "env": "APP_KEY"},
        "j": {"type": "jwt", "ttl": 60}}}
    creds = parse_config(raw, tmp_path / "k.yaml").credentials
    got = {name: credential_scope(name, p) for name, p in creds.items()}
    assert got["gh"]["scope"] == {"app_id": "123", "installation_id": 9, "repositories": ["billing"],
                                  "permissions": {"contents": "read"}}
    assert got["aws"]["scope"]["role_arn"].endswith(":role/invoices") and got["aws"]["scope"]["region"] == "eu-west-1"
    assert got["o"]["scope"]["scopes"] == ["reports:read"] and got["o"]["scope"]["audience"] == "https://api.example"
    assert got["t"]["scope"]["audience"] == "https://ledger.example"
    assert got["s"]["long_lived"] is True and got["s"]["scope"] == {"source": "env", "from": "APP_KEY",
                                                                    "header": "Authorization"}
    assert [n for n, c in got.items() if c["long_lived"]] == ["s"]
    assert got["j"]["scope"] == {"audience": None, "ttl": 60}


def test_an_encoded_body_is_not_inflated(d: Discovery) -> None:
    import gzip

    body = json.dumps({"password": "hunter2-correct-horse"}).encode()
    r = http.Request.make("POST", "https://api.example.com/", b"", {"Content-Type": "application/json",
                                                                   "Content-Encoding": "gzip"})
    r.raw_content = gzip.compress(body)
    assert d.inspect(r, body=True) == ()

# Tests for the examples in docs/policy.md: `keyless policy test docs/policy-examples`.
# Override input.identity, input.request and input.context separately, with literal values:
# rego-cpp mis-evaluates `with input.x as <rule>` (see docs/policy.md, Testing).
package keyless.examples_test

import rego.v1

import data.keyless.examples.allowlist
import data.keyless.examples.dryrun
import data.keyless.examples.mcp
import data.keyless.examples.posture
import data.keyless.examples.scopes
import data.keyless.examples.scoping
import data.keyless.examples.timewindow

test_allowlist_allows_listed_host_and_caches if {
	d := allowlist.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "GET", "host": "raw.githubusercontent.com", "path": "/x"}
	d.allow == true
	d.cache == {"ttl": 30, "vary": ["identity.id", "request.host"]}
}

test_allowlist_denies_other_host if {
	d := allowlist.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "GET", "host": "api.stripe.com", "path": "/x"}
	d.allow == false
}

test_scoping_reads_and_statuses if {
	r := scoping.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "GET", "host": "api.github.com", "path": "/repos/acme/app/pulls"}
	r.allow == true
	s := scoping.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "POST", "host": "api.github.com", "path": "/repos/acme/app/statuses/abc123"}
	s.allow == true
	s.credential == "github-ci"
}

test_scoping_denies_writes_elsewhere if {
	d := scoping.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "DELETE", "host": "api.github.com", "path": "/repos/acme/app"}
	d.allow == false
	d.reason == "ci may not DELETE /repos/acme/app"
	o := scoping.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "GET", "host": "api.github.com", "path": "/repos/other/app"}
	o.allow == false
}

# 2026-11-24 (a Tuesday) 09:30 UTC = 10:30 in Paris; 2026-11-24 19:30 UTC = 20:30; 2026-11-22 is a Sunday.
test_timewindow_inside if {
	d := timewindow.decision with input.identity as {"id": "spiffe://example.org/ns/payroll/sa/batch", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"time_ns": 1795512600000000000}
	d.allow == true
}

test_timewindow_evening_and_weekend_denied if {
	e := timewindow.decision with input.identity as {"id": "spiffe://example.org/ns/payroll/sa/batch", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"time_ns": 1795548600000000000}
	e.allow == false
	w := timewindow.decision with input.identity as {"id": "spiffe://example.org/ns/payroll/sa/batch", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"time_ns": 1795343400000000000}
	w.allow == false
}

test_posture_failing_denied if {
	d := posture.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"posture": {"workload": {"status": "fail", "critical_vulns": 2}, "stale": false}}
	d.allow == false
	d.reason == "posture failing: 2 critical vulnerabilities"
}

test_posture_stale_or_missing_denied if {
	s := posture.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"posture": {"workload": {"status": "pass"}, "stale": true}}
	s.allow == false
	m := posture.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"time_ns": 0}
	m.allow == false
}

test_posture_passing_allowed if {
	d := posture.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []} with input.request as {"method": "POST", "host": "api.bank.example", "path": "/transfers"}
		with input.context as {"posture": {"workload": {"status": "pass"}, "stale": false}}
	d.allow == true
}

test_scopes_per_call if {
	r := scopes.decision with input.request as {"method": "GET", "host": "api.github.com", "path": "/repos/acme/app"}
	r.credential == "github-read"
	w := scopes.decision with input.request as {"method": "PUT", "host": "api.github.com", "path": "/repos/acme/app/contents/README.md"}
	w.credential == "github-app"
	w.params.repositories == ["acme/app"]
	j := scopes.decision with input.request as {"method": "POST", "host": "billing.internal.example", "path": "/v1"}
	j.params.audience == "https://billing.internal.example"
}

test_dryrun_forwards_what_would_be_denied if {
	d := dryrun.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "GET", "host": "evil.example", "path": "/x"}
	d.allow == true
	not d.credential
	startswith(d.reason, "dry-run: would deny: ")
	a := dryrun.decision with input.identity as {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []}
		with input.request as {"method": "GET", "host": "api.github.com", "path": "/x"}
	a.reason == "spiffe://example.org/ns/ci/sa/builder may reach api.github.com"
}

# `keyless policy test` changes every field the cached allow's vary leaves out and checks that
# the decision stays the same (docs/policy.md, "Caching decisions").
vary_samples := {"data.keyless.examples.allowlist.decision": [
	{
		"source": {"address": "10.0.4.2", "port": 41000},
		"identity": {"id": "spiffe://example.org/ns/ci/sa/builder", "attestations": []},
		"request": {"method": "GET", "scheme": "https", "host": "raw.githubusercontent.com", "port": 443,
			"path": "/acme/app/main/README.md", "query": {}, "headers": {"user-agent": "git/2.43"}},
		"context": {"time": "2026-11-22T10:00:00.000Z", "time_ns": 1795341600000000000, "mode": "regular"},
	},
	{
		"source": {"address": "10.0.4.9", "port": 41001},
		"identity": {"id": "spiffe://example.org/ns/billing/sa/api", "attestations": []},
		"request": {"method": "POST", "scheme": "https", "host": "api.stripe.com", "port": 443,
			"path": "/v1/charges", "query": {}, "headers": {}},
		"context": {"time": "2026-11-22T10:00:00.000Z", "time_ns": 1795341600000000000, "mode": "regular"},
	},
]}

test_mcp_create_issue_only_in_granted_repos if {
	ok := mcp.decision with input.identity as {"id": "spiffe://demo.local/triage-agent", "attestations": []}
		with input.user as {"facts": {"subject": "alice"}}
		with input.mcp as {"server": "github", "kind": "request", "method": "tools/call", "id": 7,
			"tool": "create_issue", "arguments": {"repo": "acme/app"}, "tool_changed": false}
	ok.allow == true
	ok.credential == "github-mcp"
	bob := mcp.decision with input.identity as {"id": "spiffe://demo.local/triage-agent", "attestations": []}
		with input.user as {"facts": {"subject": "bob"}}
		with input.mcp as {"server": "github", "kind": "request", "method": "tools/call", "id": 7,
			"tool": "create_issue", "arguments": {"repo": "acme/app"}, "tool_changed": false}
	bob.allow == false
}

test_mcp_other_tools_and_changed_tools_are_refused if {
	other := mcp.decision with input.identity as {"id": "spiffe://demo.local/triage-agent", "attestations": []}
		with input.user as {"facts": {"subject": "alice"}}
		with input.mcp as {"server": "github", "kind": "request", "method": "tools/call", "id": 7,
			"tool": "delete_repo", "arguments": {"repo": "acme/app"}, "tool_changed": false}
	other.allow == false
	changed := mcp.decision with input.identity as {"id": "spiffe://demo.local/triage-agent", "attestations": []}
		with input.user as {"facts": {"subject": "alice"}}
		with input.mcp as {"server": "github", "kind": "request", "method": "tools/call", "id": 7,
			"tool": "create_issue", "arguments": {"repo": "acme/app"}, "tool_changed": true}
	changed.allow == false
	contains(changed.reason, "quarantined")
}

test_mcp_listing_shows_create_issue_to_a_granted_user_only if {
	shown := mcp.decision with input.identity as {"id": "spiffe://demo.local/triage-agent", "attestations": []}
		with input.user as {"facts": {"subject": "bob"}}
		with input.mcp as {"server": "github", "kind": "request", "method": "tools/call", "id": 7,
			"tool": "create_issue", "arguments": {}, "tool_changed": false, "listing": true}
	shown.allow == true
	hidden := mcp.decision with input.identity as {"id": "spiffe://demo.local/other-agent", "attestations": []}
		with input.user as {"facts": {"subject": "bob"}}
		with input.mcp as {"server": "github", "kind": "request", "method": "tools/call", "id": 7,
			"tool": "create_issue", "arguments": {}, "tool_changed": false, "listing": true}
	hidden.allow == false
}

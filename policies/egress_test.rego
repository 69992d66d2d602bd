# Tests for egress.rego, in `opa test` conventions: `keyless policy test policies`.
#
# The embedded engine (rego-cpp) mis-evaluates `with input as <rule or function>` and can
# abort on `with input as {...}` when the policy calls built-ins, so these tests override
# `input.identity` and `input.request` separately, with literal values. OPA accepts the same.
package keyless.egress_test

import rego.v1

import data.keyless.egress

test_billing_reads_with_api_key if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "demo-api"
}

test_billing_posts_reports_with_jwt if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "POST", "scheme": "https", "host": "127.0.0.1", "port": 443, "path": "/v1/reports", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "workload-jwt"
}

test_wrong_method_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "DELETE", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
	contains(d.reason, "DELETE")
}

test_wrong_path_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/admin", "query": {}, "headers": {}}
	d.allow == false
}

test_other_host_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "evil.example", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
}

test_unknown_workload_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/other", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
}

test_anonymous_denied if {
	d := egress.decision with input.identity as {"id": null, "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
	d.reason == "caller has no attested workload identity"
}

test_failing_posture_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
		with input.context as {"time": "2026-01-01T00:00:00Z", "posture": {"workload": {"status": "fail"}, "stale": false}}
	d.allow == false
	d.reason == "workload posture is failing"
}

test_passing_posture_allowed if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
		with input.context as {"time": "2026-01-01T00:00:00Z", "posture": {"workload": {"status": "pass"}, "stale": false}}
	d.allow == true
}

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

test_github_grant_scopes_the_installation_token if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "api.github.com", "port": 443, "path": "/repos/acme/billing/issues", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "github"
	d.params.repositories == ["billing"]
	d.params.permissions.contents == "read"
}

test_s3_grant_names_the_role if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "PUT", "scheme": "https", "host": "s3.us-east-1.amazonaws.com", "port": 443, "path": "/acme-invoices/2026/11.pdf", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "aws"
	d.params.role_arn == "arn:aws:iam::123456789012:role/billing-invoices"
}

test_partner_oauth_only_for_reports if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "api.partner.example", "port": 443, "path": "/v2/summary", "query": {}, "headers": {}}
	d.allow == false
	r := egress.decision with input.identity as {"id": "spiffe://demo.local/reports", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "api.partner.example", "port": 443, "path": "/v2/summary", "query": {}, "headers": {}}
	r.allow == true
	r.params.scopes == ["reports:read"]
}

test_ledger_uses_token_exchange if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "POST", "scheme": "https", "host": "ledger.internal.example", "port": 443, "path": "/entries", "query": {}, "headers": {}}
	d.credential == "ledger"
	d.params.audience == "https://ledger.internal.example"
}

test_grant_without_params_gets_empty_params if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "query": {}, "headers": {}}
	d.params == {}
}

# Tests for egress.rego, in `opa test` conventions: `keyless policy test policies`.
#
# The tests override `input.identity` and `input.request` separately, with literal values; the
# request carries `path_template` as Keyless builds it (proxy/policy/input.py). `vary_samples`
# at the end are inputs on which `keyless policy test` checks each cached decision's `vary`.
package keyless.egress_test

import rego.v1

import data.keyless.egress

test_billing_reads_with_api_key if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "demo-api"
}

test_billing_posts_reports_with_jwt if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "POST", "scheme": "https", "host": "127.0.0.1", "port": 443, "path": "/v1/reports", "path_template": "/v1/reports", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "workload-jwt"
}

test_wrong_method_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "DELETE", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
	contains(d.reason, "DELETE")
}

test_wrong_path_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/admin", "path_template": "/admin", "query": {}, "headers": {}}
	d.allow == false
}

test_other_host_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "evil.example", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
}

test_unknown_workload_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/other", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
}

test_anonymous_denied if {
	d := egress.decision with input.identity as {"id": null, "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == false
	d.reason == "caller has no attested workload identity"
}

test_failing_posture_denied if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
		with input.context as {"time": "2026-01-01T00:00:00Z", "posture": {"workload": {"status": "fail"}, "stale": false}}
	d.allow == false
	d.reason == "workload posture is failing"
}

test_passing_posture_allowed if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
		with input.context as {"time": "2026-01-01T00:00:00Z", "posture": {"workload": {"status": "pass"}, "stale": false}}
	d.allow == true
}

# One test per trust provider: the grants key on what each provider attests.

test_spiffe_svid_may_call_payments if {
	d := egress.decision with input.identity as {"id": "spiffe://prod/ns/payments/sa/billing", "attestations": [{"provider": "svid", "type": "mtls", "id": "spiffe://prod/ns/payments/sa/billing", "facts": {"spiffe_id": "spiffe://prod/ns/payments/sa/billing", "trust_domain": "prod"}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "payments.example.com", "port": 443, "path": "/v1/charges", "path_template": "/v1/charges", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "workload-jwt"
}

test_other_svid_may_not_call_payments if {
	d := egress.decision with input.identity as {"id": "spiffe://prod/ns/payments/sa/intruder", "attestations": [{"provider": "svid", "type": "mtls", "id": "spiffe://prod/ns/payments/sa/intruder", "facts": {"spiffe_id": "spiffe://prod/ns/payments/sa/intruder", "trust_domain": "prod"}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "payments.example.com", "port": 443, "path": "/v1/charges", "path_template": "/v1/charges", "query": {}, "headers": {}}
	d.allow == false
}

test_github_main_of_acme_deploy_may_call_payments if {
	d := egress.decision with input.identity as {"id": "https://token.actions.githubusercontent.com#repo:acme/deploy:ref:refs/heads/main", "attestations": [{"provider": "ci", "type": "jwt", "id": "https://token.actions.githubusercontent.com#repo:acme/deploy:ref:refs/heads/main", "facts": {"preset": "github", "issuer": "https://token.actions.githubusercontent.com", "repository": "acme/deploy", "repository_id": "42", "ref": "refs/heads/main"}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "payments.example.com", "port": 443, "path": "/v1/charges", "path_template": "/v1/charges", "query": {}, "headers": {}}
	d.allow == true
	d.reason == "GitHub Actions runs of acme/deploy on main may call the payments API"
}

test_github_other_branch_denied if {
	d := egress.decision with input.identity as {"id": "https://token.actions.githubusercontent.com#repo:acme/deploy:ref:refs/heads/dev", "attestations": [{"provider": "ci", "type": "jwt", "id": "https://token.actions.githubusercontent.com#repo:acme/deploy:ref:refs/heads/dev", "facts": {"preset": "github", "repository": "acme/deploy", "ref": "refs/heads/dev"}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "payments.example.com", "port": 443, "path": "/v1/charges", "path_template": "/v1/charges", "query": {}, "headers": {}}
	d.allow == false
}

test_github_other_repository_denied if {
	d := egress.decision with input.identity as {"id": "https://token.actions.githubusercontent.com#repo:evil/deploy:ref:refs/heads/main", "attestations": [{"provider": "ci", "type": "jwt", "id": "https://token.actions.githubusercontent.com#repo:evil/deploy:ref:refs/heads/main", "facts": {"preset": "github", "repository": "evil/deploy", "ref": "refs/heads/main"}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "payments.example.com", "port": 443, "path": "/v1/charges", "path_template": "/v1/charges", "query": {}, "headers": {}}
	d.allow == false
}

test_generic_issuer_with_github_like_claims_denied if {
	d := egress.decision with input.identity as {"id": "https://idp.example#x", "attestations": [{"provider": "idp", "type": "jwt", "id": "https://idp.example#x", "facts": {"preset": "generic", "repository": "acme/deploy", "ref": "refs/heads/main"}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "payments.example.com", "port": 443, "path": "/v1/charges", "path_template": "/v1/charges", "query": {}, "headers": {}}
	d.allow == false
}

test_gitlab_protected_main_reads_registry if {
	d := egress.decision with input.identity as {"id": "https://gitlab.com#project_path:acme/infra:ref_type:branch:ref:main", "attestations": [{"provider": "ci", "type": "jwt", "id": "https://gitlab.com#project_path:acme/infra:ref_type:branch:ref:main", "facts": {"preset": "gitlab", "project_path": "acme/infra", "project_id": "7", "ref": "main", "ref_protected": "true"}}]}
		with input.request as {"method": "GET", "scheme": "https", "host": "registry.example.com", "port": 443, "path": "/v2/acme/infra/manifests/latest", "path_template": "/v2/acme/infra/manifests/latest", "query": {}, "headers": {}}
	d.allow == true
}

test_gitlab_unprotected_ref_denied if {
	d := egress.decision with input.identity as {"id": "https://gitlab.com#project_path:acme/infra:ref_type:branch:ref:main", "attestations": [{"provider": "ci", "type": "jwt", "id": "https://gitlab.com#project_path:acme/infra:ref_type:branch:ref:main", "facts": {"preset": "gitlab", "project_path": "acme/infra", "project_id": "7", "ref": "main", "ref_protected": "false"}}]}
		with input.request as {"method": "GET", "scheme": "https", "host": "registry.example.com", "port": 443, "path": "/v2/acme/infra/manifests/latest", "path_template": "/v2/acme/infra/manifests/latest", "query": {}, "headers": {}}
	d.allow == false
}

test_kubernetes_builder_reads_demo_api if {
	d := egress.decision with input.identity as {"id": "https://kubernetes.default.svc#system:serviceaccount:ci:builder", "attestations": [{"provider": "k8s", "type": "jwt", "id": "https://kubernetes.default.svc#system:serviceaccount:ci:builder", "facts": {"preset": "kubernetes", "namespace": "ci", "service_account": "builder", "pod": "builder-7d9"}}]}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "demo-api"
}

test_backup_agent_process_uploads if {
	d := egress.decision with input.identity as {"id": null, "attestations": [{"provider": "local", "type": "process", "id": null, "facts": {"uid": 998, "user": "backup", "exe": "/usr/local/bin/backup-agent", "sha256": "ab", "pid": 4242}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/reports", "path_template": "/v1/reports", "query": {}, "headers": {}}
	d.allow == true
}

test_other_program_of_backup_user_denied if {
	d := egress.decision with input.identity as {"id": null, "attestations": [{"provider": "local", "type": "process", "id": null, "facts": {"uid": 998, "user": "backup", "exe": "/usr/bin/curl", "pid": 4243}}]}
		with input.request as {"method": "POST", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/reports", "path_template": "/v1/reports", "query": {}, "headers": {}}
	d.allow == false
	d.reason != "caller has no attested workload identity"
}

test_github_grant_scopes_the_installation_token if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "api.github.com", "port": 443, "path": "/repos/acme/billing/issues", "path_template": "/repos/acme/billing/issues", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "github"
	d.params.repositories == ["billing"]
	d.params.permissions.contents == "read"
}

test_s3_grant_names_the_role if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "PUT", "scheme": "https", "host": "s3.us-east-1.amazonaws.com", "port": 443, "path": "/acme-invoices/2026/11.pdf", "path_template": "/acme-invoices/{id}/11.pdf", "query": {}, "headers": {}}
	d.allow == true
	d.credential == "aws"
	d.params.role_arn == "arn:aws:iam::123456789012:role/billing-invoices"
}

test_partner_oauth_only_for_reports if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "api.partner.example", "port": 443, "path": "/v2/summary", "path_template": "/v2/summary", "query": {}, "headers": {}}
	d.allow == false
	r := egress.decision with input.identity as {"id": "spiffe://demo.local/reports", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "api.partner.example", "port": 443, "path": "/v2/summary", "path_template": "/v2/summary", "query": {}, "headers": {}}
	r.allow == true
	r.params.scopes == ["reports:read"]
}

test_ledger_uses_token_exchange if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "POST", "scheme": "https", "host": "ledger.internal.example", "port": 443, "path": "/entries", "path_template": "/entries", "query": {}, "headers": {}}
	d.credential == "ledger"
	d.params.audience == "https://ledger.internal.example"
}

test_grant_without_params_gets_empty_params if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices", "path_template": "/v1/invoices", "query": {}, "headers": {}}
	d.params == {}
}

test_an_identifier_in_the_path_shares_one_cached_allow if {
	d := egress.decision with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices/8812", "path_template": "/v1/invoices/{id}", "query": {}, "headers": {}}
	d.allow == true
	"request.path_template" in d.cache.vary
	not "request.path" in d.cache.vary
}

# Inputs as Keyless builds them, on which `keyless policy test` changes every field a cached
# decision's key leaves out and checks that the decision stays the same.
_ctx := {"time": "2026-11-22T10:00:00.000Z", "time_ns": 1795341600000000000, "mode": "regular",
	"posture": {"workload": {"status": "pass", "critical_vulns": 0}, "stale": false, "age_seconds": 4.2}}

_billing := {"id": "spiffe://demo.local/billing", "attestations": [{"provider": "office", "type": "source_ip",
	"id": "spiffe://demo.local/billing", "facts": {"address": "10.0.3.7", "cidr": "10.0.3.0/24"}}]}

_github := {"id": "https://token.actions.githubusercontent.com#repo:acme/deploy:ref:refs/heads/main", "attestations": [{
	"provider": "ci", "type": "jwt", "id": "https://token.actions.githubusercontent.com#repo:acme/deploy:ref:refs/heads/main",
	"facts": {"preset": "github", "repository": "acme/deploy", "ref": "refs/heads/main"},
}]}

_request(method, host, path) := {"method": method, "scheme": "https", "host": host, "port": 443, "path": path,
	"query": {"page": ["2"]}, "headers": {"user-agent": "curl/8.5.0", "x-request-id": "r-1"}}

vary_samples := {"data.keyless.egress.decision": [
	{"source": {"address": "10.0.3.7", "port": 50312}, "identity": _billing, "context": _ctx,
	 "request": _request("GET", "localhost", "/v1/invoices/8812")},
	{"source": {"address": "10.0.3.7", "port": 50313}, "identity": _billing, "context": _ctx,
	 "request": _request("POST", "demo-api", "/v1/reports")},
	{"source": {"address": "10.0.9.1", "port": 40000}, "identity": _github, "context": _ctx,
	 "request": _request("POST", "payments.example.com", "/v1/charges/ch_3MmlLrLkdIwHu7ix0snN0B15")},
	{"source": {"address": "10.0.3.7", "port": 50314}, "identity": _billing, "context": _ctx,
	 "request": _request("DELETE", "localhost", "/v1/invoices/8812")},
	{"source": {"address": "10.0.3.8", "port": 50315}, "identity": {"id": null, "attestations": []}, "context": _ctx,
	 "request": _request("GET", "localhost", "/v1/invoices")},
]}

# The default Keyless egress policy.
#
# Keyless asks for data.keyless.egress.decision on every request. The answer is an object:
#   {"allow": bool, "reason": string, "credential": name-or-null, "params": {...}}
# Anything else is a policy error and the request is refused (503 policy_unavailable).
#
# This policy is a table of grants: who may call what (host, methods, path prefix) and with
# which credential (a name from the `credentials` section of keyless.yaml). The first matching
# grant wins; no match is a deny that says why.
#
# "Who" is one of (see docs/attestation.md for the trust providers behind each):
#   "workload":   input.identity.id, the strongest verified id (a SPIFFE ID from an mTLS SVID,
#                 a token's id, a process or source-address mapping);
#   "github":     facts of a GitHub Actions OIDC token (jwt provider, preset github);
#   "gitlab":     facts of a GitLab CI OIDC token (preset gitlab);
#   "kubernetes": facts of a projected service-account token (preset kubernetes);
#   "process":    facts of the local process that owns the connection (process provider).
# Every listed fact must match exactly.
package keyless.egress

import rego.v1

grants := [
	{
		"reason": "billing may read the demo API with its API key",
		"workload": "spiffe://demo.local/billing",
		"hosts": {"localhost", "127.0.0.1", "demo-api"},
		"methods": {"GET", "HEAD"},
		"path_prefix": "/v1/",
		"credential": "demo-api",
	},
	{
		"reason": "billing may file reports, authenticated by a Keyless-minted JWT",
		"workload": "spiffe://demo.local/billing",
		"hosts": {"localhost", "127.0.0.1", "demo-api"},
		"methods": {"POST"},
		"path_prefix": "/v1/reports",
		"credential": "workload-jwt",
	},
	# "Only spiffe://prod/ns/payments/sa/billing, or GitHub Actions runs of acme/deploy on
	# refs/heads/main, may call the payments API."
	{
		"reason": "the billing service (SPIFFE SVID) may call the payments API",
		"workload": "spiffe://prod/ns/payments/sa/billing",
		"hosts": {"payments.example.com"},
		"methods": {"GET", "POST"},
		"path_prefix": "/v1/",
		"credential": "workload-jwt",
	},
	{
		"reason": "GitHub Actions runs of acme/deploy on main may call the payments API",
		"github": {"repository": "acme/deploy", "ref": "refs/heads/main"},
		"hosts": {"payments.example.com"},
		"methods": {"GET", "POST"},
		"path_prefix": "/v1/",
		"credential": "workload-jwt",
	},
	{
		"reason": "pipelines of acme/infra on main may read the registry",
		"gitlab": {"project_path": "acme/infra", "ref": "main", "ref_protected": "true"},
		"hosts": {"registry.example.com"},
		"methods": {"GET", "HEAD"},
		"path_prefix": "/v2/",
		"credential": "workload-jwt",
	},
	{
		"reason": "the ci/builder service account may read the demo API",
		"kubernetes": {"namespace": "ci", "service_account": "builder"},
		"hosts": {"localhost", "127.0.0.1"},
		"methods": {"GET"},
		"path_prefix": "/v1/",
		"credential": "demo-api",
	},
	{
		"reason": "the backup agent running as user backup may upload reports",
		"process": {"user": "backup", "exe": "/usr/local/bin/backup-agent"},
		"hosts": {"localhost", "127.0.0.1"},
		"methods": {"POST"},
		"path_prefix": "/v1/reports",
		"credential": "workload-jwt",
	},
	# The grants below use the brokered credentials in docs/credentials.md. `params` goes to the
	# credential provider unchanged: it narrows the token minted for this one call.
	{
		"reason": "billing may read its repository and comment on issues with a GitHub App token",
		"workload": "spiffe://demo.local/billing",
		"hosts": {"api.github.com"},
		"methods": {"GET", "POST"},
		"path_prefix": "/repos/acme/billing/",
		"credential": "github",
		"params": {"repositories": ["billing"], "permissions": {"contents": "read", "issues": "write"}},
	},
	{
		"reason": "billing may store invoices in S3 under its own role",
		"workload": "spiffe://demo.local/billing",
		"hosts": {"s3.us-east-1.amazonaws.com"},
		"methods": {"GET", "PUT", "HEAD"},
		"path_prefix": "/acme-invoices/",
		"credential": "aws",
		"params": {"role_arn": "arn:aws:iam::123456789012:role/billing-invoices"},
	},
	{
		"reason": "reports may read the partner API with a client-credentials token",
		"workload": "spiffe://demo.local/reports",
		"hosts": {"api.partner.example"},
		"methods": {"GET"},
		"path_prefix": "/v2/",
		"credential": "partner-oauth",
		"params": {"scopes": ["reports:read"], "resource": "https://api.partner.example"},
	},
	{
		"reason": "billing may post to the ledger as itself, via token exchange",
		"workload": "spiffe://demo.local/billing",
		"hosts": {"ledger.internal.example"},
		"methods": {"POST"},
		"path_prefix": "/entries",
		"credential": "ledger",
		"params": {"audience": "https://ledger.internal.example", "scopes": ["ledger:write"]},
	},
]

# Every grant that matches this request, in table order.
granted := [g | some g in grants; matches(g)]

# Every answer is cached for a minute (docs/policy.md, "Caching decisions"). The refusals use
# cache_ttl, the strict key (identity, the whole request line, posture): their reasons name the
# path. An allow reads only what `vary` lists, the path through its template, so one decision
# serves /v1/invoices/1 to /v1/invoices/999. A decision that reads headers or the clock must
# name them in vary, or not be cached; `keyless policy test` checks vary on vary_samples.
default decision := {"allow": false, "reason": "no grant allows this call", "cache_ttl": 60}

decision := {"allow": false, "reason": "caller has no attested workload identity", "cache_ttl": 60} if {
	anonymous
} else := {"allow": false, "reason": "workload posture is failing", "cache_ttl": 60} if {
	# Present only when policy.posture is configured (a scanner's or EDR's export).
	input.context.posture.workload.status == "fail"
} else := {
	"allow": true,
	"reason": granted[0].reason,
	"credential": granted[0].credential,
	"params": object.get(granted[0], "params", {}),
	"cache": {"ttl": 60, "vary": [
		"identity",
		"context.posture.workload",
		"request.method",
		"request.host",
		"request.path_template",
	]},
} if {
	count(granted) > 0
} else := {"allow": false, "reason": sprintf("no grant allows %s to %s %s%s", [
	input.identity.id,
	input.request.method,
	input.request.host,
	input.request.path,
]), "cache_ttl": 60}

anonymous if {
	input.identity.id == null
	count(input.identity.attestations) == 0
}

matches(g) if {
	caller(g)
	input.request.host in g.hosts
	input.request.method in g.methods
	# The template (identifier segments as {id}, docs/policy.md) never matches a prefix its path
	# does not: a prefix holds no "{", so the first replaced segment lies past the prefix.
	startswith(input.request.path_template, g.path_prefix)
}

caller(g) if g.workload == input.identity.id

caller(g) if attested(g.github, "jwt", "github")

caller(g) if attested(g.gitlab, "jwt", "gitlab")

caller(g) if attested(g.kubernetes, "jwt", "kubernetes")

caller(g) if attested(g.process, "process", null)

# Some attestation of this type (and jwt preset) carries every fact in `want`.
attested(want, kind, preset) if {
	some a in input.identity.attestations
	a.type == kind
	object.get(a.facts, "preset", null) == preset
	matched := {k | v := want[k]; a.facts[k] == v}
	count(matched) == count(want)
}

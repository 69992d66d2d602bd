# The policy the end-to-end tests run against (tests/test_e2e_core.py).
#
# Two workloads (billing on 127.0.0.1, reports on 127.0.0.2) and a grant table keyed on
# workload, host, method and path prefix. A few paths exist only to make the policy misbehave
# on purpose: they must turn into refusals, never into forwarded requests.
package keyless.egress

import rego.v1

billing := "spiffe://demo.local/billing"

reports := "spiffe://demo.local/reports"

grants := [
	{"workload": billing, "methods": {"GET", "POST"}, "prefix": "/v1/", "credential": "file-key"},
	{"workload": billing, "methods": {"GET"}, "prefix": "/env/", "credential": "env-key"},
	{"workload": billing, "methods": {"GET", "POST"}, "prefix": "/jwt/", "credential": "minted"},
	{"workload": billing, "methods": {"GET"}, "prefix": "/aud/", "credential": "minted", "params": {"audience": "https://billing.example"}},
	{"workload": billing, "methods": {"GET"}, "prefix": "/open/", "credential": null},
	{"workload": billing, "methods": {"GET"}, "prefix": "/doomed/", "credential": "doomed-key"},
	{"workload": billing, "methods": {"GET"}, "prefix": "/ghost/", "credential": "ghost"},
	{"workload": billing, "methods": {"GET"}, "prefix": "/rotate/", "credential": "rotating-key"},
	{"workload": reports, "methods": {"GET"}, "prefix": "/reports/", "credential": "minted"},
]

# Only "localhost" is granted, so the same upstream reached as 127.0.0.1 is a host deny.
hosts := {"localhost"}

granted := [g |
	some g in grants
	g.workload == input.identity.id
	input.request.host in hosts
	input.request.method in g.methods
	startswith(input.request.path, g.prefix)
]

# /undefined/... leaves the decision undefined: Keyless must treat that as a deny.
decision := d if {
	not startswith(input.request.path, "/undefined")
	d := _decision
}

_decision := {"allow": false, "reason": "caller has no attested workload identity"} if {
	input.identity.id == null
} else := "a string" if {
	input.request.path == "/policy-error/string"
} else := {"allow": "yes"} if {
	input.request.path == "/policy-error/allow-yes"
} else := {"allow": true, "n": to_number("not a number")} if {
	input.request.path == "/policy-error/eval"
} else := {
	"allow": true,
	"reason": sprintf("grant %s", [granted[0].prefix]),
	"credential": granted[0].credential,
	"params": object.get(granted[0], "params", {}),
} if {
	count(granted) > 0
} else := {"allow": false, "reason": sprintf("no grant allows %s to %s %s%s", [
	input.identity.id,
	input.request.method,
	input.request.host,
	input.request.path,
])}

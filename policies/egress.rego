# The default Keyless egress policy.
#
# Keyless asks for data.keyless.egress.decision on every request. The answer is an object:
#   {"allow": bool, "reason": string, "credential": name-or-null, "params": {...}}
# Anything else is a policy error and the request is refused (503 policy_unavailable).
#
# This policy is a table of grants: who (workload id) may call what (host, methods, path
# prefix) and with which credential (a name from the `credentials` section of keyless.yaml).
# The first matching grant wins; no match is a deny that says why.
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
]

# Every grant that matches this request, in table order.
granted := [g | some g in grants; matches(g)]

default decision := {"allow": false, "reason": "no grant allows this call"}

decision := {"allow": false, "reason": "caller has no attested workload identity"} if {
	input.identity.id == null
} else := {"allow": false, "reason": "workload posture is failing"} if {
	# Present only when policy.posture is configured (a scanner's or EDR's export).
	input.context.posture.workload.status == "fail"
} else := {"allow": true, "reason": granted[0].reason, "credential": granted[0].credential} if {
	count(granted) > 0
} else := {"allow": false, "reason": sprintf("no grant allows %s to %s %s%s", [
	input.identity.id,
	input.request.method,
	input.request.host,
	input.request.path,
])}

matches(g) if {
	g.workload == input.identity.id
	input.request.host in g.hosts
	input.request.method in g.methods
	startswith(input.request.path, g.path_prefix)
}

# The policy tests/test_e2e_authority.py runs against: rules written on canonical hosts only.
#
# A name rule (denied.example), an address rule (127.0.0.1 is read-only) and two allowed
# loopback destinations. Any host that is not one of these four canonical forms ends in the
# last rule with its own reason, so a spelling that escaped canonicalisation is never allowed
# and never mistaken for the decision its canonical form gets.
package keyless.egress

import rego.v1

decision := {"allow": false, "reason": "denied by name"} if {
	input.request.host == "denied.example"
} else := {"allow": false, "reason": "read-only address"} if {
	input.request.host == "127.0.0.1"
	input.request.method != "GET"
} else := {"allow": true, "reason": "allowed", "credential": "key"} if {
	input.request.host in {"127.0.0.1", "localhost"}
} else := {"allow": false, "reason": sprintf("unlisted host %s", [input.request.host])}

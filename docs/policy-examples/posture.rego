# Posture: refuse a workload whose scanner report is failing or stale, even with a valid identity.
# The allow branch requires a fresh passing report, so "no posture configured" is a deny too.
package keyless.examples.posture

import rego.v1

default decision := {"allow": false, "reason": "no fresh passing posture report for this workload"}

decision := {"allow": false, "reason": sprintf("posture failing: %d critical vulnerabilities", [
	input.context.posture.workload.critical_vulns,
])} if {
	input.context.posture.workload.status == "fail"
} else := {"allow": true, "reason": "identity and posture ok", "credential": "internal-jwt"} if {
	input.identity.id != null
	input.context.posture.stale == false
	input.context.posture.workload.status == "pass"
}

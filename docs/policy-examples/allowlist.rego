# Per-identity destination allowlist, kept as data (data.json) so that adding a host is a data
# change. Allowed decisions may be cached for 30 s: they depend only on identity and host.
package keyless.examples.allowlist

import rego.v1

default decision := {"allow": false, "reason": "destination is not on this workload's allowlist"}

decision := {"allow": true, "reason": sprintf("%s may reach %s", [input.identity.id, input.request.host]),
	"cache_ttl": 30} if {
	some pattern in data.allowlist[input.identity.id]
	glob.match(pattern, ["."], input.request.host)
}

# Per-identity destination allowlist, kept as data (data.json) so that adding a host is a data
# change. Allowed decisions are cached for 30 s for any request of this identity to this host:
# they read nothing else (cache.vary; examples_test.rego's vary_samples check it).
package keyless.examples.allowlist

import rego.v1

default decision := {"allow": false, "reason": "destination is not on this workload's allowlist"}

decision := {"allow": true, "reason": sprintf("%s may reach %s", [input.identity.id, input.request.host]),
	"cache": {"ttl": 30, "vary": ["identity.id", "request.host"]}} if {
	some pattern in data.allowlist[input.identity.id]
	glob.match(pattern, ["."], input.request.host)
}

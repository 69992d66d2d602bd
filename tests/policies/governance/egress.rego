# The governance end-to-end test's policy (tests/test_governance.py): three workloads, one
# static credential two of them may obtain, and a grant nobody uses.
package keyless.egress

import rego.v1

grants := [
	{
		"reason": "ci may read the API",
		"workload": "spiffe://e2e.test/ci",
		"hosts": {"localhost"},
		"methods": {"GET"},
		"path_prefix": "/v1/",
		"credential": "api-key",
	},
	{
		"reason": "billing may read and write the API",
		"workload": "spiffe://e2e.test/billing",
		"hosts": {"localhost"},
		"methods": {"GET", "POST"},
		"path_prefix": "/v1/",
		"credential": "api-key",
	},
	{
		"reason": "billing may file reports with a minted JWT",
		"workload": "spiffe://e2e.test/billing",
		"hosts": {"localhost"},
		"methods": {"POST"},
		"path_prefix": "/v2/reports",
		"credential": "minted",
	},
	{
		"reason": "reports may read the open feed",
		"workload": "spiffe://e2e.test/reports",
		"hosts": {"localhost"},
		"methods": {"GET"},
		"path_prefix": "/feed/",
		"credential": null,
	},
]

granted := [g | some g in grants; g.workload == input.identity.id; input.request.host in g.hosts;
	input.request.method in g.methods; startswith(input.request.path, g.path_prefix)]

default decision := {"allow": false, "reason": "no grant allows this call"}

decision := {"allow": true, "reason": granted[0].reason, "credential": granted[0].credential} if {
	count(granted) > 0
}

# The policy of the in-process hook tests (tests/unit/test_addon.py): /deny/... is denied,
# /cred/NAME/... is allowed with credential NAME, anything else is allowed with none.
package keyless.egress

import rego.v1

default decision := {"allow": true, "reason": "open"}

decision := {"allow": false, "reason": "denied path"} if startswith(input.request.path, "/deny/")

decision := {"allow": true, "reason": "credential", "credential": name} if {
	parts := split(input.request.path, "/")
	parts[1] == "cred"
	name := parts[2]
}

# The policy of tests/test_reflection.py: billing (127.0.0.1) may call anything on localhost,
# with every method, TRACE included, so that only Keyless's own TRACE rule can stop a credential
# from riding on one. The path prefix picks the credential.
package keyless.egress

import rego.v1

credentials := {"/basic/": "basic", "/jwt/": "minted", "/open/": null}

credential := c if {
	some prefix, c in credentials
	startswith(input.request.path, prefix)
} else := "api-key"

decision := {"allow": true, "reason": "reflection tests", "credential": credential} if {
	input.identity.id == "spiffe://demo.local/billing"
	input.request.host == "localhost"
} else := {"allow": false, "reason": "not the billing workload on localhost"}

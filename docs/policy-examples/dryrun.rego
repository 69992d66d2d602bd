# A dry-run policy: everything is forwarded, and what the enforcing policy would have refused is
# allowed WITHOUT a credential and marked "dry-run: would deny ..." in the audit record's reason.
# Roll out a new policy this way, grep the audit log for "dry-run:", then enforce.
package keyless.examples.dryrun

import rego.v1

import data.keyless.examples.allowlist

decision := allowlist.decision if {
	allowlist.decision.allow
} else := {"allow": true, "reason": sprintf("dry-run: would deny: %s", [allowlist.decision.reason])}

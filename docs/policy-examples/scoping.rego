# Method and path scoping: CI may read acme's repositories and set commit statuses, nothing else.
package keyless.examples.scoping

import rego.v1

routes := [
	{"methods": {"GET", "HEAD"}, "path": "/repos/acme/*", "why": "read acme repositories"},
	{"methods": {"GET", "HEAD"}, "path": "/repos/acme/*/**", "why": "read acme repositories"},
	{"methods": {"POST"}, "path": "/repos/acme/*/statuses/*", "why": "set commit statuses"},
]

matching := [r | some r in routes; input.request.method in r.methods; glob.match(r.path, ["/"], input.request.path)]

default decision := {"allow": false, "reason": "not a CI call to api.github.com"}

decision := {"allow": true, "reason": sprintf("ci may %s", [matching[0].why]), "credential": "github-ci"} if {
	input.identity.id == "spiffe://example.org/ns/ci/sa/builder"
	input.request.host == "api.github.com"
	count(matching) > 0
} else := {"allow": false, "reason": sprintf("ci may not %s %s", [input.request.method, input.request.path])} if {
	input.identity.id == "spiffe://example.org/ns/ci/sa/builder"
	input.request.host == "api.github.com"
}

# Choosing the credential and its scopes per call: reads get a read-only token, writes a token
# scoped to the one repository written to, and internal APIs a JWT for their own audience.
package keyless.examples.scopes

import rego.v1

# "acme/app" from "/repos/acme/app/...". The reason below joins strings with concat, not sprintf:
# rego-cpp's sprintf("%s") wraps a string made by concat() in quotes (OPA does not).
repo := concat("/", array.slice(split(input.request.path, "/"), 2, 4))

default decision := {"allow": false, "reason": "no credential for this call"}

decision := {"allow": true, "reason": "read with the read-only token", "credential": "github-read",
	"params": {"permissions": {"contents": "read"}}} if {
	input.request.host == "api.github.com"
	input.request.method in {"GET", "HEAD"}
} else := {"allow": true, "reason": concat("", ["write to ", repo, " only"]), "credential": "github-app",
	"params": {"repositories": [repo], "permissions": {"contents": "write"}}} if {
	input.request.host == "api.github.com"
	startswith(input.request.path, "/repos/")
} else := {"allow": true, "reason": "internal API with a JWT for its audience", "credential": "internal-jwt",
	"params": {"audience": sprintf("https://%s", [input.request.host])}} if {
	endswith(input.request.host, ".internal.example")
}

# MCP tool calls (docs/agents.md): an agent may call create_issue only in the repositories granted
# to it for the user it acts for; every other tool is refused, and hidden from tools/list; a tool
# whose description or schema changed since Keyless pinned it is quarantined.
package keyless.examples.mcp

import rego.v1

# agent (input.identity.id) -> user (the subject of the user's verified token) -> repositories
issue_grants := {"spiffe://demo.local/triage-agent": {
	"alice": {"acme/app", "acme/docs"},
	"bob": {"acme/docs"},
}}

default decision := {"allow": false, "reason": "no grant for this MCP call"}

decision := {"allow": true, "reason": "MCP session", "credential": "github-mcp"} if {
	session
} else := {"allow": false, "reason": "tool description changed since it was pinned: quarantined"} if {
	input.mcp.server == "github"
	input.mcp.tool_changed
} else := {"allow": true, "reason": "create_issue in a repository granted for this user", "credential": "github-mcp"} if {
	input.mcp.server == "github"
	input.mcp.method == "tools/call"
	input.mcp.tool == "create_issue"
	repo_granted
}

# The session's plumbing: the event stream (GET) and its end (DELETE), notifications, the
# client's answers to server requests, and the calls that only describe the server.
session if {
	input.mcp.server == "github"
	input.mcp.kind in {"transport", "notification", "response"}
}

session if {
	input.mcp.server == "github"
	input.mcp.method in {"initialize", "ping", "tools/list", "server/discover"}
}

granted_repos := issue_grants[input.identity.id][input.user.facts.subject]

# tools/list asks once per tool, with no arguments (input.mcp.listing): show the tool to a
# caller that has a repository at all; the call itself is decided on its repo argument.
repo_granted if {
	input.mcp.listing
	count(granted_repos) > 0
}

repo_granted if input.mcp.arguments.repo in granted_repos

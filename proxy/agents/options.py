"""The ``mcp`` config section: which upstreams are MCP servers, and the bounds on parsing them.

    mcp:
      servers:
        - {host: mcp.example.com, port: 443, path: /mcp, name: github}
      max_body: 1m            # a JSON-RPC request body is buffered (and parsed) up to this
      max_list_body: 4m       # a tools/list response is buffered (and filtered) up to this
      user_token:             # the user's token an agent presents for on-behalf-of credentials
        header: keyless-user-token
        issuers: [...]        # verified exactly like a ``jwt`` trust provider's tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.authority import config_host
from proxy.confread import Section

DEFAULT_USER_HEADER = "keyless-user-token"


@dataclass(frozen=True, slots=True)
class McpServer:
    name: str
    host: str
    port: int
    path: str

    @property
    def key(self) -> str:
        """What the tool pins are recorded under: one server is one endpoint."""
        return f"{self.host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class UserTokenConfig:
    header: str
    # proxy.trust.jwt.JwtOptions: the user's token is verified like a workload token.
    jwt: Any


@dataclass(frozen=True, slots=True)
class McpConfig:
    servers: tuple[McpServer, ...] = ()
    max_body: int = 1 << 20
    max_list_body: int = 4 << 20
    user_token: UserTokenConfig | None = None

    def server_for(self, host: str, port: int, path: str) -> McpServer | None:
        """The configured server ``host:port`` + ``path`` (no query) is, if any."""
        path = path.split("?", 1)[0]
        for s in self.servers:
            if s.host == host and s.port == port and path in (s.path, s.path + "/"):
                return s
        return None


def _size(s: Section, key: str, default: int) -> int:
    from proxy.answers import parse_size

    def check(value: Any) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return value if value > 0 else None
        try:
            return parse_size(value) if isinstance(value, str) else None
        except ValueError:
            return None

    size: int = s._get(key, default, check, "a size such as 512k, 1m (bytes when a number)")
    return size


def parse(s: Section) -> McpConfig:
    from proxy.trust import jwt as jwt_trust

    servers: list[McpServer] = []
    s.has("servers")
    raw = s.raw.get("servers")
    if raw is not None and not isinstance(raw, list):
        s.error("must be a list of {host, port, path}", "servers")
        raw = []
    for i, item in enumerate(raw or []):
        row = Section(item, s.key_path(f"servers[{i}]"), s.problems, s.base_dir)
        host = config_host(row)
        port = row.integer("port", 443, lo=1, hi=65535)
        path = row.text("path", "/mcp")
        if path and (not path.startswith("/") or "?" in path):
            row.error("must be an absolute path without a query, e.g. /mcp", "path")
        name = row.text("name", f"{host}:{port}")
        row.done()
        if host and path:
            servers.append(McpServer(name, host, port, path.rstrip("/") or "/"))
    user: UserTokenConfig | None = None
    if s.has("user_token"):
        us = s.section("user_token")
        header = us.text("header", DEFAULT_USER_HEADER).lower()
        if not header.isascii() or any(c in header for c in " :\r\n\0"):
            us.error(f"is not a valid header name: {header!r}", "header")
        user = UserTokenConfig(header, jwt_trust.parse(us))
        us.done()
    return McpConfig(tuple(servers), _size(s, "max_body", 1 << 20), _size(s, "max_list_body", 4 << 20), user)

"""``static``: a residual secret from an environment variable, a file or a secret store.

For APIs that only accept a long-lived key. The app never sees it: Keyless reads it at start,
re-reads a file when it changes and an AWS Secrets Manager secret every ``refresh_interval``
(rotation without restart), and injects it into one header.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from proxy.confread import Section
from proxy.credentials import Runtime, header_template, render
from proxy.credentials.secretstore import (
    SecretsManagerOptions,
    SecretsManagerSource,
    SecretStoreError,
    parse_secrets_manager,
)
from proxy.errors import ConfigError, KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.redact import header_forms


@dataclass(frozen=True, slots=True)
class StaticOptions:
    source: str
    env: str | None
    file: Path | None
    header: str
    template: str
    store: SecretsManagerOptions | None = None


def parse(s: Section) -> StaticOptions:
    source = s.choice("from", ("env", "file", "aws_secrets_manager"), "env" if s.has("env") else "file")
    if source == "aws_secrets_manager":
        header, template = header_template(s)
        return StaticOptions(source, None, None, header, template, parse_secrets_manager(s))
    env = s.text("env") if source == "env" else None
    file = s.path_value("file") if source == "file" else None
    if source == "env" and s.has("file"):
        s.error("only used with from: file", "file")
    if source == "file" and s.has("env"):
        s.error("only used with from: env", "env")
    header, template = header_template(s)
    return StaticOptions(source, env, file, header, template)


class SecretError(ValueError):
    """A secret could not be loaded; the message never includes the value."""


def env_missing(name: str) -> SecretError:
    # A value that is no variable name is likely the secret pasted by mistake: never echo it.
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
        return SecretError(f"environment variable {name} is not set")
    return SecretError("the environment variable name is not a valid name (a pasted secret?); it is not shown")


def check_secret(value: str) -> str:
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise SecretError("secret is empty")
    if any(c in value for c in "\r\n\0"):
        raise SecretError("secret contains CR, LF or NUL")
    return value


class StaticCredential:
    type = "static"

    def __init__(self, name: str, options: StaticOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self._value = ""
        self._stamp: tuple[int, int, int] | None = None
        # The header value and the Grant describing it, for the current secret: the same on every
        # request until the secret changes, and its fingerprint and forms cost more than the stat.
        self._granted: tuple[str, str, Grant] | None = None
        self._store = SecretsManagerSource(options.store) if options.store is not None else None
        self._file = str(options.file) if options.file is not None else ""
        try:
            self._load()
        except (SecretError, SecretStoreError) as e:
            raise ConfigError([f"credentials.{name}: {e}"]) from None

    def __repr__(self) -> str:
        return f"StaticCredential(name={self.name!r}, from={self.options.source!r})"

    def _load(self) -> None:
        o = self.options
        if self._store is not None:
            self._value = check_secret(self._store.fetch())
            return
        if o.source == "env":
            if o.env is None:
                raise RuntimeError("invariant broken: o.env is None")
            raw = os.environ.get(o.env)
            if raw is None:
                raise env_missing(o.env)
            self._value = check_secret(raw)
            return
        if o.file is None:
            raise RuntimeError("invariant broken: o.file is None")
        try:
            st = o.file.stat()
            raw = o.file.read_text()
        except OSError as e:
            raise SecretError(f"cannot read secret file {o.file} ({e.strerror})") from None
        self._value = check_secret(raw)
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _current(self) -> str:
        o = self.options
        if o.file is not None:
            # A stat per request (about a microsecond) buys rotation without a restart.
            try:
                st = os.stat(self._file)
            except OSError:
                raise KeylessError("credential_unavailable", "secret file is missing",
                                   f"static({self.name})") from None
            if (st.st_ino, st.st_mtime_ns, st.st_size) != self._stamp:
                try:
                    self._load()
                except SecretError as e:
                    raise KeylessError("credential_unavailable", str(e), f"static({self.name})") from None
        return self._value

    def _stored(self, value: str) -> None:
        try:
            self._value = check_secret(value)
        except SecretError as e:
            raise SecretStoreError(str(e)) from None

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        if self._store is not None and self._store.due():
            self._store.refresh_in_background(self._stored)
        value = self._current()
        granted = self._granted
        if granted is None or granted[0] is not value:
            header = render(self.options.template, value)
            granted = self._granted = (value, header, Grant(self.name, self.type, None, fingerprint(value),
                                                            header_forms(header, value)))
        request.headers[self.options.header] = granted[1]
        return granted[2]

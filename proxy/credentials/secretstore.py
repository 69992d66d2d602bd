"""Residual secrets held in a secret store, for the ``static`` provider.

``aws_secrets_manager``: ``GetSecretValue`` through botocore with Keyless's own AWS identity (the
default credential chain: environment, web identity, instance role). botocore is synchronous,
so refreshes run in a worker thread, never on the event loop; the request path only reads the
value held in memory and starts a background refresh once ``refresh_interval`` has passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.confread import Section

log = logging.getLogger("keyless.credentials")


@dataclass(frozen=True, slots=True)
class SecretsManagerOptions:
    secret_id: str
    region: str
    endpoint_url: str | None
    ca_file: Path | None
    json_key: str | None
    refresh_interval: float


def parse_secrets_manager(s: Section) -> SecretsManagerOptions:
    from proxy.credentials.http import endpoint_url

    return SecretsManagerOptions(
        secret_id=s.text("secret_id"), region=s.text("region", "us-east-1"),
        endpoint_url=endpoint_url(s, "endpoint_url"), ca_file=s.path_value("ca_file", None),
        json_key=s.text("json_key", None), refresh_interval=s.number("refresh_interval", 300.0, lo=1.0),
    )


class SecretStoreError(ValueError):
    """The store did not give a usable secret; the message never contains the value."""


class SecretsManagerSource:
    def __init__(self, options: SecretsManagerOptions) -> None:
        from proxy.credentials.http import quiet_botocore

        quiet_botocore()
        self.options = options
        self._client: Any = None
        self._refreshing: asyncio.Task[None] | None = None
        self.loaded_at = 0.0

    def __repr__(self) -> str:
        return f"SecretsManagerSource(secret_id={self.options.secret_id!r})"

    def fetch(self) -> str:
        """Blocking: call from a worker thread (or at start, before the loop runs)."""
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        o = self.options
        if self._client is None:
            self._client = botocore.session.get_session().create_client(
                "secretsmanager", region_name=o.region, endpoint_url=o.endpoint_url,
                verify=str(o.ca_file) if o.ca_file else True,
                config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}, proxies={}))
        try:
            answer = self._client.get_secret_value(SecretId=o.secret_id)
        except ClientError as e:
            raise SecretStoreError(f"GetSecretValue failed ({e.response.get('Error', {}).get('Code', '?')})") from None
        except BotoCoreError as e:
            raise SecretStoreError(f"GetSecretValue failed ({type(e).__name__})") from None
        value = answer.get("SecretString")
        if not isinstance(value, str):
            raise SecretStoreError("secret has no SecretString")
        if o.json_key is not None:
            try:
                value = json.loads(value)[o.json_key]
            except (ValueError, KeyError, TypeError):
                raise SecretStoreError(f"secret is not JSON with key {o.json_key!r}") from None
            if not isinstance(value, str):
                raise SecretStoreError(f"secret key {o.json_key!r} is not a string")
        self.loaded_at = time.monotonic()
        return value

    def due(self) -> bool:
        return time.monotonic() - self.loaded_at >= self.options.refresh_interval

    def refresh_in_background(self, store: Any) -> None:
        """Start one refresh (single flight); ``store(value)`` is called with the new value."""
        if self._refreshing is not None and not self._refreshing.done():
            return

        async def run() -> None:
            try:
                store(await asyncio.to_thread(self.fetch))
            except (SecretStoreError, ValueError) as e:
                # The value in memory stays in use: a static secret does not expire.
                log.warning("secret %s: refresh failed: %s", self.options.secret_id, e)
                self.loaded_at = time.monotonic()

        self._refreshing = asyncio.get_running_loop().create_task(run())

"""Assemble Keyless from a Config and run it: mitmproxy as a library plus the admin listener."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.audit import AuditSink, JsonLinesSink
from proxy.broker import Broker
from proxy.ca import ensure_ca
from proxy.config import Config
from proxy.credentials import CredentialProvider
from proxy.errors import ConfigError
from proxy.policy.embedded import EmbeddedEngine, PolicyLoadError
from proxy.signing import Signer
from proxy.trust import TrustProvider

log = logging.getLogger("keyless")


@dataclass(frozen=True, slots=True)
class Prepared:
    config: Config
    signer: Signer
    engine: EmbeddedEngine
    trust: list[TrustProvider]
    credentials: dict[str, CredentialProvider]


def prepare(config: Config) -> Prepared:
    """Everything ``keyless check`` verifies; raises ConfigError listing every problem."""
    problems: list[str] = []
    signer: Signer | None = None
    try:
        signer = Signer.create(config.signing.algorithm, config.signing.key_file, config.signing.issuer)
    except ConfigError as e:
        problems.extend(e.problems)
    engine: EmbeddedEngine | None = None
    try:
        engine = EmbeddedEngine.from_dir(config.policy.dir, config.policy.decision)
        probe_policy(engine)
    except PolicyLoadError as e:
        problems.extend(f"policy: {p}" for p in e.problems)
    trust: list[TrustProvider] = []
    credentials: dict[str, CredentialProvider] = {}
    if signer is not None:
        try:
            trust, credentials = Broker.build_plugins(config, signer)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    assert signer is not None and engine is not None
    return Prepared(config, signer, engine, trust, credentials)


def probe_policy(engine: EmbeddedEngine) -> None:
    """Evaluate the decision once: rego-cpp reports some errors (unknown functions) only then."""
    from proxy.errors import KeylessError

    probe = {
        "source": {"address": "127.0.0.1", "port": 1},
        "identity": {"id": None, "attestations": []},
        "request": {"method": "GET", "scheme": "https", "host": "example.com", "port": 443,
                    "path": "/", "query": {}, "headers": {}},
        "context": {"time": "2026-01-01T00:00:00Z", "mode": "regular"},
    }
    try:
        engine.decide_sync(probe)
    except KeylessError as e:
        raise PolicyLoadError([e.message]) from None


async def serve(prep: Prepared, *, reuse_port: bool = False) -> int:
    """Run until SIGINT/SIGTERM. Returns the process exit code.

    ``reuse_port``: bind the proxy and admin ports with SO_REUSEPORT (one of several workers,
    see proxy/workers.py).
    """
    from mitmproxy import options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

    from proxy.addon import KeylessAddon

    config = prep.config
    ca_cert = ensure_ca(config.tls.ca_dir)
    sink: AuditSink = JsonLinesSink(config.audit.path)
    broker = Broker(config, prep.engine, prep.signer, sink, prep.trust, prep.credentials)

    master = Master(options.Options())
    ready = asyncio.Event()

    class Ready:
        def running(self) -> None:
            ready.set()

    # A deliberately short addon list: no onboarding app, no scripts, no replay, nothing that
    # could answer or rewrite a request behind Keyless's back.
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True), KeylessAddon(broker), Ready(),
    )
    # Options belong to the addons that define them, so they are set once all are loaded.
    master.options.update(
        mode=["regular"],
        listen_host=config.listen.address,
        listen_port=config.listen.port,
        confdir=str(config.tls.ca_dir),
        # lazy: no byte reaches an upstream before the policy has allowed the request.
        connection_strategy="lazy",
        upstream_cert=False,
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=str(config.tls.upstream_ca) if config.tls.upstream_ca else None,
    )

    if reuse_port:
        from proxy.workers import enable_reuse_port

        enable_reuse_port()

    runner: web.AppRunner | None = None
    if config.admin.enabled:
        from proxy.admin import make_admin_app

        runner = web.AppRunner(make_admin_app(prep.signer, ca_cert, ready.is_set), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.admin.address, config.admin.port, reuse_port=reuse_port or None).start()
        except OSError as e:
            await runner.cleanup()
            where = f"{config.admin.address}:{config.admin.port}"
            raise ConfigError([f"admin: cannot listen on {where} ({e.strerror})"]) from None

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    log.info("keyless listening on %s:%d (policy revision %s, CA %s)", config.listen.address,
             config.listen.port, prep.engine.revision, ca_cert)
    from proxy.policy.cache import describe

    log.info("%s", describe(getattr(prep.engine, "cache", None)))
    # Everything built so far (modules, compiled policy, mitmproxy's option tree: ~100k objects)
    # lives as long as the process: move it out of the collector's reach so full collections
    # triggered by per-request garbage do not rescan it.
    gc.collect()
    gc.freeze()
    try:
        await master.run()
    finally:
        sink.close()
        if runner is not None:
            await runner.cleanup()
    return 0


def ca_cert_for(config: Config) -> Path:
    return ensure_ca(config.tls.ca_dir)

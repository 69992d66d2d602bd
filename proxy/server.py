"""Assemble Keyless from a Config and run it: mitmproxy as a library plus the admin listener."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.audit import AuditTrail, build_trail
from proxy.ca import ensure_ca
from proxy.config import Config
from proxy.credentials import CredentialProvider
from proxy.errors import ConfigError
from proxy.governance.shadow import Shadow, build_shadow
from proxy.model import set_fingerprint_key
from proxy.pipeline import Pipeline
from proxy.policy import PolicyEngine
from proxy.policy.embedded import PolicyLoadError
from proxy.policy.runtime import PolicyRuntime, build_policy
from proxy.shared.store import SharedStore, store_for
from proxy.signing import Signer
from proxy.trust import TrustProvider

log = logging.getLogger("keyless")


@dataclass(frozen=True, slots=True)
class Prepared:
    config: Config
    signer: Signer
    engine: PolicyEngine
    trust: list[TrustProvider]
    credentials: dict[str, CredentialProvider]
    policy: PolicyRuntime | None = None
    shadow: Shadow | None = None  # policy.shadow, evaluated beside the engine (docs/learning.md)
    shared: SharedStore | None = None


def prepare(config: Config) -> Prepared:
    """Everything ``keyless check`` verifies; raises ConfigError listing every problem."""
    problems: list[str] = []
    signer: Signer | None = None
    try:
        signer = Signer.create(config.signing.algorithm, config.signing.key_file, config.signing.issuer)
    except ConfigError as e:
        problems.extend(e.problems)
    policy: PolicyRuntime | None = None
    try:
        # Reads, compiles, probes and tests the policy (or, for OPA, its local copy if any).
        policy = build_policy(config.policy.engine, config.policy.dir, config.policy.decision,
                              config.policy.extras)
    except PolicyLoadError as e:
        problems.extend(f"policy: {p}" for p in e.problems)
    shadow: Shadow | None = None
    if config.policy.extras.shadow is not None:
        try:
            shadow = build_shadow(config.policy.extras.shadow, config.policy.engine, config.policy.decision,
                                  config.policy.extras)
        except PolicyLoadError as e:
            problems.extend(f"policy: {p}" for p in e.problems)
    trust: list[TrustProvider] = []
    credentials: dict[str, CredentialProvider] = {}
    shared: SharedStore | None = None
    try:
        # Reads the encryption key and Redis password; connects only once serving.
        shared = store_for(config.cache)
    except ConfigError as e:
        problems.extend(e.problems)
    if signer is not None:
        try:
            trust, credentials = Pipeline.build_plugins(config, signer, shared)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    if signer is None or policy is None:
        raise RuntimeError("invariant broken: no signer or policy without a problem")
    set_fingerprint_key(signer.derived_key(b"audit-fingerprint"))
    return Prepared(config, signer, policy.engine, trust, credentials, policy, shadow=shadow, shared=shared)


def load_and_prepare(path: Path) -> Prepared:
    """``keyless check``: read the config, then secrets and policies, and raise ConfigError
    with every problem from all three stages (duplicates removed)."""
    from proxy.config import load_config

    problems: list[str] = []
    config: Config | None
    try:
        config = load_config(path)
    except ConfigError as e:
        problems.extend(e.problems)
        config = e.partial if isinstance(e.partial, Config) else None
    if config is not None:
        try:
            prep = prepare(config)
        except ConfigError as e:
            problems.extend(e.problems)
        else:
            if not problems:
                return prep
    raise ConfigError(list(dict.fromkeys(problems)))


async def serve(prep: Prepared, *, reuse_port: bool = False) -> int:
    """Run until SIGINT/SIGTERM. Returns the process exit code.

    ``reuse_port``: bind the proxy and admin ports with SO_REUSEPORT (one of several workers,
    see proxy/workers.py).
    """
    from mitmproxy import options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

    from proxy.addon import KeylessAddon
    from proxy.answer_layers import install as install_answers
    from proxy.wirepatch import install as install_wire_limits

    config = prep.config
    ca_cert = ensure_ca(config.tls.ca_dir)
    if config.tls.publish_ca is not None:
        from proxy.ca import publish_ca

        publish_ca(ca_cert, config.tls.publish_ca)
    if config.tls.publish_bundle is not None:
        from proxy.clientenv import system_bundle, write_bundle

        config.tls.publish_bundle.parent.mkdir(parents=True, exist_ok=True)
        write_bundle(config.tls.publish_bundle, ca_cert, system_bundle())
    sink = build_trail(config.audit, prep.signer)
    pipeline = Pipeline(config, prep.engine, prep.signer, sink, prep.trust, prep.credentials)
    policy = prep.policy
    from proxy.observe import instrument

    instrument(pipeline, sink, policy)
    pipeline.shadow = prep.shadow
    if policy is not None and policy.posture is not None:
        pipeline.posture = policy.posture.lookup
    shared = prep.shared
    if shared is not None:
        from proxy.shared.revocation import Revocations

        pipeline.revocations = Revocations(shared)
        pipeline.telemetry.add_collector(shared.collect)

    from proxy.ports import Bound, bind_problem, fmt_address, remove_state, write_state

    # mitmproxy would log a port in use with a hint for its own command line and exit 1: try
    # the bind first and report it like any config problem (one line, exit 2).
    if problem := bind_problem("listen.port", config.listen.address, config.listen.port, reuse_port=reuse_port):
        raise ConfigError([problem])

    master = Master(options.Options())
    ready = asyncio.Event()
    admin_addr: list[str] = []

    class Ready:
        def running(self) -> None:
            # Logged here, once mitmproxy has bound: the address is the real one (port 0 too).
            addrs = master.addons.get("proxyserver").listen_addrs()
            if not addrs:
                return  # mitmproxy failed to listen; ErrorCheck stops it and serve() reports it
            host, port = addrs[0][0], addrs[0][1]
            log.info("keyless listening on %s (policy revision %s, CA %s)%s", fmt_address(host, port),
                     prep.engine.revision, ca_cert, f", admin on {admin_addr[0]}" if admin_addr else "")
            if not reuse_port:
                bound = Bound(os.getpid(), host, port, admin_addr[0] if admin_addr else None)
                try:
                    write_state(config.tls.ca_dir, bound)
                except OSError as e:  # only `keyless env` with port 0 needs it: not worth failing for
                    log.warning("cannot record the bound port in %s (%s)", config.tls.ca_dir, e.strerror)
            ready.set()
            # mitmproxy dispatches every hook of every request to every addon in its chain (a
            # few microseconds each): this one has done its only job.
            asyncio.get_running_loop().call_soon(master.addons.remove, self)

    # A deliberately short addon list: no onboarding app, no scripts, no replay, nothing that
    # could answer or rewrite a request behind Keyless's back.
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=False), keyless_addon := KeylessAddon(pipeline), Ready(),
    )
    # Header limits, HTTP/2-to-HTTP/1 framing, timeouts, connection cap: patches mitmproxy has no
    # options for (proxy/wirepatch.py), in place before the first connection is accepted.
    install_wire_limits(config.listen.limits, on_refusal=keyless_addon.audit_wire_refusal)
    # Options belong to the addons that define them, so they are set once all are loaded.
    master.options.update(
        # "transparent": the original destination comes from the redirected socket (SO_ORIGINAL_DST).
        mode=[config.listen.mode],
        listen_host=config.listen.address,
        listen_port=config.listen.port,
        confdir=str(config.tls.ca_dir),
        # lazy: no byte reaches an upstream before the policy has allowed the request.
        connection_strategy="lazy",
        upstream_cert=False,
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=str(upstream_trust(config.tls.upstream_ca)),
        # Ask clients for a certificate only when an mtls provider will verify it (mitmproxy
        # itself accepts any certificate; some clients hang up when asked for one they lack).
        request_client_cert=any(p.type == "mtls" for p in config.trust),
        # body_size_limit stays unset: it caps requests and responses alike and answers with
        # mitmproxy's page. Keyless limits requests itself (listen.max_request_body).
    )
    # Keyless's JSON answers in place of mitmproxy's error pages (proxy/answer_layers.py).
    install_answers(keyless_addon)

    def is_ready() -> bool:
        # Ready once mitmproxy listens and the policy engine has answered (OPA: at least once),
        # and while the audit trail can be written.
        return ready.is_set() and (policy is None or policy.ready()) and sink.healthy()

    if reuse_port:
        from proxy.workers import enable_reuse_port

        enable_reuse_port()

    runner: web.AppRunner | None = None
    if config.admin.enabled:
        from proxy.admin import make_admin_app

        status = policy.status if policy is not None else None
        report = None
        if config.audit.path != "-":
            from functools import partial

            from proxy.governance.report_cli import live_report

            report = partial(live_report, config.source, Path(config.audit.path))
        runner = web.AppRunner(make_admin_app(prep.signer, ca_cert, is_ready, status, audit_status=sink.status,
                                              metrics=pipeline.telemetry.registry, report=report,
                                              routes=_shared_routes(shared)), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.admin.address, config.admin.port, reuse_port=reuse_port or None).start()
        except OSError as e:
            await runner.cleanup()
            where = f"{config.admin.address}:{config.admin.port}"
            raise ConfigError([f"admin: cannot listen on {where} ({e.strerror})"]) from None
        admin_addr.extend(fmt_address(str(a[0]), int(a[1])) for a in runner.addresses[:1])

    from proxy.drain import Drainer

    loop = asyncio.get_running_loop()
    drainer = Drainer(master, keyless_addon.inflight, config.listen.drain_seconds, on_start=ready.clear,
                      on_timeout=pipeline.cut_inflight)
    loop.add_signal_handler(signal.SIGINT, master.shutdown)
    loop.add_signal_handler(signal.SIGTERM, drainer.start)
    from proxy.observe import on_sighup

    loop.add_signal_handler(signal.SIGHUP, on_sighup(config, policy, pipeline.telemetry))
    # Everything built so far (modules, compiled policy, mitmproxy's option tree: ~100k objects)
    # lives as long as the process: move it out of the collector's reach so full collections
    # triggered by per-request garbage do not rescan it.
    gc.collect()
    gc.freeze()
    if policy is not None:
        await policy.start()
    if prep.shadow is not None:
        await prep.shadow.start()
    await sink.start({"version": pipeline.labels.get("version"), "policy_revision": prep.engine.revision})
    if pipeline.revocations is not None:
        await pipeline.revocations.begin()
    ticker = loop.create_task(_tick(sink))
    flushed = False
    try:
        await master.run()
    except SystemExit:
        # mitmproxy's ErrorCheck: an error was logged during startup (a bind lost to a race
        # after the check above, say); it has been printed once already by the log handler.
        where = fmt_address(config.listen.address, config.listen.port)
        raise ConfigError([f"listen: cannot start the proxy listener on {where} (see the error above)"]) from None
    finally:
        if not reuse_port:
            remove_state(config.tls.ca_dir)
        ticker.cancel()
        if policy is not None:
            await policy.stop()
        if prep.shadow is not None:
            await prep.shadow.stop()
        if pipeline.revocations is not None:
            await pipeline.revocations.stop()
        if shared is not None:
            await shared.aclose()
        # Every record written (spool flushed, final checkpoint signed) or a non-zero exit.
        flushed = await sink.aclose()
        if runner is not None:
            await runner.cleanup()
    return 0 if flushed else 1


def _shared_routes(shared: SharedStore | None) -> Callable[[web.Application], None] | None:
    if shared is None:
        return None
    from proxy.shared.admin import add_routes

    return lambda app: add_routes(app, shared)


async def _tick(sink: AuditTrail) -> None:
    """Once a second: retry a failed audit sink's spool; time-based checkpoints."""
    while True:
        await asyncio.sleep(1.0)
        try:
            sink.tick()
        except Exception as e:  # noqa: BLE001 - the ticker must outlive any one failure
            log.error("audit tick failed: %s", type(e).__name__)


def upstream_trust(configured: Path | None) -> Path:
    """The CA bundle upstream certificates are verified against.

    mitmproxy falls back to certifi's bundle, which ignores CAs an operator installed in the
    system store; Keyless uses the system bundle (as its token-endpoint clients do) unless
    ``tls.upstream_ca`` names another.
    """
    if configured is not None:
        return configured
    system = ssl.get_default_verify_paths().cafile
    if system and Path(system).is_file():
        return Path(system)
    import certifi

    return Path(certifi.where())

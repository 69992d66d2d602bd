"""mitmproxy with exactly Keyless's addon list and options, minus Keyless: the "bare" baseline.

``mitmdump`` loads about forty default addons (dumper, save, replay, the onboarding app, ...),
and every hook is dispatched to each of them; Keyless's Master loads six (see
``proxy/server.py``). Comparing Keyless with this process isolates the cost of Keyless's own
work per request (attest, decide, strip, inject, audit); comparing with ``mitmdump`` answers
the user's question ("what does Keyless cost over the mitmproxy I know?"). Keep the addon list
and options in step with ``proxy.server.serve``.

    python bench/bare_master.py --port 8080 --confdir CA_DIR [--upstream-ca FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def main(args: argparse.Namespace) -> None:
    from mitmproxy import options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

    master = Master(options.Options())
    master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
                      errorcheck.ErrorCheck(repeat_errors_on_stderr=True))
    master.options.update(mode=["regular"], listen_host="127.0.0.1", listen_port=args.port, confdir=args.confdir,
                          connection_strategy="lazy", upstream_cert=False, ssl_insecure=False,
                          ssl_verify_upstream_trusted_ca=args.upstream_ca)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--confdir", required=True)
    p.add_argument("--upstream-ca")
    asyncio.run(main(p.parse_args()))

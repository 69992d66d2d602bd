"""The one shape every plug-in registry uses (trust providers, credentials, ...).

A registry is a visible dict from a type name to a ``PluginSpec`` (Secretless's
``ProviderFactories``, mitmproxy's ``default_addons()``): no entry points, no discovery. Flags
say what a plug-in needs from the request path, after httpx's ``Auth.requires_request_body``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.confread import Section


@dataclass(frozen=True, slots=True)
class PluginSpec[T]:
    # Validates the plug-in's own config section into a frozen options object.
    parse: Callable[[Section], Any]
    # Builds the plug-in from its name, options and (for some kinds) shared services. May raise
    # ConfigError (a missing secret): ``keyless check`` reports it with the rest.
    create: Callable[..., T]
    # The request body must be complete before the plug-in runs (SigV4 signs its hash). Only
    # then does Keyless buffer a body; otherwise it streams to the upstream after the decision.
    requires_request_body: bool = False

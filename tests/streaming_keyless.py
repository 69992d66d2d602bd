"""``python -m proxy.cli`` with allowed request bodies streamed to the upstream after the
decision, as the pipeline does for credentials that do not need the body: the ``request`` hook's
work (strip, inject, allow the upstream connection) moves into ``requestheaders``, which then
sets ``flow.request.stream = True``. Used by tests/test_wire_answers.py."""

from __future__ import annotations

import sys
from typing import Any

from proxy.addon import KeylessAddon
from proxy.cli import main

_decide = KeylessAddon.requestheaders
_forward = KeylessAddon.request
_STREAMED = "test.streamed"


async def _requestheaders(self: KeylessAddon, flow: Any) -> None:
    await _decide(self, flow)
    if flow.response is None:
        await _forward(self, flow)
    if flow.response is None:
        flow.metadata[_STREAMED] = True
        flow.request.stream = True


async def _request(self: KeylessAddon, flow: Any) -> None:
    if not flow.metadata.get(_STREAMED):
        await _forward(self, flow)


KeylessAddon.requestheaders = _requestheaders  # type: ignore[method-assign]
KeylessAddon.request = _request  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())

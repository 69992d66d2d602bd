"""Policy: build the input document, ask Rego, parse the decision strictly."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.model import Decision


class PolicyEngine(Protocol):
    revision: str
    query: str

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        """Evaluate the decision rule for one request.

        Raises ``KeylessError("policy_unavailable", ...)`` when the policy errors or returns
        anything but an object with a boolean ``allow``.
        """
        ...

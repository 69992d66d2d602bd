"""Policy: build the input document, ask Rego, parse the decision strictly."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.errors import KeylessError
from proxy.model import Decision


class PolicyEngine(Protocol):
    query: str

    @property
    def revision(self) -> str:
        """The policy revision in force (a bundle's ``.manifest`` revision, or a content hash)."""
        ...

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        """Evaluate the decision rule for one request.

        Raises ``KeylessError("policy_unavailable", ...)`` when the policy errors or returns
        anything but an object with a boolean ``allow``.
        """
        ...


class PolicyUnavailable(KeylessError):
    """``policy_unavailable`` with a reason code for the audit record.

    Reason codes: ``policy_error`` (evaluation failed), ``malformed_decision``, ``opa_timeout``,
    ``opa_unreachable``, ``opa_http_error``, ``opa_malformed_response``, ``policy_not_loaded``.
    """

    def __init__(self, reason: str, message: str, provider: str | None = None,
                 engine_decision_id: str | None = None) -> None:
        super().__init__("policy_unavailable", message, provider)
        self.reason = reason
        self.engine_decision_id = engine_decision_id

"""One static secret an app sent, as the audit record keeps it: where, what, a keyed fingerprint.

No field can hold the value: the fingerprint is an HMAC with Keyless's key (proxy.model), so a
log reader can correlate records about one secret and cannot test a guess against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Finding:
    # ``header:authorization``, ``query:api_key``, ``cookie:session``, ``body:$.password``
    location: str
    # The detect-secrets plugin class that matched, or ``strip_list`` (a credential header or
    # parameter by name, whatever its value looks like).
    detector: str
    fingerprint: str
    # Removed before forwarding (strip config) or forwarded to the upstream as the app sent it.
    stripped: bool

    @property
    def kind(self) -> str:
        return self.location.split(":", 1)[0]

    def as_record(self) -> dict[str, Any]:
        return {"location": self.location, "detector": self.detector, "fingerprint": self.fingerprint,
                "action": "stripped" if self.stripped else "forwarded"}

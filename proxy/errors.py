"""The one error type Keyless raises on the request path.

Every refusal carries a stable code; the same code appears in the HTTP refusal, the audit
record and the logs. Messages name who failed and never contain a secret value.
"""

from __future__ import annotations

from typing import Final

STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "forbidden": 403,
    "attestation_failed": 407,
    "body_too_large": 413,
    "misdirected_request": 421,
    "request_header_fields_too_large": 431,
    "internal_error": 500,
    # An upstream answer Keyless will not hand on: larger than listen.max_response_body, or a
    # text body it cannot scan for a reflected credential (unknown or corrupt Content-Encoding).
    "response_too_large": 502,
    "response_unscannable": 502,
    # The upstream could not be reached or failed; see proxy/answers.py.
    "upstream_unreachable": 502,
    "upstream_dns_failed": 502,
    "upstream_tls_failed": 502,
    "upstream_failed": 502,
    "policy_unavailable": 503,
    "credential_unavailable": 503,
    "upstream_timeout": 504,
    # The audit trail cannot be written: no credential leaves unaudited (proxy.audit.file).
    "audit_unavailable": 503,
    # Still in flight when listen.drain_seconds ran out at shutdown: cut, with this record.
    "drain_timeout": 503,
    "overloaded": 503,
    # The caller's identity was revoked (`keyless revoke`); the revocation state could not be
    # synced and the identity is revocation-sensitive (proxy/shared/revocation.py).
    "identity_revoked": 403,
    "revocation_unknown": 503,
}


class KeylessError(Exception):
    """A refusal with a stable code, e.g. ``credential_unavailable``.

    ``provider`` names the plug-in that failed (``static(billing-api)``) so that the message
    reads like SPIRE's ``nodeattestor(k8s_psat): missing token``.
    """

    def __init__(self, code: str, message: str, provider: str | None = None) -> None:
        if code not in STATUS:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.provider = provider
        self.message = f"{provider}: {message}" if provider else message
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def __repr__(self) -> str:
        return f"KeylessError({self.code!r}, {self.message!r})"


class ConfigError(Exception):
    """Every problem found in a config file, each as ``key.path: what is wrong``.

    ``partial`` is the config as far as it could be read (invalid keys fall back to their
    defaults), so that ``keyless check`` can go on to check policies and secrets and report
    those problems in the same run.
    """

    def __init__(self, problems: list[str], partial: object | None = None) -> None:
        self.problems = problems
        self.partial = partial
        super().__init__("\n".join(problems))

"""Policy: build the input document, ask Rego, parse the decision strictly."""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Protocol

from proxy.model import Decision

# rego-cpp (regopy's librego_shared.so, loaded with RTLD_LOCAL by ctypes) leaks about 5 KB per
# evaluation when libstdc++ was already loaded RTLD_LOCAL by an earlier C++ extension (aiohttp's
# frozenlist is one): measured 100 MB -> 215 MB over 30,000 decisions, against flat when
# regopy loads first. Making libstdc++ global before regopy is imported (this package is
# imported before its modules) restores the flat profile whatever the import order.
# tests/test_fastinput.py::test_no_native_leak_after_cpp_extension guards it.
with contextlib.suppress(OSError):
    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)


class PolicyEngine(Protocol):
    revision: str
    query: str

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        """Evaluate the decision rule for one request.

        Raises ``KeylessError("policy_unavailable", ...)`` when the policy errors or returns
        anything but an object with a boolean ``allow``.
        """
        ...

"""Keyless: an egress credential broker built on mitmproxy."""

# regopy must be loaded before any other C++ extension module (aiohttp's frozenlist is one):
# loaded after it, rego-cpp's time-zone code binds to that module's C++ runtime and corrupts the
# heap, and a policy calling time.clock or time.weekday with a time zone aborts the process.
# Importing it here, first, holds for every entry point (`keyless`, `python -m proxy.cli`).
# rego-cpp also leaks ~5 KB per evaluation when libstdc++ was loaded RTLD_LOCAL by an earlier
# extension: making libstdc++ global first keeps it flat whatever the import order
# (tests/test_fastinput.py::test_no_native_leak_after_cpp_extension).
import contextlib  # isort: skip
import ctypes  # isort: skip

with contextlib.suppress(OSError):
    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)

import regopy  # noqa: E402, F401  # isort: skip

__version__ = "0.1.0"

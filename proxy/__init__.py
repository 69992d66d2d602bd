"""Keyless: an egress credential broker built on mitmproxy."""

# regopy must be loaded before any other C++ extension module (aiohttp's frozenlist is one):
# loaded after it, rego-cpp's time-zone code binds to that module's C++ runtime and corrupts the
# heap, and a policy calling time.clock or time.weekday with a time zone aborts the process.
# Importing it here, first, holds for every entry point (`keyless`, `python -m proxy.cli`).
import regopy  # noqa: F401  # isort: skip

__version__ = "0.1.0"

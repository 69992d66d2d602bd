"""Keyless: an egress credential broker built on mitmproxy."""

__version__ = "0.1.0"

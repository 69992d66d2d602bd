"""Governance: what the traffic says about the identities behind it (discovery, the report)."""

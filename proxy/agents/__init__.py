"""AI agents: Model Context Protocol parsing, tool policy input, tools/list filtering and pins.

``options`` reads the ``mcp`` config section; ``mcp`` parses one JSON-RPC message into the
policy's ``input.mcp`` and builds the JSON-RPC refusals; ``pins`` remembers each server's tool
descriptions so a changed one (a "rug pull") is visible to policy. No mitmproxy here.
"""

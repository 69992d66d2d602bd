"""``${VAR}`` and ``${VAR:-default}`` in keyless.yaml, expanded from the environment.

OPA's config file substitutes ``${VAR}`` from the environment; Keyless does the same, with two
differences that keep it safe and debuggable:

- Expansion runs on the parsed YAML's string values, never on the text, so a variable's value
  cannot add keys or change the document's structure. A value that is exactly one reference
  (``port: ${PORT}``) is then read as a YAML scalar, so numbers and booleans keep their type.
- An unset variable without a default is a problem reported with its key path
  (``listen.port: environment variable PORT is not set``), where OPA silently substitutes "".

``${VAR:-default}`` uses ``default`` when VAR is unset or empty (the shell's rule); ``$${`` is a
literal ``${``. Mapping keys are not expanded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_BAD_REF = re.compile(r"\$\{(?![A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})")


def expand(raw: Any, environ: Mapping[str, str], problems: list[str], path: str = "") -> Any:
    """A copy of ``raw`` with every string value expanded; problems get ``path: message`` lines."""
    if isinstance(raw, dict):
        return {k: expand(v, environ, problems, f"{path}.{k}" if path else str(k)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand(v, environ, problems, f"{path}[{i}]") for i, v in enumerate(raw)]
    if isinstance(raw, str) and "${" in raw:
        return _expand_text(raw, environ, problems, path or "(top level)")
    return raw


def _expand_text(text: str, environ: Mapping[str, str], problems: list[str], where: str) -> Any:
    if _BAD_REF.search(text.replace("$${", "")):
        problems.append(f"{where}: malformed variable reference (write ${{NAME}} or ${{NAME:-default}}, "
                        "$${ for a literal ${)")
        return text

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            problems.append(f"{where}: environment variable {name} is not set "
                            f"(set it, or write ${{{name}:-default}})")
        return ""

    whole = _REF.fullmatch(text)
    expanded = _REF.sub(one, text)
    if whole is not None and whole.group(0) != "$${":
        # `port: ${PORT}` means the number: read the value as a YAML scalar, never a structure.
        try:
            typed = yaml.safe_load(expanded) if expanded else None
        except yaml.YAMLError:
            return expanded
        if isinstance(typed, bool | int | float) and not isinstance(typed, str):
            return typed
        return expanded if expanded or whole.group(2) is not None else None
    return expanded

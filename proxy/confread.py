"""A small reader for untrusted YAML mappings that collects every problem with its key path.

Each accessor records the key as known, returns a typed value (or the default) and, on a bad
value, appends ``path.to.key: what is wrong`` to the shared problem list instead of raising,
so that one run reports every mistake at once (SPIRE's ``buildConfig`` habit).
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_MISSING: Any = object()


class Section:
    def __init__(self, raw: Any, path: str, problems: list[str], base_dir: Path) -> None:
        self.path = path
        self.problems = problems
        self.base_dir = base_dir
        self._known: set[str] = set()
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error(f"must be a mapping, got {_kind(raw)}")
            raw = {}
        self.raw: dict[str, Any] = raw

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | None = None) -> None:
        where = self.key_path(key) if key is not None else (self.path or "(top level)")
        self.problems.append(f"{where}: {message}")

    def has(self, key: str) -> bool:
        self._known.add(key)
        return key in self.raw and self.raw[key] is not None

    def _get(self, key: str, default: Any, check: Callable[[Any], T | None], want: str) -> Any:
        self._known.add(key)
        if key not in self.raw or self.raw[key] is None:
            if default is _MISSING:
                self.error(f"is required ({want})", key)
                return None
            return default
        value = self.raw[key]
        checked = check(value)
        if checked is None:
            self.error(f"must be {want}, got {_show(value)}", key)
            return default if default is not _MISSING else None
        return checked

    def text(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, lambda v: v if isinstance(v, str) and v else None, "a non-empty string")

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, lambda v: v if isinstance(v, bool) else None, "true or false")

    def integer(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = 2**31) -> Any:
        def check(v: Any) -> int | None:
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
            return v if ok else None

        return self._get(key, default, check, f"an integer from {lo} to {hi}")

    def number(self, key: str, default: Any = _MISSING, lo: float = 0.0) -> Any:
        def check(v: Any) -> float | None:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= lo
            return float(v) if ok else None

        return self._get(key, default, check, f"a number >= {lo:g}")

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        return self._get(key, default, lambda v: v if v in choices else None, "one of " + ", ".join(choices))

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        def check(v: Any) -> tuple[str, ...] | None:
            if isinstance(v, list) and all(isinstance(i, str) and i for i in v):
                return tuple(v)
            return None

        return self._get(key, default, check, "a list of strings")

    def path_value(self, key: str, default: Any = _MISSING) -> Any:
        """A filesystem path, relative to the config file's directory."""

        def check(v: Any) -> Path | None:
            if not isinstance(v, str) or not v:
                return None
            p = Path(v).expanduser()
            return p if p.is_absolute() else self.base_dir / p

        return self._get(key, default, check, "a path")

    def cidr(self, value: Any, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        if not isinstance(value, str):
            self.error(f"must be a CIDR such as 10.0.0.0/8, got {_show(value)}", key)
            return None
        try:
            return ipaddress.ip_network(value, strict=True)
        except ValueError as e:
            self.error(f"is not a valid CIDR ({e})", key)
            return None

    def section(self, key: str) -> Section:
        self._known.add(key)
        return Section(self.raw.get(key), self.key_path(key), self.problems, self.base_dir)

    def done(self) -> None:
        """Report keys nobody asked for: a typo must not silently become a default."""
        for key in self.raw:
            if key not in self._known:
                hint = difflib.get_close_matches(str(key), sorted(self._known), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.error("unknown key" + extra, str(key))


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

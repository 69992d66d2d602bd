"""Path templates for learned grants: identifier segments become ``{id}``.

The default rules are those of ``request.path_template`` (proxy.policy.input): a segment is an
identifier when it is all digits, a UUID, or at least 16 characters of ``[A-Za-z0-9_-]`` with a
digit. Each rule is a list of regular expressions that must all match the segment, written in
the syntax Python, Go (OPA) and Rust (regorus) share, with no look-around: the emitted policy
carries the same rules in ``data.json`` and applies them itself, so a grant means exactly what
``keyless learn`` showed, also with rules added by ``--id-pattern``.

Only whole segments are replaced and literal segments are kept as written, so two routes that
differ in a literal (``/v1/charges/{id}`` and ``/v1/customers/{id}``) never merge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.policy.input import ID_PLACEHOLDER

DEFAULT_RULES: tuple[tuple[str, ...], ...] = (
    ("^[0-9]+$",),
    ("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",),
    ("^[A-Za-z0-9_-]{16,}$", "[0-9]"),
)


@dataclass(frozen=True, slots=True)
class Templater:
    rules: tuple[tuple[str, ...], ...] = DEFAULT_RULES

    @classmethod
    def with_patterns(cls, extra: Sequence[str]) -> Templater:
        """The default rules plus one rule per ``--id-pattern`` (matched against the whole segment);
        raise ValueError naming a pattern that does not compile."""
        added: list[tuple[str, ...]] = []
        for p in extra:
            if "(?=" in p or "(?!" in p or "(?<" in p:
                raise ValueError(f"--id-pattern {p!r}: look-around is not supported by Rego engines")
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"--id-pattern {p!r}: {e}") from None
            added.append((f"^(?:{p})$",))
        return cls((*DEFAULT_RULES, *added))

    def is_id(self, segment: str) -> bool:
        return bool(segment) and any(all(re.search(p, segment) for p in rule) for rule in self.rules)

    def template(self, path: str) -> str:
        """``/v1/charges/123`` -> ``/v1/charges/{id}``."""
        return "/".join(ID_PLACEHOLDER if self.is_id(seg) else seg for seg in path.split("/"))

    def matches(self, pattern: str, path: str) -> bool:
        """Whether a grant's path pattern covers ``path`` (what the emitted Rego decides)."""
        want, have = pattern.split("/"), path.split("/")
        return len(want) == len(have) and all(
            w == h or (w == ID_PLACEHOLDER and self.is_id(h)) for w, h in zip(want, have, strict=True))

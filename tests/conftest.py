from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Upstream


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    u = Upstream(tmp_path / "upstream").start()
    yield u
    u.stop()

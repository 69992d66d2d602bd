"""The pipeline's small helpers that replaced standard-library calls on the request path."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

from proxy.pipeline import iso_ms, new_decision_id


def test_decision_ids_are_uuid4_hex() -> None:
    ids = {new_decision_id() for _ in range(20000)}
    assert len(ids) == 20000
    for d in ids:
        u = uuid.UUID(hex=d)
        assert (u.version, u.variant, u.hex) == (4, uuid.RFC_4122, d)


def test_iso_ms_is_rfc3339_utc_with_milliseconds() -> None:
    rng = random.Random(3339)
    stamps = [0, 999, 1000, 1_796_112_000_999, 1_796_112_001_000] + [rng.randrange(4_102_444_800_000)
                                                                     for _ in range(20000)]
    for ms in stamps:
        expected = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"
        assert iso_ms(ms) == expected


def test_only_short_paths_are_memoised() -> None:
    """A client can send paths up to the header limit, each new: they are checked, never kept."""
    import pytest

    from proxy.errors import KeylessError
    from proxy.paths import MEMO_PATH, _check_path_memo, check_path
    from proxy.policy.input import _template_memo, path_template

    long = "/v1/" + "a" * (MEMO_PATH + 1)
    before = (_check_path_memo.cache_info().currsize, _template_memo.cache_info().currsize)
    check_path(long + "?q=1")
    assert path_template(long + "/42") == long + "/{id}"
    assert (_check_path_memo.cache_info().currsize, _template_memo.cache_info().currsize) == before
    for bad in ("/v1/../admin", long + "/%2e%2e/x"):
        with pytest.raises(KeylessError):
            check_path(bad)
    check_path("/v1/ok-memo-test")
    assert _check_path_memo.cache_info().currsize == before[0] + 1

"""Fixtures of the partition tests: the test bed needs root, iproute2 and network namespaces.

Where the bed cannot be built the tests skip with the reason; under ``RPCMESH_REQUIRE_BACKENDS=1``
(CI) they fail instead.
"""

from __future__ import annotations

import pytest

from tests.partitions.bed import unsupported_reason
from tests.support.backends import backends_required


@pytest.fixture
def partition_bed_supported() -> None:
    """Skip (or fail under RPCMESH_REQUIRE_BACKENDS=1) when namespaces cannot be made here."""
    reason = unsupported_reason()
    if reason is None:
        return
    if backends_required():
        pytest.fail(f"the partition test bed cannot run: {reason} (and RPCMESH_REQUIRE_BACKENDS=1)")
    pytest.skip(
        f"the partition test bed cannot run: {reason} (set RPCMESH_REQUIRE_BACKENDS=1 to fail instead)"
    )

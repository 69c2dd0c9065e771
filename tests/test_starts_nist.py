"""Every NIST StRD nonlinear problem here from its far start with ``starts: 8``: parameters to
6 digits, standard errors to 4. Each compiles its own batched loop (~2 s), so this runs in
`make accuracy`, not `make test`."""

from __future__ import annotations

import httpx
import pytest

from tests import nist
from tests.conftest import module_scoped
from tests.test_starts import check_far_start

pytestmark = [pytest.mark.anyio, pytest.mark.accuracy]
anyio_backend, client = module_scoped()


@pytest.mark.parametrize("name", nist.names())
async def test_every_nist_problem_from_the_far_start(client: httpx.AsyncClient, name: str) -> None:
    await check_far_start(client, name)

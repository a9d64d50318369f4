"""The app for the contract tests: its own database and a lenient lockout, so that fuzzed
requests (which may carry odd headers) never lock the access key out for other modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Served, app_settings, serve
from tests.upstream import FakeUpstream


@pytest.fixture(scope="module")
def v1(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("contract-data")
    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), LOGIN_MAX_FAILURES="1000"))
    served: Served = serve(app)
    yield served.url + "/v1"
    served.stop()

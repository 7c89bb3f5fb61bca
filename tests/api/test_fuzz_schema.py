"""Schemathesis against /openapi.json (OpenAI and admin routes) of a real gateway served by
uvicorn with a FakeProvider: no 5xx, and every response conforms to the schema.

Operations are driven with Hypothesis directly (schemathesis' own pytest plugin does not load
under this pytest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from gateway.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with serve_in_thread(make_app()) as stub:
        models = {"tiny-llama": {}, "org/chat": {"priority": 1}, "ext": {"endpoint": stub}}
        app = create_app(make_settings(tmp, models, drain_seconds=0), provider=FakeProvider(endpoint=stub))
        with serve_in_thread(app) as url:
            yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_server_errors_and_schema_conformance(api_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)

        check()

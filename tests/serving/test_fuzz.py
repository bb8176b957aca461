"""Property-based fuzzing over the server's own OpenAPI spec (schemathesis): no request gets a 5xx.

Valid bodies (positive) and schema-violating ones (negative) for every operation,
a bounded number of each so the whole run stays well under a minute.
"""
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra, not installed here")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

EXAMPLES = {GenerationMode.POSITIVE: 80, GenerationMode.NEGATIVE: 60}


@pytest.fixture(scope="module")
def fuzz_target(embed_server):
    # The embed-task server serves every route (rerank by cosine too), so no operation is a trivial 400.
    schema = schemathesis.openapi.from_url(f"{embed_server.url}/openapi.json")
    return embed_server, schema


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
def test_no_server_errors(fuzz_target, mode):
    server, schema = fuzz_target
    seen = []

    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=server.url, timeout=30)
        seen.append(case.operation.label)
        assert response.status_code < 500, (case.operation.label, case.body, response.text)

    check()
    assert len({label for label in seen if label.startswith("POST")}) >= 5, seen  # the model routes were reached
    with server.client() as c:
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200

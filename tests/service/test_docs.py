"""docs/api.md documents every route with a curl example, and its error example is what the API says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()


def sections() -> dict[str, str]:
    parts = re.split(r"^## ", DOC, flags=re.MULTILINE)
    return {p.splitlines()[0].strip(): p for p in parts[1:]}


def test_every_route_has_a_section_with_a_curl_example(client: Any) -> None:
    documented = sections()
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method in operations:
            title = f"{method.upper()} {path.replace('{job_id}', '{id}').replace('{index}', '{n}')}"
            assert title in documented, f"docs/api.md has no section '## {title}'"
            section = documented[title]
            assert "curl" in section, f"'## {title}' has no curl example"
            if method != "get" or path not in ("/health",):
                assert "Authorization: Bearer" in section or path == "/health"


def test_the_documented_error_shape_is_the_real_one(client: Any) -> None:
    response = client.post("/generate", json={"prompt": "x", "width": 100, "height": 64})
    assert response.json()["detail"] == "width: Input should be a multiple of 16"
    assert '"detail": "width: Input should be a multiple of 16", "field": "width"' in DOC

"""Every route's body limit: uploads get the configured maxima, everything else the JSON limit."""

from __future__ import annotations

from typing import Any

from service.app import create_app
from service.limits import MULTIPART_OVERHEAD_BYTES, BodyLimits


def test_every_upload_route_gets_an_upload_limit_and_every_other_route_the_json_one(settings: Any) -> None:
    limits = BodyLimits.from_settings(settings)
    operations = create_app(settings).openapi()["paths"]
    uploads = []
    for path, methods in operations.items():
        for method, operation in methods.items():
            content = operation.get("requestBody", {}).get("content", {})
            limit = limits.for_route(method.upper(), path)
            if "multipart/form-data" in content:
                uploads.append(f"{method.upper()} {path}")
                # A route that takes files gets an upload maximum, not the 64 KiB of the JSON routes:
                # a new upload route must be added to BodyLimits.for_route.
                assert limit in (limits.adapter_upload, limits.dataset_upload), (method, path)
            elif (method.upper(), path) == ("POST", "/generate"):
                # An input image travels base64-encoded in its JSON body.
                assert limit == limits.generate, (method, path)
            else:
                assert limit == settings.max_json_body_bytes, (method, path)
    assert {"POST /adapters", "POST /finetune"} <= set(uploads)
    assert limits.generate == -(-settings.max_input_image_bytes * 4 // 3) + settings.max_json_body_bytes
    assert limits.adapter_upload == settings.max_adapter_bytes + MULTIPART_OVERHEAD_BYTES
    assert limits.dataset_upload == settings.max_dataset_bytes + MULTIPART_OVERHEAD_BYTES

#!/usr/bin/env python3
"""The MinIO client commands the compose files use, for the stand-in images: enough of `mc`.

    mc alias set ALIAS URL ACCESS_KEY SECRET_KEY
    mc mb [--ignore-existing] ALIAS/BUCKET
    mc ready ALIAS        (in the stand-in S3 image: the gateway answers and a volume server is up)
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

CONFIG = os.path.join(os.environ.get("MC_CONFIG_DIR", os.path.expanduser("~/.mc")), "config.json")


def aliases() -> dict[str, dict[str, str]]:
    try:
        with open(CONFIG) as f:
            return json.load(f)["aliases"]
    except FileNotFoundError:
        return {"local": {"url": "http://127.0.0.1:9000", "accessKey": os.environ.get("MINIO_ROOT_USER", ""),
                          "secretKey": os.environ.get("MINIO_ROOT_PASSWORD", "")}}


def signed_request(alias: dict[str, str], method: str, path: str) -> urllib.request.Request:
    """An S3 request signed with AWS Signature Version 4 (region us-east-1, empty body)."""
    url = urllib.parse.urlsplit(alias["url"])
    now = datetime.datetime.now(datetime.UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": url.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, urllib.parse.quote(path), "", *(f"{k}:{headers[k]}" for k in sorted(headers)),
                           "", signed, payload])
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + alias["secretKey"]).encode()
    for part in (day, "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={alias['accessKey']}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return urllib.request.Request(alias["url"].rstrip("/") + path, method=method, headers=headers)


def make_bucket(target: str, ignore_existing: bool) -> int:
    name, _, bucket = target.partition("/")
    alias = aliases()[name]
    # A fresh SeaweedFS refuses writes until its volume server has registered: retry for a while.
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(signed_request(alias, "PUT", f"/{bucket}"), timeout=10):
                print(f"Bucket created successfully `{target}`.")
                return 0
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            if "BucketAlreadyOwnedByYou" in body or "BucketAlreadyExists" in body:
                if ignore_existing:
                    print(f"Bucket `{target}` already exists.")
                    return 0
                print(f"mc: bucket `{target}` already exists", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"mc: {exc.code} {body}", file=sys.stderr)
                return 1
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"mc: {exc}", file=sys.stderr)
                return 1
        time.sleep(1)


def ready(name: str) -> int:
    try:
        with urllib.request.urlopen("http://127.0.0.1:9333/dir/status", timeout=3) as response:
            topology = json.load(response)["Topology"]
        if not any(node for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
                   for node in rack.get("DataNodes") or []):
            print("mc: no volume server yet", file=sys.stderr)
            return 1
        urllib.request.urlopen(aliases()[name]["url"], timeout=3)
    except urllib.error.HTTPError:
        pass  # the gateway answers (an anonymous request is refused): it is up
    except (OSError, KeyError, ValueError) as exc:
        print(f"mc: not ready: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:2] == ["alias", "set"] and len(argv) == 6:
        found = aliases()
        found[argv[2]] = {"url": argv[3], "accessKey": argv[4], "secretKey": argv[5]}
        os.makedirs(os.path.dirname(CONFIG), exist_ok=True)
        with open(CONFIG, "w") as f:
            json.dump({"aliases": found}, f)
        print(f"Added `{argv[2]}` successfully.")
        return 0
    if argv[:1] == ["mb"] and len(argv) in (2, 3):
        return make_bucket(argv[-1], "--ignore-existing" in argv)
    if argv[:1] == ["ready"] and len(argv) == 2:
        return ready(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

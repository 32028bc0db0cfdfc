"""Insecure configurations are refused; keys are compared as digests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobstore.settings import Settings, SettingsError, get_backend_settings, get_settings, hash_api_key
from service.auth import OPEN_ACCESS_OWNER, Principal, Unauthorized, authenticate


def test_no_keys_and_no_open_access_is_refused() -> None:
    with pytest.raises(ValidationError, match="no API keys"):
        Settings(api_keys="", dev_open_access=False)


def test_open_access_outside_development_is_refused() -> None:
    with pytest.raises(ValidationError, match="only allowed with URAE_ENV=development"):
        Settings(env="production", dev_open_access=True)


def test_open_access_in_development_lets_anyone_in() -> None:
    settings = Settings(env="development", dev_open_access=True)
    # Everything belongs to one anonymous principal, which manages all of it.
    assert authenticate(settings, None) == Principal(OPEN_ACCESS_OWNER, admin=True)


def test_keys_and_hashes_both_authenticate() -> None:
    settings = Settings(api_keys="alpha, beta", api_key_hashes=hash_api_key("gamma"))
    for key in ("alpha", "beta", "gamma"):
        assert authenticate(settings, f"Bearer {key}")
    for header in (None, "Bearer delta", "alpha", "Token alpha"):
        with pytest.raises(Unauthorized):
            authenticate(settings, header)
    assert "alpha" not in repr(settings.key_hashes)


def test_admin_keys_authenticate_as_admins_and_key_ids_are_stable_and_distinct() -> None:
    settings = Settings(api_keys="alpha", admin_keys="root", admin_key_hashes=hash_api_key("ops"))
    alpha, root, ops = (authenticate(settings, f"Bearer {k}") for k in ("alpha", "root", "ops"))
    assert not alpha.admin and root.admin and ops.admin
    assert alpha == authenticate(Settings(api_key_hashes=hash_api_key("alpha")), "Bearer alpha")
    assert len({alpha.key_id, root.key_id, ops.key_id}) == 3
    assert "alpha" not in alpha.key_id and len(alpha.key_id) == 16
    assert not alpha.can_access(root.key_id) and root.can_access(alpha.key_id) and alpha.can_access(alpha.key_id)


def test_the_api_refuses_to_start_without_keys() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("URAE_")}
    result = subprocess.run([sys.executable, "-c", "from service.app import main; main()"], env=env,
                            capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "URAE_API_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["worker", "webhooks"])
def test_a_backend_process_needs_no_keys_but_refuses_a_bad_setting_with_its_name(module: str) -> None:
    """Workers and the webhook sender answer no HTTP: their hosts' .env holds no API keys
    (tests/deploy/test_worker_host_env.py starts a worker from the README's). A setting that does not
    validate still stops them, with one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("URAE_")}
    env["URAE_LEASE_TTL_S"] = "-1"
    result = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 2, result.stderr
    assert "URAE_LEASE_TTL_S" in result.stderr
    assert "URAE_API_KEYS" not in result.stderr and "Traceback" not in result.stderr


def test_only_the_api_refuses_to_load_without_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("URAE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(SettingsError, match="no API keys configured"):
        get_settings()
    assert not get_backend_settings().key_hashes  # a worker or the webhook sender loads, holding no keys


def test_every_setting_is_documented_in_env_example() -> None:

    text = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    missing = [name for name in Settings.model_fields if f"URAE_{name.upper()}=" not in text]
    assert missing == []


def test_empty_values_mean_the_default_in_the_environment_and_in_a_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.env.example`` leaves optional settings empty (``URAE_CACHE_DIR=``): copied to ``.env`` or
    passed as ``${VAR:-}`` by compose, an empty value must not become ``Path('.')``."""

    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    empty = [line.split("=", 1)[0] for line in example.splitlines() if re.fullmatch(r"URAE_[A-Z0-9_]+=", line)]
    assert {"URAE_CACHE_DIR", "URAE_PREVIEW_AUTOENCODER", "URAE_S3_ENDPOINT_URL"} <= set(empty)
    for name in list(os.environ):
        if name.startswith("URAE_"):
            monkeypatch.delenv(name)
    defaults = Settings(api_keys="k")
    (tmp_path / ".env").write_text(example.replace("URAE_API_KEYS=\n", "URAE_API_KEYS=k\n"))
    monkeypatch.chdir(tmp_path)
    from_file = Settings()
    for name in empty:
        monkeypatch.setenv(name, "")
    from_env = Settings(_env_file=None, api_keys="k")
    for settings in (from_file, from_env):
        assert settings.cache_dir is None and settings.preview_autoencoder is None
        assert settings.local_cache_dir == defaults.storage_dir / "cache"
        for name in empty:
            field = name.removeprefix("URAE_").lower()
            if field in Settings.model_fields and field != "api_keys":
                assert getattr(settings, field) == getattr(defaults, field), name

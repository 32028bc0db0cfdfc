"""Insecure configurations are refused; keys are compared as digests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from jobstore.settings import Settings, hash_api_key
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


@pytest.mark.parametrize("program", [["-m", "worker"], ["-c", "from service.app import main; main()"]])
def test_entry_points_refuse_to_start_without_keys(program: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("URAE_")}
    result = subprocess.run([sys.executable, *program], env=env, capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "URAE_API_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_setting_is_documented_in_env_example() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    missing = [name for name in Settings.model_fields if f"URAE_{name.upper()}=" not in text]
    assert missing == []

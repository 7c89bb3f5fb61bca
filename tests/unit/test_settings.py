from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import ConfigFileError, Settings, load_settings


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.provider, s.keep_hot_seconds, s.max_waiting_requests) == (
        "127.0.0.1",
        8000,
        "local",
        600,
        512,
    )
    assert s.admin_token is None and not s.allow_unlisted_models
    assert s.resolved_database_url == "sqlite:///data/gateway.db"
    assert "{socket}" in s.local.engine_command and "{engine_args}" in s.local.engine_command


def test_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "port: 9000\nkeep_hot_seconds: 30\nlocal:\n  gpu_ids: ['0', '1']\n  stop_grace_seconds: 3\n"
    )
    s = load_settings(cfg)
    assert (s.port, s.keep_hot_seconds, s.local.gpu_ids, s.local.stop_grace_seconds) == (
        9000,
        30,
        ["0", "1"],
        3,
    )
    monkeypatch.setenv("LLMGW_PORT", "9100")
    monkeypatch.setenv("LLMGW_LOCAL__GPU_IDS", '["3"]')
    monkeypatch.setenv("LLMGW_ADMIN_TOKEN", "s3cret")
    s = load_settings(cfg)
    assert (s.port, s.local.gpu_ids) == (9100, ["3"])
    assert s.local.stop_grace_seconds == 3  # nested keys not in the environment keep the file's value
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert load_settings(cfg, port=9200).port == 9200


def test_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("port: [1\n")
    with pytest.raises(ConfigFileError, match="invalid YAML"):
        load_settings(cfg)
    cfg.write_text("- a list\n")
    with pytest.raises(ConfigFileError, match="mapping"):
        load_settings(cfg)
    cfg.write_text("porto: 1\n")
    with pytest.raises(ValueError, match="porto"):
        load_settings(cfg)
    cfg.write_text("provider: kubernetes\n")
    with pytest.raises(ValueError, match="provider"):
        load_settings(cfg)


def test_client_keys_are_required_unless_open_or_dev_on_loopback(tmp_path: Path) -> None:
    from gateway.cli.main import dev_client_auth

    base = {"data_dir": tmp_path, "admin_token": "t" * 24}
    assert Settings(**base).keys_required
    assert not Settings(**base, client_auth="open").keys_required
    for host in ("127.0.0.1", "::1", "localhost"):
        assert not dev_client_auth(Settings(**base, host=host)).keys_required
    assert dev_client_auth(Settings(**base, host="0.0.0.0")).keys_required  # reachable: keys
    assert dev_client_auth(Settings(**base, client_auth="keys")).keys_required  # asked for

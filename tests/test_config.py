"""Configuration: defaults, .env, validation messages that name the variable, the generated key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_settings
from core.errors import ConfigError


def test_defaults_pick_the_local_model_and_generate_an_access_key() -> None:
    settings = load_settings(environ={}, env_file=None)
    assert settings.active_provider == "local"
    assert settings.port == 8000
    assert settings.host == "0.0.0.0"
    assert settings.log_level == "INFO"
    assert settings.access_key_generated
    key = settings.access_key.get_secret_value()
    assert len(key) >= 32
    # A fresh key every start.
    assert load_settings(environ={}, env_file=None).access_key.get_secret_value() != key


def test_port_falls_back_to_gradio_server_port() -> None:
    assert load_settings(environ={"GRADIO_SERVER_PORT": "7860"}, env_file=None).port == 7860
    both = {"PORT": "9000", "GRADIO_SERVER_PORT": "7860"}
    assert load_settings(environ=both, env_file=None).port == 9000


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ACCESS_KEY=from-dotenv-1234567\nLOG_LEVEL=debug\nPORT=9100\n")
    settings = load_settings(environ={"PORT": "9200"}, env_file=env_file)
    assert settings.access_key.get_secret_value() == "from-dotenv-1234567"
    assert not settings.access_key_generated
    assert settings.log_level == "DEBUG"
    assert settings.port == 9200


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("PORT", "eighty", "port number"),
        ("PORT", "70000", "port number"),
        ("REQUEST_TIMEOUT", "0", "seconds from 1 to 600"),
        ("LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("PROVIDER", "azure", "auto, openai or local"),
        ("OPENAI_BASE_URL", "localhost:11434", "http://"),
        ("CHAT_MODEL", "gpt 4; rm -rf", "model id"),
        ("ACCESS_KEY", "short", "at least 16"),
        ("LOCAL_MODEL_PATH", "/nowhere/model.gguf", ".gguf"),
    ],
)
def test_invalid_values_give_one_line_naming_the_variable(name: str, value: str, allowed: str):
    with pytest.raises(ConfigError) as info:
        load_settings(environ={name: value}, env_file=None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Invalid configuration: " + name)
    assert allowed in message


def test_secret_values_are_not_echoed_in_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"ACCESS_KEY": "abc"}, env_file=None)
    assert "abc" not in str(info.value)


def test_status_has_no_secrets() -> None:
    settings = load_settings(
        environ={"OPENAI_API_KEY": "sk-secret-value-123", "ACCESS_KEY": "access-secret-4567890"},
        env_file=None,
    )
    status = repr(settings.status())
    assert "sk-secret" not in status and "access-secret" not in status
    assert settings.status()["provider"] == "openai"
    assert settings.status()["upstream_key_set"] is True


def test_provider_switch() -> None:
    assert (
        load_settings(environ={"OPENAI_API_KEY": "sk-x"}, env_file=None).active_provider == "openai"
    )
    assert (
        load_settings(
            environ={"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, env_file=None
        ).active_provider
        == "openai"
    )
    local = {"OPENAI_API_KEY": "sk-x", "PROVIDER": "LOCAL"}
    assert load_settings(environ=local, env_file=None).active_provider == "local"
    assert load_settings(environ={"PROVIDER": "openai"}, env_file=None).active_provider == "openai"

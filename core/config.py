"""Settings from the environment and .env, validated once at start."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from core.errors import ConfigError
from core.schemas import MODEL_NAME_PATTERN

VERSION = "0.1.0"

ModelName = Annotated[str | None, Field(default=None, pattern=MODEL_NAME_PATTERN)]

# What each variable allows, for the one-line error at start.
_ALLOWED = {
    "PROVIDER": "auto, openai or local",
    "LOG_LEVEL": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "REQUEST_TIMEOUT": "a number of seconds from 1 to 600",
    "PORT": "a port number from 1 to 65535",
    "MAX_CONCURRENCY": "a whole number from 1 to 1000",
    "UPSTREAM_MAX_RETRIES": "a whole number from 0 to 10",
    "OPENAI_BASE_URL": "an http:// or https:// URL, usually ending in /v1",
    "ACCESS_KEY": "at least 16 characters (make one: openssl rand -base64 24)",
    "LOCAL_MODEL_PATH": "the path of an existing .gguf file",
    "LOCAL_CONTEXT_SIZE": "a whole number from 256 to 131072",
    "LOCAL_THREADS": "a whole number from 1 to 256",
    "LOGIN_MAX_FAILURES": "a whole number from 1 to 1000",
    "DATABASE_URL": "sqlite:///path.db or postgresql://user:password@host/db",
    "LOG_CONTENT": "true or false",
    "METRICS_PUBLIC": "true or false",
    "DEFAULT_DAILY_TOKENS": "a whole number of tokens per user per day (0: no limit)",
    "DEFAULT_RPM": "a whole number of requests per user per minute (0: no limit)",
    "PRICES_JSON": 'JSON like {"model": {"input": 0.4, "output": 1.6}} (USD per 1M tokens)',
    "LOGIN_LOCKOUT_SECONDS": "a number of seconds from 1 to 86400",
    "ALLOWED_ORIGINS": "comma-separated origins such as https://tools.example.com",
    "V1_CORS_ORIGINS": "* (any site, the default), comma-separated origins, or none",
    "FORWARDED_ALLOW_IPS": "comma-separated proxy addresses or networks (10.0.0.0/8), or *",
    "MAX_REQUEST_BYTES": "a whole number of bytes from 1024 to 1073741824",
    "SESSION_IDLE_MINUTES": "a whole number of minutes from 1 to 525600",
    "SESSION_MAX_HOURS": "a whole number of hours from 1 to 8760",
    "UPLOAD_QUOTA_MB": "a whole number of megabytes per user from 1 to 102400",
    "UPLOAD_TTL_MINUTES": "a whole number of minutes from 1 to 10080",
    "ALLOW_REMOTE_IMAGES": "true or false",
    "BACKENDS_FILE": "the path of a YAML (.yaml, .yml) or TOML (.toml) file of backends",
    "SESSION_SECRET": "at least 32 characters (make one: openssl rand -base64 48)",
    "CACHE": "off, memory or database",
    "ACCESS_LOG": "true or false",
    "CACHE_TTL_SECONDS": "a whole number of seconds from 1 to 31536000",
    "CACHE_MAX_MB": "a whole number of megabytes from 1 to 102400",
    "CACHE_SHARED": "true or false",
}
for _name in ("CHAT_MODEL", "COMPLETION_MODEL", "IMAGE_MODEL", "EMBEDDING_MODEL"):
    _ALLOWED[_name] = "a model id: visible characters, no spaces, at most 256 (a path is fine)"


class Settings(BaseModel):
    """Everything the app reads from the environment; field aliases are the variable names."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore")

    access_key: SecretStr | None = Field(default=None, alias="ACCESS_KEY")
    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    provider: Literal["auto", "openai", "local"] = Field(default="auto", alias="PROVIDER")
    chat_model: ModelName = Field(default=None, alias="CHAT_MODEL")
    completion_model: ModelName = Field(default=None, alias="COMPLETION_MODEL")
    image_model: ModelName = Field(default=None, alias="IMAGE_MODEL")
    embedding_model: ModelName = Field(default=None, alias="EMBEDDING_MODEL")
    request_timeout: float = Field(default=60.0, ge=1, le=600, alias="REQUEST_TIMEOUT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", alias="LOG_LEVEL"
    )
    host: str = Field(default="0.0.0.0", alias="GRADIO_SERVER_NAME")
    port: int = Field(default=8000, ge=1, le=65535, alias="PORT")
    upstream_max_retries: int = Field(default=2, ge=0, le=10, alias="UPSTREAM_MAX_RETRIES")
    max_concurrency: int = Field(default=64, ge=1, le=1000, alias="MAX_CONCURRENCY")
    local_model_path: Path | None = Field(default=None, alias="LOCAL_MODEL_PATH")
    local_context_size: int = Field(default=2048, ge=256, le=131072, alias="LOCAL_CONTEXT_SIZE")
    local_threads: int | None = Field(default=None, ge=1, le=256, alias="LOCAL_THREADS")
    data_dir: Path = Field(default=Path("data"), alias="DATA_DIR")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    log_content: bool = Field(default=False, alias="LOG_CONTENT")
    # One line per call at INFO (logger "access"); false: none.
    access_log: bool = Field(default=True, alias="ACCESS_LOG")
    default_daily_tokens: int = Field(default=0, ge=0, le=10**12, alias="DEFAULT_DAILY_TOKENS")
    default_rpm: int = Field(default=0, ge=0, le=100_000, alias="DEFAULT_RPM")
    metrics_public: bool = Field(default=False, alias="METRICS_PUBLIC")
    prices_json: str | None = Field(default=None, alias="PRICES_JSON")
    login_max_failures: int = Field(default=5, ge=1, le=1000, alias="LOGIN_MAX_FAILURES")
    login_lockout_seconds: float = Field(default=900, ge=1, le=86400, alias="LOGIN_LOCKOUT_SECONDS")
    # The web edge (ui/edge): who may call it from where, and how much it holds.
    allowed_origins: tuple[str, ...] = Field(default=(), alias="ALLOWED_ORIGINS")
    v1_cors_origins: tuple[str, ...] = Field(default=("*",), alias="V1_CORS_ORIGINS")
    forwarded_allow_ips: tuple[str, ...] = Field(default=(), alias="FORWARDED_ALLOW_IPS")
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=2**30, alias="MAX_REQUEST_BYTES"
    )
    session_idle_minutes: int = Field(default=480, ge=1, le=525_600, alias="SESSION_IDLE_MINUTES")
    # Signs session tokens; every replica needs the same one (unset: made once in DATA_DIR).
    session_secret: SecretStr | None = Field(default=None, alias="SESSION_SECRET")
    session_max_hours: int = Field(default=72, ge=1, le=8760, alias="SESSION_MAX_HOURS")
    upload_quota_mb: int = Field(default=50, ge=1, le=102_400, alias="UPLOAD_QUOTA_MB")
    upload_ttl_minutes: int = Field(default=60, ge=1, le=10_080, alias="UPLOAD_TTL_MINUTES")
    allow_remote_images: bool = Field(default=False, alias="ALLOW_REMOTE_IMAGES")
    # Several named backends at once (core.backends); without it, the variables above
    # describe the one backend.
    backends_file: Path | None = Field(default=None, alias="BACKENDS_FILE")
    # The response cache (core.cache): where answers are kept, for how long, for whom.
    cache: Literal["off", "memory", "database"] = Field(default="off", alias="CACHE")
    cache_ttl_seconds: int = Field(default=86_400, ge=1, le=31_536_000, alias="CACHE_TTL_SECONDS")
    cache_max_mb: int = Field(default=256, ge=1, le=102_400, alias="CACHE_MAX_MB")
    cache_shared: bool = Field(default=False, alias="CACHE_SHARED")
    # True when ACCESS_KEY was not set and we made one up for this run.
    access_key_generated: bool = False

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("provider", "cache", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("access_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # Guessing is rate limited, but a short key still falls to a patient attacker.
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("too short")
        return value

    @field_validator("session_secret")
    @classmethod
    def _strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("too short")
        return value

    @field_validator("allowed_origins", "v1_cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().lower() == "none":
            return ()
        origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#@]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return origins

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        entries = []
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            if entry == "*" or "/" not in entry:
                if entry != "*" and not _is_ip(entry):
                    raise ValueError(f"{entry!r} is not an IP address or network")
                entries.append(entry)
                continue
            try:
                entries.append(str(ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return tuple(entries)

    @field_validator("openai_base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or len(value) < 10:
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("local_model_path")
    @classmethod
    def _check_model_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"no file at {value}")
        return value.expanduser() if value is not None else None

    @field_validator("backends_file")
    @classmethod
    def _check_backends_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"no file at {value}")
        if value.suffix not in (".yaml", ".yml", ".toml"):
            raise ValueError("must end in .yaml, .yml or .toml")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must start with sqlite:// or postgresql://")
        return value

    @field_validator("prices_json")
    @classmethod
    def _check_prices(cls, value: str | None) -> str | None:
        if value is not None:
            from core.pricing import parse_prices

            parse_prices(value)
        return value

    @property
    def active_provider(self) -> Literal["openai", "local"]:
        """Which backend serves: auto picks OpenAI-compatible when a key or URL is set."""
        if self.provider != "auto":
            return self.provider
        return "openai" if (self.openai_api_key or self.openai_base_url) else "local"

    def status(self) -> dict[str, object]:
        """The public, secret-free view of the configuration (for /health and the header)."""
        return {
            "version": VERSION,
            "provider": self.active_provider,
            "base_url": (
                public_url(self.openai_base_url)
                if self.openai_base_url and self.active_provider == "openai"
                else None
            ),
            "upstream_key_set": self.openai_api_key is not None,
            "cache": self.cache,
        }


def public_url(url: str) -> str:
    """`url` without its user info (user:password@host): safe to show and to log."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _env_values(environ: Mapping[str, str] | None, env_file: str | Path | None) -> dict[str, str]:
    """Merge .env and the environment (the environment wins); blank values count as unset."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    # Gradio's own variable is the fallback for PORT (Hugging Face Spaces sets it).
    if not merged.get("PORT", "").strip() and merged.get("GRADIO_SERVER_PORT", "").strip():
        merged["PORT"] = merged["GRADIO_SERVER_PORT"]
    return {k: v.strip() for k, v in merged.items() if k in _FIELDS and v.strip()}


_FIELDS = {f.alias for f in Settings.model_fields.values() if f.alias} | {"GRADIO_SERVER_PORT"}


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Read and validate settings; raise ConfigError naming the variable on anything wrong."""
    values = _env_values(environ, env_file)
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            name = str(err["loc"][0]) if err["loc"] else "?"
            secret = "KEY" in name or "SECRET" in name or name == "DATABASE_URL"
            got = "" if secret else f" (got {values.get(name, '')!r})"
            reason = err["msg"].removeprefix("Value error, ")
            lines.append(f"{name}{got}: {reason}; allowed: {_ALLOWED.get(name, 'see README')}")
        raise ConfigError("Invalid configuration: " + " | ".join(lines)) from None
    if settings.access_key is None:
        key = SecretStr(secrets.token_urlsafe(24))
        settings = settings.model_copy(update={"access_key": key, "access_key_generated": True})
    return settings

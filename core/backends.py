"""Named backends: what BACKENDS_FILE lists (YAML or TOML), or, without it, the one backend
the OPENAI_* and PROVIDER variables describe (the shorthand that keeps working unchanged).

A file, for a team that uses a hosted model, Claude, a local Ollama and the embedded model:

    backends:
      - name: openai
        kind: openai                       # any OpenAI-compatible server
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY        # the key stays in the environment, never here
        models: [gpt-4.1-mini, text-embedding-3-small, gpt-image-1]
      - name: claude
        kind: anthropic
        api_key_env: ANTHROPIC_API_KEY
        models: [claude-sonnet-4-5]
        fallbacks: {claude-sonnet-4-5: [openai/gpt-4.1-mini]}
      - name: ollama
        kind: openai
        base_url: http://localhost:11434/v1
        models: "*"                        # whatever the server lists
      - name: local
        kind: local

Nothing here talks to a backend: core.router builds the providers and routes calls.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.config import Settings
from core.errors import ConfigError
from core.pricing import Price
from core.schemas import MODEL_NAME_PATTERN

log = logging.getLogger("core.backends")
Kind = Literal["openai", "anthropic", "huggingface", "local"]
KINDS: tuple[str, ...] = ("openai", "anthropic", "huggingface", "local")
# At most 16 characters: the ledger's provider column holds the name of the backend.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,15}$"
# The NAME of a variable, in the usual capitals: a key pasted here by mistake (sk-..., gsk_...)
# does not fit, and is refused without being repeated.
ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"
FUNCTIONS = ("chat", "completion", "embedding", "image")
# Where each kind answers when the file gives no base_url.
DEFAULT_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "huggingface": "https://router.huggingface.co",
}
ModelId = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]


class BackendSpec(BaseModel):
    """One backend as the file describes it (validated; no secret in it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    kind: Kind
    base_url: str | None = None
    # The environment variable that holds the key (the file never holds a key).
    api_key_env: Annotated[str, Field(pattern=ENV_NAME_PATTERN)] | None = None
    timeout: Annotated[float, Field(ge=1, le=600)] | None = None  # default: REQUEST_TIMEOUT
    max_retries: Annotated[int, Field(ge=0, le=10)] | None = None  # default: UPSTREAM_MAX_RETRIES
    # The models it serves: ids or shell patterns ("gpt-*"), or "*": whatever it lists.
    # None: the kind's own (the embedded model's; "*" for the others).
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | Literal["*"] | None = None
    # The model a call gets when it names none, per function (chat, completion, embedding, image).
    defaults: dict[Literal["chat", "completion", "embedding", "image"], ModelId] = {}
    # Model -> what to try, in order, when it cannot answer (connection error, 429, 5xx before
    # the first byte): "backend/model", or a model id that routes like any other.
    fallbacks: dict[ModelId, list[ModelId]] = {}
    # USD per million tokens (and per image) for this backend's models, by model or prefix.
    prices: dict[str, Price] = {}

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
            raise ValueError("must be an http:// or https:// URL")
        in_file = (info.context or {}).get("file", False)  # OPENAI_BASE_URL may hold a user
        if in_file and ("@" in parts.netloc or parts.query or parts.fragment):
            # user:password@ or ?key=...: a secret in the file, and shown wherever the URL is
            raise ValueError(
                "must hold no user, password, query or fragment: put the key in an "
                "environment variable and name it in api_key_env"
            )
        return value.rstrip("/")

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_the_file(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("api_key", "key", "token", "apikey"):
                if key in data:
                    raise ValueError(
                        f"'{key}' holds a secret: put the key in an environment variable "
                        "and name that variable in api_key_env"
                    )
        return data

    @model_validator(mode="after")
    def _fits_its_kind(self) -> BackendSpec:
        if self.kind == "local" and (self.base_url or self.api_key_env):
            raise ValueError("a local backend (the embedded model) takes no base_url or key")
        return self

    def lists_everything(self) -> bool:
        """Whether its models are whatever the server lists ("*")."""
        return self.models == "*" or (self.models is None and self.kind != "local")

    def named(self, model: str) -> bool:
        """Whether `model` is in its model list, by id or pattern (never for "*")."""
        if not isinstance(self.models, list):
            return False
        return any(
            model == entry or (_is_pattern(entry) and fnmatch.fnmatchcase(model, entry))
            for entry in self.models
        )

    def listed_ids(self) -> list[str]:
        """The ids (not patterns) its model list names."""
        return [m for m in self.models or [] if not _is_pattern(m)] if self.models != "*" else []


class BackendsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: Annotated[list[BackendSpec], Field(min_length=1, max_length=64)]

    @model_validator(mode="after")
    def _consistent(self) -> BackendsFile:
        names = [b.name.lower() for b in self.backends]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two backends are named {name!r}: names must be unique")
        if sum(b.kind == "local" for b in self.backends) > 1:
            raise ValueError("at most one local backend (one embedded model per process)")
        for backend in self.backends:
            for model, targets in backend.fallbacks.items():
                for target in targets:
                    if target in (model, f"{backend.name}/{model}"):
                        raise ValueError(
                            f"backend {backend.name!r}: {model!r} cannot fall back to itself"
                        )
        return self


class Backend(BaseModel):
    """A backend ready to be built: its spec, and its key read from the environment."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec: BackendSpec
    api_key: SecretStr | None = None
    # The one backend of the variables (no BACKENDS_FILE): it keeps their defaults and words.
    shorthand: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "*?[")


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_backends(text: str, *, source: str = "BACKENDS_FILE", toml: bool = False) -> BackendsFile:
    """The file's text, validated; ConfigError names the entry and field that is wrong."""
    try:
        data = tomllib.loads(text) if toml else yaml.load(text, Loader=_StrictLoader)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{source} is not valid {'TOML' if toml else 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a 'backends:' list of backends")
    try:
        return BackendsFile.model_validate(data, context={"file": True})
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            where = _where(err["loc"], data)
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """backends[1] (claude).models, for a person to find the line."""
    parts: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            name = (
                node[part].get("name")
                if isinstance(node, list) and part < len(node) and isinstance(node[part], dict)
                else None
            )
            parts[-1] += f"[{part}]" + (f" ({name})" if isinstance(name, str) else "")
        else:
            parts.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "the file"


def load_backends(
    path: Path, environ: Mapping[str, str] | None = None, *, warn: bool = True
) -> list[Backend]:
    """Read BACKENDS_FILE and each backend's key from the environment (`warn`: log the
    fallbacks that can never be used)."""
    env = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"BACKENDS_FILE: cannot read {path}: {exc.strerror}") from None
    spec = parse_backends(text, source=f"BACKENDS_FILE ({path.name})", toml=path.suffix == ".toml")
    backends = []
    for backend in spec.backends:
        key = env.get(backend.api_key_env, "").strip() if backend.api_key_env else ""
        if backend.api_key_env and not key:
            raise ConfigError(
                f"BACKENDS_FILE ({path.name}): backend {backend.name!r} takes its key from "
                f"{backend.api_key_env}, which is not set: set it, or leave the backend out"
            )
        backends.append(Backend(spec=backend, api_key=SecretStr(key) if key else None))
    if warn:
        _warn_about_fallbacks(spec)
    return backends


def _warn_about_fallbacks(spec: BackendsFile) -> None:
    """Fallbacks that can never be used, said once at start (the file still loads)."""
    by_name = {b.name: b for b in spec.backends}
    for backend in spec.backends:
        for model, targets in backend.fallbacks.items():
            if isinstance(backend.models, list) and not backend.named(model):
                log.warning("backend %r: fallbacks for %r, a model it does not list",
                            backend.name, model)  # fmt: skip
            for target in targets:
                first, slash, _ = target.partition("/")
                other = by_name.get(first) if slash else None
                if other is None and not any(b.named(target) or b.lists_everything()
                                             for b in spec.backends):  # fmt: skip
                    log.warning("backend %r: no backend serves the fallback %r",
                                backend.name, target)  # fmt: skip
                elif other is not None and backend.kind == "openai" and other.kind != "openai":
                    log.warning(
                        "backend %r: the fallback %r is used for dashboard calls only: /v1 "
                        "passes OpenAI's bytes through, which only an openai-kind backend takes",
                        backend.name, target,
                    )  # fmt: skip


def from_settings(settings: Settings) -> list[Backend]:
    """The one backend the present variables describe (no BACKENDS_FILE): PROVIDER, or an
    OpenAI-compatible server when OPENAI_API_KEY or OPENAI_BASE_URL is set, else the
    embedded model."""
    if settings.active_provider == "local":
        return [Backend(spec=BackendSpec(name="local", kind="local"), shorthand=True)]
    defaults = {
        function: model
        for function, model in (
            ("chat", settings.chat_model),
            ("completion", settings.completion_model),
            ("image", settings.image_model),
            ("embedding", settings.embedding_model),
        )
        if model
    }
    spec = BackendSpec(
        name="openai", kind="openai", base_url=settings.openai_base_url, defaults=defaults
    )
    return [Backend(spec=spec, api_key=settings.openai_api_key, shorthand=True)]

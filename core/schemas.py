"""Request and result models: the one place inputs are validated and bounded."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import InvalidRequest

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+\-]{0,127}$"
MAX_PROMPT_CHARS = 100_000
MAX_MESSAGES = 500
MAX_CONVERSATION_CHARS = 400_000
MAX_TOKENS = 32_768
MAX_EMBEDDING_TEXTS = 2_048
MAX_DIMENSIONS = 8_192
MAX_IMAGES = 10
IMAGE_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")  # gpt-image: the dashboard's
IMAGE_QUALITIES = ("auto", "low", "medium", "high")
# What OpenAI's API also takes for dall-e-2 and dall-e-3; the upstream says which model takes which.
DALLE_SIZES = ("256x256", "512x512", "1792x1024", "1024x1792")
DALLE_QUALITIES = ("standard", "hd")

ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
Temperature = Annotated[float, Field(ge=0, le=2)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=100)]], Field(max_length=4)]
Kind = Literal["chat", "completion", "embedding", "image", "audio", "other"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class FunctionRequest(_Request):
    """A request to one of the service's functions (core.endpoints): it names a model (None:
    the backend's default for the function) and has an input to count."""

    model: ModelName | None = None

    def prompt_text(self) -> str:
        """The input as one text (for token estimates and LOG_CONTENT)."""
        raise NotImplementedError


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatRequest(FunctionRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    temperature: Temperature = 0.7
    max_tokens: MaxTokens | None = None
    stop: StopList = []

    @field_validator("messages")
    @classmethod
    def _conversation(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if sum(len(m.content) for m in messages) > MAX_CONVERSATION_CHARS:
            raise ValueError(f"the conversation is longer than {MAX_CONVERSATION_CHARS} characters")
        if not any(m.role == "user" and m.content.strip() for m in messages):
            raise ValueError("there must be at least one non-empty user message")
        return messages

    def prompt_text(self) -> str:
        return json.dumps([m.model_dump() for m in self.messages], ensure_ascii=False)


class CompletionRequest(FunctionRequest):
    prompt: Prompt
    temperature: Temperature = 0.7
    max_tokens: MaxTokens | None = None
    stop: StopList = []

    def prompt_text(self) -> str:
        return self.prompt


class ImageRequest(FunctionRequest):
    prompt: Annotated[str, Field(min_length=1, max_length=32_000)]
    size: Literal[IMAGE_SIZES + DALLE_SIZES] = "auto"  # type: ignore[valid-type]
    quality: Literal[IMAGE_QUALITIES + DALLE_QUALITIES] = "auto"  # type: ignore[valid-type]
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1

    def prompt_text(self) -> str:
        return self.prompt


class EmbeddingRequest(FunctionRequest):
    texts: Annotated[list[Prompt], Field(min_length=1, max_length=MAX_EMBEDDING_TEXTS)]
    dimensions: Annotated[int, Field(ge=1, le=MAX_DIMENSIONS)] | None = None

    @field_validator("texts")
    @classmethod
    def _no_blank(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"text {i + 1} is blank")
        return texts

    def prompt_text(self) -> str:
        return "\n".join(self.texts)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamChunk(BaseModel):
    """One piece of a streamed reply: text, and at the end the usage if the backend reports it."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None


class ImageResult(BaseModel):
    model: str
    images: list[bytes]
    revised_prompts: list[str | None] = []
    usage: Usage | None = None  # gpt-image models report tokens; others do not


class EmbeddingResult(BaseModel):
    model: str
    dimensions: int
    vectors: list[list[float]]
    usage: Usage


class ModelInfo(BaseModel):
    id: str
    owned_by: str = ""
    created: int | None = None
    kinds: list[Kind]

    @property
    def kind(self) -> Kind:
        return self.kinds[0]


_KIND_RULES: list[tuple[Kind, re.Pattern[str]]] = [
    ("embedding", re.compile(r"embed", re.I)),
    ("image", re.compile(r"(^|[-/])(gpt-image|dall-e|image|flux|sdxl|stable-diffusion)", re.I)),
    ("audio", re.compile(r"whisper|tts|audio|transcribe|speech", re.I)),
    ("other", re.compile(r"moderation|search|computer-use", re.I)),
    ("completion", re.compile(r"instruct$|^(davinci|babbage)", re.I)),
]


def guess_kinds(model_id: str) -> list[Kind]:
    """Classify a model id by naming conventions; anything unrecognised is taken as chat."""
    for kind, pattern in _KIND_RULES:
        if pattern.search(model_id):
            # Open models named "*-instruct" (Qwen, Llama) are chat models too.
            if kind == "completion" and not model_id.lower().startswith(("gpt-3.5", "davinci")):
                return ["chat", "completion"]
            return [kind]
    return ["chat"]


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse(model: type[RequestT], data: dict[str, object]) -> RequestT:
    """Validate input into a request model, or raise InvalidRequest with a readable message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = InvalidRequest(describe_validation_error(exc))
        first = exc.errors(include_input=False, include_url=False)[0]["loc"]
        error.param = str(first[0]) if first else None
        raise error from None


def describe_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's errors into one line per field, without echoing the input."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "Invalid input: " + "; ".join(parts)

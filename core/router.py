"""Which backend serves a call: by the model it names, with fallbacks; and the models of all.

Routing, for a call of a function (chat, embedding...) naming `model`:
1. "backend/model" where `backend` is a backend's name: that backend, with `model`.
2. An id a backend's model list names (file order), then a pattern it lists ("gpt-*").
3. An id a backend with `models: "*"` lists (its list is asked for and kept a minute).
4. No model: the first backend (file order) with a default model for the function.
With one backend (the shorthand without BACKENDS_FILE), every model goes to it unchanged,
as before: the upstream says whether it has it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from core import errors
from core.backends import Backend, BackendSpec
from core.endpoints import ENDPOINTS
from core.providers.base import Provider
from core.schemas import ModelInfo, guess_kinds

log = logging.getLogger("core.router")
LIST_TTL = 60.0  # a backend's model list is kept this long
FAILED_LIST_TTL = 15.0  # a backend that could not list is not asked again sooner


@dataclass(eq=False)
class Served:
    """A backend with its provider, and its model list as last seen."""

    spec: BackendSpec
    provider: Provider
    shorthand: bool = False  # the one backend of the variables (no BACKENDS_FILE)
    listed: tuple[float, list[ModelInfo]] | None = None
    failed: float = 0.0
    lock: asyncio.Lock | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def serves(self, function: str) -> bool:
        return function in self.provider.functions

    def ids(self) -> list[str]:
        """The ids its file names (not patterns), or the embedded model's own."""
        if self.kind == "local":
            return sorted(set(self.provider.default_models.values()))
        return self.spec.listed_ids()

    def default(self, function: str) -> str | None:
        """Its model for a call that names none: the file's default, else the first id its
        list names for the function's kind, else the provider's own default."""
        if not self.serves(function):
            return None
        if function in self.spec.defaults:
            return self.spec.defaults[function]  # type: ignore[index]
        kind = "chat" if function == "chat" else function
        for model in self.spec.listed_ids():
            if kind in guess_kinds(model):
                return model
        return self.provider.default_models.get(function)


@dataclass(frozen=True)
class Route:
    served: Served
    model: str  # the id the backend knows (no "backend/" prefix)

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def provider(self) -> Provider:
        return self.served.provider


class Router:
    def __init__(self, served: list[Served]) -> None:
        if not served:
            raise ValueError("no backend")
        self.backends = served
        self.by_name = {s.name: s for s in served}

    @classmethod
    def of(cls, backends: list[Backend], build: Callable[[Backend], Provider]) -> Router:
        """A router over `backends`, each with the provider `build` makes for it."""
        return cls(
            [Served(spec=b.spec, provider=build(b), shorthand=b.shorthand) for b in backends]
        )

    @property
    def single(self) -> bool:
        """The one backend the variables describe: it takes every model as it is named, and
        its words are the variables' (a BACKENDS_FILE of one backend still routes)."""
        return len(self.backends) == 1 and self.first.shorthand

    @property
    def first(self) -> Served:
        return self.backends[0]

    def serves(self, function: str) -> bool:
        return any(s.serves(function) for s in self.backends)

    def default(self, function: str) -> Route | None:
        for served in self.backends:
            if model := served.default(function):
                return Route(served, model)
        return None

    def public_id(self, route: Route) -> str:
        """The id that routes back to `route`: the plain id when it does, else backend/id."""
        if self.single or self._claims_plain(route.model) is route.served:
            return route.model
        return f"{route.name}/{route.model}"

    def _claims_plain(self, model: str) -> Served | None:
        """The backend a plain id goes to without asking anyone for a list, if any."""
        for served in self.backends:  # an id a list names exactly, even one with a "/"
            if model in served.ids():
                return served
        first, slash, _ = model.partition("/")
        if slash and first in self.by_name:
            return None
        for served in self.backends:
            if model in served.ids():
                return served
        for served in self.backends:
            if served.spec.named(model):
                return served
        for served in self.backends:
            if served.listed and any(m.id == model for m in served.listed[1]):
                return served
        return None

    async def resolve(self, function: str, model: str | None) -> Route:
        """The backend and model id for a call; ModelNotFound names the backends asked."""
        if not model:
            route = self.default(function)
            if route is None:
                raise errors.Unsupported(self.unavailable(function))
            return route
        if self.single:
            return Route(self.first, model)
        served = next((s for s in self.backends if model in s.ids()), None)
        first, slash, rest = model.partition("/")
        if served is None and slash and rest and first in self.by_name:
            return Route(self.by_name[first], rest)
        served = served or self._claims_plain(model)
        if served is None:
            for candidate in self.backends:
                if not (candidate.spec.lists_everything() and candidate.serves(function)):
                    continue
                if any(m.id == model for m in await self.listing(candidate)):
                    served = candidate
                    break
        if served is None:
            asked = ", ".join(s.name for s in self.backends)
            raise errors.ModelNotFound(
                f"No backend serves the model {model[:256]!r} (asked: {asked}). Name one the "
                "Models tab lists, or write backend/model.",
                code="model_not_found",
            )
        return Route(served, model)

    def unavailable(self, function: str) -> str:
        endpoint = ENDPOINTS[function]
        if self.single:
            return endpoint.unavailable.format(backend=self.first.name, path=endpoint.path)
        names = ", ".join(s.name for s in self.backends)
        return f"No backend here serves /{endpoint.path} (the backends: {names})."

    async def fallbacks(self, route: Route, function: str) -> list[Route]:
        """What to try after `route`, in the order its backend's file lists them."""
        routes = []
        for target in route.served.spec.fallbacks.get(route.model, []):
            try:
                routes.append(await self.resolve(function, target))
            except errors.ServiceError as exc:
                log.warning(
                    "fallback %r of %s/%s skipped: %s", target, route.name, route.model, exc
                )
        return routes

    async def listing(self, served: Served, *, refresh: bool = False) -> list[ModelInfo]:
        """A backend's models: its file's ids when it names them, else what it lists (kept a
        minute; [] while it cannot be reached)."""
        if not served.spec.lists_everything():
            if served.kind == "local":
                return await served.provider.list_models()
            ids = served.ids()
            return [ModelInfo(id=i, owned_by=served.name, kinds=guess_kinds(i)) for i in ids]
        now = time.monotonic()
        if not refresh and served.listed and now - served.listed[0] < LIST_TTL:
            return served.listed[1]
        if not refresh and now - served.failed < FAILED_LIST_TTL:
            return served.listed[1] if served.listed else []
        if served.lock is None:
            served.lock = asyncio.Lock()
        async with served.lock:
            if not refresh and served.listed and time.monotonic() - served.listed[0] < LIST_TTL:
                return served.listed[1]
            try:
                models = await served.provider.list_models()
            except errors.ServiceError as exc:
                served.failed = time.monotonic()
                log.warning("backend %s could not list its models: %s", served.name, exc.message)
                if self.single:
                    raise
                return served.listed[1] if served.listed else []
            served.listed = (time.monotonic(), models)
            return models

    async def models(self, *, refresh: bool = False) -> list[ModelInfo]:
        """Every backend's models, each with its backend named and an id that routes to it."""
        lists = await asyncio.gather(*(self.listing(s, refresh=refresh) for s in self.backends))
        out: list[ModelInfo] = []
        for served, models in zip(self.backends, lists, strict=True):
            for model in models:
                public = self.public_id(Route(served, model.id))
                out.append(model.model_copy(update={"id": public, "backend": served.name}))
        return out

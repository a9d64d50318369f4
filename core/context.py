"""Wiring: from Settings to the database, users, ledger, authenticator and service."""

from __future__ import annotations

import atexit
import logging
import weakref
from dataclasses import dataclass
from datetime import timedelta

from core import db
from core.auth import Authenticator
from core.config import Settings
from core.conversations import ConversationStore, PresetStore
from core.ledger import Ledger, journal_folder
from core.pricing import PriceTable
from core.providers import build_provider, configured_backends
from core.providers.base import Provider
from core.router import Router
from core.service import Service
from core.users import UserStore

log = logging.getLogger("core.context")


@dataclass
class Core:
    """Everything the edges (dashboard, APIs, CLI) need, built once per process."""

    settings: Settings
    service: Service
    users: UserStore
    ledger: Ledger
    auth: Authenticator
    conversations: ConversationStore
    presets: PresetStore


def open_core(settings: Settings, provider: Provider | None = None) -> Core:
    """Open (and migrate) the database, then build the service on top of it."""
    router = None
    if provider is None:  # BACKENDS_FILE's backends, or the one the variables describe
        router = Router.of(configured_backends(settings), lambda b: build_provider(settings, b))
    engine = db.make_engine(db.database_url(settings.data_dir, settings.database_url))
    version = db.migrate(engine)
    log.info("database %s at schema version %d", engine.dialect.name, version)
    own_prices = {s.name: s.spec.prices for s in router.backends} if router else None
    ledger = Ledger(
        engine,
        prices=PriceTable(settings.prices_json, backends=own_prices),
        log_content=settings.log_content,
        # Each outcome is on local disk before its answer ends; a dead process's is replayed.
        journal_dir=journal_folder(settings.data_dir, engine),
    )
    # A heartbeat (core.db.processes): holds of a process that stops beating are released
    # while the app runs; rows naming no process (an older release's) after this long.
    ledger.start(stale_unnamed=timedelta(seconds=settings.request_timeout * 3 + 60))
    # Outcomes are written by a background thread: write what is queued before exiting.
    atexit.register(_close, weakref.ref(ledger))
    users = UserStore(engine)
    service = Service(settings, provider, ledger=ledger, router=router)
    return Core(
        settings=settings,
        service=service,
        users=users,
        ledger=ledger,
        auth=Authenticator(settings, users),
        conversations=ConversationStore(engine),
        presets=PresetStore(engine),
    )


def _close(ref: weakref.ref[Ledger]) -> None:
    ledger = ref()
    if ledger is not None:
        ledger.close()

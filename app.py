"""Entry point: read settings, build the app, serve it on PORT (python app.py)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from core.config import Settings, load_settings
from core.errors import ConfigError
from core.log import configure_logging
from core.providers import configured_backends

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
log = logging.getLogger("app")


def announce_generated_key(settings: Settings) -> None:
    """Print a generated access key once, to the console only, with how to fix one."""
    assert settings.access_key is not None
    print(
        "\n  No ACCESS_KEY set: this run's access key is\n\n"
        f"      {settings.access_key.get_secret_value()}\n\n"
        "  Sign in with any name and this key. It changes on every start; set ACCESS_KEY in\n"
        "  the environment or in .env to keep one.\n",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, _secrets(settings), access=settings.access_log)
        # After logging, so start-up messages are formatted.
        from ui.server import create_app, server_options

        app = create_app(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.access_key_generated:
        announce_generated_key(settings)
    log.info("serving on http://%s:%d", settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # One worker: Gradio keeps sessions in process memory.
        workers=1,
        # Uvicorn's records go through our handler too, so the secret filter covers them.
        log_config=None,
        **server_options(),
    )


def _secrets(settings: Settings) -> list[str]:
    """Every key the process holds, for the log filter: ours, and each backend's."""
    keys = [settings.access_key, settings.openai_api_key, settings.session_secret]
    keys += [b.api_key for b in configured_backends(settings, warn=False)]  # the app warns
    return [s.get_secret_value() for s in keys if s]


if __name__ == "__main__":
    main()

"""The OpenAI-compatible HTTP API (/v1) and /metrics; FastAPI only, calling core.service."""

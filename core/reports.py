"""Usage aggregates from ledger rows (pandas): totals, per day by model, by user, by function."""

from __future__ import annotations

from datetime import date
from typing import Any

import pandas as pd

from core.auth import Principal
from core.errors import Forbidden, InvalidRequest
from core.ledger import Ledger
from core.tables import csv_text

OK = "ok"
REFUSED = "refused"


def _with_tokens(rows: pd.DataFrame) -> pd.DataFrame:
    frame = rows.copy()
    frame["tokens"] = frame["prompt_tokens"] + frame["completion_tokens"]
    frame["model"] = frame["model"].fillna("")
    return frame


def totals(rows: pd.DataFrame) -> dict[str, Any]:
    """Headline figures for a set of ledger rows."""
    frame = _with_tokens(rows)
    return {
        "requests": len(frame),
        "succeeded": int((frame["status"] == OK).sum()),
        "failed": int(((frame["status"] != OK) & (frame["status"] != REFUSED)).sum()),
        "refused": int((frame["status"] == REFUSED).sum()),
        "prompt_tokens": int(frame["prompt_tokens"].sum()),
        "completion_tokens": int(frame["completion_tokens"].sum()),
        "total_tokens": int(frame["tokens"].sum()),
        "cost_usd": round(float(frame["cost_usd"].sum()), 6),
    }


def daily_by_model(rows: pd.DataFrame) -> pd.DataFrame:
    """Tokens and cost per UTC day and model (for the plots)."""
    frame = _with_tokens(rows)
    frame = frame[frame["model"] != ""]  # model listings have no model and no tokens
    frame["day"] = frame["ts"].dt.tz_convert("UTC").dt.strftime("%Y-%m-%d")
    grouped = frame.groupby(["day", "model"], as_index=False).agg(
        requests=("status", "size"), tokens=("tokens", "sum"), cost_usd=("cost_usd", "sum")
    )
    return grouped.sort_values(["day", "model"]).reset_index(drop=True)


def _by(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    frame = _with_tokens(rows)
    frame["failed"] = (frame["status"] != OK) & (frame["status"] != REFUSED)
    frame["refused"] = frame["status"] == REFUSED
    grouped = frame.groupby(column, as_index=False).agg(
        requests=("status", "size"),
        failed=("failed", "sum"),
        refused=("refused", "sum"),
        prompt_tokens=("prompt_tokens", "sum"),
        completion_tokens=("completion_tokens", "sum"),
        tokens=("tokens", "sum"),
        cost_usd=("cost_usd", "sum"),
        avg_latency_ms=("latency_ms", "mean"),
    )
    grouped["cost_usd"] = grouped["cost_usd"].round(6)
    grouped["avg_latency_ms"] = grouped["avg_latency_ms"].round(1)
    return grouped.sort_values("tokens", ascending=False).reset_index(drop=True)


def by_user(rows: pd.DataFrame) -> pd.DataFrame:
    return _by(rows, "user")


def by_function(rows: pd.DataFrame) -> pd.DataFrame:
    return _by(rows, "function")


def to_csv(rows: pd.DataFrame) -> str:
    """The rows as CSV, safe to open in a spreadsheet (user and model names come from users)."""
    out = rows.copy()
    out["ts"] = out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return csv_text(out)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-friendly records (numpy scalars become Python numbers)."""
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def parse_day(text: str | None, what: str) -> date | None:
    """A YYYY-MM-DD filter value (empty: no bound)."""
    if not text or not str(text).strip():
        return None
    try:
        return date.fromisoformat(str(text).strip()[:10])
    except ValueError:
        raise InvalidRequest(f"{what} must be a date like 2026-11-28") from None


def usage_rows(
    ledger: Ledger,
    caller: Principal,
    *,
    start: str | None = None,
    end: str | None = None,
    user: str | None = None,
    model: str | None = None,
) -> pd.DataFrame:
    """The ledger rows a caller may see: admins everyone's, users only their own."""
    if not caller.is_admin:
        if user and user != caller.name:
            raise Forbidden("You can see only your own usage; admins see everyone's.")
        user = caller.name
    first, last = parse_day(start, "start"), parse_day(end, "end")
    if first and last and first > last:
        raise InvalidRequest("start must not be after end")
    return ledger.rows(
        start=first, end=last, users=[user] if user else None, models=[model] if model else None
    )


def usage_report(rows: pd.DataFrame) -> dict[str, Any]:
    """Every aggregate, as JSON-friendly records (the /usage API and the Usage tab share it)."""
    return {
        "totals": totals(rows),
        "daily": records(daily_by_model(rows)),
        "by_user": records(by_user(rows)),
        "by_function": records(by_function(rows)),
    }

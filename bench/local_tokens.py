"""Tokens/second of the embedded model: through Service.chat_stream vs llama-cpp-python directly.

Run from the project root:  .venv/bin/python bench/local_tokens.py [--runs 5] [--max-tokens 128]

Both sides load the bundled GGUF with the same settings and stream the same prompt at
temperature 0 (so they generate the same tokens); one warm-up run each, then alternating runs.
Two cases: free text, and JSON constrained by a schema (response_format json_schema through the
service, the same llama.cpp grammar handed to llama-cpp-python directly), so the grammar's own
cost shows next to the service's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, from anywhere

from core.config import load_settings
from core.providers.local import bundled_model_path, grammar_for, load_llama
from core.service import Service

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a dragon who learns to cook."},
]
STORY = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "characters": {"type": "array", "items": {"type": "string"}},
        "story": {"type": "string"},
    },
    "required": ["title", "characters", "story"],
}
CASES = {"free text": None, "JSON schema": STORY}


class Run:
    """One timed generation: time to first text, total time, and the text."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        if text and self.first is None:
            self.first = time.perf_counter() - self.start
        self.parts.append(text)

    def finish(self) -> None:
        self.total = time.perf_counter() - self.start
        self.text = "".join(self.parts)


async def via_service(service: Service, max_tokens: int, schema: dict | None) -> Run:
    run = Run()
    request = {"messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens}
    if schema is not None:
        spec = {"name": "story", "schema": schema}
        request["response_format"] = {"type": "json_schema", "json_schema": spec}
    async for chunk in service.chat_stream(request):
        run.add(chunk.text)
    run.finish()
    return run


def direct(llm: Llama, max_tokens: int, schema: dict | None) -> Run:
    run = Run()
    grammar = grammar_for(json.dumps(schema, sort_keys=True)) if schema is not None else None
    stream = llm.create_chat_completion(
        messages=MESSAGES, temperature=0, max_tokens=max_tokens, stream=True, grammar=grammar
    )
    for chunk in stream:
        run.add(chunk["choices"][0]["delta"].get("content") or "")
    run.finish()
    return run


def summary(runs: Iterable[Run], count_tokens: Callable[[str], int]) -> tuple[float, float, int]:
    runs = list(runs)
    tokens = [count_tokens(r.text) for r in runs]
    rate = statistics.median(t / r.total for t, r in zip(tokens, runs, strict=True))
    ttft = statistics.median(r.first or r.total for r in runs)
    return rate, ttft, round(statistics.mean(tokens))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    settings = load_settings(environ={"PROVIDER": "local"}, env_file=None)
    service = Service(settings)
    llm = load_llama(
        bundled_model_path(), n_ctx=settings.local_context_size, n_threads=settings.local_threads
    )
    print(
        f"model: {service.describe()}; max_tokens={args.max_tokens}, runs={args.runs} "
        "(medians after one warm-up each)"
    )

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    print(f"{'':36}{'tokens/s':>10}{'first token (ms)':>20}{'tokens':>8}")
    rates: dict[str, float] = {}
    for name, schema in CASES.items():
        await via_service(service, args.max_tokens, schema)  # warm-up both sides
        direct(llm, args.max_tokens, schema)
        svc_runs, direct_runs = [], []
        for _ in range(args.runs):
            svc_runs.append(await via_service(service, args.max_tokens, schema))
            direct_runs.append(direct(llm, args.max_tokens, schema))
        if {r.text for r in svc_runs} != {r.text for r in direct_runs}:
            print(f"warning ({name}): the two sides generated different text")
        svc_rate, svc_ttft, n = summary(svc_runs, count)
        dir_rate, dir_ttft, _ = summary(direct_runs, count)
        rates[name] = svc_rate
        for label, rate, ttft in (
            (f"{name}: Service.chat_stream", svc_rate, svc_ttft),
            (f"{name}: llama-cpp direct", dir_rate, dir_ttft),
        ):
            print(f"{label:36}{rate:>10.1f}{ttft * 1000:>20.1f}{n:>8}")
        print(f"{name}: ratio service/direct {svc_rate / dir_rate:.3f} (tokens/s)")
    plain, constrained = rates["free text"], rates["JSON schema"]
    print(f"grammar: JSON schema at {constrained / plain:.2f}x the tokens/s of free text")
    await service.aclose()
    llm.close()


if __name__ == "__main__":
    asyncio.run(main())

"""Tokens/second of the embedded model: through Service.chat_stream vs llama-cpp-python directly.

Run from the project root:  .venv/bin/python bench/local_tokens.py [--runs 5] [--max-tokens 128]

Both sides load the bundled GGUF with the same settings and stream the same prompt at
temperature 0 (so they generate the same tokens); one warm-up run each, then alternating runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, from anywhere

from core.config import load_settings
from core.providers.local import bundled_model_path, load_llama
from core.service import Service

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a dragon who learns to cook."},
]


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


async def via_service(service: Service, max_tokens: int) -> Run:
    run = Run()
    request = {"messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens}
    async for chunk in service.chat_stream(request):
        run.add(chunk.text)
    run.finish()
    return run


def direct(llm: Llama, max_tokens: int) -> Run:
    run = Run()
    stream = llm.create_chat_completion(
        messages=MESSAGES, temperature=0, max_tokens=max_tokens, stream=True
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
    print(f"model: {service.describe()}; max_tokens={args.max_tokens}, runs={args.runs}")

    await via_service(service, args.max_tokens)  # warm-up both sides
    direct(llm, args.max_tokens)
    svc_runs, direct_runs = [], []
    for _ in range(args.runs):
        svc_runs.append(await via_service(service, args.max_tokens))
        direct_runs.append(direct(llm, args.max_tokens))
    if {r.text for r in svc_runs} != {r.text for r in direct_runs}:
        print("warning: the two sides generated different text")

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    svc_rate, svc_ttft, n = summary(svc_runs, count)
    dir_rate, dir_ttft, _ = summary(direct_runs, count)
    print(f"tokens per run: {n} (median of {args.runs} runs after 1 warm-up)")
    print(f"{'':24}{'tokens/s':>10}{'first token (ms)':>20}")
    print(f"{'Service.chat_stream':24}{svc_rate:>10.1f}{svc_ttft * 1000:>20.1f}")
    print(f"{'llama-cpp direct':24}{dir_rate:>10.1f}{dir_ttft * 1000:>20.1f}")
    print(f"ratio service/direct: {svc_rate / dir_rate:.3f} (tokens/s)")
    await service.aclose()
    llm.close()


if __name__ == "__main__":
    asyncio.run(main())

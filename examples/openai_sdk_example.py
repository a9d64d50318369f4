"""Use the dashboard's OpenAI-compatible /v1 API with the official openai SDK, unchanged.

DASHBOARD_URL=http://localhost:8000 ACCESS_KEY=... python examples/openai_sdk_example.py
"""

from __future__ import annotations

import os

from openai import OpenAI

base = os.environ.get("DASHBOARD_URL", "http://localhost:8000")
# Your own access key (or the owner's ACCESS_KEY); the upstream key never leaves the server.
client = OpenAI(base_url=f"{base}/v1", api_key=os.environ["ACCESS_KEY"])
# An empty model is the server's default for each call (its CHAT_MODEL, EMBEDDING_MODEL...; the
# embedded model offline), so this script runs on any backend; set CHAT_MODEL to pick one.
chat_model = os.environ.get("CHAT_MODEL", "")

reply = client.chat.completions.create(
    model=chat_model,
    messages=[{"role": "user", "content": "Name three prime numbers."}],
)
print(f"chat ({reply.model}):", reply.choices[0].message.content,
      f"({reply.usage.total_tokens} tokens)")  # fmt: skip

stream = client.chat.completions.create(
    model=chat_model,
    messages=[{"role": "user", "content": "Count to five."}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    elif chunk.usage:
        print(f"\nstream usage: {chunk.usage.total_tokens} tokens")

vectors = client.embeddings.create(
    model=os.environ.get("EMBEDDING_MODEL", ""), input=["a cat", "a kitten"]
)
print("embeddings:", len(vectors.data), "vectors of", len(vectors.data[0].embedding))
print("models:", ", ".join(m.id for m in list(client.models.list())[:5]))

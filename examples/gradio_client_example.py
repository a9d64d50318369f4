"""Call every endpoint of the dashboard's API with gradio_client.

DASHBOARD_URL=http://localhost:8000 ACCESS_KEY=... python examples/gradio_client_example.py
"""

from __future__ import annotations

import os
import ssl

import certifi
from gradio_client import Client

url = os.environ.get("DASHBOARD_URL", "http://localhost:8000")
# gradio_client builds two new TLS contexts for every call unless it is handed one; one context,
# made once, verifies certificates the same way and makes each call about 100 ms faster.
tls = ssl.create_default_context(cafile=certifi.where())
client = Client(url, auth=("script", os.environ["ACCESS_KEY"]), ssl_verify=tls, verbose=False)

# Chat: OpenAI-style messages; predict() returns the whole reply...
messages = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is a vector embedding?"},
]
print("chat:", client.predict(messages=messages, temperature=0.2, api_name="/chat"))

# ...and submit() streams it: each value is the reply so far.
for partial in client.submit(messages=messages, max_tokens=64, api_name="/chat"):
    print("\rstreaming:", partial[-60:], end="", flush=True)
print()

print("completion:", client.predict(prompt="The three primary colors are", api_name="/completion"))

result = client.predict(texts=["a cat", "a kitten", "a tax return"], api_name="/embeddings")
print("embeddings:", result["model"], result["dimensions"], "dimensions,", len(result["vectors"]))

models = client.predict(api_name="/models")
print("models:", ", ".join(f"{m['id']} ({m['kind']})" for m in models[:5]))

try:
    paths = client.predict(prompt="a lighthouse at dawn", n=1, api_name="/generate_image")
    print("images saved to:", *paths)
except Exception as exc:  # the embedded model has no image model: the message says what to set
    print("images:", exc)

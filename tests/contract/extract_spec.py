"""Cut OpenAI's published OpenAPI spec down to the operations the /v1 gateway implements.

    python tests/contract/extract_spec.py /path/to/openai-openapi [COMMIT]

reads openapi.yaml at COMMIT (default HEAD) of a clone of https://github.com/openai/openai-openapi
and writes tests/contract/openai-openapi.yaml: the operations below, every component they
reference (followed transitively through $ref), the security scheme, and a header naming the
source repository, the commit and the spec's version. Nothing in a kept schema is changed; only
documentation is dropped (the operations' `x-oaiMeta` code samples and the unused tags), and
`servers` points at /v1, where the gateway serves these paths (OpenAI's is kept in a comment).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SOURCE = "https://github.com/openai/openai-openapi"
SPEC_FILE = "openapi.yaml"
OUT = Path(__file__).with_name("openai-openapi.yaml")
# path -> the methods the gateway implements (GET /chat/completions lists stored completions and
# DELETE /models/{model} deletes a fine-tune: the gateway has neither).
OPERATIONS = {
    "/chat/completions": ["post"],
    "/completions": ["post"],
    "/embeddings": ["post"],
    "/images/generations": ["post"],
    "/models": ["get"],
    "/models/{model}": ["get"],
}
DROPPED_KEYS = {"x-oaiMeta"}  # documentation: code samples for the API reference


def refs(node: Any) -> list[str]:
    """Every local $ref in a node, in document order."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found += refs(value)
        return found
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


def resolve(spec: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise ValueError(f"not a local reference: {ref}")
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def extract(spec: dict[str, Any], commit: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, methods in OPERATIONS.items():
        item = spec["paths"][path]
        kept = {k: v for k, v in item.items() if k not in {"get", "post", "put", "patch", "delete"}}
        for method in methods:
            kept[method] = {k: v for k, v in item[method].items() if k not in DROPPED_KEYS}
        paths[path] = kept
    # Follow $refs transitively from the kept operations.
    needed: set[tuple[str, str]] = set()
    todo = refs(paths)
    while todo:
        ref = todo.pop()
        parts = ref[2:].split("/")
        if parts[0] != "components" or len(parts) != 3:
            raise ValueError(f"unexpected reference: {ref}")
        key = (parts[1], parts[2])
        if key in needed:
            continue
        needed.add(key)
        todo += refs(resolve(spec, ref))
    components: dict[str, Any] = {}
    for section, entries in spec["components"].items():  # the source's order
        kept = {name: body for name, body in entries.items() if (section, name) in needed}
        if kept:
            components[section] = kept
    schemes = {name for req in spec.get("security", []) for name in req}
    components["securitySchemes"] = {
        name: spec["components"]["securitySchemes"][name] for name in sorted(schemes)
    }
    info = {**spec["info"], "x-source": {"repository": SOURCE, "file": SPEC_FILE, "commit": commit}}
    return {
        "openapi": spec["openapi"],
        "info": info,
        "servers": [{"url": "/v1", "description": "the gateway, under /v1 of the app's origin"}],
        "security": spec.get("security", []),
        "paths": paths,
        "components": components,
    }


def header(commit: str, spec: dict[str, Any]) -> str:
    ops = ", ".join(f"{m.upper()} {p}" for p, ms in OPERATIONS.items() for m in ms)
    return (
        "# OpenAI's published OpenAPI spec, cut down to the operations the /v1 gateway serves.\n"
        f"# Source:  {SOURCE} ({SPEC_FILE})\n"
        f"# Commit:  {commit}\n"
        f"# Version: {spec['openapi']} spec, info.version {spec['info']['version']}\n"
        f"# Operations: {ops}\n"
        "# Kept: those operations and every component they reference (transitively), unchanged.\n"
        "# Dropped: every other path and component, the operations' x-oaiMeta code samples, tags.\n"
        f"# Servers: OpenAI's is {spec['servers'][0]['url']}; the gateway serves these under /v1.\n"
        "# Regenerate: python tests/contract/extract_spec.py <clone of openai-openapi> [commit]\n"
    )


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    repo, rev = argv[1], argv[2] if len(argv) == 3 else "HEAD"
    git = ["git", "-C", repo]
    commit = subprocess.check_output([*git, "rev-parse", f"{rev}^{{commit}}"], text=True).strip()
    text = subprocess.check_output([*git, "show", f"{commit}:{SPEC_FILE}"], text=True)
    spec = yaml.safe_load(text)
    out = extract(spec, commit)
    body = yaml.safe_dump(out, sort_keys=False, allow_unicode=True, width=100)
    OUT.write_text(header(commit, spec) + body)
    count = sum(map(len, out["components"].values()))
    print(f"{OUT}: {len(out['paths'])} paths, {count} components")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

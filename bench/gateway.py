"""Overhead of the /v1 gateway and of the Gradio /chat endpoint, side by side with direct calls.

    .venv/bin/python bench/gateway.py [--latency-ms 20] [--requests 300] [--concurrency 32]
                                      [--total 2000] [--repeat 3] [--history 100000] [--v1-only]
                                      [--client aiohttp|openai]

Starts bench/upstream.py (fixed latency), the app (python app.py), two Gradio apps to compare
with (bench/gradio_peers.py: Gradio's own gr.load_chat, and a bare gr.api relay), and LiteLLM's
proxy and Portkey's gateway when they are installed (never by `make install`), each as its own
process. Before the app starts, two users with quotas are put in its database: one fresh, one
with --history rows of today (a busy user's afternoon).

/v1: a light aiohttp client (the openai SDK caps direct throughput near 430 req/s here and
flatters every gateway; --client openai measures with it all the same) calls the upstream
directly, /v1 with the owner key, /v1 with each quota'd user, and each peer gateway, in turn,
--repeat times (interleaved: a noisy moment falls on all), streaming and not; one call at a
time, then --concurrency callers. Prints the medians: p50/p99 latency, what each adds to
direct, requests per second and the ratio to direct, and the CPU time (user+system, from /proc)
each server process spends per call: the upstream's for direct calls, the gateway's for calls
through it, i.e. what the gateway itself costs. That time includes what a process burns while
idle; the idle rates are printed first.

Gradio (unless --v1-only): gradio_client calling each Gradio app's chat endpoint, with its
default settings and with one TLS context handed to it; then Gradio's queue protocol spoken
directly (what the servers cost without gradio_client's polling).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import httpx
import openai
import orjson

try:
    import psutil
except ImportError:  # then /proc (Linux)
    psutil = None

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-access-key-0123456789"
MESSAGES = [{"role": "user", "content": "Say something about foxes."}]
TLS_CONTEXT = ssl.create_default_context(cafile=certifi.where())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], url: str, quiet: bool = False) -> subprocess.Popen:
    stderr = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    for _ in range(300):
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{cmd} did not start")


def cpu_ms(pid: int) -> float:
    """User+system CPU time a process has used so far, in ms."""
    if psutil is not None:
        times = psutil.Process(pid).cpu_times()
        return (times.user + times.system) * 1000
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15 of proc(5)
    return (int(utime) + int(stime)) * 1000 / os.sysconf("SC_CLK_TCK")


def idle_cpu(pids: dict[str, int], seconds: float = 3.0) -> str:
    """CPU ms per second each process spends while nothing calls it."""
    before = {name: cpu_ms(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return ", ".join(
        f"{name} {(cpu_ms(pid) - before[name]) / seconds:.0f}" for name, pid in pids.items()
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(
    call: Callable[[], Awaitable[float]], n: int, pid: int
) -> tuple[list[float], float]:
    """Latencies (ms) of `n` calls after a warm-up, and the CPU ms per call of process `pid`."""
    for _ in range(10):  # warm-up: connections, caches
        await call()
    cpu = cpu_ms(pid)
    latencies = [await call() for _ in range(n)]
    return latencies, (cpu_ms(pid) - cpu) / n


def sdk_calls(client: openai.AsyncOpenAI) -> dict[str, Callable[[], Awaitable[float]]]:
    """The openai SDK's call (what the Gradio comparisons set beside their own)."""

    async def plain() -> float:
        t = time.perf_counter()
        await client.chat.completions.create(model="bench-model", messages=MESSAGES)
        return (time.perf_counter() - t) * 1000

    return {"non-streaming": plain}


def row(name: str, direct: list[float], via: list[float], width: int = 28) -> str:
    cells = []
    for q in (0.5, 0.95, 0.99):
        d, v = pct(direct, q), pct(via, q)
        cells.append(f"{d:7.2f} {v:7.2f} {v - d:+6.2f}")
    return f"{name:<{width}}" + " | ".join(cells)


def cpu_cells(direct: float, via: float) -> str:
    """CPU ms per request of the upstream (direct calls) and of the server called (via it)."""
    return f" | {direct:8.2f} {via:6.2f}"


@dataclass
class Target:
    """Something that answers OpenAI's chat completions: the upstream itself, or a gateway in
    front of it (with the key it takes); `pid`: the process whose CPU time is its cost."""

    name: str
    url: str  # .../v1
    pid: int
    headers: dict[str, str] = field(default_factory=dict)
    model: str = "bench-model"


@dataclass
class Figures:
    latencies: list[float] = field(default_factory=list)  # ms, one call at a time
    seq_cpu: list[float] = field(default_factory=list)  # cpu ms per call, one at a time
    rates: list[float] = field(default_factory=list)  # req/s with N callers
    rate_cpu: list[float] = field(default_factory=list)  # cpu ms per call, N callers


async def light_call(http, target: Target, stream: bool) -> float:
    """One chat call with aiohttp (a client that costs little, so the gateway's cost shows):
    the ms to the whole answer, or to the end of the stream."""
    body = orjson.dumps({"model": target.model, "messages": MESSAGES, "stream": stream})
    headers = {"content-type": "application/json", **target.headers}
    started = time.perf_counter()
    async with http.post(target.url + "/chat/completions", data=body, headers=headers) as answer:
        if answer.status != 200:
            raise SystemExit(f"{target.name}: HTTP {answer.status}: {await answer.text()}")
        if stream:
            async for line in answer.content:
                if line.startswith(b"data: [DONE]"):
                    break
        else:
            await answer.read()
    return (time.perf_counter() - started) * 1000


def sdk_call(target: Target, stream: bool) -> tuple[Callable[[], Awaitable[float]], object]:
    """--client openai: the same call through the openai SDK (what issue 11's figures were
    measured with; it caps direct throughput and flatters gateways). The call, and its client."""
    key = target.headers.get("authorization", "Bearer none").removeprefix("Bearer ")
    client = openai.AsyncOpenAI(
        base_url=target.url,
        api_key=key,
        # The SDK's own default: a kept-alive connection the server closed meanwhile (idle
        # through the sequential calls) is tried again, as in any real use.
        max_retries=2,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=None)),
    )

    async def call() -> float:
        started = time.perf_counter()
        answer = await client.chat.completions.create(
            model=target.model, messages=MESSAGES, stream=stream
        )
        if stream:
            async for _ in answer:
                pass
        return (time.perf_counter() - started) * 1000

    return call, client


async def light_round(
    target: Target, stream: bool, args: argparse.Namespace, figures: Figures
) -> None:
    """One repetition for one target: sequential calls, then N concurrent callers."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        sdk = sdk_call(target, stream) if args.client == "openai" else None

        async def light_call_once() -> float:
            return await (sdk[0]() if sdk else light_call(http, target, stream))

        for _ in range(10):  # warm-up: connections, caches
            await light_call_once()
        # ...and one connection per caller, before anything is measured.
        await asyncio.gather(*(light_call_once() for _ in range(args.concurrency)))
        cpu = cpu_ms(target.pid)
        latencies = [await light_call_once() for _ in range(args.requests)]
        figures.seq_cpu.append((cpu_ms(target.pid) - cpu) / args.requests)
        figures.latencies += latencies
        remaining = args.total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await light_call_once()

        cpu, started = cpu_ms(target.pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        figures.rates.append(args.total / (time.perf_counter() - started))
        await asyncio.sleep(0.3)  # the ledger's writer finishes these calls' rows: theirs
        figures.rate_cpu.append((cpu_ms(target.pid) - cpu) / args.total)
        if sdk:
            await sdk[1].close()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def measure_light(targets: list[Target], args: argparse.Namespace) -> None:
    """Every target in turn, `--repeat` times (interleaved, so that a noisy moment of the
    machine falls on all of them), streaming and not; medians of the repetitions."""
    for stream in (False, True):
        figures = {t.name: Figures() for t in targets}
        for _ in range(args.repeat):
            for target in targets:
                await light_round(target, stream, args, figures[target.name])
        direct = figures[targets[0].name]
        d50, rate = pct(direct.latencies, 0.5), median(direct.rates)
        kind = "streaming (to the end)" if stream else "non-streaming"
        client = "openai SDK" if args.client == "openai" else "aiohttp"
        print(
            f"\n{kind}: {client} client, {args.requests} sequential calls then {args.total} from "
            f"{args.concurrency} callers, x{args.repeat} interleaved (medians)"
        )
        print(
            f"{'':<34}{'p50 ms':>7} {'added':>7} {'p99 ms':>7} | {'req/s':>7} {'ratio':>6}"
            f" | cpu ms/call: 1 at a time, {args.concurrency} callers"
        )
        for target in targets:
            f = figures[target.name]
            p50 = pct(f.latencies, 0.5)
            added = "" if target is targets[0] else f"{p50 - d50:+7.2f}"
            r = median(f.rates)
            print(
                f"{target.name:<34}{p50:7.2f} {added:>7} {pct(f.latencies, 0.99):7.2f} |"
                f" {r:7.1f} {r / rate:6.2f} | {median(f.seq_cpu):6.2f} {median(f.rate_cpu):6.2f}"
            )


def seed_users(data_dir: str, history: int) -> dict[str, str]:
    """Two users with quotas in the app's database, before it starts: one fresh, and one with
    `history` rows of today already (what a busy user has by the afternoon). Their keys."""
    sys.path.insert(0, str(ROOT))
    from datetime import UTC, datetime, timedelta

    from core import db
    from core.users import UserStore

    engine = db.make_engine(db.database_url(Path(data_dir), None))
    db.migrate(engine)
    users = UserStore(engine)
    keys = {}
    for name in ("quota-fresh", "quota-busy"):
        _, keys[name] = users.add(name, daily_tokens=10**11)
    # Spread over the day so far, up to a minute ago (not in the per-minute window).
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    step = max(now - midnight - timedelta(seconds=70), timedelta(0)) / max(history, 1)
    rows = [
        {"ts": midnight + i * step, "user": "quota-busy", "source": "v1", "function": "chat",
         "model": "bench-model", "provider": "openai", "status": "ok",
         "request_id": f"req_seed{i:08d}", "prompt_tokens": 12, "completion_tokens": 12}
        for i in range(history)
    ]  # fmt: skip
    with engine.begin() as conn:
        for i in range(0, len(rows), 10_000):
            conn.execute(db.usage.insert(), rows[i : i + 10_000])
    engine.dispose()
    return keys


def peer_gateways(up_port: int, env: dict[str, str]) -> tuple[list[Target], list]:
    """LiteLLM's proxy and Portkey's gateway, when installed (never by make install): the
    same upstream behind each. Returns the targets and their processes."""
    targets, procs = [], []
    upstream = f"http://127.0.0.1:{up_port}/v1"
    litellm = shutil.which("litellm") or (ROOT / ".venv/bin/litellm")
    if Path(str(litellm)).exists():
        port = free_port()
        proc = start(
            [str(litellm), "--model", "openai/bench-model", "--api_base", upstream,
             "--port", str(port), "--host", "127.0.0.1"],
            {**env, "OPENAI_API_KEY": "sk-bench"},
            f"http://127.0.0.1:{port}/health/liveliness",
        )  # fmt: skip
        procs.append(proc)
        targets.append(Target("LiteLLM proxy", f"http://127.0.0.1:{port}/v1", proc.pid))
    else:
        print("LiteLLM's proxy is not installed (pip install 'litellm[proxy]'): left out")
    portkey = shutil.which("portkey-gateway")
    if portkey:
        port = free_port()
        proc = start([portkey, f"--port={port}"], env, f"http://127.0.0.1:{port}/")
        procs.append(proc)
        targets.append(
            Target("Portkey gateway", f"http://127.0.0.1:{port}/v1", proc.pid,
                   headers={"x-portkey-provider": "openai", "x-portkey-custom-host": upstream,
                            "authorization": "Bearer sk-bench"})
        )  # fmt: skip
    else:
        print("Portkey's gateway is not installed (npm i -g @portkey-ai/gateway): left out")
    return targets, procs


@dataclass
class GradioApp:
    """A Gradio app with a chat endpoint, and how gradio_client calls it."""

    name: str
    url: str
    api_name: str
    pid: int  # its server process, whose CPU time is measured
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    auth: tuple | None = None
    # gr.load_chat keeps the conversation per session, and its API fails on a session's second
    # call ("Invalid message format"), so each of its calls starts a new session.
    new_session: bool = False

    def client(self, **options: object) -> object:
        from gradio_client import Client

        return Client(self.url, auth=self.auth, verbose=False, analytics_enabled=False, **options)

    def call(self, client) -> None:
        if self.new_session:
            client.reset_session()
        client.predict(*self.args, api_name=self.api_name, **self.kwargs)


# gradio_client builds a new httpx client for each call, twice (the join and the event stream),
# and each builds a TLS context from certifi's bundle even for http:// (about 30 ms of CPU each
# here). Handing it one context, made once, is the same verification at none of that cost.
CLIENT_OPTIONS = {
    "default gradio_client": {},
    "gradio_client, one TLS context": {"ssl_verify": TLS_CONTEXT},
}


def threaded_rate(
    call: Callable[[int], object], total: int, workers: int, pid: int
) -> tuple[float, float]:
    """Requests per second with `workers` threads sharing `total` calls, and the CPU ms per
    call of process `pid`."""
    remaining = [total]
    lock = threading.Lock()

    def worker(i: int) -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            call(i)

    cpu, started = cpu_ms(pid), time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    return total / (time.perf_counter() - started), (cpu_ms(pid) - cpu) / total


def measure_gradio_app(
    app: GradioApp, options: dict, n: int, total: int, args: argparse.Namespace
) -> tuple[list[float], float, float, float]:
    """Sequential latencies (ms) of one client, then requests/s of one client per caller; each
    with the app's CPU ms per request."""
    client = app.client(**options)
    for _ in range(5):  # warm-up: the first call builds the server-side session
        app.call(client)
    latencies, cpu = [], cpu_ms(app.pid)
    for _ in range(n):
        t = time.perf_counter()
        app.call(client)
        latencies.append((time.perf_counter() - t) * 1000)
    cpu = (cpu_ms(app.pid) - cpu) / n
    clients = [app.client(**options) for _ in range(args.concurrency)]
    for c in clients:
        app.call(c)
    rate, rate_cpu = threaded_rate(lambda i: app.call(clients[i]), total, args.concurrency, app.pid)
    return latencies, cpu, rate, rate_cpu


def measure_gradio(
    direct_url: str, upstream_pid: int, apps: list[GradioApp], args: argparse.Namespace
) -> None:
    """gradio_client calling each app's chat endpoint, with each client configuration, next to
    the sync openai SDK calling the upstream directly (gradio_client is synchronous too)."""
    n = max(30, args.requests // 3)
    total = max(args.concurrency * 4, args.total // 4)
    direct = [
        openai.OpenAI(base_url=direct_url, api_key="sk-bench", max_retries=0)
        for _ in range(args.concurrency)
    ]

    def direct_call(i: int = 0) -> None:
        direct[i].chat.completions.create(model="bench-model", messages=MESSAGES)

    def timed(call: Callable[[], object]) -> float:
        t = time.perf_counter()
        call()
        return (time.perf_counter() - t) * 1000

    for _ in range(5):
        direct_call()
    cpu = cpu_ms(upstream_pid)
    d = [timed(direct_call) for _ in range(n)]
    d_cpu = (cpu_ms(upstream_pid) - cpu) / n
    rd, rd_cpu = threaded_rate(direct_call, total, args.concurrency, upstream_pid)
    print(
        f"\ngradio_client calling each app's chat endpoint vs the openai SDK calling the upstream"
        f" directly\n(ms; {n} sequential calls; then {total} calls from {args.concurrency} callers,"
        f" one client each; direct: {rd:.1f} req/s;\n upstream cpu ms/req {d_cpu:.2f} sequential,"
        f" {rd_cpu:.2f} with {args.concurrency} callers; cpu: each Gradio app's server process)"
    )
    print(
        f"{'':<48}{'p50 direct  via  added':<25} | {'p95':<22} | {'p99':<22} | req/s  ratio"
        f" | cpu ms/req seq, {args.concurrency} callers"
    )
    rates: dict[tuple[str, str], float] = {}
    for option, options in CLIENT_OPTIONS.items():
        for app in apps:
            g, g_cpu, rate, rate_cpu = measure_gradio_app(app, options, n, total, args)
            rates[option, app.name] = rate
            label = f"{app.name}, {option}"
            print(
                f"{row(label, d, g, width=48)} | {rate:6.1f}  {rate / rd:5.2f}"
                f" | {g_cpu:6.2f} {rate_cpu:6.2f}"
            )
    ours, theirs = apps[0].name, apps[1].name
    for option in CLIENT_OPTIONS:
        ratio = rates[option, ours] / rates[option, theirs]
        print(f"{ours} serves {ratio:.1f}x the requests/s of {theirs} ({option})")


async def measure_gradio_raw(
    direct_url: str, upstream_pid: int, app: GradioApp, args: argparse.Namespace
) -> None:
    """The Gradio queue protocol spoken directly (join, then read the event stream): what the
    server costs, without gradio_client's 50 ms polling."""
    import uuid

    import aiohttp

    name, app_url, auth = app.name, app.url, app.auth
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        if auth:
            await http.post(f"{app_url}/login", data={"username": auth[0], "password": auth[1]})
        async with http.get(f"{app_url}/config") as response:
            config = await response.json()
        fn_index = next(
            i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "chat"
        )
        # The app's /chat takes messages, model, temperature, max_tokens, stop.
        data = [MESSAGES, "bench-model"] + ([] if auth is None else [0.7, 0, None])

        async def call(session_hash: str) -> float:
            t = time.perf_counter()
            body = {"data": data, "fn_index": fn_index, "session_hash": session_hash}
            async with http.post(f"{app_url}/gradio_api/queue/join", json=body) as response:
                await response.read()
            url = f"{app_url}/gradio_api/queue/data?session_hash={session_hash}"
            async with http.get(url) as response:
                async for line in response.content:
                    if b"process_completed" in line:
                        break
            return (time.perf_counter() - t) * 1000

        hashes = [uuid.uuid4().hex[:12] for _ in range(args.concurrency)]
        for h in hashes:  # each session's first call builds its server-side state
            await call(h)
        direct = openai.AsyncOpenAI(base_url=direct_url, api_key="sk-bench", max_retries=0)
        d, d_cpu = await sequential(sdk_calls(direct)["non-streaming"], args.requests, upstream_pid)
        g, g_cpu = await sequential(lambda: call(hashes[0]), args.requests, app.pid)
        print(f"\n{name}, Gradio's queue protocol, no gradio_client (ms; {args.requests} calls)")
        print(f"{'':<28}{'p50 direct  via  added':<25} | {'p95':<22} | {'p99':<22}"
              f" | cpu ms/req upstream, {name}")  # fmt: skip
        print(row(name + " (raw)", d, g) + cpu_cells(d_cpu, g_cpu))
        total = remaining = args.total // 4
        cpu, started = cpu_ms(app.pid), time.perf_counter()

        async def worker(session_hash: str) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call(session_hash)

        await asyncio.gather(*(worker(h) for h in hashes))
        rate = total / (time.perf_counter() - started)
        rate_cpu = (cpu_ms(app.pid) - cpu) / total
        print(
            f"{name + ' (raw), ' + str(args.concurrency) + ' callers':<28}{rate:7.1f} req/s"
            f"   cpu ms/req {name} {rate_cpu:5.2f}"
        )
        await direct.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=300, help="sequential calls per case")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--total", type=int, default=2000, help="requests per throughput case")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions")
    parser.add_argument(
        "--history", type=int, default=100_000, help="today's rows of the busy quota'd user"
    )
    parser.add_argument(
        "--v1-only", "--sdk-only", action="store_true", help="only /v1 and peers, not Gradio's"
    )
    parser.add_argument(
        "--client",
        choices=("aiohttp", "openai"),
        default="aiohttp",
        help="the /v1 client: a light one (default), or the openai SDK (issue 11's figures)",
    )
    args = parser.parse_args()

    up_port, app_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ACCESS_"))}
    upstream = start(
        [sys.executable, "bench/upstream.py", "--port", str(up_port),
         "--latency-ms", str(args.latency_ms)],
        env,
        f"http://127.0.0.1:{up_port}/v1/models",
    )  # fmt: skip
    data_dir = tempfile.mkdtemp(prefix="bench-data-")
    atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
    keys = seed_users(data_dir, args.history)
    app_env = {
        **env,
        "PORT": str(app_port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "ACCESS_KEY": KEY,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
        "CHAT_MODEL": "bench-model",
        "DATA_DIR": data_dir,
        # As served: one access line per call (to /dev/null here), so its cost is counted.
        "LOG_LEVEL": "INFO",
        # Blank is unset: a developer's .env (read from the app's folder) must not change
        # what is measured (another database, quotas, a cache, backends).
        **dict.fromkeys(
            (
                "DATABASE_URL",
                "BACKENDS_FILE",
                "DEFAULT_RPM",
                "DEFAULT_DAILY_TOKENS",
                "CACHE",
                "LOG_CONTENT",
                "ACCESS_LOG",
            ),
            "",
        ),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    app = start(
        [sys.executable, "app.py"], app_env, f"http://127.0.0.1:{app_port}/health", quiet=True
    )
    peers, peer_urls = [], {}
    for kind in () if args.v1_only else ("load_chat", "relay"):
        port = free_port()
        peer_urls[kind] = f"http://127.0.0.1:{port}"
        peers.append(
            start(
                [sys.executable, "bench/gradio_peers.py", "--kind", kind, "--port", str(port),
                 "--upstream", f"http://127.0.0.1:{up_port}/v1"],
                env,
                peer_urls[kind] + "/",
            )
        )  # fmt: skip
    direct_url, app_url = f"http://127.0.0.1:{up_port}/v1", f"http://127.0.0.1:{app_port}"
    apps = [
        GradioApp("app /chat", app_url, "/chat", app.pid, auth=("bench", KEY),
                  kwargs={"messages": MESSAGES, "model": "bench-model"}),
    ]  # fmt: skip
    if peers:  # not with --v1-only: they would idle beside the /v1 figures
        apps += [
            GradioApp("gr.load_chat", peer_urls["load_chat"], "/open_api_stream", peers[0].pid,
                      args=(MESSAGES[0]["content"],), new_session=True),
            GradioApp("bare gr.api relay", peer_urls["relay"], "/chat", peers[1].pid,
                      kwargs={"messages": MESSAGES, "model": "bench-model"}),
        ]  # fmt: skip
    try:
        print(
            f"upstream latency {args.latency_ms:.0f} ms; {os.cpu_count()} cores; "
            f"client, upstream and app on this machine"
        )
        pids = {"upstream": upstream.pid, "app": app.pid}
        idle = pids | {peer.name: peer.pid for peer in apps[1:]}
        print(f"idle cpu ms/s (counted in the cpu ms/call figures): {idle_cpu(idle)}")
        others, other_procs = peer_gateways(up_port, env)
        peers += other_procs
        v1 = app_url + "/v1"
        targets = [
            Target("direct (the upstream)", direct_url, upstream.pid),
            Target("/v1, owner key", v1, app.pid, {"authorization": f"Bearer {KEY}"}),
            Target("/v1, user with quotas", v1, app.pid,
                   {"authorization": f"Bearer {keys['quota-fresh']}"}),
            Target(f"/v1, quotas, {args.history:,} rows today", v1, app.pid,
                   {"authorization": f"Bearer {keys['quota-busy']}"}),
            *others,
        ]  # fmt: skip
        asyncio.run(measure_light(targets, args))
        if args.v1_only:
            return
        measure_gradio(direct_url, upstream.pid, apps, args)
        for target in (apps[0], apps[2]):  # what the server costs, without gradio_client
            asyncio.run(measure_gradio_raw(direct_url, upstream.pid, target, args))
    finally:
        for proc in (app, *peers, upstream):
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()

"""Load on `prefalign serve`: N concurrent clients x M streamed requests on loopback, batched vs one at a time.

    python benchmarks/serve_load.py [--clients 8] [--requests 4] [--max-tokens 32] [--threads 1]
                                    [--modes 32,1] [--repeats 2] [--out benchmarks/results/serve_load-cpu-2core]

For each mode (the server's --max-batch: 32 batches, 1 serves one request at a time) a fresh server
process on the shipped model (src/prefalign/assets/imdb-lm) takes N client threads, each sending M
completions one after another (streamed, `ignore_eos` so every request generates exactly --max-tokens
tokens: equal work in both modes). Reported: throughput (completion tokens over the wall time of the
whole load), latency (request sent -> last chunk) and time to first token (request sent -> first
chunk with text), p50 and p99 over all requests, and the scheduler's batch sizes (GET /stats).
The modes are interleaved and repeated (--repeats 2: 32, 1, 32, 1), so a machine that gets busier or
quieter during the run weighs on every mode alike; each run records the load average before and after
it, and each mode's figures are the median over its runs (every run is in the results too).
Bounded: N x M requests, and --deadline seconds for each run (the script stops a run that goes past it).
Loopback only: the server binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = str(ROOT / "src" / "prefalign" / "assets" / "imdb-lm")
PROMPTS = ["I loved this movie because", "The acting was", "This film is a", "Worst plot ever, the",
           "A quiet drama about", "The director", "I expected more from", "Two hours of"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "prefalign", "serve", SHIPPED, "--port", str(port),
                             "--max-batch", str(max_batch), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def one_request(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model=SHIPPED, prompt=prompt, max_tokens=max_tokens, stream=True,
                                           temperature=1.0, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens}


def load(url: str, clients: int, requests: int, max_tokens: int, deadline: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=deadline)
        for r in range(requests):
            if time.monotonic() > stop_at:
                return
            out = one_request(client, PROMPTS[(c + r) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(out)

    before = httpx.get(f"{url}/stats").json()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/stats").json()
    steps = after["steps"] - before["steps"]  # this load's decode steps and rows, without the warm-up's
    rows = sum(int(k) * (v - before["rows_per_step"].get(k, 0)) for k, v in after["rows_per_step"].items())
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {"requests": len(results), "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(lat), "latency_p99_s": pct(lat, 0.99),
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
            "mean_rows_per_step": rows / max(steps, 1), "max_rows_per_step": after["max_rows_per_step"],
            "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--modes", default="32,1", help="the server's --max-batch values to compare, in order")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the modes (interleaved: 32,1,32,1)")
    ap.add_argument("--deadline", type=float, default=600, help="seconds per run at most")
    ap.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    modes = [int(x) for x in args.modes.split(",")]
    runs = []
    for round_ in range(args.repeats):
        for mode in modes:
            runs.append({"max_batch": mode, "round": round_, **one_run(mode, args)})
            print(f"round {round_} max_batch {mode}: {json.dumps(runs[-1])}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commit": commit.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "clients": args.clients,
            "requests_per_client": args.requests, "max_tokens": args.max_tokens, "server_threads": args.threads,
            "repeats": args.repeats}
    medians = {mode: median_of([r for r in runs if r["max_batch"] == mode]) for mode in dict.fromkeys(modes)}
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps({**meta, "modes": medians, "runs": runs}, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown(meta, medians, runs))


def one_run(mode: int, args) -> dict:
    """A fresh server at --max-batch `mode`, warmed up, then the load; the load average around it."""
    proc, url = start_server(mode, args.threads)
    try:
        load(url, 1, 1, 4, args.deadline)  # warm-up: first-call costs out of the figures
        before = os.getloadavg()
        row = load(url, args.clients, args.requests, args.max_tokens, args.deadline)
        return {**row, "load_average_before": list(before), "load_average_after": list(os.getloadavg())}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


FIGURES = ["tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "mean_rows_per_step"]


def median_of(runs: list[dict]) -> dict:
    return {"runs": len(runs), **{k: statistics.median(r[k] for r in runs) for k in FIGURES},
            "requests": sum(r["requests"] for r in runs)}


def markdown(meta: dict, medians: dict, runs: list[dict]) -> str:
    head = ("| tokens/s | latency p50 s | latency p99 s | TTFT p50 s | TTFT p99 s | mean rows/step |",
            "|---|---|---|---|---|---|")

    def cells(r: dict) -> str:
        return (f"{r['tokens_per_s']:.0f} | {r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | "
                f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['mean_rows_per_step']:.1f} |")

    lines = [f"`{meta['command']}`", "",
             f"(commit {meta['commit']}; {meta['machine']}; {meta['clients']} clients x {meta['requests_per_client']} "
             f"streamed requests of {meta['max_tokens']} tokens on the shipped model; server torch threads "
             f"{meta['server_threads']}; the modes interleaved, {meta['repeats']} rounds)", "",
             "Median over the runs of each mode:", "",
             "| --max-batch | runs | " + head[0].removeprefix("| "), "|---|---|" + head[1].removeprefix("|")]
    lines += [f"| {mode} | {m['runs']} | " + cells(m) for mode, m in medians.items()]
    lines += ["", "Every run, in the order run (load average: 1-minute, before -> after the run):", "",
              "| round | --max-batch | requests | load average | " + head[0].removeprefix("| "),
              "|---|---|---|---|" + head[1].removeprefix("|")]
    lines += [f"| {r['round']} | {r['max_batch']} | {r['requests']} | {r['load_average_before'][0]:.1f} -> "
              f"{r['load_average_after'][0]:.1f} | " + cells(r) for r in runs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Continuous batching pays: N concurrent clients vs the same requests sent one by one.

Starts `keel serve` in a subprocess on loopback, sends N chat requests (greedy, so both runs
generate the same tokens) sequentially, then all at once from N threads, and prints a table and,
last, one JSON line with the throughput ratio.

    .venv/bin/python benchmarks/serve_batching.py --model runs/demo/model --clients 16
    .venv-vllm/bin/python benchmarks/serve_batching.py --clients 16 --backend vllm:cpu
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "keel", "serve", "--model", model, "--port", str(port), "--device", "cpu",
           "--max-batch", str(args.clients), "--model-name", "bench", "--backend", args.backend]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


def one(client, question: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, temperature=0)
    return r.usage.completion_tokens, time.perf_counter() - start


def run(client, questions, max_tokens, concurrent: bool) -> dict:
    results: list = [None] * len(questions)
    start = time.perf_counter()
    if concurrent:
        def work(i):
            results[i] = one(client, questions[i], max_tokens)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    else:
        for i, q in enumerate(questions):
            results[i] = one(client, q, max_tokens)
    wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return {"requests": len(questions), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "mean_latency_s": sum(r[1] for r in results) / len(results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory (default: a fresh 4-layer Qwen3)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--backend", default="torch",
                   help="keel serve's --backend: torch, onnxruntime:cpu:int8, vllm:cpu (in .venv-vllm), ...")
    args = p.parse_args()

    from keel.tasks import get_task

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from keel.models import init_model, save_model

            model = str(Path(tmp) / "model")
            save_model(*init_model("qwen3", layers=4, hidden=128, seed=0), model)
        questions = [ex.question for ex in get_task("arithmetic", digits=3).examples("test", args.clients, seed=0)]
        port = free_port()
        proc = start_server(model, port, args)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=600, http_client=httpx.Client(limits=httpx.Limits(max_connections=64)))
            one(client, questions[0], 4)  # warm-up
            seq = run(client, questions, args.max_tokens, concurrent=False)
            con = run(client, questions, args.max_tokens, concurrent=True)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        finally:
            proc.terminate()
            proc.wait(30)
    assert seq["tokens"] == con["tokens"], "greedy runs generated different token counts"
    print(f"{'mode':<12}{'requests':>9}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'mean latency s':>16}")
    for name, r in (("sequential", seq), (f"{args.clients} clients", con)):
        print(f"{name:<12}{r['requests']:>9}{r['tokens']:>8}{r['wall_s']:>9.2f}{r['tok_s']:>9.1f}{r['mean_latency_s']:>16.2f}")
    steps = rows = 0
    for line in metrics.splitlines():
        if line.startswith("keel_decode_steps_total "):
            steps = int(line.split()[1])
        if line.startswith("keel_decode_rows_total "):
            rows = int(line.split()[1])
    print(json.dumps({"benchmark": "serve_batching", "model": model if args.model else "fresh qwen3 4x128",
                      "backend": args.backend, "clients": args.clients, "max_tokens": args.max_tokens,
                      "threads": os.cpu_count(),
                      "sequential_tok_s": round(seq["tok_s"], 1), "concurrent_tok_s": round(con["tok_s"], 1),
                      "mean_decode_batch_both_runs": round(rows / max(steps, 1), 2),
                      "ratio": round(con["tok_s"] / seq["tok_s"], 2)}))


if __name__ == "__main__":
    main()

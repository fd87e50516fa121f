"""Serving throughput with and without batching (issue #5): N concurrent HTTP requests to
``looplm serve``'s app (uvicorn in this process, real HTTP on 127.0.0.1), once with
``--max-batch N`` and once with ``--max-batch 1`` (every request decoded alone by the batch-1
decoder), same model and prompts.  Prints wall time, generated tokens/s and their ratio.

Model: random weights, d_model 256, 4 heads, 3 core layers x T 4, byte vocabulary, greedy,
static depth (``--exit`` to change); prompts of ~40 bytes.

    OMP_NUM_THREADS=2 python benchmarks/serve_batching.py --requests 8 --tokens 64
"""

import argparse
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import uvicorn

from looplm import LoopLM, ModelConfig
from looplm.data.tokenizer import byte_tokenizer
from looplm.serve import create_app
from looplm.serve.engine import Engine


def run(model, tokenizer, max_batch: int, requests: int, tokens: int, exit: str,
        wait_ms: float) -> tuple[float, int, dict]:
    engine = Engine(model, tokenizer, max_batch=max_batch, batch_wait_ms=wait_ms)
    app = create_app(model, tokenizer, engine=engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    prompts = [f"request {index}: the looped model thinks in depth" for index in range(requests)]
    with httpx.Client(timeout=600) as client:
        client.post(url, json={"prompt": "warm up", "max_tokens": 4, "temperature": 0})
        start = time.perf_counter()
        with ThreadPoolExecutor(requests) as pool:
            bodies = list(pool.map(lambda prompt: client.post(url, json={
                "prompt": prompt, "max_tokens": tokens, "temperature": 0, "exit": exit}).json(), prompts))
        elapsed = time.perf_counter() - start
    stats = engine.stats.as_dict()
    server.should_exit = True
    thread.join()
    return elapsed, sum(body["usage"]["completion_tokens"] for body in bodies), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--exit", default="static")
    parser.add_argument("--batch-wait-ms", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LoopLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=256, n_heads=4, n_core_layers=3,
                               loop_steps=4, max_seq_len=256)).eval()
    results = {}
    for max_batch in (args.requests, 1):
        elapsed, generated, stats = run(model, tokenizer, max_batch, args.requests, args.tokens, args.exit,
                                         args.batch_wait_ms)
        results[max_batch] = generated / elapsed
        print(f"max_batch {max_batch:>3}: {args.requests} requests, {generated} tokens in {elapsed:.2f} s ="
              f" {generated / elapsed:.1f} tokens/s (batches {stats['batches']}, mean batch size"
              f" {stats['mean_batch_size']:.2f})")
    print(f"batched / unbatched throughput: {results[args.requests] / results[1]:.2f}x")


if __name__ == "__main__":
    main()

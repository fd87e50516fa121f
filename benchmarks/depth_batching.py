"""Depth-interleaved batching: does early exit buy throughput in a batch?  This engine against a
previous commit's, every figure measured in the same run.

1. Continuous batching (``BatchSession``: ``--batch`` rows, ``--requests`` requests of
   ``--tokens`` new tokens each, joining as slots free up; ``--standby`` slots more, default as many
   as rows, where the engine has them: requests admitted while every row is busy are prefilled and
   wait, and take the row of a request that ends inside a C call there), fixed depth against
   Q-exit, on
   - the reference shape (d 256, 4 heads, vocab 4096, 3 core layers × T 4) with its exit gate
     set so Q-exit stops tokens early (random weights: the exits are the gate's, not learned);
   - the demo model trained with Stage I (``looplm.demo``'s config; real, learned exits; its
     context is 32 tokens, so each request gets what fits after a held-out binding prompt),
     trained once and cached under ``$LOOPLM_CACHE/benchmarks`` (default ``~/.cache/looplm``).
     Stop ids are off, as for every model here: after its one-token answer the model goes on past
     anything it was trained on, and its gate lets most of those tokens out at step 1 (1.2–1.4 steps
     a decoded token in BENCHMARKS.md's runs, against ~3.2 for the answers), so the demo's X is
     mostly those tokens';
   - with ``--text-model CKPT --text-shards DIR`` (repeatable, in pairs), a looped model trained on
     text (the text study's Stage II run: real exits on real text), prompts of 32 tokens from the
     shards' val split; each is reported as ``text_model_vocab<N>`` (a second one of that
     vocabulary as ``text_model_vocab<N>_d<width>``).
   Reported: X, the share of layer applications Q-exit saved, and the throughput ratio
   Q-exit / fixed, against the target 1 / (1 − 0.8·X) (wall time drops by at least 80 % of the
   compute saved), in two consistent scopes: the decode phase (X over the decoded tokens, time
   without the prompts' prefill — the same work under both policies) and the whole run (X counting
   the prefill's full-depth layer applications, time with it).  The first line of each model mixes
   the scopes (decode-only X against whole-run time), the strictest reading.
2. Batch-1 decode tokens/s on the reference shape (``looplm.bench.time_decode``: prompt 128,
   128 new tokens, greedy, fixed depth, default backend), in each worker and again in
   ``--batch-1-rounds`` processes per engine alternating with the other's (the A/B to read).
3. The server under load: ``--serve-requests`` requests at ``--concurrency`` concurrent clients
   over loopback HTTP (uvicorn in process), mixed exit policies (static, q:0.5, hidden:0.05,
   kl:0.01, act), reference shape with a byte vocabulary: tokens/s and p50/p99 latency.

Each engine runs in its own subprocess (``--worker``) with its tree first on PYTHONPATH; the
previous commit is exported with ``git archive`` into a temporary directory.  The CPU model, its
flags and a matmul rate are printed first: read every figure against them.

    python benchmarks/depth_batching.py [--previous d640c9e] [--rounds 3] [--threads N] [--json FILE]

Defaults take several minutes on a quiet machine (the demo model trains once, ~3 minutes).
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
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_EXITS = ("static", "q:0.5", "hidden:0.05", "kl:0.01", "act")


def cpu_flags() -> str:
    """The SIMD flags that matter to the kernels (from /proc/cpuinfo)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return " ".join(flag for flag in flags.split(":")[1].split() if flag in wanted)


# --- the worker: runs inside one engine's tree --------------------------------------------------

def reference_model(gate_exits: bool = True):
    import torch

    from looplm import LoopLM
    from looplm.config import preset

    torch.manual_seed(0)
    model = LoopLM(preset("reference")).eval()
    if gate_exits:  # Q-exit stops tokens early (the figures of docs/INFERENCE.md's compute-bound run)
        torch.nn.init.normal_(model.exit_gate.weight, std=0.05)
        model.exit_gate.bias.data.fill_(-0.5)
    return model


def demo_model(steps: int):
    """The demo model trained with Stage I (cached), its tokenizer and held-out prompts."""
    from looplm.data.tasks import TaskBatches, make_task
    from looplm.demo import DEMO_TASK, DEMO_TASK_OPTIONS, demo_run_config
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    cache = Path(os.environ.get("LOOPLM_CACHE", Path.home() / ".cache" / "looplm")) / "benchmarks" / f"demo-{steps}"
    if not (cache / "config.json").exists():
        from looplm.training.trainer import Trainer

        with tempfile.TemporaryDirectory() as scratch:
            print(f"training the demo model ({steps} steps) into {cache} ...", file=sys.stderr, flush=True)
            trainer = Trainer(demo_run_config(train_steps=steps), Path(scratch) / "run", progress=False)
            trainer.train()
            trainer.model.save(cache, trainer.tokenizer)
    model, tokenizer = load_model(cache).eval(), load_checkpoint_tokenizer(cache)
    held_out = TaskBatches(make_task(DEMO_TASK, **DEMO_TASK_OPTIONS), tokenizer, split="test",
                           seed=0).eval_set(64, seed=7)
    return model, held_out.prompts


def text_model(path: str, shards: str, requests: int, prompt_tokens: int = 32):
    """A looped model trained on text (a checkpoint directory, e.g. the text study's Stage II run)
    and ``requests`` prompts of ``prompt_tokens`` tokens cut from the validation split of prepared
    shards of its tokenizer (``looplm prepare``; the text study prepares them under its --out)."""
    from looplm.data.shards import TokenShards
    from looplm.model.loading import load_model

    model = load_model(Path(path)).eval()
    tokens = TokenShards(Path(shards), "val").tokens
    if int(tokens.max()) >= model.config.vocab_size:
        raise SystemExit(f"--text-shards {shards} holds token ids outside the model's vocabulary: give the shards of"
                         " its tokenizer")
    stride = max(prompt_tokens, (len(tokens) - prompt_tokens) // requests)
    return model, [[int(token) for token in tokens[start:start + prompt_tokens]]
                   for start in range(0, stride * requests, stride)][:requests]


def text_model_name(model) -> str:
    """The results' key of a text model: ``text_model`` and its vocabulary (byte-level models have
    a few hundred ids, BPE ones thousands), so two text models of one run stay apart."""
    return f"text_model_vocab{model.config.vocab_size}"


def model_sections(results: dict) -> list[str]:
    """The keys of ``results`` that hold a model's fixed / Q-exit comparison, in run order."""
    return [key for key, value in results.items() if isinstance(value, dict) and "fixed" in value]


def continuous(model, prompts: list[list[int]], tokens: int, policy, rows: int, standby: int = 0) -> dict:
    """Every prompt through one ``BatchSession`` of ``rows`` rows (and ``standby`` slots more where
    the engine has them), joining as slots free up (either engine's API); tokens/s over the whole
    run, prefill included, and layer applications."""
    import inspect

    import torch

    from looplm.batch import BatchSession

    context = model.config.max_seq_len
    standby = standby if "standby" in inspect.signature(BatchSession).parameters else 0
    session = BatchSession(model, rows, context, exit_policy=policy, stop_ids=[],
                           **({"standby": standby} if standby else {}))
    waiting, admitted, prefill_seconds, prompt_tokens = list(prompts), [], 0.0, 0
    started = time.perf_counter()
    with torch.inference_mode():
        while waiting or session.active:
            while waiting and session.fits(waiting[0], min(tokens, context - len(waiting[0]))):
                prompt = waiting.pop(0)
                admitting = time.perf_counter()
                admitted += session.admit([prompt], [min(tokens, context - len(prompt))])
                prefill_seconds += time.perf_counter() - admitting
                prompt_tokens += len(prompt)
            session.step()
    seconds = time.perf_counter() - started
    generations = [request.generation for request in admitted]
    counts = [(getattr(request, "layer_applications", None), getattr(request, "full_depth_applications", None))
              for request in admitted]
    if counts[0][0] is None:  # this engine keeps the counts on the generation
        counts = [(g.layer_applications, g.full_depth_applications) for g in generations]
    emitted = sum(len(g.ids) for g in generations)
    decoded = emitted - len(admitted)  # a request's first token comes from its prompt's prefill
    steps = [step for g in generations for step in g.steps[1:]]
    full_depth = sum(full for _, full in counts)
    return {"requests": len(admitted), "standby": standby, "tokens": emitted, "seconds": seconds,
            "tokens_per_s": emitted / seconds,
            "prefill_seconds": prefill_seconds, "decode_seconds": seconds - prefill_seconds,
            "layer_applications": sum(run for run, _ in counts), "full_depth_applications": full_depth,
            # the prompts ran at full depth: the decoded tokens' full-depth count per token, per prompt token
            "prefill_applications": round(prompt_tokens * full_depth / max(decoded, 1)),
            "mean_steps": sum(steps) / max(len(steps), 1)}


def multiply_adds(model) -> tuple[int, int]:
    """Multiply-adds of one layer application (one per weight of a core layer's projections:
    attention over the context left out) and of the head, per token, for the plain loop's layers."""
    layer = model.core[0]
    projections = (layer.attn.qkv, layer.attn.out, layer.ffn.gate_up, layer.ffn.down)
    return sum(module.weight.numel() for module in projections), model.head_weight.numel()


def depth_batching(model, prompts, tokens: int, rows: int, q: float, rounds: int = 1, standby: int = 0) -> dict:
    """Fixed depth and Q-exit, alternately ``rounds`` times each; each policy's figures are those of
    its run with the median decode time (the machine drifts by a few per cent between runs)."""
    from looplm.exit_policy import FixedSteps, QExit

    continuous(model, prompts[:rows], 4, QExit(q), rows, standby)  # warm-up
    runs = {"fixed": [], "q_exit": []}
    for _ in range(rounds):
        runs["fixed"].append(continuous(model, prompts, tokens, FixedSteps(), rows, standby))
        runs["q_exit"].append(continuous(model, prompts, tokens, QExit(q), rows, standby))
    fixed, early = (sorted(runs[name], key=lambda run: run["decode_seconds"])[(rounds - 1) // 2]
                    for name in ("fixed", "q_exit"))
    for name, run in (("fixed", fixed), ("q_exit", early)):
        run["rounds_decode_seconds"] = [round(other["decode_seconds"], 4) for other in runs[name]]
        run["rounds_seconds"] = [round(other["seconds"], 4) for other in runs[name]]
    saved = 1 - early["layer_applications"] / fixed["layer_applications"]
    # The whole run's ratio from each policy's median whole-run time (every run emits the same tokens),
    # as the decode ratio is from the median decode times: a prefill slowed once by the machine in the
    # run with the median decode time does not set it.
    ratio = (statistics.median(run["seconds"] for run in runs["fixed"])
             / statistics.median(run["seconds"] for run in runs["q_exit"]))
    # The same bar in two consistent scopes: the decode phase alone (X over decoded tokens, time without
    # the prompts' prefill, which is the same work for both policies), and the whole run (X counting the
    # prefill's full-depth applications too, time with the prefill).  The line above mixes the scopes.
    decode_ratio = fixed["decode_seconds"] / early["decode_seconds"]
    whole = 1 - ((early["layer_applications"] + early["prefill_applications"])
                 / (fixed["layer_applications"] + fixed["prefill_applications"]))
    # What early exit saves of the arithmetic: every token still runs its head, so the multiply-adds
    # saved are fewer than the layer applications; 1 / (1 - that share) is what Q-exit would buy if
    # wall time followed arithmetic exactly (no per-iteration or per-token costs).  The decode runs a
    # head for each decoded token (a request's first token is its prompt's: one head per prompt in
    # the prefill, whose layers run at full depth under both policies).
    layer, head = multiply_adds(model)
    decode_work = {name: run["layer_applications"] * layer + (run["tokens"] - run["requests"]) * head
                   for name, run in (("fixed", fixed), ("q_exit", early))}
    whole_work = {name: decode_work[name] + run["prefill_applications"] * layer + run["requests"] * head
                  for name, run in (("fixed", fixed), ("q_exit", early))}
    arithmetic = 1 - decode_work["q_exit"] / decode_work["fixed"]
    whole_arithmetic = 1 - whole_work["q_exit"] / whole_work["fixed"]
    # Each round's own decode ratio (its fixed-depth run over the Q-exit run right after it): how far
    # the machine's drift moves the figure, and in how many rounds the bar held.
    rounds_ratios = [one["decode_seconds"] / other["decode_seconds"] for one, other in zip(runs["fixed"],
                                                                                            runs["q_exit"])]
    scopes = {"decode": {"X": saved, "ratio": decode_ratio, "target": 1 / (1 - 0.8 * saved),
                         "multiply_adds_saved": arithmetic, "arithmetic_ratio": 1 / (1 - arithmetic),
                         "rounds_ratios": rounds_ratios},
              "whole_run": {"X": whole, "ratio": ratio, "target": 1 / (1 - 0.8 * whole),
                            "multiply_adds_saved": whole_arithmetic, "arithmetic_ratio": 1 / (1 - whole_arithmetic)}}
    for scope in scopes.values():
        scope["met"] = scope["ratio"] >= scope["target"]
    return {"fixed": fixed, "q_exit": early, "q": q, "saved_share_X": saved, "throughput_ratio": ratio,
            "target_ratio": 1 / (1 - 0.8 * saved), "meets_target": ratio >= 1 / (1 - 0.8 * saved), "scopes": scopes}


def serve_load(requests: int, concurrency: int, tokens: int, rows: int) -> dict:
    """``requests`` completions, ``concurrency`` at a time, mixed exit policies, over loopback."""
    import httpx
    import torch
    import uvicorn

    from looplm import LoopLM, ModelConfig
    from looplm.data.tokenizer import byte_tokenizer
    from looplm.serve import create_app
    from looplm.serve.engine import Engine

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LoopLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=256, n_heads=4, n_core_layers=3,
                               loop_steps=4, max_seq_len=256)).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.05)
    model.exit_gate.bias.data.fill_(-0.5)
    engine = Engine(model, tokenizer, max_batch=rows, batch_wait_ms=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, engine=engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    latencies, generated = [], []

    def ask(index: int) -> None:
        body = {"prompt": f"request {index}: the looped model thinks in depth", "max_tokens": tokens,
                "temperature": 0, "exit": SERVE_EXITS[index % len(SERVE_EXITS)]}
        started = time.perf_counter()
        answer = client.post(url, json=body).json()
        latencies.append(time.perf_counter() - started)
        generated.append(answer["usage"]["completion_tokens"])

    with httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=concurrency)) as client:
        client.post(url, json={"prompt": "warm up", "max_tokens": 4, "temperature": 0})
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, range(requests)))
        seconds = time.perf_counter() - started
    stats = engine.stats.as_dict()
    server.should_exit = True
    thread.join()
    latencies.sort()
    return {"requests": requests, "concurrency": concurrency, "tokens": sum(generated), "seconds": seconds,
            "tokens_per_s": sum(generated) / seconds, "p50_latency_s": statistics.median(latencies),
            "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "batches": stats["batches"], "mean_batch_size": stats["mean_batch_size"]}


def worker(args) -> dict:
    import torch

    from looplm.bench import time_decode

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_1_only:
        return {"batch_1_decode_tokens_per_s": time_decode(reference_model(gate_exits=False),
                                                           repeats=args.repeats)["decode_tokens_per_s"]}
    results = {}
    generator = torch.Generator().manual_seed(3)
    model = reference_model()
    prompts = [torch.randint(0, model.config.vocab_size, (64,), generator=generator).tolist()
               for _ in range(args.requests)]
    standby = args.batch if args.standby is None else args.standby
    results["reference_shape"] = depth_batching(model, prompts, args.tokens, args.batch, 0.5, args.rounds, standby)
    demo, held_out = demo_model(args.demo_steps)
    results["demo_model"] = depth_batching(demo, held_out[:args.requests], args.tokens, args.batch, 0.5,
                                           args.rounds, standby)
    for path, shards in zip(args.text_model or (), args.text_shards or ()):
        text, text_prompts = text_model(path, shards, args.requests)
        name = text_model_name(text)
        name += f"_d{text.config.d_model}" if name in results else ""  # two of one vocabulary
        name += f"_{len(results)}" if name in results else ""
        results[name] = depth_batching(text, text_prompts, args.tokens, args.batch, 0.5, args.rounds, standby)
    results["batch_1_decode_tokens_per_s"] = time_decode(reference_model(gate_exits=False),
                                                         repeats=args.repeats)["decode_tokens_per_s"]
    if not args.skip_serve:
        results["serve"] = serve_load(args.serve_requests, args.concurrency, args.serve_tokens, args.batch)
    return results


# --- the driver ----------------------------------------------------------------------------------

def run_tree(tree: Path, args, extra: tuple[str, ...] = ()) -> dict:
    """The worker in a subprocess with ``tree``'s looplm."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"] + args.passed + list(extra)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {tree} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, results: dict) -> None:
    print(f"\n## {name}\n")
    standby = {results[model]["fixed"].get("standby", 0) for model in model_sections(results)}
    print(f"standby slots (prefilled requests waiting for a row): {', '.join(map(str, sorted(standby)))}\n")
    print("| model | policy | mean steps | layer applications | tokens | seconds | of which prefill | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    models = model_sections(results)
    for model in models:
        section = results[model]
        for policy in ("fixed", "q_exit"):
            row = section[policy]
            prefill = f"{row['prefill_seconds']:.2f}" if "prefill_seconds" in row else "–"
            print(f"| {model} | {policy} | {row['mean_steps']:.2f} | {row['layer_applications']:,}"
                  f" | {row['tokens']:,} | {row['seconds']:.2f} | {prefill} | {row['tokens_per_s']:.1f} |")
    for model in models:
        for policy in ("fixed", "q_exit"):
            if "rounds_decode_seconds" in results[model][policy]:
                print(f"{model} {policy}: decode seconds of every round"
                      f" {results[model][policy]['rounds_decode_seconds']}")
                if "rounds_seconds" in results[model][policy]:
                    print(f"{model} {policy}: whole-run seconds of every round"
                          f" {results[model][policy]['rounds_seconds']}")
    for model in models:
        section = results[model]
        print(f"\n{model}: X = {section['saved_share_X']:.3f} of decode layer applications saved; whole-run"
              f" throughput Q/fixed = {section['throughput_ratio']:.3f}; target 1/(1-0.8X) ="
              f" {section['target_ratio']:.3f} ({'met' if section['meets_target'] else 'NOT met'}; mixed scopes)")
        for scope, figures in section.get("scopes", {}).items():
            print(f"  {scope}: X = {figures['X']:.3f}, Q/fixed = {figures['ratio']:.3f}, target"
                  f" {figures['target']:.3f} ({'met' if figures['met'] else 'NOT met'})")
            if len(figures.get("rounds_ratios", ())) > 1:
                ratios = figures["rounds_ratios"]
                print(f"    each round's Q/fixed: {min(ratios):.3f} to {max(ratios):.3f}, target met in"
                      f" {sum(ratio >= figures['target'] for ratio in ratios)} of {len(ratios)} rounds")
            if "multiply_adds_saved" in figures:
                print(f"    multiply-adds saved {figures['multiply_adds_saved']:.3f} (the head's are not): wall time"
                      f" following arithmetic exactly would give Q/fixed = {figures['arithmetic_ratio']:.3f}")
    print(f"\nbatch-1 decode, reference shape: {results['batch_1_decode_tokens_per_s']:.1f} tokens/s")
    if "serve" in results:
        serve = results["serve"]
        print(f"server: {serve['requests']} requests at {serve['concurrency']} concurrent, mixed exits:"
              f" {serve['tokens_per_s']:.1f} tokens/s, p50 {serve['p50_latency_s']:.2f} s, p99"
              f" {serve['p99_latency_s']:.2f} s ({serve['batches']} batches, mean size {serve['mean_batch_size']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", default="d640c9e", help="the engine to compare with (a commit)")
    parser.add_argument("--skip-previous", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--standby", type=int, default=None,
                        help="BatchSession standby slots, where the engine has them (default: --batch; 0: none)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--demo-steps", type=int, default=3000, help="demo training steps (cached per value)")
    parser.add_argument("--repeats", type=int, default=3, help="batch-1 decode timings (median)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="continuous-batching runs per policy, alternating (the median decode time's run)")
    parser.add_argument("--text-model", action="append", metavar="CKPT",
                        help="also a looped model trained on text: its checkpoint directory (e.g. the text"
                        " study's Stage II run), with --text-shards; repeat both for several models, in pairs")
    parser.add_argument("--text-shards", action="append", metavar="DIR",
                        help="prepared shards of the text model's tokenizer (their val split gives the prompts)")
    parser.add_argument("--serve-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve-tokens", type=int, default=64)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--batch-1-rounds", type=int, default=3,
                        help="batch-1 decode of each engine in processes alternating with the other's (medians)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-1-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.text_model or ()) != len(args.text_shards or ()):
        parser.error("--text-model and --text-shards go together: give one --text-shards for each --text-model")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.passed = [argument for argument in sys.argv[1:] if argument != "--worker"]
    for flag in ("--text-model", "--text-shards"):  # the workers run in their trees: absolute paths
        for at, argument in enumerate(args.passed):
            if argument.startswith(flag + "="):
                args.passed[at] = f"{flag}={Path(argument.split('=', 1)[1]).resolve()}"
            elif argument == flag and at + 1 < len(args.passed):
                args.passed[at + 1] = str(Path(args.passed[at + 1]).resolve())
    import torch

    sys.path.insert(0, str(ROOT))
    from looplm.bench import cpu_name, matmul_gflops

    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": args.threads or torch.get_num_threads(),
               "matmul_gflop_s": matmul_gflops(), "torch": torch.__version__}
    print(f"{machine['cpu']}; flags {machine['flags']}; {machine['threads']} threads; fp32 2048² matmul"
          f" {machine['matmul_gflop_s']:.0f} GFLOP/s; torch {machine['torch']}")
    results = {"machine": machine, "this": run_tree(ROOT, args)}
    report("this engine (depth-interleaved)", results["this"])
    if not args.skip_previous:
        with tempfile.TemporaryDirectory(prefix="looplm-previous-") as previous:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.previous],
                                     capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", previous], input=archive.stdout, check=True)
            results["previous"] = run_tree(Path(previous), args)
            # Batch 1 again, each engine in its own process alternating with the other's: the two
            # workers above ran minutes apart, and the machine's speed drifts by several per cent.
            alternating = {"this": [], "previous": []}
            for _ in range(args.batch_1_rounds):
                for name, tree in (("this", ROOT), ("previous", Path(previous))):
                    alternating[name].append(run_tree(tree, args, ("--batch-1-only",))["batch_1_decode_tokens_per_s"])
            results["batch_1_alternating"] = alternating
        report(f"previous engine ({args.previous})", results["previous"])
        this, before = results["this"], results["previous"]
        print("\nbatch-1 decode, this / previous (the workers' own runs, minutes apart):"
              f" {this['batch_1_decode_tokens_per_s'] / before['batch_1_decode_tokens_per_s']:.3f}")
        if alternating["this"]:
            mine, theirs = statistics.median(alternating["this"]), statistics.median(alternating["previous"])
            print(f"batch-1 decode in alternating processes: this {[round(x, 1) for x in alternating['this']]},"
                  f" previous {[round(x, 1) for x in alternating['previous']]} tokens/s; medians' ratio"
                  f" {mine / theirs:.3f} (target >= 0.95)")
        for model in [model for model in model_sections(this) if model in before]:
            print(f"{model}, Q-exit tokens/s, this / previous:"
                  f" {this[model]['q_exit']['tokens_per_s'] / before[model]['q_exit']['tokens_per_s']:.2f}")
        if "serve" in this and "serve" in before:
            print("server tokens/s, this / previous:"
                  f" {this['serve']['tokens_per_s'] / before['serve']['tokens_per_s']:.2f};"
                  f" p50 {this['serve']['p50_latency_s']:.2f} s vs {before['serve']['p50_latency_s']:.2f} s,"
                  f" p99 {this['serve']['p99_latency_s']:.2f} s vs {before['serve']['p99_latency_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

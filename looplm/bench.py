"""``looplm bench``: training and decode throughput on the reference shape.

Reference shape (issue #2): d_model 256, 4 heads, vocab 4096, 3 core layers × T 4.
Training: batch 8 × 256 tokens, Stage I objective, AdamW step included.
Decode: batch 1, a 128-token prompt, 128 new tokens, greedy, fixed T steps, through the
public ``generate`` path (prefill excluded from the decode rate, reported separately), with
the default backend (the C kernel where it builds) and, as baselines in the same run, the
torch and reference backends.
Each figure is the median of ``repeats`` timed runs after a warm-up.

Precision: the CPU's relevant flags and its fp32 and bf16 matmul rates are printed first; then
training and decode run in fp32 and, where ``auto`` chooses bf16 here (``looplm.precision``:
native bf16 in the CPU for training, in the C kernel for decode), in bf16 too, side by side.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from looplm.checkpoint.atomic import atomic_write_text
from looplm.config import TrainConfig, preset
from looplm.cpu import cpu_name, reported_flags
from looplm.generate import FixedSteps, generate
from looplm.model.lm import LoopLM
from looplm.precision import Precision, decode_precision, native_bf16_flag, training_precision
from looplm.training.objectives import compute_loss
from looplm.training.trainer import make_optimizer


def time_training(model: LoopLM, batch: int = 8, length: int = 256, steps: int = 3, repeats: int = 3,
                  compile_model: bool = False, precision: str = "fp32") -> float:
    """Median training tokens/s over ``repeats`` runs of ``steps`` optimiser steps; ``precision``
    fp32 or bf16 (the forward under bf16 autocast, as ``train.precision`` runs it)."""
    optimizer = make_optimizer(model, TrainConfig())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_of(inputs, targets):
        return compute_loss(model(inputs), targets, "stage1", 0.1).loss

    forward = torch.compile(loss_of) if compile_model else loss_of

    autocast = Precision(precision, "asked").autocast("cpu")

    def one_step() -> None:
        with autocast:
            loss = forward(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return median_rate(one_step, batch * length, steps, repeats, warmup=2)


def median_rate(one_step, tokens_per_step: int, steps: int, repeats: int, warmup: int = 1) -> float:
    """Median tokens/s over ``repeats`` timed runs of ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        one_step()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        rates.append(tokens_per_step * steps / (time.perf_counter() - started))
    return statistics.median(rates)


def time_decode(model: LoopLM, prompt_length: int = 128, new_tokens: int = 128, repeats: int = 3,
                backend: str = "auto", compile_steps: bool = False, dtype: str = "fp32") -> dict:
    """Median batch-1 greedy decode tokens/s (and prefill tokens/s) through ``generate``
    (``dtype``: the weights, see ``looplm.generate.Decoder``)."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_length,), generator=generator).tolist()
    policy = FixedSteps()
    model.eval()
    options = dict(exit_policy=policy, stop_ids=[], backend=backend, compile_steps=compile_steps, dtype=dtype)
    generate(model, prompt, 8, **options)
    decode_rates, prefill_rates = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        generate(model, prompt, 1, **options)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        result = generate(model, prompt, new_tokens, **options)
        total = time.perf_counter() - started
        decode_rates.append((len(result.ids) - 1) / max(total - prefill, 1e-9))
        prefill_rates.append(prompt_length / prefill)
    return {"decode_tokens_per_s": statistics.median(decode_rates),
            "prefill_tokens_per_s": statistics.median(prefill_rates)}


def matmul_gflops(size: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of one [size, size] matmul in ``dtype`` (best of ``repeats``): the machine's compute
    ceiling at this moment, to read the run's other figures against (a shared VM's speed
    drifts, and the host's CPU generation can change between runs)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(seconds_of(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def machine_report() -> dict:
    """The CPU, its flags that decide the precision paths, and its fp32 and bf16 matmul rates.

    The bf16 matmul runs at 2048² where the CPU has native bf16, at 512² elsewhere (there torch
    emulates bf16: about 1 GFLOP/s, which would take a minute at 2048²); ``matmul_bf16_size``
    says which."""
    bf16_size = 2048 if native_bf16_flag() else 512
    return {"machine": cpu_name(),
            "cpu_flags": " ".join(reported_flags()) or "(none of the reported)",
            "matmul_gflop_s": matmul_gflops(),
            "matmul_gflop_s_bf16": matmul_gflops(bf16_size, dtype=torch.bfloat16),
            "matmul_bf16_size": bf16_size}


def seconds_of(function) -> float:
    """Wall seconds of one call of ``function``."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """STREAM-style copy bandwidth in bytes/s (bytes read + written) over buffers far larger
    than the last-level cache: the memory ceiling of weight-streaming decode."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
    return 2 * source.nbytes / min(times)


def decode_traffic(model: LoopLM, context: int) -> dict:
    """What one batch-1 decoded token at full depth reads: the weights (the core's T times, the
    rest once, one embedding row, the head) and the K/V of ``context`` earlier positions; and
    the layer applications it runs."""
    from looplm.cache import KVCache

    config = model.config
    core = sum(p.numel() for p in model.core.parameters())
    once = sum(p.numel() for module in (model.prelude, model.coda, model.norm) for p in module.parameters())
    element = next(model.parameters()).element_size()
    weights = element * (core * config.loop_steps + once + config.vocab_size * config.d_model + config.d_model)
    kv_per_token = KVCache(config, 1, 1, device="meta").bytes_per_token
    return {"layer_applications_per_token": config.n_prelude_layers + config.loop_steps
            * (config.n_core_layers + config.n_coda_layers),
            "kv_cache_bytes_per_token": kv_per_token,
            "bytes_read_per_token": weights + kv_per_token * context}


def roofline(model: LoopLM, tokens_per_s: float, context: int) -> dict:
    """The decode rate against the bandwidth roofline (bytes read per token ÷ copy bandwidth)."""
    traffic = decode_traffic(model, context)
    bandwidth = copy_bandwidth()
    ceiling = bandwidth / traffic["bytes_read_per_token"]
    return {**traffic, "copy_bandwidth_gb_s": bandwidth / 1e9, "roofline_tokens_per_s": ceiling,
            "fraction_of_roofline": tokens_per_s / ceiling}


def decode_against_baselines(model: LoopLM, repeats: int) -> dict:
    """Batch-1 decode with the default backend, and the torch and reference paths timed in the
    same run as baselines (rates and speed-ups); all float32."""
    results = time_decode(model, repeats=repeats)
    for backend in ("torch", "reference"):
        rate = time_decode(model, repeats=repeats, backend=backend)["decode_tokens_per_s"]
        results[f"decode_tokens_per_s_{backend}_path"] = rate
        results[f"decode_speedup_vs_{backend}_path"] = results["decode_tokens_per_s"] / rate
    return results


def run_bench(json_path: str | None = None, threads: int = 0, compile_model: bool = False,
              repeats: int = 3) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = preset("reference")
    model = LoopLM(config)
    training, decoding = training_precision("auto", "cpu", config.d_model), decode_precision("auto")
    results = {
        "shape": "d_model 256, 4 heads, vocab 4096, 3 core layers x T 4",
        "parameters": model.num_parameters(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **machine_report(),
        "train_precision": training.label,
        "train_tokens_per_s": time_training(model, repeats=repeats),
    }
    if training.name == "bf16":  # the chosen precision beside fp32, same run
        results["train_tokens_per_s_bf16"] = time_training(model, repeats=repeats, precision="bf16")
        results["train_speedup_bf16"] = results["train_tokens_per_s_bf16"] / results["train_tokens_per_s"]
    if compile_model:
        results["train_tokens_per_s_compiled"] = time_training(LoopLM(config), repeats=repeats, compile_model=True)
    decode_model = LoopLM(config)
    from looplm.kernels import load_kernel, unavailable_reason

    # The headline decode rate is the default backend's (native where it builds); the torch
    # and reference paths are timed in the same run as baselines.
    results["decode_backend"] = "native" if load_kernel() is not None else f"torch ({unavailable_reason()})"
    results.update(decode_against_baselines(decode_model, repeats))
    # A token mid-generation attends over the 128-token prompt and half the 128 new tokens.
    results.update(roofline(decode_model, results["decode_tokens_per_s"], context=128 + 64))
    results["decode_dtype"] = decoding.label
    if decoding.name == "bf16":
        results["decode_tokens_per_s_bf16"] = time_decode(decode_model, repeats=repeats,
                                                          dtype="bf16")["decode_tokens_per_s"]
        results["decode_speedup_bf16"] = results["decode_tokens_per_s_bf16"] / results["decode_tokens_per_s"]
    if compile_model:
        results["decode_tokens_per_s_torch_compiled"] = time_decode(decode_model, repeats=repeats,
                                                                    compile_steps=True)["decode_tokens_per_s"]
    for key, value in results.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        print(f"{key:>36}: {shown}")
    if json_path:
        atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    return results

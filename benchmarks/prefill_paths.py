"""A batched cache's prompt prefill: the C rows (``NativeRowsStepper.prefill_rows``, 64 positions a
call) against the model's torch forward into the same cache row, for several model widths and
prompt lengths, and which one ``prefills_rows`` picks.  The rule it checks: the torch forward pays
milliseconds of dispatch per prompt and wins by its GEMMs only on longer prompts, so a prompt that
fits one C call (``PREFILL_ROWS``, ``looplm/kernels/native_stepper.py``) goes to the C rows where
the kernel has SIMD products.  ``LOOPLM_NATIVE_TARGET=avx2,fma`` (or ``portable``) measures another
build of the kernel on the same CPU.

The models are the ``reference`` preset (3 core layers × 4 loop steps, vocab 4096) at each width,
random weights, float32; each figure is the best of ``--repeats`` prefills.  The CPU, its flags and
a matmul rate are printed first: read the figures against them.

    python benchmarks/prefill_paths.py [--widths 64,256,1024] [--lengths 16,64,256,512] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from looplm import LoopLM
from looplm.bench import machine_report
from looplm.cache import KVCache
from looplm.config import preset
from looplm.kernels.build import simd_paths
from looplm.kernels.native_stepper import NativeRowsStepper


def best_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(width: int, length: int, repeats: int) -> dict:
    config = dataclasses.replace(preset("reference"), d_model=width, n_heads=max(1, width // 64),
                                 n_kv_heads=max(1, width // 64))
    torch.manual_seed(0)
    model = LoopLM(config).eval()
    steps = config.loop_steps
    cache = KVCache(config, 2, length + 1, steps)
    stepper = NativeRowsStepper(model, cache)
    prompt = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        c_rows = best_seconds(lambda: stepper.prefill_rows(prompt, 0, steps, cache.row(0)), repeats)
        forward = best_seconds(lambda: model(ids, steps=steps, cache=cache.row(1)), repeats)
    return {"d_model": width, "prompt_tokens": length, "core_mib_per_step": stepper.token_step_bytes / 2**20,
            "c_rows_ms": 1e3 * c_rows, "torch_forward_ms": 1e3 * forward,
            "picks": "c_rows" if stepper.prefills_rows(length) else "torch_forward",
            "faster": "c_rows" if c_rows < forward else "torch_forward"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,256,512,1024", help="d_model values, comma-separated")
    parser.add_argument("--lengths", default="16,64,128,256,512", help="prompt lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    machine = {**machine_report(), "threads": torch.get_num_threads(), "simd_paths": simd_paths()}
    print(f"{machine['machine']} | flags: {machine['cpu_flags']} | fp32 matmul {machine['matmul_gflop_s']:.0f}"
          f" GFLOP/s | {machine['threads']} threads | kernel: {machine['simd_paths']}")
    print("| d_model | core MiB/step | prompt | C rows ms | torch forward ms | faster | picked |")
    print("|---:|---:|---:|---:|---:|---|---|")
    rows, wrong = [], 0
    for width in (int(value) for value in args.widths.split(",")):
        for length in (int(value) for value in args.lengths.split(",")):
            row = measure(width, length, args.repeats)
            rows.append(row)
            wrong += row["picks"] != row["faster"]
            print(f"| {width} | {row['core_mib_per_step']:.1f} | {length} | {row['c_rows_ms']:.2f} |"
                  f" {row['torch_forward_ms']:.2f} | {row['faster']} | {row['picks']} |", flush=True)
    print(f"\nthe rule picked the slower path for {wrong} of {len(rows)} shapes")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()

"""Batch-1 decode tokens/s of the C runtime against the other backends (docs/C_RUNTIME.md).

    python benchmarks/c_runtime.py [--json FILE] [--repeats 3] [--new-tokens 128] [--threads N]

Two shapes: the reference shape (d 256, 4 heads, vocab 4096, 3 core layers × T 4: Ouro's plain
loop) and ``loopcached`` at the same width (d 256, vocab 4096; its GGGA hybrid with memory
caching along the sequence and the loop).  For each: the standalone ``looplm-run`` (its own
tokens/s line, prefill excluded), the in-process ``native`` backend, the ``torch`` backend (where
it runs) and the ``reference`` backend, greedy, fixed T steps, a 64-token prompt; on the
reference shape also the runtime in process in place of the fused plain-loop kernel (what
replacing decode_kernel.c would cost).  Also printed: the CPU, its SIMD flags, an fp32 matmul
rate, the program's build time and size.  Each figure is the median of ``--repeats`` runs; run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looplm.bench import cpu_name, matmul_gflops, time_decode  # noqa: E402
from looplm.config import ModelConfig, preset  # noqa: E402
from looplm.cpu import reported_flags  # noqa: E402
from looplm.fast_decode import fast_unsupported  # noqa: E402
from looplm.interop.gguf import export_gguf  # noqa: E402
from looplm.kernels import build as native_build  # noqa: E402
from looplm.kernels import program  # noqa: E402
from looplm.model import LoopLM  # noqa: E402

PROMPT = 64


def shapes() -> dict[str, ModelConfig]:
    loopcached = preset("loopcached")
    loopcached.d_model, loopcached.vocab_size, loopcached.max_seq_len = 256, 4096, 512
    loopcached.ffn_hidden = preset("reference").ffn_hidden
    loopcached.__post_init__()
    return {"reference": preset("reference"), "loopcached-d256": loopcached}


def program_rate(binary: Path, model_path: Path, vocab: int, new_tokens: int, threads: int) -> float:
    prompt = torch.randint(0, vocab, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    command = [str(binary), str(model_path), "--prompt-ids", ",".join(map(str, prompt)), "-n", str(new_tokens),
               "--print-ids"] + (["--threads", str(threads)] if threads else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(re.search(r"\(([\d.]+) tokens/s\)", result.stderr).group(1))


def in_process_rate(model, repeats: int, new_tokens: int, backend: str) -> float | str:
    try:
        return time_decode(model, PROMPT, new_tokens, repeats, backend=backend)["decode_tokens_per_s"]
    except Exception as error:  # a backend that cannot run this family says why
        return f"n/a ({str(error).splitlines()[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch and program threads (0 = their defaults)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    results: dict = {"machine": cpu_name(), "simd_flags": reported_flags(), "torch_threads": torch.get_num_threads(),
                     "matmul_gflop_s": matmul_gflops()}
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        started = time.perf_counter()
        binary = program.build(directory / "looplm-run")
        results["program_build_seconds"] = time.perf_counter() - started
        results["program_bytes"] = binary.stat().st_size
        results["library_simd"] = native_build.load_kernel().lr_simd().decode()
        for name, config in shapes().items():
            torch.manual_seed(0)
            model = LoopLM(config).eval()
            path = export_gguf(model, directory / f"{name}.gguf")
            figures = {"parameters": model.num_parameters()}
            figures["looplm-run"] = statistics.median(
                program_rate(binary, path, config.vocab_size, arguments.new_tokens, arguments.threads)
                for _ in range(arguments.repeats))
            for backend in ("native", "torch", "reference"):
                figures[backend] = in_process_rate(model, arguments.repeats, arguments.new_tokens, backend)
            if fast_unsupported(model) is None:  # the fused plain-loop kernel serves it: the runtime in its place
                with mock.patch("looplm.kernels.native_stepper.native_unsupported", lambda model, cache: "benchmark"):
                    figures["native (runtime in place of decode_kernel.c)"] = in_process_rate(
                        model, arguments.repeats, arguments.new_tokens, "native")
            reference = figures["reference"]
            if isinstance(reference, float):
                figures["native / reference"] = figures["native"] / reference
                figures["looplm-run / reference"] = figures["looplm-run"] / reference
            results[name] = figures
    print(f"CPU: {results['machine']}; SIMD: {' '.join(results['simd_flags']) or 'none listed'}; torch threads"
          f" {results['torch_threads']}; fp32 2048² matmul {results['matmul_gflop_s']:.0f} GFLOP/s")
    print(f"looplm-run: built in {results['program_build_seconds']:.1f} s, {results['program_bytes']:,} bytes;"
          f" library SIMD path: {results['library_simd']}")
    for name in shapes():
        print(f"\n{name} ({results[name]['parameters']:,} parameters), batch-1 greedy decode tokens/s"
              f" (prompt {PROMPT}, {arguments.new_tokens} new, fixed T steps):")
        for key, value in results[name].items():
            if key != "parameters":
                print(f"  {key:48s} {value:10.1f}" if isinstance(value, float) else f"  {key:48s} {value}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

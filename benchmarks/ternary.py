"""Ternary weights (model.ternary, looplm.ternary) against float32 and int8 Q8_0: batch-1 decode
speed, weight bytes, and the loss of ternary-QAT training against float32 training.

Decode: batch 1, greedy, fixed T steps, through ``generate`` (prefill excluded), on the
reference shape (d 256, 4 heads, vocab 4096, 3 core layers x T 4).  Four variants decode with
the ``reference`` backend (the model's own modules: the python paths), timed round by round in
the same run: fp32 (``nn.Linear``), q8_0 (``looplm.quant.Int8Linear``, whose batch-1 rows go
through the Q8_0 C matvec), ternary QAT (``BitLinear``: float shadow weights ternarised on
every call) and ternary packed (``TernaryLinear``: 2-bit codes unpacked per call); then fp32,
q8_0 and ternary packed with the ``native`` backend (the C runtime: the ternary projection
quantises each input row to int8 once and sums int8 × ternary products from the 2-bit codes,
matvec.h).
Bytes: the layers' projection weights as held in memory, and the GGUF file of each storage type.
Loss: the same looped model trained on the binding task for the same steps and seed in fp32
and with ternary weights in all layers; validation loss and exact-match accuracy per loop step.

    python benchmarks/ternary.py            # the full run (about 20 minutes on 2 quiet cores)
    python benchmarks/ternary.py --quick    # a smoke run with small budgets (a few minutes)
"""

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from looplm import train
from looplm.bench import cpu_name, matmul_gflops, time_decode
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset
from looplm.data.tokenizer import byte_tokenizer
from looplm.interop.gguf import export_gguf
from looplm.model.lm import LoopLM
from looplm.quant import Int8Linear, quantize_model
from looplm.ternary import TernaryLinear, pack_model

FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_flags() -> str:
    """The SIMD flags that matter for these kernels, as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.partition(":")[2].split())
                return " ".join(flag for flag in FLAGS_SHOWN if flag in present) or "none of " + ",".join(FLAGS_SHOWN)
    except OSError:
        pass
    return "unknown"


def projection_bytes(model: nn.Module) -> int:
    """Bytes of the prelude/core/coda layers' projection weights as the model holds them."""
    total = 0
    for stack in (model.prelude, model.core, model.coda):
        for module in stack.modules():
            if isinstance(module, TernaryLinear):
                total += module.packed.nbytes + module.scale.nbytes
            elif isinstance(module, Int8Linear):
                total += module.values.nbytes + module.scales.nbytes
            elif isinstance(module, nn.Linear):
                total += module.weight.nbytes
    return total


def decode_variants(config: ModelConfig) -> dict[str, LoopLM]:
    """The four decode variants of one shape, built from the same seed."""
    torch.manual_seed(0)
    fp32 = LoopLM(config).eval()
    torch.manual_seed(0)
    ternary = LoopLM(dataclasses.replace(config, ternary="all")).eval()
    return {"fp32": fp32, "q8_0": quantize_model(copy.deepcopy(fp32)), "ternary QAT": ternary,
            "ternary packed": pack_model(copy.deepcopy(ternary))}


# (row, variant, backend): every variant through the python paths, then the native C backend's
NATIVE = ("fp32", "q8_0", "ternary packed")


def decode_rows(models: dict[str, LoopLM]) -> list[tuple[str, str, str]]:
    return ([(name, name, "reference") for name in models]
            + [(f"{name} native", name, "native") for name in NATIVE if name in models])


def decode_rates(models: dict[str, LoopLM], prompt: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median decode tokens/s per row, interleaved round by round so load changes hit all alike."""
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for row, name, backend in decode_rows(models):
            rate = time_decode(models[name], prompt, new_tokens, 1, backend)["decode_tokens_per_s"]
            runs.setdefault(row, []).append(rate)
    return {row: statistics.median(rates) for row, rates in runs.items()}


def gguf_sizes(directory: Path) -> dict[str, int]:
    """File sizes of the reference shape stored as f32, q8_0 and ternary (a ternary model)."""
    torch.manual_seed(0)
    ternary = LoopLM(dataclasses.replace(preset("reference"), ternary="all"))
    sizes = {}
    for dtype in ("f32", "q8_0", "ternary"):
        path = export_gguf(ternary, directory / f"{dtype}.gguf", dtype, byte_tokenizer())
        sizes[dtype] = path.stat().st_size
    return sizes


def training_comparison(steps: int, directory: Path, eval_batches: int) -> dict[str, dict]:
    """fp32 and ternary-QAT runs of the same model, task, steps and seed; their last evaluation."""
    results = {}
    for scope in ("none", "all"):
        model = ModelConfig(vocab_size=259, d_model=128, n_heads=4, n_core_layers=2, loop_steps=4, max_seq_len=64,
                            ternary=scope)
        run = RunConfig(model=model,
                        train=TrainConfig(steps=steps, batch_size=32, seq_len=64, lr=3e-3, warmup_steps=min(50, steps),
                                          eval_every=steps, eval_batches=eval_batches, log_every=max(steps // 4, 1),
                                          keep_last=1, seed=0),
                        data=DataConfig(task="binding", task_options={"hops": 3}))
        results["ternary" if scope == "all" else "fp32"] = train(run, directory / scope, progress=False).last_eval
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets: a smoke run, not figures to quote")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.train_steps or (30 if args.quick else 1500)
    prompt, new_tokens = (16, 8) if args.quick else (64, 64)
    print(f"cpu {cpu_name()}; flags {cpu_flags()}; threads {torch.get_num_threads()}, torch {torch.__version__};"
          f" fp32 matmul {matmul_gflops(1024 if args.quick else 2048):.0f} GFLOP/s")
    config = preset("reference")
    models = decode_variants(config)
    rates = decode_rates(models, prompt, new_tokens, repeats)
    print(f"\nbatch-1 decode, reference shape (d 256, 3 core layers x T 4), reference backend (rows '... native':"
          f" the C runtime), prompt {prompt}, {new_tokens} new tokens, median of {repeats}")
    print(f"{'variant':<23}{'tokens/s':>10}{'vs fp32':>9}{'projection bytes':>18}{'vs fp32':>9}")
    base_rate, base_bytes = rates["fp32"], projection_bytes(models["fp32"])
    for row, name, _ in decode_rows(models):
        size = projection_bytes(models[name])
        print(f"{row:<23}{rates[row]:>10.1f}{rates[row] / base_rate:>9.2f}{size:>18,}{size / base_bytes:>9.3f}")
    with tempfile.TemporaryDirectory() as directory:
        sizes = gguf_sizes(Path(directory))
        print("\nGGUF file of the reference shape (embedding and norms f32 except under q8_0):  "
              + ",  ".join(f"{dtype} {size:,} bytes" for dtype, size in sizes.items()))
        results = training_comparison(steps, Path(directory), 1 if args.quick else 8)
    print(f"\nbinding (3 hops), d 128, 2 core layers x T 4, {steps} steps, same seed: validation per loop step")
    print(f"{'step':>4}{'fp32 loss':>11}{'ternary loss':>14}{'fp32 acc':>10}{'ternary acc':>13}")
    fp32, ternary = results["fp32"], results["ternary"]
    for step in range(len(fp32["loss_by_step"])):
        print(f"{step + 1:>4}{fp32['loss_by_step'][step]:>11.4f}{ternary['loss_by_step'][step]:>14.4f}"
              f"{fp32['accuracy_by_step'][step]:>10.3f}{ternary['accuracy_by_step'][step]:>13.3f}")
    if args.quick:
        print("(--quick: budgets too small to compare; run without --quick for the figures)")


if __name__ == "__main__":
    main()

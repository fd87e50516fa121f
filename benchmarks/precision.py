"""bf16 and int8 dot products against float32, every pair timed in one run (issue #21).

Printed first: the CPU, its flags that decide the paths (avx2, fma, avx512f, avx512_bf16,
avx512_vnni, avx_vnni, amx_bf16, amx_int8), the C kernel's compiled paths and the fp32 and bf16
2048² matmul rates.  Then, each pair interleaved round by round (median of ``--repeats``
rounds) so a change in the machine's load hits both sides alike:

1. training tokens/s on the reference shape (d 256, 4 heads, vocab 4096, 3 core layers × T 4;
   batch 8 × 256, Stage I, AdamW): fp32 against bf16 autocast (``train.precision bf16``), eager,
   and again with the forward and loss under ``torch.compile`` on both sides (``train.compile``;
   ``--skip-compiled`` leaves this pair out);
2. batch-1 greedy decode tokens/s at a ~100M shape (d 768, 12 heads, ffn 2048, vocab 4096,
   14 core layers × T 4: 102 M parameters; prompt 32, 32 new tokens, fixed T steps, the native
   C kernel): fp32 weights against bf16 weights (``dtype="bf16"``);
3. the same decode with Q8_0 int8 weights (``quantize_model``): Q8_0 × Q8_0 dot products
   (``activations="int8"``: VNNI where the kernel has it) against the float-input kernel
   (``activations="float"``, the path before), the same weights;
4. batched decode (8 prompts of 32 tokens, 8 new tokens each, prefill excluded; the engine of
   ``generate_batch``) at the ~100M shape: fp32 against bf16 weights (torch's bf16 matmuls).

    python benchmarks/precision.py [--threads N] [--repeats 3] [--json FILE] [--skip-large] [--skip-compiled]

``--demo-accuracy`` instead trains the demo model (``looplm demo``'s task and recipe, 3,000
steps) twice with the same seed, in fp32 and with bf16 autocast, and reports both held-out
accuracies per loop step; then, on the fp32 model, it decodes every held-out answer with fp32
and with bf16 weights and reports how many greedy answers agree and the largest logit change
(as a fraction of each token's logit range).  About 5–10 minutes (``--demo-steps`` shortens the
training for a quick look).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from looplm.batch import BatchSession
from looplm.bench import machine_report, time_decode, time_training
from looplm.config import ModelConfig, preset
from looplm.exit_policy import FixedSteps
from looplm.kernels.build import simd_paths
from looplm.model import LoopLM
from looplm.precision import decode_precision, training_precision
from looplm.quant import quantize_model, set_activations

LARGE = ModelConfig(vocab_size=4096, d_model=768, n_heads=12, ffn_hidden=2048, n_core_layers=14, loop_steps=4,
                    max_seq_len=256)


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median of ``repeats`` rounds, each round timing every variant once, in turn."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            rates[name].append(measure())
    return {name: statistics.median(values) for name, values in rates.items()}


def pair(figures: dict[str, float], new: str, old: str) -> dict:
    return {**figures, f"{new} / {old}": figures[new] / figures[old]}


def training_pair(repeats: int, compiled: bool = False) -> dict:
    """Training tokens/s, fp32 against bf16 autocast, on the reference shape; ``compiled``: the
    forward and loss under ``torch.compile`` on both sides (as ``train.compile`` runs them; each
    precision compiles once, in the warm-up)."""
    torch.manual_seed(0)
    model = LoopLM(preset("reference"))
    for precision in ("fp32", "bf16"):  # warm both paths once (and compile them)
        time_training(model, steps=1, repeats=1, precision=precision, compile_model=compiled)
    figures = interleaved({precision: (lambda precision=precision: time_training(model, steps=2, repeats=1,
                                                                                  precision=precision,
                                                                                  compile_model=compiled))
                           for precision in ("fp32", "bf16")}, repeats)
    return pair(figures, "bf16", "fp32")


def decode_rate(model, dtype: str = "fp32") -> float:
    return time_decode(model, prompt_length=32, new_tokens=32, repeats=1, backend="native",
                       dtype=dtype)["decode_tokens_per_s"]


def decode_pairs(repeats: int) -> dict:
    torch.manual_seed(0)
    model = LoopLM(LARGE).eval()
    results = {"parameters": model.num_parameters()}
    results["bf16 weights"] = pair(interleaved({dtype: (lambda dtype=dtype: decode_rate(model, dtype))
                                                for dtype in ("fp32", "bf16")}, repeats), "bf16", "fp32")
    int8 = quantize_model(copy.deepcopy(model))

    def q8(activations: str) -> float:
        set_activations(int8, activations)
        return decode_rate(int8)

    results["Q8_0 weights"] = pair(interleaved({"int8 x int8": lambda: q8("int8"), "float input": lambda: q8("float")},
                                               repeats), "int8 x int8", "float input")
    results["batched 8"] = pair(interleaved({dtype: (lambda dtype=dtype: batched_rate(model, dtype))
                                             for dtype in ("fp32", "bf16")}, repeats), "bf16", "fp32")
    return results


def batched_rate(model, dtype: str, rows: int = 8, new_tokens: int = 8) -> float:
    """Decoded tokens/s of a batch of ``rows`` 32-token prompts (``BatchSession``, as
    ``generate_batch`` runs it), the prompts' prefill excluded."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (32,), generator=generator).tolist() for _ in range(rows)]
    session = BatchSession(model, rows, 32 + new_tokens, exit_policy=FixedSteps(), stop_ids=[], dtype=dtype)
    session.admit(prompts, [new_tokens] * rows)
    started = time.perf_counter()
    while session.active:
        session.step()
    return rows * (new_tokens - 1) / (time.perf_counter() - started)  # the first token came with the prefill


def demo_accuracy(seed: int, train_steps: int) -> dict:
    """The demo model trained in fp32 and in bf16 autocast (same seed); then fp32 against bf16
    weights decoding every held-out answer of the fp32 model."""
    from looplm.data.tasks import TaskBatches, make_task
    from looplm.demo import DEMO_EVAL_EXAMPLES, DEMO_TASK, DEMO_TASK_OPTIONS, demo_run_config
    from looplm.eval.depth import accuracy_by_step
    from looplm.generate import Decoder
    from looplm.training.trainer import Trainer

    results, models = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for precision in ("fp32", "bf16"):
            run = demo_run_config(train_steps, seed)
            run.train = dataclasses.replace(run.train, precision=precision)
            trainer = Trainer(run, Path(directory) / precision, progress=False)
            trainer.train()
            task = make_task(DEMO_TASK, **DEMO_TASK_OPTIONS)
            held_out = TaskBatches(task, trainer.tokenizer, split="test", seed=seed).eval_set(DEMO_EVAL_EXAMPLES,
                                                                                             seed=seed + 7)
            steps = run.model.loop_steps + 2
            results[f"accuracy_by_step {trainer.precision.label}"] = [round(value, 4) for value in
                                                                      accuracy_by_step(trainer.model, held_out, steps)]
            models[precision] = (trainer.model.eval(), held_out)
    model, held_out = models["fp32"]
    agree, worst = 0, 0.0
    for prompt in held_out.prompts:
        decoders = {dtype: Decoder(model, FixedSteps(), len(prompt) + 8, backend="native", dtype=dtype)
                    for dtype in ("fp32", "bf16")}
        with torch.inference_mode():
            (reference, _), (logits, _) = (decoder.prefill(torch.tensor([prompt])) for decoder in decoders.values())
        worst = max(worst, float((logits - reference).abs().max() / (reference.max() - reference.min())))
        agree += int(logits.argmax()) == int(reference.argmax())
    results["bf16 decode: greedy answers equal to fp32"] = f"{agree} / {len(held_out.prompts)}"
    results["bf16 decode: largest |logit change| / logit range"] = f"{worst:.3%}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="leave out the ~100M decode figures")
    parser.add_argument("--skip-compiled", action="store_true",
                        help="leave out the training pair under torch.compile (about a minute of compiling)")
    parser.add_argument("--demo-accuracy", action="store_true", help="the demo-task accuracy check instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-steps", type=int, default=3000, help="training steps of each demo run")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, **machine_report(),
               "kernel_paths": " ".join(f"{form}={path}" for form, path in simd_paths().items()) or "(no kernel)",
               "auto training precision (reference shape)": training_precision("auto", "cpu", 256).label,
               "auto decode dtype": decode_precision("auto").label,
               "auto batched decode dtype": decode_precision("auto", batched=True).label}
    show(results)
    sections = ({"demo accuracy": lambda: demo_accuracy(args.seed, args.demo_steps)} if args.demo_accuracy else
                {"training tokens/s, reference shape": lambda: training_pair(args.repeats)})
    if not args.demo_accuracy and not args.skip_compiled:
        sections["training tokens/s, reference shape, torch.compile"] = lambda: training_pair(args.repeats, True)
    if not args.demo_accuracy and not args.skip_large:
        sections["decode tokens/s, ~100M shape"] = lambda: decode_pairs(args.repeats)
    for name, measure in sections.items():
        results[name] = measure()
        show({name: results[name]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def show(figures: dict, indent: str = "") -> None:
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            show(value, indent + "  ")
        else:
            print(f"{indent}{key:>40}: {f'{value:,.2f}' if isinstance(value, float) else value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

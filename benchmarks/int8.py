"""Weight-only int8 (Q8_0, looplm.quant) against float32: batch-1 decode speed and loss.

Decode: batch 1, greedy, fixed T steps, through ``generate`` (prefill excluded), on the
reference shape (d 256, 4 heads, vocab 4096, 3 core layers x T 4) and a ~100M-parameter shape
(d 768, 12 heads, vocab 4096, 14 core layers x T 4), each timed in the same run as
fp32 and int8 (``quantize_model``, ``activations="auto"``: Q8_0 × Q8_0 dot products where the
kernel has VNNI, else int8 weights widened in registers) with the default backend (``native``: the
C layer kernel) and through the model's own modules (``reference``: each int8 projection a call
of the Q8_0 C matmul).  The two int8 kernel forms against each other: benchmarks/precision.py.
Loss: a small looped model (d 128, 2 core layers x T 4, byte tokens) trained for a few hundred
steps on text, then its validation loss per step in fp32 and after ``quantize_model``.

    python benchmarks/int8.py --threads 1
"""

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from looplm import train
from looplm.bench import time_decode
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset
from looplm.data.source import open_training_data
from looplm.eval.depth import loss_by_step
from looplm.model.lm import LoopLM
from looplm.model.loading import load_model
from looplm.quant import quantize_model

LICENSES = Path("/usr/share/common-licenses")


def decode_rates(config: ModelConfig, prompt: int, new_tokens: int, repeats: int) -> dict:
    """Median decode tokens/s of fp32 and int8 on both backends, the variants interleaved round by
    round so that a change in the machine's load hits them alike."""
    torch.manual_seed(0)
    fp32 = LoopLM(config).eval()
    models = {"fp32": fp32, "int8": quantize_model(copy.deepcopy(fp32))}
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for precision, model in models.items():
            for backend in ("native", "reference"):
                rate = time_decode(model, prompt, new_tokens, 1, backend)["decode_tokens_per_s"]
                runs.setdefault(f"{precision} {backend}", []).append(rate)
    return {"parameters": fp32.num_parameters(), **{key: statistics.median(rates) for key, rates in runs.items()}}


def corpus(directory: Path) -> Path:
    """Debian's licence texts (~260 KB of English) as one file, else a synthetic text."""
    path = directory / "corpus.txt"
    files = sorted(p for p in LICENSES.glob("*") if p.is_file()) if LICENSES.is_dir() else []
    text = "\n\n".join(p.read_text(errors="replace") for p in files)
    if len(text) < 50_000:
        text = " ".join(f"item {i} costs {i * 7 % 97} coins and weighs {i * 13 % 89} grams." for i in range(20_000))
    path.write_text(text)
    return path


def loss_delta(steps: int, directory: Path) -> dict:
    data_path = corpus(directory)
    model_config = ModelConfig(vocab_size=259, d_model=128, n_heads=4, n_core_layers=2, loop_steps=4, max_seq_len=128)
    run = RunConfig(model=model_config,
                    train=TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20, eval_every=0,
                                      log_every=50, keep_last=1),
                    data=DataConfig(path=str(data_path)))
    out = directory / "run"
    train(run, out, progress=False)
    model = load_model(out)
    checkpoint = sorted((out / "checkpoints").glob("step_*"))[-1]
    data = open_training_data(DataConfig(path=str(data_path), tokenizer=str(checkpoint)), 16, 128, 16,
                              directory / "eval-data")
    fp32 = loss_by_step(model, data.validation)["loss_by_step"]
    int8 = loss_by_step(quantize_model(model), data.validation)["loss_by_step"]
    return {"fp32": fp32, "int8": int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--skip-large", action="store_true", help="leave out the ~100M-parameter shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {"reference (d256, 3x4)": (preset("reference"), 64, 64)}
    if not args.skip_large:
        large = ModelConfig(vocab_size=4096, d_model=768, n_heads=12, n_core_layers=14, loop_steps=4, max_seq_len=256)
        shapes["~100M (d768, 14x4)"] = (large, 16, 16)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("batch-1 decode tokens/s (fp32 and int8 timed in the same run; native = C kernel, ref = model modules)")
    print(f"{'shape':<24}{'params':>12}{'fp32 native':>13}{'int8 native':>13}{'ratio':>7}"
          f"{'fp32 ref':>10}{'int8 ref':>10}{'ratio':>7}")
    for name, (config, prompt, new_tokens) in shapes.items():
        rates = decode_rates(config, prompt, new_tokens, args.repeats)
        print(f"{name:<24}{rates['parameters']:>12,}{rates['fp32 native']:>13.1f}{rates['int8 native']:>13.1f}"
              f"{rates['int8 native'] / rates['fp32 native']:>7.2f}{rates['fp32 reference']:>10.1f}"
              f"{rates['int8 reference']:>10.1f}{rates['int8 reference'] / rates['fp32 reference']:>7.2f}")
    with tempfile.TemporaryDirectory() as directory:
        losses = loss_delta(args.train_steps, Path(directory))
    print(f"\nvalidation loss after {args.train_steps} training steps (d 128, 2 core layers x T 4, byte tokens):")
    print(f"{'step':>4}{'fp32':>10}{'int8':>10}{'delta':>11}")
    for step, (fp32, int8) in enumerate(zip(losses["fp32"], losses["int8"]), start=1):
        print(f"{step:>4}{fp32:>10.4f}{int8:>10.4f}{int8 - fp32:>+11.5f}")
    print(f"mean |delta| {statistics.mean(abs(a - b) for a, b in zip(losses['fp32'], losses['int8'])):.5f}")


if __name__ == "__main__":
    main()

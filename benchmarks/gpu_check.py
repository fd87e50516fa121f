"""One check of every CUDA path of looplm, run once when a GPU is lent (issue 20).

    python benchmarks/gpu_check.py --out gpu_check.json --markdown gpu_check.md     # one GPU, < 8 min
    python benchmarks/gpu_check.py --dry-run --out dry.json                         # the same steps, tiny, CPU

Checks, in the order they run (each in its own try/except; a failure is recorded and the next
check starts):

- ``train_*``: bf16 autocast training through the real ``Trainer`` on generated token data
  (no download): the ``reference`` preset and a ~100M-parameter looped config (d 768, 12 core
  layers x T 4, vocab 4096), eager and under ``torch.compile``.  The held-out loss must fall; tokens/s,
  achieved TFLOP/s and MFU (``looplm.training.mfu``) come from the trainer's own ``metrics.jsonl``.
  On CUDA, torch's sync debug mode ("warn") reports every call where the host waits for the GPU;
  a wait in a step that does not log fails the check and names the source line.
- ``decode_matches_cpu``: greedy tokens on the GPU in float32 (TF32 off) equal the CPU's float32
  tokens, with both GPU backends (``torch`` and ``reference``), fixed depth and Q-exit.  bf16 is
  reported, not judged: bf16 rounds every activation to 8 bits of mantissa, so its greedy path
  leaves float32's at the first near-tie; the report says how many leading tokens agree.
- ``decode_cuda_graphs``: batch-1 decode tokens/s of the ``torch`` backend eager and with
  ``compile_steps=True`` (``torch.compile(mode="reduce-overhead")``: CUDA graphs); the compiled
  tokens must equal the eager ones and inductor must not skip the graphs.
- ``batched_q_exit``: ``generate_batch`` at batch 32 under Q-exit and at fixed depth: layer
  applications saved (``BatchResult.saved_fraction``), wall time of each, and the batched rows
  equal batch-1 decode of the same prompts.
- ``serve``: the OpenAI-compatible app (``looplm.serve``) with the model on the GPU answers
  concurrent requests (batched greedy, Q-exit, a streamed chat).
- ``torchrun``: ``torchrun --nproc_per_node 1 -m looplm train ... --parallel ddp`` and
  ``--parallel fsdp`` (NCCL; gloo in the dry run) run a few steps, exit 0 and write a
  checkpoint that ``looplm.load`` reads.

The report (``--out``, JSON) holds the device, each check's status (pass / fail / skipped),
figures, error text and seconds, and is rewritten after every check, so a run cut short keeps
what it finished (the check it was in shows "running").  A Markdown table for
docs/BENCHMARKS.md is printed at the end (and written with ``--markdown``).  ``--budget``
seconds (default 420) bounds the run: a check that would start with less time left than it needs
is skipped ("skipped: time budget"), and a watchdog ends the process ``--grace`` seconds after the
budget if a check hangs.  ``--only a,b`` reruns some checks.  Exit status 0 when every check
passes, 1 otherwise.

``--dry-run`` runs every check at tiny size on the CPU (the test suite runs it, so the script
does not rot).  There, ``torch.compile`` uses the ``aot_eager`` backend: Dynamo and AOTAutograd
trace exactly as on the GPU, but inductor's C++ compilation, about 40 s for even a tiny model on
two cores, is left out; CUDA-only probes (sync debug mode, CUDA graphs, MFU) say "not applicable".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import faulthandler
import functools
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout: import this tree's looplm
    sys.path.insert(0, str(ROOT))

import looplm  # noqa: E402
from looplm import LoopLM, ModelConfig, generate, load  # noqa: E402
from looplm.batch import generate_batch  # noqa: E402
from looplm.bench import cpu_name, time_decode  # noqa: E402
from looplm.config import DataConfig, RunConfig, TrainConfig, preset  # noqa: E402
from looplm.data.source import TrainingData  # noqa: E402
from looplm.data.tokenizer import byte_tokenizer  # noqa: E402
from looplm.eval.depth import loss_by_step  # noqa: E402
from looplm.exit_policy import FixedSteps, QExit  # noqa: E402
from looplm.training.mfu import peak_tflops_for_name  # noqa: E402
from looplm.training.trainer import Trainer  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Sizes: the GPU run and the dry run execute the same code at these sizes.

# The ~100M-parameter looped config (88 M parameters; the same shape benchmarks/decode.py uses).
LARGE = ModelConfig(vocab_size=4096, d_model=768, n_heads=12, ffn_hidden=2048, n_core_layers=12, loop_steps=4,
                    max_seq_len=512)


@dataclass(frozen=True)
class Sizes:
    """How big each check runs; ``time_scale`` scales each check's ``needs_s``."""

    device: str
    shapes: dict[str, ModelConfig]        # training shapes; "reference" is also the decode/serve model
    batch: dict[str, tuple[int, int]]     # per shape: (sequences, tokens per sequence) of a step
    train_steps: int
    log_every: int
    lr: float
    decode_prompt: int                    # CPU-vs-GPU equality: prompt and new tokens
    decode_tokens: int
    speed_prompt: int                     # batch-1 tokens/s
    speed_tokens: int
    speed_repeats: int
    batch_rows: int                       # batched decode
    batch_tokens: int
    serve_requests: int
    serve_tokens: int
    torchrun_steps: int
    torchrun_timeout_s: float
    threads: int                          # torch threads (0: torch's default)
    time_scale: float


GPU = Sizes(device="cuda", shapes={"reference": preset("reference"), "100m": LARGE},
            batch={"reference": (16, 256), "100m": (16, 512)}, train_steps=40, log_every=10, lr=1e-3,
            decode_prompt=32, decode_tokens=64, speed_prompt=128, speed_tokens=128, speed_repeats=3,
            batch_rows=32, batch_tokens=64, serve_requests=8, serve_tokens=32, torchrun_steps=5,
            torchrun_timeout_s=240, threads=0, time_scale=1.0)

# Vocabulary 320: the generated data's checkpoint carries the byte tokenizer (259 ids).  One
# thread: at these sizes a second thread only adds waiting (several times slower on a busy CPU).
DRY = Sizes(device="cpu",
            shapes={"reference": ModelConfig(vocab_size=320, d_model=32, n_heads=2, n_core_layers=1, loop_steps=2,
                                             max_seq_len=64),
                    "100m": ModelConfig(vocab_size=320, d_model=48, n_heads=2, n_core_layers=1, loop_steps=2,
                                        max_seq_len=64)},
            batch={"reference": (4, 16), "100m": (4, 16)}, train_steps=10, log_every=4, lr=1e-2,
            decode_prompt=8, decode_tokens=12, speed_prompt=8, speed_tokens=8, speed_repeats=1,
            batch_rows=4, batch_tokens=6, serve_requests=3, serve_tokens=4, torchrun_steps=2,
            torchrun_timeout_s=120, threads=1, time_scale=0.05)


# ---------------------------------------------------------------------------------------------
# Progress lines, outcomes and the report.

STARTED = time.perf_counter()


def progress(message: str) -> None:
    clock = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{clock} +{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


@dataclass
class Outcome:
    """What a check measured, a one-line summary for the table, and the problems it found (none:
    the check passes)."""

    figures: dict
    summary: str
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    run: Callable[[Sizes], Outcome]
    needs_s: float  # the least time (GPU seconds) worth starting it with


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a temporary file renamed into place): a watchdog exit never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    temporary.replace(path)


def device_info(sizes: Sizes) -> dict:
    info = {"mode": "gpu" if sizes.device == "cuda" else "dry-run (CPU)", "date": datetime.date.today().isoformat(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "git_commit": _git_commit()}
    if sizes.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        info.update(gpu=name, gpu_count=torch.cuda.device_count(), capability=f"{properties.major}.{properties.minor}",
                    gpu_memory_gib=round(properties.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nccl=_nccl_version(),
                    peak_bf16_tflops=peak_tflops_for_name(name) or None)
    return info


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nccl_version() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # no NCCL in this build
        return None


# ---------------------------------------------------------------------------------------------
# Probes: host syncs during training, CUDA-graph skips during compiled decode.

SYNC_WARNING = "synchronizing CUDA operation"


class SyncProbe:
    """Where the host waits for the GPU while a ``Trainer`` trains.

    torch's sync debug mode "warn" turns every synchronizing CUDA call (``.item()``, ``float()``
    of a GPU tensor, ``bool()`` in an ``if``, a blocking host-to-device copy, ...) into a Python
    warning; the probe notes each one with the trainer's ``step`` counter and the innermost looplm
    source line on the stack.  (Syncs inside the autograd engine's own threads do not reach
    Python and are not seen.)  ``quiet_step_syncs`` keeps the ones in steps that do not log."""

    def __init__(self, trainer, cuda: bool):
        self.trainer, self.cuda = trainer, cuda
        self.events: list[tuple[int, str]] = []  # (trainer.step when it happened, source line)
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> "SyncProbe":
        self._warnings.__enter__()
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                self.events.append((self.trainer.step, looplm_caller(filename, lineno)))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)

    def quiet_step_syncs(self, steps: int, log_every: int, warmup: int = 2) -> dict[str, int]:
        """{source line: quiet steps it synced in}.  While ``trainer.step == e`` the trainer runs
        either the compute of 1-based step e + 1 or the logging of step e, so an event there is
        judged only when neither step logs (nor is the last, which logs and saves), and after
        ``warmup`` steps (compilation, allocator warm-up)."""
        def logs(step: int) -> bool:
            return step % log_every == 0 or step >= steps

        found: dict[str, set[int]] = collections.defaultdict(set)
        for step, where in self.events:
            if step >= warmup and not logs(step) and not logs(step + 1):
                found[where].add(step)
        return {where: len(quiet) for where, quiet in sorted(found.items())}


def looplm_caller(filename: str, lineno: int) -> str:
    """Where looplm made a call: the innermost looplm frame on the current stack as
    "looplm/x.py:LINE `source`", else the warning's own location (filename, lineno)."""
    package = Path(looplm.__file__).resolve().parent
    frame = next((f for f in reversed(traceback.extract_stack()) if f.filename.startswith(f"{package}{os.sep}")), None)
    if frame is None:
        return f"{filename}:{lineno}"
    return f"{Path(frame.filename).relative_to(package.parent)}:{frame.lineno} `{(frame.line or '').strip()}`"


@contextlib.contextmanager
def cudagraph_skips():
    """Collects inductor's "skipping cudagraphs due to ..." messages while compiled code runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def graph_breaks() -> collections.Counter:
    """Dynamo's graph breaks so far, by the first line of their reason."""
    from torch._dynamo.utils import counters

    found = collections.Counter()
    for reason, count in counters["graph_break"].items():
        found[reason.splitlines()[0]] += count
    return found


# ---------------------------------------------------------------------------------------------
# Generated training data (no download).

def generated_tokens(vocab: int, seq_len: int, seed: int = 0) -> TrainingData:
    """Sequences a model starts to learn within a few dozen steps: each next token is, with
    probability 1/2, a fixed successor of the previous one (a random permutation of the
    vocabulary), else drawn from a Zipf distribution (p(k) ∝ 1/k).  The loss starts at ln V and
    falls towards about half of it.  The byte tokenizer goes into the checkpoint (its ids are a
    subset of the model's)."""
    successor = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)

    def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.empty(rows, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.multinomial(zipf, rows, replacement=True, generator=generator)
        follows = torch.rand(rows, seq_len, generator=generator) < 0.5
        fresh = torch.multinomial(zipf, rows * seq_len, replacement=True, generator=generator).view(rows, seq_len)
        for position in range(seq_len):
            tokens[:, position + 1] = torch.where(follows[:, position], successor[tokens[:, position]],
                                                  fresh[:, position])
        return tokens[:, :-1], tokens[:, 1:]

    validation = [batch(8, torch.Generator().manual_seed(seed + 1))]
    return TrainingData(byte_tokenizer(), seq_len, batch, validation, description="generated tokens")


# ---------------------------------------------------------------------------------------------
# The checks: one function each.

def check_training(sizes: Sizes, shape: str, compiled: bool) -> Outcome:
    """bf16 (on CUDA) training of ``shape`` through the real Trainer; eager or compiled."""
    config = sizes.shapes[shape]
    rows, length = sizes.batch[shape]
    cuda = sizes.device == "cuda"
    run = RunConfig(model=config, data=DataConfig(),
                    train=TrainConfig(steps=sizes.train_steps, batch_size=rows, seq_len=length, lr=sizes.lr,
                                      warmup_steps=max(sizes.train_steps // 8, 1), eval_every=0,
                                      log_every=sizes.log_every, device=sizes.device, compile=compiled))
    data = generated_tokens(config.vocab_size, length)
    breaks_before = graph_breaks()
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as out:
        trainer = Trainer(run, out, progress=False, data=data)
        before = held_out_loss(trainer.model, data)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with SyncProbe(trainer, cuda) as probe:
            result = trainer.train()
        after = held_out_loss(trainer.model, data)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = [record for record in records if "tokens_per_s" in record][-1]  # the last window: no compilation
    figures = {"parameters": trainer.model.num_parameters(), "batch": f"{rows} x {length}",
               "steps": result.steps_done, "held_out_loss_before": before, "held_out_loss_after": after,
               "last_logged_loss": steady["loss"], "tokens_per_s": steady["tokens_per_s"],
               "achieved_tflops": steady["achieved_tflops"], "mfu": steady.get("mfu"),
               "peak_tflops": steady.get("peak_tflops"), "train_seconds": result.seconds}
    problems = []
    if not after < 0.95 * before:
        problems.append(f"the held-out loss did not fall: {before:.3f} before training, {after:.3f} after")
    if cuda:
        figures["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        quiet = probe.quiet_step_syncs(result.steps_done, sizes.log_every)
        figures["host_syncs_in_quiet_steps"] = quiet
        figures["host_sync_lines_all_steps"] = sorted({where for _, where in probe.events})
        if quiet:
            problems.append("sync per step: yes, at " + "; ".join(f"{where} ({count} quiet steps)"
                                                                  for where, count in quiet.items()))
    else:
        figures["host_syncs_in_quiet_steps"] = "not applicable (CPU)"
    if compiled:
        figures["graph_breaks"] = dict(graph_breaks() - breaks_before)
    mfu = f"MFU {figures['mfu']:.1%}" if figures["mfu"] is not None else (
        "MFU: unknown GPU peak" if cuda else "MFU not applicable (CPU)")
    syncs = ("syncs in quiet steps: " + (", ".join(short_line(w) for w in figures["host_syncs_in_quiet_steps"])
                                         or "none")) if cuda else "syncs n/a"
    summary = (f"{figures['parameters']:,} parameters; held-out loss {before:.2f} → {after:.2f}; "
               f"{figures['tokens_per_s']:,.0f} tokens/s; {mfu}; {syncs}")
    if compiled:
        summary += f"; graph breaks: {sum(figures['graph_breaks'].values())}"
    return Outcome(figures, summary, problems)


def check_decode_matches_cpu(sizes: Sizes) -> Outcome:
    """Greedy tokens of the device equal the CPU's in float32; bf16 agreement reported."""
    cpu_model = decode_model(sizes.shapes["reference"])
    vocab, count = cpu_model.config.vocab_size, sizes.decode_tokens
    prompt = torch.randint(0, vocab, (sizes.decode_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    options = dict(stop_ids=[])
    expected = generate(cpu_model, prompt, count, **options)  # CPU float32, its default backend
    expected_q = generate(cpu_model, prompt, count, exit_policy=QExit(0.5), **options)
    margins = greedy_margins(cpu_model, prompt, expected.ids)
    model = copy.deepcopy(cpu_model).to(sizes.device)
    problems, figures = [], {"tokens": count, "smallest_cpu_logit_margin": min(margins)}
    with float32_matmuls("highest"):  # TF32 off: float32 means float32
        for backend in ("torch", "reference"):
            got = generate(model, prompt, count, backend=backend, **options)
            got_q = generate(model, prompt, count, exit_policy=QExit(0.5), backend=backend, **options)
            agree = leading_agreement(got.ids, expected.ids)
            figures[f"float32_{backend}_tokens_matching"] = agree
            figures[f"float32_{backend}_q_exit_equal"] = got_q.ids == expected_q.ids and got_q.steps == expected_q.steps
            if agree < count:
                problems.append(f"float32 {backend} backend: token {agree} differs from the CPU's (CPU logit margin"
                                f" there {margins[agree]:.2e})")
            if not figures[f"float32_{backend}_q_exit_equal"]:
                problems.append(f"float32 {backend} backend under Q-exit 0.5: tokens or exit steps differ from"
                                " the CPU's")
    model = model.to(torch.bfloat16)
    for backend in ("torch", "reference"):
        got = generate(model, prompt, count, backend=backend, **options)
        figures[f"bf16_{backend}_leading_tokens_matching"] = leading_agreement(got.ids, expected.ids)
        figures[f"bf16_{backend}_tokens_matching"] = sum(a == b for a, b in zip(got.ids, expected.ids))
    figures["mean_exit_steps_q_exit"] = statistics.fmean(expected_q.steps)
    summary = (f"float32 torch/reference: {figures['float32_torch_tokens_matching']}/"
               f"{figures['float32_reference_tokens_matching']} of {count} tokens equal the CPU's, Q-exit "
               f"{'equal' if figures['float32_torch_q_exit_equal'] else 'differs'}; bf16 (reported only): first "
               f"{figures['bf16_torch_leading_tokens_matching']} tokens equal")
    return Outcome(figures, summary, problems)


def check_decode_cuda_graphs(sizes: Sizes) -> Outcome:
    """Batch-1 decode tokens/s, eager and compiled (CUDA graphs on CUDA), same tokens."""
    model = decode_model(sizes.shapes["reference"]).to(sizes.device)
    prompt = torch.randint(0, model.config.vocab_size, (sizes.speed_prompt,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    timing = dict(prompt_length=sizes.speed_prompt, new_tokens=sizes.speed_tokens, repeats=sizes.speed_repeats,
                  backend="torch")
    eager = time_decode(model, **timing)
    eager_ids = generate(model, prompt, sizes.speed_tokens, backend="torch", stop_ids=[]).ids
    with cudagraph_skips() as skips:
        started = time.perf_counter()
        compiled_ids = generate(model, prompt, sizes.speed_tokens, backend="torch", compile_steps=True, stop_ids=[]).ids
        first_call = time.perf_counter() - started
        graphs = time_decode(model, **timing, compile_steps=True)
    cuda = sizes.device == "cuda"
    figures = {"eager_tokens_per_s": eager["decode_tokens_per_s"],
               "compiled_tokens_per_s": graphs["decode_tokens_per_s"],
               "speedup": graphs["decode_tokens_per_s"] / eager["decode_tokens_per_s"],
               "first_compiled_call_s": first_call, "eager_prefill_tokens_per_s": eager["prefill_tokens_per_s"],
               "cudagraph_skips": skips if cuda else "not applicable (CPU)"}
    problems = []
    if compiled_ids != eager_ids:
        problems.append("compiled decode gives other tokens than eager from token"
                        f" {leading_agreement(compiled_ids, eager_ids)}")
    if cuda and skips:
        problems.append("inductor skipped CUDA graphs: " + "; ".join(sorted(set(skips))))
    what = "CUDA graphs" if cuda else "compiled (aot_eager)"
    summary = (f"batch 1: eager {figures['eager_tokens_per_s']:,.0f} tokens/s, {what} "
               f"{figures['compiled_tokens_per_s']:,.0f} ({figures['speedup']:.2f}x; first call {first_call:.0f} s)")
    return Outcome(figures, summary, problems)


def check_batched_q_exit(sizes: Sizes) -> Outcome:
    """Batched decode with Q-exit against fixed depth: applications and wall time saved."""
    model = decode_model(sizes.shapes["reference"]).to(sizes.device)
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(sizes.decode_prompt // 2, 2 * sizes.decode_prompt + 1, (sizes.batch_rows,),
                            generator=generator)
    prompts = [torch.randint(0, model.config.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    options = dict(stop_ids=[])
    with float32_matmuls("highest"):
        generate_batch(model, prompts[:2], 2, **options)  # warm-up
        fixed, fixed_s = timed(sizes, lambda: generate_batch(model, prompts, sizes.batch_tokens,
                                                             exit_policy=FixedSteps(), **options))
        q_exit, q_exit_s = timed(sizes, lambda: generate_batch(model, prompts, sizes.batch_tokens,
                                                               exit_policy=QExit(0.5), **options))
        checked = min(4, len(prompts))
        equal = sum(generate(model, prompts[row], sizes.batch_tokens, backend="torch", **options).ids
                    == fixed.generations[row].ids for row in range(checked))
    steps = [step for generation in q_exit.generations for step in generation.steps]
    figures = {"rows": len(prompts), "new_tokens": sizes.batch_tokens, "saved_fraction": q_exit.saved_fraction,
               "mean_exit_steps": statistics.fmean(steps), "fixed_depth_s": fixed_s, "q_exit_s": q_exit_s,
               "time_saved": 1 - q_exit_s / fixed_s, "rows_equal_to_batch1": f"{equal} of {checked}"}
    problems = []
    if equal < checked:
        problems.append(f"batched rows differ from batch-1 decode of the same prompts ({equal} of {checked} equal)")
    if q_exit.saved_fraction <= 0:
        problems.append("Q-exit saved no layer applications")
    summary = (f"batch {len(prompts)}, q 0.5: {q_exit.saved_fraction:.0%} of layer applications saved, wall "
               f"{fixed_s:.2f} s → {q_exit_s:.2f} s ({figures['time_saved']:+.0%} saved); rows = batch-1:"
               f" {equal}/{checked}")
    return Outcome(figures, summary, problems)


def check_serving(sizes: Sizes) -> Outcome:
    """The HTTP app with the model on the device answers concurrent requests."""
    from fastapi.testclient import TestClient

    from looplm.serve import create_app
    from looplm.serve.engine import Engine

    tokenizer = byte_tokenizer()
    model = decode_model(dataclasses.replace(sizes.shapes["reference"], vocab_size=tokenizer.vocab_size))
    model = model.to(sizes.device)
    engine = Engine(model, tokenizer, max_batch=sizes.serve_requests, batch_wait_ms=50)
    tokens = sizes.serve_tokens
    requests = [("/v1/completions", {"prompt": f"request {index}: a looped model thinks in depth",
                                     "max_tokens": tokens, "temperature": 0}) for index in range(sizes.serve_requests)]
    requests.append(("/v1/completions", {"prompt": "early exit", "max_tokens": tokens, "temperature": 0,
                                         "exit": "q:0.5"}))
    requests.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
                                              "temperature": 0, "stream": True}))
    started = time.perf_counter()
    with TestClient(create_app(model, tokenizer, engine=engine)) as client:
        with ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(lambda request: client.post(request[0], json=request[1]), requests))
        wall = time.perf_counter() - started
        stats = client.get("/v1/looplm/stats").json()
    problems = [f"{path} answered {response.status_code}: {response.text[:200]}"
                for (path, _), response in zip(requests, responses) if response.status_code != 200]
    completed = [response.json() for (_, body), response in zip(requests, responses)
                 if response.status_code == 200 and not body.get("stream")]
    generated = sum(body["usage"]["completion_tokens"] for body in completed)
    streamed = responses[-1]
    if streamed.status_code == 200 and "data: [DONE]" not in streamed.text:
        problems.append("the streamed chat did not end with data: [DONE]")
    if stats.get("largest_batch", 0) < 2:
        problems.append(f"no requests decoded together (engine stats {stats})")
    figures = {"requests": len(requests), "answered_200": sum(r.status_code == 200 for r in responses),
               "completion_tokens": generated, "wall_s": wall, "engine_stats": stats}
    summary = (f"{figures['answered_200']} of {len(requests)} concurrent requests answered in {wall:.1f} s; "
               f"largest batch {stats.get('largest_batch')}, mean batch {stats.get('mean_batch_size', 0):.1f}")
    return Outcome(figures, summary, problems)


def check_torchrun(sizes: Sizes) -> Outcome:
    """One-process torchrun training under DDP and FSDP (launched together), checkpoints loadable."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if sizes.threads:
        environment["OMP_NUM_THREADS"] = str(sizes.threads)
    figures, problems = {}, []
    with tempfile.TemporaryDirectory(prefix="gpu_check_torchrun_") as work:
        launched = {}
        for engine in ("ddp", "fsdp"):
            out = Path(work) / engine
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                       "-m", "looplm", "train", "--task", "binding", "--preset", "tiny", "--out", str(out),
                       "--parallel", engine, "--train.device", sizes.device, "--train.steps", str(sizes.torchrun_steps),
                       "--train.batch_size", "8", "--train.eval_every", "0"]
            # Output to files (a full pipe would stall a process not being read); a session of its own, so a
            # hung run is ended with its worker.
            with open(Path(work) / f"{engine}.out", "w") as stdout, open(Path(work) / f"{engine}.err", "w") as stderr:
                process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=stdout, stderr=stderr,
                                           start_new_session=True)
            launched[engine] = (process, out)
        deadline = time.perf_counter() + sizes.torchrun_timeout_s
        for engine, (process, out) in launched.items():
            try:
                process.wait(timeout=max(deadline - time.perf_counter(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                problems.append(f"{engine}: no exit within {sizes.torchrun_timeout_s:.0f} s")
            stdout, stderr = ((Path(work) / f"{engine}.{kind}").read_text() for kind in ("out", "err"))
            result = {"exit_status": process.returncode,
                      "seconds": time.perf_counter() - deadline + sizes.torchrun_timeout_s}
            checkpoints = sorted((out / "checkpoints").glob("step_*"))
            if process.returncode != 0:
                problems.append(f"{engine}: exit status {process.returncode}: {tail(stderr)}")
            elif not checkpoints:
                problems.append(f"{engine}: no checkpoint written")
            else:
                result["checkpoint"] = checkpoints[-1].name
                result["final_loss"] = json.loads(stdout).get("final_loss") if stdout.strip().startswith("{") else None
                result["checkpoint_loads"] = load(checkpoints[-1]).num_parameters() > 0
            figures[engine] = result
    backend = "NCCL" if sizes.device == "cuda" else "gloo"
    summary = f"{backend}: " + "; ".join(
        f"{engine} exit {result['exit_status']}, {result.get('checkpoint', 'no checkpoint')}"
        f" ({result['seconds']:.0f} s)"
        for engine, result in figures.items())
    return Outcome(figures, summary, problems)


# ---------------------------------------------------------------------------------------------
# Small helpers of the checks.

def decode_model(config: ModelConfig) -> LoopLM:
    """A seeded untrained model for the decode checks, its exit gate spread so that Q-exit stops
    tokens at different steps (a new gate is all zeros: λ = 1/2 everywhere, every token exits at
    step 1 under q = 0.5)."""
    torch.manual_seed(0)
    model = LoopLM(config)
    torch.nn.init.normal_(model.exit_gate.weight, std=config.d_model ** -0.5)  # gate logits ~ N(0, 1)
    return model.eval()


@contextlib.contextmanager
def float32_matmuls(precision: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def held_out_loss(model: LoopLM, data: TrainingData) -> float:
    """Cross-entropy of the last loop step on the data's validation batches (float32, no autocast)."""
    with torch.no_grad():
        return loss_by_step(model, data.validation)["loss_by_step"][-1]


def greedy_margins(model: LoopLM, prompt: list[int], generated: list[int]) -> list[float]:
    """Top-1 minus top-2 logit of each greedy decision (one full forward): how near a tie each was."""
    ids = torch.tensor([prompt + generated[:-1]])
    with torch.inference_mode():
        logits = model(ids).logits()[0, len(prompt) - 1:].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def leading_agreement(got: list[int], expected: list[int]) -> int:
    """How many leading tokens agree."""
    for index, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return index
    return min(len(got), len(expected))


def timed(sizes: Sizes, function):
    """(function's result, wall seconds), waiting for the GPU's queued work before reading the clock."""
    started = time.perf_counter()
    result = function()
    if sizes.device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def short_line(where: str) -> str:
    """"looplm/training/trainer.py:201 `x`" → "trainer.py:201"."""
    return Path(where.split(" ", 1)[0]).name


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# The run: every check in its own try/except, within the time budget.

CHECKS = [
    Check("train_reference_eager", "bf16 training, reference shape, eager",
          functools.partial(check_training, shape="reference", compiled=False), 15),
    Check("train_reference_compiled", "bf16 training, reference shape, torch.compile",
          functools.partial(check_training, shape="reference", compiled=True), 60),
    Check("train_100m_eager", "bf16 training, ~100M looped (d 768, 12 x T 4), eager",
          functools.partial(check_training, shape="100m", compiled=False), 30),
    Check("decode_matches_cpu", "greedy decode on the device = CPU float32", check_decode_matches_cpu, 15),
    Check("decode_cuda_graphs", "batch-1 decode, eager vs CUDA graphs", check_decode_cuda_graphs, 60),
    Check("batched_q_exit", "batched decode, Q-exit vs fixed depth", check_batched_q_exit, 20),
    Check("serve", "HTTP server on the device, concurrent requests", check_serving, 20),
    Check("torchrun", "torchrun, 1 process: DDP and FSDP", check_torchrun, 45),
    Check("train_100m_compiled", "bf16 training, ~100M looped, torch.compile",
          functools.partial(check_training, shape="100m", compiled=True), 120),
]


def run_checks(checks: list[Check], sizes: Sizes, budget_s: float, report: dict, out: Path) -> None:
    """Run each check, recording pass / fail (with the error) / skipped; rewrite the report after each."""
    deadline = time.perf_counter() + budget_s
    for check in checks:
        entry = {"name": check.name, "title": check.title, "status": "running", "seconds": 0.0}
        report["checks"].append(entry)
        left = deadline - time.perf_counter()
        if left < check.needs_s * sizes.time_scale:
            entry.update(status="skipped: time budget", summary=f"{left:.0f} s left, needs about {check.needs_s:.0f} s")
            progress(f"{check.name}: skipped ({entry['summary']})")
            write_json(out, report)
            continue
        write_json(out, report)  # "running" marks where a run that never came back stopped
        progress(f"{check.name}: start ({check.title})")
        started = time.perf_counter()
        try:
            outcome = check.run(sizes)
            entry.update(status="fail" if outcome.problems else "pass", summary=outcome.summary,
                         figures=outcome.figures, problems=outcome.problems)
        except Exception as error:  # every failure is a finding: record it and go on
            entry.update(status="fail", summary=f"{type(error).__name__}: {str(error)[:300]}",
                         error=traceback.format_exc(limit=-8))
        entry["seconds"] = round(time.perf_counter() - started, 1)
        progress(f"{check.name}: {entry['status']} in {entry['seconds']:.1f} s: {entry['summary']}")
        for problem in entry.get("problems", []):
            progress(f"  problem: {problem}")
        try:
            release_memory(sizes)
        except Exception as error:  # e.g. a sticky CUDA error: the next check will report it too
            progress(f"  releasing memory failed: {type(error).__name__}: {error}")
        report["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
        write_json(out, report)


def release_memory(sizes: Sizes) -> None:
    """Compiled graphs, CUDA-graph pools and cached blocks of one check do not burden the next."""
    import gc

    if "torch._dynamo" in sys.modules:  # something compiled (importing Dynamo only to reset it takes seconds)
        torch._dynamo.reset()
    gc.collect()
    if sizes.device == "cuda":
        torch.cuda.empty_cache()


def markdown(report: dict) -> str:
    device = report["device"]
    where = (f"{device['gpu']}, CUDA {device['cuda']}" if "gpu" in device else f"dry run on {device['cpu']}")
    passed = sum(entry["status"] == "pass" for entry in report["checks"])
    lines = [f"`benchmarks/gpu_check.py` on {where}, torch {device['torch']}, {device['date']}, commit "
             f"{(device.get('git_commit') or '?')[:10]}: {passed} of {len(report['checks'])} checks pass.", "",
             "| check | status | figures | seconds |", "|---|---|---|---:|"]
    for entry in report["checks"]:
        cell = entry.get("summary", "")
        if entry.get("problems"):
            cell += " — " + "; ".join(entry["problems"])
        status = entry["status"] if entry["status"] == "pass" else f"**{entry['status']}**"
        lines.append(f"| {entry['title']} | {status} | {cell.replace('|', '/')} | {entry['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def dry_run_compile():
    """The dry run's torch.compile: Dynamo and AOTAutograd trace as on the GPU, without inductor's
    C++ compilation (tens of seconds even for a tiny model on a small CPU)."""
    compile_with_inductor = torch.compile
    torch.compile = functools.partial(compile_with_inductor, backend="aot_eager")
    try:
        yield
    finally:
        torch.compile = compile_with_inductor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every check at tiny size on the CPU")
    parser.add_argument("--out", default="gpu_check.json", help="JSON report (default gpu_check.json)")
    parser.add_argument("--markdown", help="also write the Markdown summary table here")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the checks (default 420)")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="the watchdog ends a hung run this many seconds after the budget (default 120)")
    parser.add_argument("--only", help="comma-separated check names: " + ", ".join(check.name for check in CHECKS))
    args = parser.parse_args(argv)
    checks = CHECKS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {check.name for check in CHECKS})
        if unknown:
            parser.error(f"unknown check {unknown[0]!r}: choose from {', '.join(check.name for check in CHECKS)}")
        checks = [check for check in CHECKS if check.name in names]
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or add --dry-run for the CPU rehearsal")
    sizes = DRY if args.dry_run else GPU
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    out = Path(args.out)
    report = {"script": "benchmarks/gpu_check.py", "command": sys.argv if argv is None else argv,
              "budget_s": args.budget, "device": device_info(sizes), "checks": []}
    progress(f"gpu_check: {report['device']}")
    faulthandler.dump_traceback_later(args.budget + args.grace, exit=True)  # a hung check still ends the run
    try:
        with dry_run_compile() if args.dry_run else contextlib.nullcontext():
            run_checks(checks, sizes, args.budget, report, out)
    finally:
        faulthandler.cancel_dump_traceback_later()
    report["passed"] = all(entry["status"] == "pass" for entry in report["checks"])
    report["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
    write_json(out, report)
    table = markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print("\n" + table, flush=True)
    progress(f"report: {out}" + (f", table: {args.markdown}" if args.markdown else ""))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

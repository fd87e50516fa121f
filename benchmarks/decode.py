"""Decode benchmarks for the inference engine (issue #5), every figure measured in one run.

1. Batch-1 decode tokens/s on the foundation's reference shape (d 256, 3 core layers × T 4,
   vocab 4096; prompt 128, 128 new tokens): the default backend against the torch and
   reference paths, and against the faster peer's 110 tokens/s (target: 5× = 550).
2. The memory-bandwidth roofline on a ~100M-parameter config: bytes read per decoded token
   (weights — the core's T times — plus the K/V attended) ÷ the measured copy bandwidth gives
   the roofline tokens/s; the decode rate is reported as a fraction of it (target ≥ 70%).
3. Early exit on a Stage-I-trained demo model (``looplm demo``'s task and recipe): each held-out
   prompt is prefilled at full depth (as every decoder does: the deeper caches must hold the
   prompt) and its answer and eos are decoded under fixed full depth and under Q-exit for a grid
   of q; exact-match accuracy, layer applications per decoded token and the wall time of the
   decode steps, at batch 1 (``Decoder``, default backend) and batched (one ``Scheduler`` row
   per problem, all at once, each row at its own loop step) separately.
4. KV layouts on the same model: bytes per token and accuracy under Q-exit, per layout.

    python benchmarks/decode.py [--demo CKPT] [--threads N] [--json FILE] [--skip-roofline]

Without --demo the demo model is trained first (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from looplm.bench import cpu_name, decode_against_baselines, matmul_gflops, roofline, seconds_of, time_decode
from looplm.cache import KV_LAYOUTS, KVCache
from looplm.config import ModelConfig, preset
from looplm.exit_policy import FixedSteps, QExit
from looplm.generate import Decoder
from looplm.model import LoopLM
from looplm.scheduler import Scheduler

PEER_TOKENS_PER_S = 110.0  # the faster public peer on this machine (issue #5)
Q_GRID = (0.3, 0.5, 0.7, 0.9)
REPLAYS = 15  # batched decode replays per measurement (a replay is only a few batched steps)
LARGE = ModelConfig(vocab_size=4096, d_model=768, n_heads=12, ffn_hidden=2048, n_core_layers=12, loop_steps=4,
                    max_seq_len=512)


def reference_shape(repeats: int) -> dict:
    torch.manual_seed(0)
    results = decode_against_baselines(LoopLM(preset("reference")).eval(), repeats)
    return {**results, "vs_peer_110": results["decode_tokens_per_s"] / PEER_TOKENS_PER_S}


def large_roofline(repeats: int) -> dict:
    torch.manual_seed(0)
    model = LoopLM(LARGE).eval()
    prompt, new = 32, 32
    decode = time_decode(model, prompt_length=prompt, new_tokens=new, repeats=repeats)["decode_tokens_per_s"]
    return {"parameters": model.num_parameters(), "shape": "d 768, 12 heads, ffn 2048, 12 core layers x T 4",
            "decode_tokens_per_s": decode, **roofline(model, decode, context=prompt + new // 2)}


def demo_model(checkpoint: str | None):
    from looplm.data.tasks import TaskBatches, make_task
    from looplm.demo import DEMO_TASK, DEMO_TASK_OPTIONS, demo_run_config
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    if checkpoint is None:
        import tempfile

        from looplm.training.trainer import Trainer

        directory = Path(tempfile.mkdtemp(prefix="looplm-decode-bench-"))
        trainer = Trainer(demo_run_config(), directory / "run", progress=False)
        print("training the demo model (about 2 minutes) ...", file=sys.stderr)
        trainer.train()
        model, tokenizer = trainer.model, trainer.tokenizer
    else:
        model, tokenizer = load_model(checkpoint), load_checkpoint_tokenizer(checkpoint)
    task = make_task(DEMO_TASK, **DEMO_TASK_OPTIONS)
    held_out = TaskBatches(task, tokenizer, split="test", seed=0).eval_set(512, seed=7)
    return model.eval(), held_out


def _answer_targets(held_out, row: int) -> list[int]:
    """The answer tokens and eos a correct model emits after problem ``row``'s prompt."""
    mask = held_out.answer_mask[row]
    return held_out.targets[row][mask].tolist()


def _decode_single(model, held_out, policy, repeats: int) -> tuple[float, float, float]:
    """Batch 1: prefill each prompt at full depth (not timed), then decode its answer and eos
    under ``policy`` (teacher-forced, so every policy does the same tokens; all argmaxes right =
    greedy generation right); exact-match accuracy, layer applications per decoded token, and
    the median over ``repeats`` of the seconds spent in decode steps."""
    per_step = model.config.n_core_layers + model.config.n_coda_layers
    timings = []
    for _ in range(repeats):
        correct, applications, tokens, seconds = 0, 0, 0, 0.0
        with torch.inference_mode():
            for row in range(len(held_out)):
                prompt, answer = held_out.prompts[row], _answer_targets(held_out, row)
                decoder = Decoder(model, policy, len(prompt) + len(answer))
                decoder.logits_view = True  # as ``generate`` decodes: no copy of the logits per token
                logits, _ = decoder.prefill(torch.tensor([prompt]))
                right = int(logits.argmax()) == answer[0]
                started = time.perf_counter()
                for position in range(1, len(answer)):  # teacher-forced: the same work for every policy
                    logits, steps = decoder.step(answer[position - 1])
                    greedy = decoder.greedy if decoder.greedy is not None else int(logits.argmax())
                    right &= greedy == answer[position]
                    applications += steps * per_step
                    tokens += 1
                seconds += time.perf_counter() - started
                correct += right
        timings.append(seconds)
    return correct / len(held_out), applications / max(tokens, 1), statistics.median(timings)


def _decode_batched(model, held_out, policy, repeats: int = 1, layout: str = "last_exited"):
    """All problems as one batch (a ``Scheduler`` row each): prefill every row at full depth (not
    timed), then decode answers and eos together, every row fed its next answer token as soon as
    its previous one finished (depth-interleaved); accuracy, layer applications per decoded token
    and the median seconds of the decode over ``repeats`` replays from the same prefilled cache.
    The answer tokens are teacher-forced (every policy decodes the same tokens); a row is right
    when every argmax matches, which equals greedy generation (``EvalSet``)."""
    rows = len(held_out)
    answers = [_answer_targets(held_out, row) for row in range(rows)]
    longest = max(len(prompt) + len(answer) for prompt, answer in zip(held_out.prompts, answers))
    with torch.inference_mode():
        scheduler = Scheduler(model, rows, longest, policy.max_steps(model.config.loop_steps), layout)
        members = [scheduler.admit(held_out.prompts[row], policy) for row in range(rows)]
        row_of = {member.slot: row for row, member in enumerate(members)}
        right = [member.greedy == answer[0] for member, answer in zip(members, answers)]
        cache = scheduler.cache
        saved = [tensor.clone() for tensor in [cache.keys, cache.values, *cache.state_tensors]]
        timings = []
        for _ in range(max(repeats, REPLAYS)):
            for tensor, value in zip([cache.keys, cache.values, *cache.state_tensors], saved):
                tensor.copy_(value)
            predictions, fed = [[] for _ in range(rows)], [1] * rows
            for row, member in enumerate(members):
                member.position, member.layer_applications = len(held_out.prompts[row]), 0
                if len(answers[row]) > 1:
                    scheduler.feed(member, answers[row][0])
            started = time.perf_counter()
            while scheduler.active:  # teacher-forced: the same work for every policy
                for member in scheduler.iterate():
                    row = row_of[member.slot]
                    predictions[row].append(member.greedy)
                    if fed[row] + 1 < len(answers[row]):
                        scheduler.feed(member, answers[row][fed[row]])
                        fed[row] += 1
            timings.append(time.perf_counter() - started)
        for row in range(rows):
            right[row] &= predictions[row] == answers[row][1:]
    decoded = sum(len(answer) - 1 for answer in answers)
    applications = sum(member.layer_applications for member in members)
    return sum(right) / rows, applications / max(decoded, 1), statistics.median(timings)


def early_exit(model, held_out, repeats: int) -> dict:
    """Full depth and Q-exit at each q, at batch 1 and batched.  Every policy is run once
    untimed first (warm-up), then the policies take turns ``repeats`` times and each keeps the
    fastest of its turns (timeit's estimator: on a shared machine the slower turns measure the
    neighbours), so no policy gains from running later or at a quieter moment.  q = 0.9 exits
    no token on the demo model: its "cut" shows what is left of the noise."""
    results = {}
    policies = [("full depth", FixedSteps())] + [(f"Q-exit q={q}", QExit(q)) for q in Q_GRID]
    for name, run in (("batch_1", _decode_single), ("batched", _decode_batched)):
        for _, policy in policies:
            run(model, held_out, policy, 1)
        turns = {label: [] for label, _ in policies}
        for _ in range(repeats):
            for label, policy in policies:
                turns[label].append(run(model, held_out, policy, 1))
        measured = {label: (values[0][0], values[0][1], min(v[2] for v in values))
                    for label, values in turns.items()}
        full_accuracy, full_applications, full_seconds = measured["full depth"]
        rows = [{"policy": "full depth", "accuracy": full_accuracy, "layer_applications_per_token": full_applications,
                 "seconds": full_seconds}]
        for q in Q_GRID:
            accuracy, applications, seconds = measured[f"Q-exit q={q}"]
            rows.append({"policy": f"Q-exit q={q}", "q": q, "accuracy": accuracy,
                         "layer_applications_per_token": applications, "seconds": seconds,
                         "applications_cut": 1 - applications / full_applications,
                         "wall_time_cut": 1 - seconds / full_seconds})
        kept = [row for row in rows[1:] if row["accuracy"] >= full_accuracy - 0.01]
        best = min(kept, key=lambda row: row["layer_applications_per_token"]) if kept else None
        results[name] = {"rows": rows, "best_q_within_1_point": best}
    return results


def compute_bound_exit(repeats: int, batch: int = 8) -> dict:
    """The reference shape (compute-bound per step, unlike the tiny demo model) with an exit gate
    set so Q-exit stops tokens early: does wall time follow the layer applications skipped?
    Greedy decode of 64 tokens after a 64-token prompt, at batch 1 and as one batch."""
    torch.manual_seed(0)
    model = LoopLM(preset("reference")).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.05)
    model.exit_gate.bias.data.fill_(-0.5)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.config.vocab_size, (64,), generator=generator).tolist() for _ in range(batch)]
    from looplm.batch import generate_batch
    from looplm.generate import generate

    rows = {}
    for name, policy in (("full depth", FixedSteps()), ("Q-exit q=0.5", QExit(0.5))):
        def single(policy=policy):
            return [generate(model, prompt, 64, exit_policy=policy, stop_ids=[]) for prompt in prompts[:2]]

        def batched(policy=policy):
            return generate_batch(model, prompts, 64, exit_policy=policy, stop_ids=[])

        single_seconds = statistics.median(seconds_of(single) for _ in range(repeats))
        steps = [s for result in single() for s in result.steps]
        batched_seconds = statistics.median(seconds_of(batched) for _ in range(repeats))
        result = batched()
        rows[name] = {"policy": name, "mean_steps": sum(steps) / len(steps),
                      "batch_1_seconds": single_seconds, "batched_seconds": batched_seconds,
                      "batched_applications": result.layer_applications}
    full, early = rows["full depth"], rows["Q-exit q=0.5"]
    early["applications_cut"] = 1 - early["mean_steps"] / full["mean_steps"]
    early["batch_1_wall_time_cut"] = 1 - early["batch_1_seconds"] / full["batch_1_seconds"]
    early["batched_applications_cut"] = 1 - early["batched_applications"] / full["batched_applications"]
    early["batched_wall_time_cut"] = 1 - early["batched_seconds"] / full["batched_seconds"]
    return {"rows": list(rows.values())}


def layouts(model, held_out, q: float) -> list[dict]:
    rows = []
    full_accuracy = None
    for layout in KV_LAYOUTS:
        cache = KVCache(model.config, 1, 64, layout=layout, modulo_slots=2)
        accuracy, applications, _ = _decode_batched(model, held_out, QExit(q), 1, layout)
        if layout == "full":
            full_accuracy = accuracy
        rows.append({"layout": layout, "bytes_per_token": cache.bytes_per_token, "accuracy": accuracy,
                     "layer_applications_per_token": applications})
    for row in rows:
        row["accuracy_delta_vs_full"] = row["accuracy"] - full_accuracy
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", help="a trained demo checkpoint (default: train one first)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-roofline", action="store_true", help="skip the ~100M-parameter roofline")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": cpu_name(),
               "matmul_gflop_s": matmul_gflops()}
    print(f"{results['machine']}, {results['threads']} threads:"
          f" fp32 2048² matmul {results['matmul_gflop_s']:.0f} GFLOP/s\n")
    results["reference_shape"] = reference_shape(args.repeats)
    print("## Batch-1 decode, reference shape\n")
    print(_table([results["reference_shape"]], list(results["reference_shape"])) + "\n")
    if not args.skip_roofline:
        results["roofline"] = large_roofline(args.repeats)
        print("## Roofline, ~100M parameters\n")
        print(_table([results["roofline"]], list(results["roofline"])) + "\n")
    model, held_out = demo_model(args.demo)
    results["early_exit"] = early_exit(model, held_out, args.repeats)
    columns = ["policy", "accuracy", "layer_applications_per_token", "seconds", "applications_cut", "wall_time_cut"]
    for name, section in results["early_exit"].items():
        print(f"## Early exit, demo model, {name} ({len(held_out)} held-out problems)\n")
        print(_table(section["rows"], columns) + "\n")
    results["compute_bound_exit"] = compute_bound_exit(args.repeats)
    print("## Early exit on the reference shape (gate set to exit early; compute-bound steps)\n")
    print(_table(results["compute_bound_exit"]["rows"], ["policy", "mean_steps", "batch_1_seconds", "batched_seconds",
                                                         "applications_cut", "batch_1_wall_time_cut",
                                                         "batched_applications_cut", "batched_wall_time_cut"]) + "\n")
    best = results["early_exit"]["batched"]["best_q_within_1_point"]
    q = best["q"] if best else 0.5
    results["layouts"] = layouts(model, held_out, q)
    print(f"## KV layouts, demo model, Q-exit q={q}\n")
    print(_table(results["layouts"], ["layout", "bytes_per_token", "accuracy", "accuracy_delta_vs_full",
                                      "layer_applications_per_token"]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

"""The benchmark machinery runs and reports positive rates (no timing thresholds here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from looplm.bench import time_decode, time_training
from looplm.model import LoopLM

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_training_and_decode_timers_report_rates():
    model = LoopLM(tiny_config())
    for precision in ("fp32", "bf16"):
        assert time_training(model, batch=2, length=8, steps=1, repeats=1, precision=precision) > 0
    for backend in ("auto", "torch", "reference"):
        rates = time_decode(model, prompt_length=4, new_tokens=4, repeats=1, backend=backend)
        assert rates["decode_tokens_per_s"] > 0 and rates["prefill_tokens_per_s"] > 0
    assert time_decode(model, prompt_length=4, new_tokens=4, repeats=1, dtype="bf16")["decode_tokens_per_s"] > 0


def test_moe_dispatch_benchmark_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_dispatch.py"), "--experts", "4",
                             "--top-k", "2", "--d-model", "32", "--expert-hidden", "8", "--batch", "1", "--seq",
                             "16", "--steps", "1", "--repeats", "1", "--json", str(tmp_path / "moe.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "moe.json").read_text())
    assert figures["speedup"] > 0 and figures["experts"] == 4


def test_decode_traffic_counts_the_loop_and_the_cache():
    from looplm.bench import decode_traffic

    two, four = (LoopLM(tiny_config(loop_steps=steps)) for steps in (2, 4))
    core = sum(p.numel() for p in two.core.parameters())
    small, large = decode_traffic(two, context=10), decode_traffic(four, context=10)
    config = two.config
    assert small["layer_applications_per_token"] == 2 * config.n_core_layers
    assert small["kv_cache_bytes_per_token"] == 2 * config.n_core_layers * 2 * config.n_kv_heads * config.head_dim * 4
    # Two more loop steps read the core's weights twice more and keep twice the K/V.
    assert large["bytes_read_per_token"] - small["bytes_read_per_token"] == (
        2 * core * 4 + 10 * small["kv_cache_bytes_per_token"])


def test_decode_benchmark_measures_exit_on_a_task(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from looplm.data.tasks import TaskBatches, make_task
    from looplm.data.tokenizer import byte_tokenizer
    from looplm.exit_policy import FixedSteps, QExit

    import decode

    model = LoopLM(tiny_config(vocab_size=259, loop_steps=3)).eval()
    held_out = TaskBatches(make_task("binding", hops=2), byte_tokenizer(), split="test", seed=0).eval_set(6, seed=1)
    for run in (decode._decode_single, decode._decode_batched):
        accuracy, applications, seconds = run(model, held_out, FixedSteps(), 1)
        assert 0 <= accuracy <= 1 and applications == 3 * model.config.n_core_layers and seconds >= 0
        _, early, _ = run(model, held_out, QExit(0.0), 1)  # q = 0: every token exits at step 1
        assert early == model.config.n_core_layers


def test_machine_calibration_figures(monkeypatch):
    from looplm import bench, cpu
    from looplm.bench import cpu_name, matmul_gflops

    assert cpu_name() and matmul_gflops(size=128, repeats=1) > 0
    monkeypatch.setattr(bench, "matmul_gflops", lambda size=2048, repeats=3, dtype=None: float(size))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "sse2", "avx512_bf16"}))
    report = bench.machine_report()
    assert report["cpu_flags"] == "avx2 fma avx512_bf16"  # the flags that decide the paths, in a fixed order
    assert report["matmul_bf16_size"] == report["matmul_gflop_s_bf16"] == 2048
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert bench.machine_report()["matmul_bf16_size"] == 512  # emulated bf16: a smaller matmul


def test_precision_benchmark_pieces_run():
    from looplm.kernels import build

    if build.load_kernel() is None:
        pytest.skip(build.unavailable_reason())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import precision as benchmark

    model = LoopLM(tiny_config()).eval()
    figures = benchmark.pair(benchmark.interleaved({"a": lambda: 2.0, "b": lambda: 1.0}, 3), "a", "b")
    assert figures == {"a": 2.0, "b": 1.0, "a / b": 2.0}
    assert benchmark.decode_rate(model, "bf16") > 0 and benchmark.batched_rate(model, "bf16", rows=2, new_tokens=2) > 0


def test_depth_batching_counts_a_layers_and_the_heads_multiply_adds_and_its_bar():
    """The depth-batching benchmark's arithmetic ceiling counts, per layer application, the
    multiply-adds of a plain-loop layer's projections (one per weight) and, per token, the head's;
    and its bar and ceiling follow from a run's counts."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import depth_batching

    from looplm.exit_policy import QExit

    model = LoopLM(tiny_config(n_kv_heads=2, vocab_size=300))
    layer = model.core[0]
    weights = sum(module.weight.numel() for module in (layer.attn.qkv, layer.attn.out, layer.ffn.gate_up,
                                                       layer.ffn.down))
    assert depth_batching.multiply_adds(model) == (weights, model.head_weight.numel())
    config = model.config  # the plain loop's projections, counted from its shape
    assert weights == config.d_model * ((config.n_heads * 2 + 2 * config.n_kv_heads) * config.head_dim
                                        + 3 * config.ffn_hidden)
    runs = {"fixed": {"layer_applications": 40, "tokens": 10, "requests": 2, "prefill_applications": 40,
                      "tokens_per_s": 1.0, "decode_seconds": 2.0, "seconds": 3.0},
            "q_exit": {"layer_applications": 20, "tokens": 10, "requests": 2, "prefill_applications": 40,
                       "tokens_per_s": 1.5, "decode_seconds": 1.0, "seconds": 2.0}}
    original = depth_batching.continuous
    try:
        depth_batching.continuous = lambda model, prompts, tokens, policy, rows, standby=0: dict(
            runs["q_exit" if isinstance(policy, QExit) else "fixed"])
        result = depth_batching.depth_batching(model, [[1]], 1, 1, 0.5, rounds=1)
        q_times = iter([9.0, 1.0, 4.0, 2.0])  # the warm-up, then three rounds: decode ratios 2, 0.5, 1
        depth_batching.continuous = lambda model, prompts, tokens, policy, rows, standby=0: (
            {**runs["q_exit"], "decode_seconds": (q := next(q_times)), "seconds": q + 1 + 5 * (q == 2.0)}
            if isinstance(policy, QExit) else dict(runs["fixed"]))
        three = depth_batching.depth_batching(model, [[1]], 1, 1, 0.5, rounds=3)
    finally:
        depth_batching.continuous = original
    rounds = three["scopes"]["decode"]
    assert rounds["rounds_ratios"] == [2.0, 0.5, 1.0] and rounds["ratio"] == 1.0
    # the whole run: each policy's median whole-run time (Q-exit's 2, 5, 8 s: 5 s), not the whole-run
    # time of the run with the median decode time (8 s, a prefill slowed once)
    assert three["scopes"]["whole_run"]["ratio"] == 3.0 / 5.0 and result["scopes"]["whole_run"]["ratio"] == 1.5
    decode = result["scopes"]["decode"]
    assert decode["X"] == 0.5 and decode["ratio"] == 2.0 and decode["met"]
    head = model.head_weight.numel()  # a head per decoded token: 10 emitted, 2 of them from the prompts
    saved = 1 - (20 * weights + 8 * head) / (40 * weights + 8 * head)
    assert decode["multiply_adds_saved"] == pytest.approx(saved)
    assert decode["arithmetic_ratio"] == pytest.approx(1 / (1 - saved))
    whole = result["scopes"]["whole_run"]  # + the prompts at full depth and their 2 heads, under both policies
    saved = 1 - ((20 + 40) * weights + 10 * head) / ((40 + 40) * weights + 10 * head)
    assert whole["multiply_adds_saved"] == pytest.approx(saved)


def test_depth_batching_counts_the_prompts_at_full_depth():
    """The benchmark's prefill count: every prompt token at full depth (a request's first token comes
    from its prompt, so the decoded tokens are the emitted ones less one a request)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import depth_batching

    from looplm.exit_policy import FixedSteps

    model = LoopLM(tiny_config(n_core_layers=2, loop_steps=3)).eval()
    run = depth_batching.continuous(model, [[1, 2, 3], [4, 5, 6, 7]], 4, FixedSteps(), 2)
    assert run["requests"] == 2 and run["tokens"] == 8
    assert run["full_depth_applications"] == run["layer_applications"] == (8 - 2) * 3 * 2
    assert run["prefill_applications"] == (3 + 4) * 3 * 2


def test_depth_batching_keeps_two_text_models_apart():
    """Several text models in one run (``--text-model`` repeated) are reported each under its own
    key, named by its vocabulary, and the report lists every model section in run order."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import depth_batching

    assert depth_batching.text_model_name(LoopLM(tiny_config(vocab_size=259))) == "text_model_vocab259"
    results = {"machine": {"cpu": "x"}, "reference_shape": {"fixed": {}}, "text_model_vocab259": {"fixed": {}},
               "batch_1_decode_tokens_per_s": 1.0, "text_model_vocab4096": {"fixed": {}}}
    assert depth_batching.model_sections(results) == ["reference_shape", "text_model_vocab259",
                                                      "text_model_vocab4096"]

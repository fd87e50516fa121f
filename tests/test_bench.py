"""The benchmark machinery runs and reports positive rates (no timing thresholds here)."""

import json
import subprocess
import sys
from pathlib import Path

from looplm.bench import time_decode, time_training
from looplm.model import LoopLM

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_training_and_decode_timers_report_rates():
    model = LoopLM(tiny_config())
    assert time_training(model, batch=2, length=8, steps=1, repeats=1) > 0
    for backend in ("auto", "torch", "reference"):
        rates = time_decode(model, prompt_length=4, new_tokens=4, repeats=1, backend=backend)
        assert rates["decode_tokens_per_s"] > 0 and rates["prefill_tokens_per_s"] > 0


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
    import decode

    from looplm.data.tasks import TaskBatches, make_task
    from looplm.data.tokenizer import byte_tokenizer
    from looplm.exit_policy import FixedSteps, QExit

    model = LoopLM(tiny_config(vocab_size=259, loop_steps=3)).eval()
    held_out = TaskBatches(make_task("binding", hops=2), byte_tokenizer(), split="test", seed=0).eval_set(6, seed=1)
    for run in (decode._decode_single, decode._decode_batched):
        accuracy, applications, seconds = run(model, held_out, FixedSteps(), 1)
        assert 0 <= accuracy <= 1 and applications == 3 * model.config.n_core_layers and seconds >= 0
        _, early, _ = run(model, held_out, QExit(0.0), 1)  # q = 0: every token exits at step 1
        assert early == model.config.n_core_layers


def test_machine_calibration_figures():
    from looplm.bench import cpu_name, matmul_gflops

    assert cpu_name() and matmul_gflops(size=128, repeats=1) > 0

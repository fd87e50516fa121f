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

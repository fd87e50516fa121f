"""benchmarks/gpu_check.py: its dry run (every check at tiny size on the CPU) passes, a failing
or slow check is recorded without stopping the run, and the host-sync probe judges only the
training steps that do not log."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    return gpu_check


def test_dry_run_passes_every_check(tmp_path, gpu_check):
    out, table = tmp_path / "report.json", tmp_path / "table.md"
    finished = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--markdown", str(table)],
                              capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    statuses = {entry["name"]: entry["status"] for entry in report["checks"]}
    assert statuses == {check.name: "pass" for check in gpu_check.CHECKS}, finished.stdout[-3000:]
    assert finished.returncode == 0 and report["passed"]
    assert report["device"]["mode"] == "dry-run (CPU)" and report["device"]["cpu"]
    training = next(entry for entry in report["checks"] if entry["name"] == "train_reference_eager")
    assert training["figures"]["held_out_loss_after"] < training["figures"]["held_out_loss_before"]
    torchrun = next(entry for entry in report["checks"] if entry["name"] == "torchrun")["figures"]
    assert torchrun["ddp"]["checkpoint_loads"] and torchrun["fsdp"]["checkpoint_loads"]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "| pass |" in line]
    assert len(rows) == len(gpu_check.CHECKS)


def test_failures_and_the_budget_are_recorded_and_the_run_goes_on(tmp_path, gpu_check):
    def broken(sizes):
        raise RuntimeError("CUDA error: device-side assert triggered")

    def finds_a_problem(sizes):
        return gpu_check.Outcome({"tokens_per_s": 1.0}, "slow", ["too slow"])

    def fine(sizes):
        return gpu_check.Outcome({}, "all good")

    checks = [gpu_check.Check("broken", "raises", broken, 0), gpu_check.Check("problem", "finds", finds_a_problem, 0),
              gpu_check.Check("fine", "passes", fine, 0), gpu_check.Check("huge", "needs more time", fine, 10_000)]
    report, out = {"device": {}, "checks": []}, tmp_path / "report.json"
    gpu_check.run_checks(checks, gpu_check.DRY, 100.0, report, out)
    entries = {entry["name"]: entry for entry in json.loads(out.read_text())["checks"]}
    assert entries["broken"]["status"] == "fail" and "device-side assert" in entries["broken"]["error"]
    assert entries["problem"]["status"] == "fail" and entries["problem"]["problems"] == ["too slow"]
    assert entries["fine"]["status"] == "pass"
    assert entries["huge"]["status"] == "skipped: time budget"


def test_sync_probe_judges_only_steps_that_do_not_log(gpu_check):
    class Trainer:
        step = 0

    def synchronise():
        warnings.warn(f"called a {gpu_check.SYNC_WARNING}", stacklevel=2)

    trainer = Trainer()
    with gpu_check.SyncProbe(trainer, cuda=False) as probe:
        for step in range(12):  # log_every 4: steps 4, 8, 12 (1-based) log
            trainer.step = step
            if step in (3, 4, 7, 8, 11):  # the compute of a logging step or the logging itself
                synchronise()
        trainer.step = 5
        synchronise()  # step 6's compute: a quiet step
        trainer.step = 1
        synchronise()  # warm-up
    assert len(probe.events) == 7
    quiet = probe.quiet_step_syncs(steps=12, log_every=4)
    assert list(quiet.values()) == [1] and next(iter(quiet)).startswith(__file__)
    with gpu_check.SyncProbe(trainer, cuda=False) as probe:
        synchronise()
    assert probe.quiet_step_syncs(steps=12, log_every=4) == {}  # step 1: warm-up

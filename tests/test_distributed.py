"""torchrun with DDP on gloo (CPU): two processes follow the single-process loss curve with
the same global batch (within 1e-5) and resume exactly after an interruption."""

import json
import socket
import subprocess
import sys

import pytest

TRAIN = ["--preset", "tiny", "--model.d_model", "32", "--model.n_core_layers", "1", "--model.loop_steps", "2",
         "--model.max_seq_len", "32", "--train.batch_size", "4", "--train.seq_len", "16", "--train.eval_every", "0",
         "--train.log_every", "1", "--train.threads", "1", "--no-progress"]


def losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(arguments, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(free_port()), "-m", "looplm"] if processes > 1 else [sys.executable, "-m", "looplm"]
    return subprocess.run([*launcher, *arguments], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog. " for i in range(400)))
    return path


def test_ddp_two_processes_follow_the_single_process_curve_and_resume(corpus, tmp_path):
    single = run(["train", "--data", str(corpus), "--out", str(tmp_path / "single"), "--train.steps", "6", *TRAIN])
    assert single.returncode == 0, single.stderr
    ddp = run(["train", "--data", str(corpus), "--out", str(tmp_path / "ddp"), "--train.steps", "6",
               "--parallel", "ddp", *TRAIN], processes=2)
    assert ddp.returncode == 0, ddp.stderr
    expected, got = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(got) == len(expected) == 6
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5, (got, expected)
    # Interrupted after 3 steps (a run of 3), then resumed to 6 under DDP: the same curve.
    first = run(["train", "--data", str(corpus), "--out", str(tmp_path / "resumed"), "--train.steps", "3",
                 "--parallel", "ddp", *TRAIN], processes=2)
    assert first.returncode == 0, first.stderr
    again = run(["train", "--data", str(corpus), "--out", str(tmp_path / "resumed"), "--train.steps", "6",
                 "--parallel", "ddp", "--resume", *TRAIN], processes=2)
    assert again.returncode == 0, again.stderr
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "resumed"), expected)) < 1e-5


def test_parallel_without_torchrun_is_a_one_line_error(corpus, tmp_path):
    result = run(["train", "--data", str(corpus), "--out", str(tmp_path / "x"), "--parallel", "ddp", *TRAIN])
    assert result.returncode == 2
    assert "runs under torchrun" in result.stderr and "Traceback" not in result.stderr

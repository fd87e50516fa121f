"""torchrun with DDP and FSDP2 on gloo (CPU): two processes follow the single-process loss
curve with the same global batch (within 1e-5) and resume exactly after an interruption; an
FSDP checkpoint is an ordinary checkpoint (loads alone, resumes in a single process)."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from looplm.training.distributed import optimizer_state_by_index, optimizer_state_by_name

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
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(free_port()), "-m", "looplm"] if processes > 1
                else [sys.executable, "-m", "looplm"])
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


# FSDP2 (fully_shard on gloo): prelude, core and coda layers sharded, MoE (balancing bias summed
# over ranks), an untied head; a checkpoint every 3 steps is the "interrupted" state.
FSDP_TRAIN = [*TRAIN, "--model.n_prelude_layers", "1", "--model.n_coda_layers", "1", "--model.ffn", "moe",
              "--model.n_experts", "4", "--model.moe_top_k", "2", "--model.moe_bias_update_rate", "0.01",
              "--model.tie_embeddings", "false", "--train.save_every", "3", "--train.keep_last", "2"]
TOLERANCE = 1e-5  # measured: 5e-7 (fp32 sums over ranks and T reduce-scatters of the looped layers)


def interrupted_copy(run_dir, target):
    """The run directory as a crash after step 3 leaves it: the step-3 checkpoint, 3 metric lines."""
    shutil.copytree(run_dir, target)
    shutil.rmtree(target / "checkpoints" / "step_0000006")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (target / "metrics.jsonl").write_text("".join(lines[:3]))


def test_fsdp_follows_the_single_process_curve_resumes_and_writes_a_normal_checkpoint(corpus, tmp_path):
    from looplm.model.loading import load_model

    train = ["train", "--data", str(corpus), "--train.steps", "6", *FSDP_TRAIN]
    single = run([*train, "--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr
    fsdp = run([*train, "--out", str(tmp_path / "fsdp"), "--parallel", "fsdp"], processes=2)
    assert fsdp.returncode == 0, fsdp.stderr
    expected, got = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(got) == len(expected) == 6
    assert max(abs(a - b) for a, b in zip(got, expected)) < TOLERANCE, (got, expected)
    # The FSDP checkpoint is an ordinary one: same files, same weights (MoE biases included).
    step = "checkpoints/step_0000006"
    sharded, reference = load_model(tmp_path / "fsdp" / step), load_model(tmp_path / "single" / step)
    assert set(sharded.state_dict()) == set(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(sharded.state_dict()[name], tensor, atol=TOLERANCE, rtol=0), name
    assert sharded.core[0].ffn.balance_bias.abs().sum() > 0  # the bias did move
    # Interrupted after step 3 and resumed under FSDP: exactly the uninterrupted FSDP curve.
    interrupted_copy(tmp_path / "fsdp", tmp_path / "resumed")
    again = run([*train, "--out", str(tmp_path / "resumed"), "--parallel", "fsdp", "--resume"], processes=2)
    assert again.returncode == 0, again.stderr
    assert losses(tmp_path / "resumed") == got
    # A single process resumes the FSDP checkpoint (same optimiser-state format) on the single curve.
    interrupted_copy(tmp_path / "fsdp", tmp_path / "alone")
    alone = run([*train, "--out", str(tmp_path / "alone"), "--resume"])
    assert alone.returncode == 0, alone.stderr
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "alone"), expected)) < TOLERANCE


def test_optimizer_state_keys_by_index_and_by_name_round_trip():
    by_name = {"state": {"embed.weight": {"step": 1}, "norm.weight": {"step": 2}, "gate.bias": {"step": 3}},
               "param_groups": [{"lr": 0.1, "params": ["embed.weight"]},
                                {"lr": 0.2, "params": ["norm.weight", "gate.bias"]}]}
    by_index = optimizer_state_by_index(by_name)
    assert by_index == {"state": {0: {"step": 1}, 1: {"step": 2}, 2: {"step": 3}},
                        "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1, 2]}]}
    assert optimizer_state_by_name(by_index, [["embed.weight"], ["norm.weight", "gate.bias"]]) == by_name

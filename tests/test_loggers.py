"""Training metrics reach TensorBoard and W&B (offline) with the values metrics.jsonl holds; MFU."""

import json
import socket
import struct
import sys

import pytest
from test_trainer import small_run, text_file

from looplm.config import DataConfig, RunConfig, TrainConfig, apply_overrides
from looplm.errors import LoopLMError
from looplm.training.loggers import WANDB_ID_FILE, scalars
from looplm.training.mfu import model_flops_utilization, peak_tflops_for_name
from looplm.training.trainer import Trainer


def jsonl(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_record_to_scalar_names():
    record = {"step": 7, "loss": 2.5, "step_losses": [3.0, 2.0], "skipped_steps": 1, "exit_histogram": [0.25, 0.75],
              "eval": {"loss_by_step": [4.0, 3.5], "accuracy_by_step": [0.5, 1.0], "mean_exit_step": 1.5}}
    assert scalars(record) == {"loss": 2.5, "loss/step_1": 3.0, "loss/step_2": 2.0, "skipped_steps": 1.0,
                               "eval/loss/step_1": 4.0, "eval/loss/step_2": 3.5, "eval/accuracy/step_1": 0.5,
                               "eval/accuracy/step_2": 1.0, "eval/mean_exit_step": 1.5}
    run = RunConfig.from_dict(apply_overrides({}, {"train.log_to": "TensorBoard, wandb"}))
    assert run.train.log_sinks() == ("tensorboard", "wandb")
    with pytest.raises(LoopLMError, match="train.log_to"):
        TrainConfig(log_to="tensorboard,mlflow")


def test_tensorboard_events_hold_the_jsonl_values_and_resume_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = DataConfig(path=str(text_file(tmp_path)))
    out = tmp_path / "run"
    Trainer(small_run(data, steps=4, save_every=2, log_to="tensorboard"), out, progress=False).train(stop_after=3)
    # A crash after step 3 whose last checkpoint is step 2: the resumed run logs step 3 again.
    for path in (out / "checkpoints" / "step_0000003").iterdir():
        path.unlink()
    (out / "checkpoints" / "step_0000003").rmdir()
    run = small_run(data, steps=4, save_every=2, eval_every=4, log_to="tensorboard")
    Trainer(run, out, resume=True, progress=False).train()

    records = jsonl(out)
    train = {r["step"]: r for r in records if "loss" in r}
    evaluation = [r for r in records if "eval" in r][-1]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # the crashed run's step 3 was dropped
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # purge_step hid the crashed run's step 3
    assert [e.value for e in loss] == pytest.approx([train[s]["loss"] for s in (1, 2, 3, 4)], rel=1e-6)
    assert [e.value for e in events.Scalars("loss/step_2")] == pytest.approx(
        [train[s]["step_losses"][1] for s in (1, 2, 3, 4)], rel=1e-6)
    assert events.Scalars("grad_norm")[-1].value == pytest.approx(train[4]["grad_norm"], rel=1e-6)
    assert events.Scalars("eval/loss/step_3")[-1].value == pytest.approx(evaluation["eval"]["loss_by_step"][2],
                                                                         rel=1e-6)
    histogram = events.Histograms("exit_step")[-1]
    assert histogram.step == 4
    assert list(histogram.histogram_value.bucket) == pytest.approx(train[4]["exit_histogram"], rel=1e-6)
    assert list(histogram.histogram_value.bucket_limit) == [1.5, 2.5, 3.5]


def wandb_records(path):
    """Records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks
    (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) of Record protos."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_writes_an_offline_run_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path / "home"),
                        "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():  # no credentials, no server
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    real_connect = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    data = DataConfig(path=str(text_file(tmp_path)))
    out = tmp_path / "run"
    run = small_run(data, steps=3, save_every=2, log_to="wandb", run_name="tiny", wandb_project="looplm-test")
    Trainer(run, out, progress=False).train(stop_after=2)
    Trainer(run, out, resume=True, progress=False).train()

    run_id = (out / WANDB_ID_FILE).read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # resumed: the same run id (wandb suffixes "-1" when both runs start within the same second)
    assert len(runs) == 2 and all(f"-{run_id}" in path.name for path in runs)
    logged = {}
    for path in runs:
        for record in wandb_records(path / f"run-{run_id}.wandb"):
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item}
                logged[items["_step"]] = items
    train = {r["step"]: r for r in jsonl(out) if "loss" in r}
    assert sorted(logged) == [1, 2, 3]
    for step, record in train.items():
        assert logged[step]["loss"] == pytest.approx(record["loss"], rel=1e-12)
        assert logged[step]["loss/step_3"] == pytest.approx(record["step_losses"][2], rel=1e-12)
        assert logged[step]["exit_step/values"] == pytest.approx(record["exit_histogram"])
        assert logged[step]["exit_step/bins"] == [0.5, 1.5, 2.5, 3.5]


def test_mfu_is_achieved_over_peak(tmp_path):
    data = DataConfig(path=str(text_file(tmp_path)))
    Trainer(small_run(data, steps=2, peak_tflops=0.002), tmp_path / "a", progress=False).train()
    records = jsonl(tmp_path / "a")
    assert len(records) == 2
    for record in records:
        assert record["peak_tflops"] == 0.002
        assert record["mfu"] == pytest.approx(record["achieved_tflops"] / 0.002, rel=1e-12)
    Trainer(small_run(data, steps=1), tmp_path / "b", progress=False).train()
    assert "mfu" not in jsonl(tmp_path / "b")[0]  # CPU, no peak given: throughput only
    assert model_flops_utilization(300.0, 1000.0, processes=2) == pytest.approx(0.15)


def test_known_gpu_peaks():
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for_name("NVIDIA H200") == 989.0
    assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for_name("NVIDIA L40S") == 362.0
    assert peak_tflops_for_name("NVIDIA L4") == 121.0
    assert peak_tflops_for_name("NVIDIA A10G") == 0.0  # not in the table: no MFU rather than a wrong one
    assert peak_tflops_for_name("Tesla V100-SXM2-16GB") == 0.0


@pytest.mark.parametrize("sink, modules", [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
                                           ("wandb", ["wandb"])])
def test_missing_logging_package_is_one_line(tmp_path, monkeypatch, sink, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    data = DataConfig(path=str(tmp_path / "never-read.txt"))
    with pytest.raises(LoopLMError, match=rf"pip install 'looplm\[{sink}\]'") as error:
        Trainer(small_run(data, log_to=sink), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)


def test_ctrl_c_flushes_the_loggers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = DataConfig(path=str(text_file(tmp_path)))
    trainer = Trainer(small_run(data, steps=4, eval_every=2, log_to="tensorboard"), tmp_path / "run", progress=False)

    def interrupt():
        raise KeyboardInterrupt

    trainer.evaluate = interrupt  # Ctrl-C during the step-2 evaluation
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.metrics.sinks == []  # closed
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]  # on disk without waiting for the writer's flush

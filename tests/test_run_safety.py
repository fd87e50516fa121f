"""A training run never runs code from a file, never mixes two runs, never loses its work to a
full disk or a kill, and resumes from its directory alone."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from looplm.cli import main
from looplm.config import assemble_run_config
from looplm.errors import LoopLMError
from looplm.model.loading import load_model
from looplm.training.trainer import Trainer

TINY = ["--model.d_model", "32", "--model.n_heads", "4", "--model.n_core_layers", "1", "--model.loop_steps", "2",
        "--model.max_seq_len", "64", "--train.batch_size", "4", "--train.seq_len", "32", "--train.eval_every", "0",
        "--train.warmup_steps", "1", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a looped model reads the same words again. " * 120)
    return path


def train(*argv) -> int:
    return main(["train", *map(str, argv)])


def error_of(capsys, *argv, after_start: bool = False) -> str:
    """The one error line of a failed ``looplm train`` (``after_start``: training had begun, so
    its opening line came first)."""
    capsys.readouterr()
    assert train(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 + after_start and lines[-1].startswith("looplm: error:"), lines
    return lines[-1]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_train_state_is_refused_and_runs_nothing(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", corpus, "--out", run, "--train.steps", "2", *TINY) == 0
    marker = tmp_path / "code-ran"
    torch.save({"step": _RunsCode(marker)}, run / "checkpoints" / "step_0000002" / "train_state.pt")
    line = error_of(capsys, "--out", run, "--resume", "--no-progress")
    assert "train_state.pt" in line and "not loaded" in line
    assert not marker.exists()


def test_resume_alone_resumes_and_a_changed_option_is_named(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--preset", "tiny", "--data", corpus, "--out", run, "--train.steps", "2", "--train.save_every", "1",
                 *TINY) == 0
    assert train("--out", run, "--resume", "--train.steps", "4", "--no-progress") == 0  # no --data, no --preset
    assert sorted(path.name for path in (run / "checkpoints").iterdir())[-1] == "step_0000004"
    assert load_model(run).config.d_model == 32
    line = error_of(capsys, "--out", run, "--resume", "--model.d_model", "64", "--no-progress")
    assert "--model.d_model 64 differs from this run's 32" in line and "run_config.json" in line
    line = error_of(capsys, "--preset", "tiny", "--out", run, "--resume", "--no-progress")  # the overrides left out
    assert "differs from this run's" in line


def test_a_fresh_run_into_a_used_directory_is_refused_or_started_clean(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "data" / "0123abcd").mkdir(parents=True)  # what a killed run on other data leaves behind
    (run / "data" / "0123abcd" / "meta.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    line = error_of(capsys, "--data", corpus, "--out", run, "--train.steps", "2", *TINY)
    assert "the start of a run that saved no checkpoint" in line and "--overwrite" in line
    assert "--resume" not in line  # which would answer "nothing to resume"
    assert train("--data", corpus, "--out", run, "--train.steps", "2", "--overwrite", "--train.log_every", "1",
                 *TINY) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2]  # the old metrics are gone


def test_overwrite_empties_only_a_run_never_a_directory_of_other_files(corpus, tmp_path, capsys):
    """--out on a directory of the user's files (not a run) is refused, --overwrite or not: emptying
    it would delete them; a run with a file of the user's beside it is not emptied either."""
    home = tmp_path / "home"
    (home / "code").mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        line = error_of(capsys, "--data", corpus, "--out", home, "--train.steps", "1", *extra, *TINY)
        assert "holds code, thesis.tex, which no run writes" in line
    assert (home / "thesis.tex").read_text() == "years of work" and (home / "code").is_dir()
    run = tmp_path / "run"
    assert train("--data", corpus, "--out", run, "--train.steps", "1", *TINY) == 0
    (run / "notes.md").write_text("mine")
    assert "holds notes.md" in error_of(capsys, "--data", corpus, "--out", run, "--train.steps", "1", "--overwrite",
                                        *TINY)
    assert (run / "notes.md").is_file() and (run / "run_config.json").is_file()
    (run / "notes.md").unlink()
    for mine in (run / "data" / "mydata.txt", run / "checkpoints" / "mine" / "n.txt"):  # inside a run's own folders
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("precious")
        line = error_of(capsys, "--data", corpus, "--out", run, "--train.steps", "1", "--overwrite", *TINY)
        assert f"holds {mine.relative_to(run).parts[0]}/{mine.relative_to(run).parts[1]}" in line, line
        assert "which no run writes" in line and mine.read_text() == "precious"
        mine.unlink()
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)  # only a data folder of the user's: not "a run" (which points to --overwrite)
    (user / "data" / "corpus.txt").write_text("mine")
    line = error_of(capsys, "--data", corpus, "--out", user, "--train.steps", "1", *TINY)
    assert "holds data/corpus.txt, which no run writes" in line and "already holds a run" not in line


def test_a_second_process_on_a_training_run_is_refused_and_touches_nothing(corpus, tmp_path, capsys):
    """While a run trains, the same directory given again — fresh, --resume or --overwrite — is
    refused in one line before anything is read or removed; once the run is done, --resume works,
    and the lock of a process that died is gone with it."""
    import subprocess
    import sys

    run = tmp_path / "run"
    assert train("--data", corpus, "--out", run, "--train.steps", "2", "--train.save_every", "1", *TINY) == 0
    overrides = {key[2:]: value for key, value in zip(TINY[:-1:2], TINY[1:-1:2])}
    config, _ = assemble_run_config(options={"data.path": str(corpus)}, overrides={**overrides, "train.steps": "3"})
    running = Trainer(config, run, resume=True, progress=False)  # holds the run until its train() ends
    before = sorted(str(path.relative_to(run)) for path in run.rglob("*"))
    for extra in ([], ["--resume"], ["--overwrite"]):
        line = error_of(capsys, "--data", corpus, "--out", run, "--train.steps", "3", *extra, *TINY)
        assert "is in use by another looplm process" in line, line
    assert sorted(str(path.relative_to(run)) for path in run.rglob("*")) == before
    assert running.train().steps_done == 3
    assert train("--data", corpus, "--out", run, "--train.steps", "4", "--resume", *TINY) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from looplm.checkpoint.lock import"
                               " DirectoryLock; lock = DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True);"
                               " time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "in use by another looplm process" in error_of(capsys, "--data", corpus, "--out", run,
                                                               "--train.steps", "5", "--resume", *TINY)
    finally:
        holder.kill()
        holder.wait()
    assert train("--data", corpus, "--out", run, "--train.steps", "5", "--resume", *TINY) == 0


def test_overwrite_never_deletes_an_input(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    corpus = run / "corpus.txt"
    corpus.write_text("text inside the run directory. " * 100)
    line = error_of(capsys, "--data", corpus, "--out", run, "--train.steps", "2", "--overwrite", *TINY)
    assert "holds the input" in line and corpus.is_file()


def test_a_disk_too_full_for_one_checkpoint_is_refused_before_training(corpus, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = error_of(capsys, "--data", corpus, "--out", tmp_path / "run", "--train.steps", "2", *TINY)
    assert "MiB free" in line and "free some disk space" in line


def test_a_failed_save_keeps_the_newest_earlier_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    saves = []
    original = os.fsync

    def fsync_until_full(descriptor):
        if len(saves) >= 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(descriptor)

    import looplm.training.trainer as trainer_module

    real_save = trainer_module.Trainer.save

    def counting_save(self):
        path = real_save(self)
        saves.append(path)
        return path

    monkeypatch.setattr(trainer_module.Trainer, "save", counting_save)
    monkeypatch.setattr("looplm.checkpoint.atomic.os.fsync", fsync_until_full)
    line = error_of(capsys, "--data", corpus, "--out", run, "--train.steps", "4", "--train.save_every", "2", *TINY,
                    after_start=True)
    assert "No space left on device" in line
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["step_0000002"]  # no staging left
    assert load_model(run).config.loop_steps == 2


def test_sigterm_saves_like_ctrl_c_and_stale_staging_is_cleaned(corpus, tmp_path):
    run = tmp_path / "run"
    overrides = {key[2:]: value for key, value in zip(TINY[:-1:2], TINY[1:-1:2])}
    config, _ = assemble_run_config(options={"data.path": str(corpus)},
                                    overrides={**overrides, "train.steps": "6", "train.log_every": "1"})
    trainer = Trainer(config, run, progress=False)
    batch = trainer.data.train_batch

    def terminated_at_step_three(size, generator):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(size, generator)

    trainer.data.train_batch = terminated_at_step_three
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["step_0000003"]
    stale = run / "checkpoints" / ".step_0000005.tmp-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    resumed = Trainer(config, run, resume=True, progress=False)
    assert not stale.exists()
    resumed.train()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 logged before the kill, then resumed from its checkpoint


def test_metrics_of_steps_after_the_resumed_checkpoint_are_dropped(corpus, tmp_path):
    run = tmp_path / "run"
    assert train("--data", corpus, "--out", run, "--train.steps", "4", "--train.save_every", "2",
                 "--train.log_every", "1", *TINY) == 0
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_0000004")  # killed after logging steps 3-4, before saving 4
    assert train("--out", run, "--resume", "--no-progress") == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_preset_size_override_derives_the_dependent_sizes():
    run, _ = assemble_run_config(preset_name="tiny", overrides={"model.d_model": "64"})
    assert (run.model.ffn_hidden, run.model.n_kv_heads) == (192, 4)  # not tiny's 384
    run, _ = assemble_run_config(preset_name="tiny", overrides={"model.d_model": "64", "model.ffn_hidden": "100"})
    assert run.model.ffn_hidden == 100

    from looplm.config import preset

    upcycled, _ = assemble_run_config(source_model=preset("openmythos-looplm").to_dict(),
                                      overrides={"model.d_model": "256", "model.n_heads": "4"})
    assert upcycled.model.ffn_hidden == 704 and upcycled.model.expert_hidden == 512  # chosen sizes stay
    assert upcycled.model.n_kv_heads == 2


def test_non_finite_weights_warn_and_their_output_stops_generation(tmp_path, capsys):
    from looplm.data.tokenizer import byte_tokenizer
    from looplm.model import LoopLM

    from conftest import tiny_config

    model = LoopLM(tiny_config(vocab_size=259, max_seq_len=64))
    with torch.no_grad():
        model.core[0].ffn.down.weight[0, 0] = float("nan")
    model.save(tmp_path / "ckpt", byte_tokenizer())
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("looplm: warning:") and "non-finite weights" in err[0]
    assert err[-1].startswith("looplm: error:") and "not finite" in err[-1] and len(err) == 2


def test_nan_and_inf_settings_are_refused():
    with pytest.raises(LoopLMError, match="train.weight_decay must be a finite number"):
        assemble_run_config(overrides={"train.weight_decay": "nan"})
    with pytest.raises(LoopLMError, match="model.rope_theta must be a finite number"):
        assemble_run_config(overrides={"model.rope_theta": "inf"})


def test_the_trainer_reads_device_values_only_at_log_steps(corpus, tmp_path, monkeypatch):
    """No tensor is turned into a Python number (``item``, ``float``, ``int``, ``bool``,
    ``tolist``) by the model, the objective or the trainer in a step that does not log: on a GPU
    each would make the host wait for the device.  (The data sampler works on host tensors.)"""
    import traceback

    overrides = {key[2:]: value for key, value in zip(TINY[:-1:2], TINY[1:-1:2])}
    config, _ = assemble_run_config(options={"data.path": str(corpus)},
                                    overrides={**overrides, "train.steps": "6", "train.log_every": "3"})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    armed, seen = [False], []
    sample = trainer.data.train_batch

    def batch(size, generator):
        armed[0] = False
        drawn = sample(size, generator)
        armed[0] = (trainer.step + 1) % 3 != 0  # steps 1, 2, 4, 5 do not log
        return drawn

    trainer.data.train_batch = batch
    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
        original = getattr(torch.Tensor, name)

        def probe(self, *args, _original=original, _name=name, **kwargs):
            if armed[0]:
                where = [f"{frame.filename}:{frame.lineno}" for frame in traceback.extract_stack()[:-1]
                         if "/looplm/" in frame.filename and "/tests/" not in frame.filename]
                if where:
                    seen.append((_name, trainer.step + 1, where[-1]))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, probe)
    result = trainer.train()
    armed[0] = False
    assert seen == [] and len(result.losses) == 6


def test_a_run_that_diverges_says_so(corpus, tmp_path, capsys):
    """A learning rate that blows the weights up ends the run with a non-finite loss: exit 2 and a
    line that says so and what to change (it had finished as a success, loss nan)."""
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--train.steps", "3",
                 "--train.lr", "1e10", *TINY]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("looplm: error: the run diverged") and "lower --train.lr" in last


def test_resuming_after_the_data_changed_is_refused(tmp_path, capsys):
    """--resume continues exactly: a data file edited since the run started would be tokenized anew
    and trained on without a word, so it is refused, and the run is left as it was."""
    data = tmp_path / "corpus.txt"
    data.write_text("the loop runs again and again. " * 200)
    run = tmp_path / "run"
    assert train("--data", data, "--out", run, "--train.steps", "2", "--train.save_every", "1", *TINY) == 0
    before = sorted(str(path.relative_to(run)) for path in run.rglob("*"))
    original = data.read_text()
    data.write_text(original + "a sentence added later. " * 50)
    line = error_of(capsys, "--out", run, "--resume", "--train.steps", "3", "--no-progress")
    assert "has changed since this run started" in line and "--overwrite" in line, line
    assert sorted(str(path.relative_to(run)) for path in run.rglob("*")) == before
    data.write_text(original)
    assert train("--out", run, "--resume", "--train.steps", "3", "--no-progress") == 0


def test_resuming_from_another_directory_says_where_the_data_path_is_relative_to(tmp_path, capsys, monkeypatch):
    """A run started with a relative --data records it so: resumed from elsewhere, the line says so."""
    (tmp_path / "corpus.txt").write_text("the loop runs again and again. " * 200)
    monkeypatch.chdir(tmp_path)
    assert train("--data", "corpus.txt", "--out", "run", "--train.steps", "1", *TINY) == 0
    monkeypatch.chdir(tmp_path / "run")
    line = error_of(capsys, "--out", tmp_path / "run", "--resume", "--train.steps", "2", "--no-progress")
    assert "'corpus.txt' is recorded relative to the directory the run was started from" in line, line


def test_a_run_that_cannot_start_leaves_no_directories_behind(tmp_path, monkeypatch, capsys):
    """No data given: one line, and the default run directory's parents made for it are gone too."""
    monkeypatch.chdir(tmp_path)
    assert "no training data" in error_of(capsys, "--no-progress")
    assert list(tmp_path.iterdir()) == []

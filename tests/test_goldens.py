"""Golden files: what must not drift.

Every other test compares a fast path with today's reference, so a change that shifts the
reference itself — and every path with it — would pass them all.  These tests hold the
reference to files committed in tests/data/ (regenerated only on purpose, by
tests/data/golden/make_goldens.py):

- the per-step losses of a fixed tiny training run;
- the greedy text of a fixed tiny checkpoint under fixed steps and Q-exit, which every decode
  backend, the batched engine, the server's engine and a GGUF round trip must reproduce;
- a run directory and GGUF files written by looplm 0.1 before this round's changes, which must
  still load, decode as they did, and resume.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from looplm.batch import generate_batch
from looplm.generate import generate
from looplm.interop.gguf import export_gguf, load_gguf
from looplm.model.loading import load_checkpoint_tokenizer, load_model

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
sys.path.insert(0, str(GOLDEN))
import make_goldens  # noqa: E402

GREEDY = json.loads((GOLDEN / "greedy.json").read_text())
CASES = sorted(GREEDY["greedy"])


def test_training_losses_match_the_golden_run(tmp_path):
    """Float rounding differs between CPUs (vector widths, accumulation order), by about 1e-6 per
    step here; a change to the model or the objective moves these losses by far more."""
    torch.set_num_threads(1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_goldens.corpus_text())
    from looplm import train

    losses = train(make_goldens.golden_run(corpus, 20), tmp_path / "run", progress=False).losses
    golden = json.loads((GOLDEN / "train_losses.json").read_text())["losses"]
    assert len(losses) == len(golden) == 20
    assert max(abs(a - b) for a, b in zip(losses, golden)) < 2e-4, list(zip(losses, golden))


@pytest.fixture(scope="module")
def tiny():
    return load_model(GOLDEN / "tiny"), load_checkpoint_tokenizer(GOLDEN / "tiny")


def _prompt(tokenizer, text):
    return [tokenizer.bos_id] + tokenizer.encode(text)


@pytest.mark.parametrize("backend", ["reference", "torch", "native"])
@pytest.mark.parametrize("case", CASES)
def test_every_backend_reproduces_the_golden_text(tiny, case, backend):
    model, tokenizer = tiny
    name, prompt = case.split("|")
    policy = make_goldens.policy(GREEDY["policies"][name])
    result = generate(model, _prompt(tokenizer, prompt), GREEDY["new_tokens"], exit_policy=policy,
                      tokenizer=tokenizer, backend=backend)
    golden = GREEDY["greedy"][case]
    assert (result.ids, result.steps, result.text) == (golden["ids"], golden["steps"], golden["text"])


@pytest.mark.parametrize("name", sorted(GREEDY["policies"]))
def test_the_batched_engine_and_the_server_reproduce_the_golden_text(tiny, name):
    from looplm.serve.engine import Done, Engine, Job, Settings

    model, tokenizer = tiny
    policy = make_goldens.policy(GREEDY["policies"][name])
    prompts = [case.split("|")[1] for case in CASES if case.startswith(name + "|")]
    batch = generate_batch(model, [_prompt(tokenizer, text) for text in prompts], GREEDY["new_tokens"],
                           exit_policy=policy, tokenizer=tokenizer)
    finished = {}
    engine = Engine(model, tokenizer, max_batch=4)
    engine.run([Job(_prompt(tokenizer, text), GREEDY["new_tokens"], Settings(policy),
                    lambda event, text=text: finished.__setitem__(text, event) if isinstance(event, Done) else None)
                for text in prompts])
    for text, generation in zip(prompts, batch.generations):
        golden = GREEDY["greedy"][f"{name}|{text}"]
        assert (generation.ids, generation.steps, generation.text) == (golden["ids"], golden["steps"], golden["text"])
        served = finished[text].generation
        assert (served.ids, served.steps, served.text) == (golden["ids"], golden["steps"], golden["text"])


def test_a_gguf_round_trip_reproduces_the_golden_text(tiny, tmp_path):
    model, tokenizer = tiny
    path = export_gguf(model, tmp_path / "tiny.gguf", "f32", tokenizer)
    loaded, loaded_tokenizer = load_gguf(path)
    for case in CASES:
        name, prompt = case.split("|")
        result = generate(loaded, _prompt(loaded_tokenizer, prompt), GREEDY["new_tokens"],
                          exit_policy=make_goldens.policy(GREEDY["policies"][name]), tokenizer=loaded_tokenizer)
        assert result.ids == GREEDY["greedy"][case]["ids"]


LEGACY = DATA / "legacy-0.1"


def test_a_run_directory_and_gguf_files_written_by_looplm_0_1_still_load_and_decode_as_then():
    recorded = json.loads((LEGACY / "generated.json").read_text())
    for source in (LEGACY / "run", LEGACY / "model-f32.gguf"):
        model, tokenizer = load_model(source), load_checkpoint_tokenizer(source)
        prompt = [tokenizer.bos_id] + tokenizer.encode(recorded["prompt"])
        assert generate(model, prompt, 16, tokenizer=tokenizer, backend="reference").ids == recorded["ids"]
    quantized, _ = load_gguf(LEGACY / "model-q8_0.gguf", int8=True)
    assert quantized.config == load_model(LEGACY / "run").config


def test_a_run_written_by_looplm_0_1_resumes(tmp_path, monkeypatch):
    from looplm.cli import main
    from looplm.training.state import read_train_state

    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy)
    state = read_train_state(copy / "run" / "checkpoints" / "step_0000004" / "train_state.pt", "cpu")
    assert state["step"] == 4 and state["numpy_rng"][0] == "MT19937"  # its NumPy state was a pickled array
    monkeypatch.chdir(copy)  # the run's saved data path is relative to where it was started
    assert main(["train", "--out", "run", "--resume", "--train.steps", "6", "--no-progress"]) == 0
    assert sorted(os.listdir(copy / "run" / "checkpoints"))[-1] == "step_0000006"


def test_a_run_written_by_looplm_0_1_is_all_a_runs_own(tmp_path):
    """Its shards lie in data/ itself: --overwrite may replace them (nothing there is the user's)."""
    from looplm.training.run_directory import foreign_entries

    run = LEGACY / "run"
    assert foreign_entries(run, sorted(run.iterdir())) == []


def test_torch_empty_is_nan_filled_in_tests():
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2, 2))).all()

"""Regenerate the golden files of tests/test_goldens.py (run from the repository root):

    python tests/data/golden/make_goldens.py

- ``train_losses.json``: the per-step losses of a fixed tiny training run (``GOLDEN_RUN`` below).
- ``tiny/``: a tiny checkpoint trained on that corpus, and ``greedy.json``: its greedy
  continuations of fixed prompts under fixed steps and under Q-exit, with the loop steps each
  token used.

Regenerate only when a change is *meant* to alter what the model computes (and say so in the
commit); a golden that moves by accident is the bug these files exist to catch.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = ["the loop", "each word once", "until it"]
POLICIES = {"static": {"kind": "static"}, "q0.5": {"kind": "q", "threshold": 0.5}}
NEW_TOKENS = 24


def corpus_text() -> str:
    """A fixed corpus of simple sentences (deterministic, no download)."""
    chooser = random.Random(0)
    words = "the loop runs again and the model reads each word once more until it knows what comes next".split()
    return "\n".join(" ".join(chooser.choice(words) for _ in range(12)) + "." for _ in range(400)) + "\n"


GOLDEN_RUN = {"model.d_model": "32", "model.n_heads": "4", "model.n_core_layers": "1", "model.loop_steps": "3",
              "model.max_seq_len": "64", "train.batch_size": "8", "train.seq_len": "32", "train.eval_every": "0",
              "train.warmup_steps": "5", "train.lr": "3e-3", "train.log_every": "1", "train.seed": "0",
              "train.precision": "fp32"}


def golden_run(corpus: Path, steps: int):
    """The fixed tiny run both goldens come from."""
    from looplm.config import assemble_run_config

    run, _ = assemble_run_config(options={"data.path": str(corpus)},
                                 overrides={**GOLDEN_RUN, "train.steps": str(steps)})
    return run


def policy(spec: dict):
    from looplm.exit_policy import FixedSteps, QExit

    return QExit(spec["threshold"]) if spec["kind"] == "q" else FixedSteps()


def main() -> None:
    import torch

    from looplm import train
    from looplm.generate import generate
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    corpus = work / "corpus.txt"
    corpus.write_text(corpus_text())
    losses = train(golden_run(corpus, 20), work / "losses", progress=False).losses
    (HERE / "train_losses.json").write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    train(golden_run(corpus, 300), work / "tiny", progress=False)
    target = HERE / "tiny"
    shutil.rmtree(target, ignore_errors=True)
    newest = sorted((work / "tiny" / "checkpoints").iterdir())[-1]
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(newest / name, target / name)
    model, tokenizer = load_model(target), load_checkpoint_tokenizer(target)
    greedy = {}
    for name, spec in POLICIES.items():
        for prompt in PROMPTS:
            result = generate(model, [tokenizer.bos_id] + tokenizer.encode(prompt), NEW_TOKENS,
                              exit_policy=policy(spec), tokenizer=tokenizer, backend="reference")
            greedy[f"{name}|{prompt}"] = {"ids": result.ids, "steps": result.steps, "text": result.text}
    (HERE / "greedy.json").write_text(json.dumps({"policies": POLICIES, "new_tokens": NEW_TOKENS, "greedy": greedy},
                                                 indent=1) + "\n")
    shutil.rmtree(work)
    print(f"wrote {HERE / 'train_losses.json'}, {target}, {HERE / 'greedy.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

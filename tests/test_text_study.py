"""benchmarks/text_study.py in its smoke mode: every model, both budgets, seeds, plots and JSON, in seconds."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "text_study.py"
LINES = ["Enter the king, with lords attending.", "What news from the river, good my lord?",
         "The tide runs high tonight and all the boats are in.", "Then let us sleep, and wake to better news."]


def load_study(monkeypatch):
    spec = importlib.util.spec_from_file_location("text_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "text_study", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for index in range(24):  # whole documents, so two of them form the validation split
        (directory / f"text_{index:02d}.txt").write_text("\n".join(LINES[index % 4:] + LINES[:index % 4]) * 4 + "\n")
    return directory


def test_smoke_study_reports_every_model_under_both_budgets(corpus, tmp_path, capsys, monkeypatch):
    study = load_study(monkeypatch)
    results = study.main(["--smoke", "--tokenizers", "bpe", "--seeds", "2", "--corpus", str(corpus),
                          "--out", str(tmp_path / "study")])
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    summary = {(entry["arm"], entry["variant"]): entry for entry in saved["summary"]}
    assert set(summary) == {("tokens", name) for name in (*study.HEADLINE, *study.EXTRA)} | {
        ("wall_clock", name) for name in (*study.HEADLINE, "depth_sampled")}
    looped = summary[("tokens", "looped")]
    assert looped["seeds"] == [0, 1] and looped["bits_per_byte_std"] is not None
    assert len(looped["bits_per_byte_by_step"]) == 4 + 2  # T, then T+1 and T+2
    assert set(looped["saved_within_1_percent"]) == {"q", "hidden", "kl"}
    assert summary[("tokens", "nanogpt")]["layers"] == 4 and summary[("tokens", "dense_compute")]["layers"] == 4
    # Equal tokens: every headline model saw the same number; equal wall clock: the budget is the looped run's time.
    assert {summary[("tokens", name)]["tokens"] for name in study.HEADLINE} == {looped["tokens"]}
    assert summary[("wall_clock", "looped")]["seconds"] == looped["seconds"]
    assert summary[("tokens", "stage2")]["tokens"] > looped["tokens"]
    run = next(row for row in saved["runs"] if row["variant"] == "looped")
    assert run["bits_per_byte"] == pytest.approx(run["loss"] / 0.6931471805599453
                                                 * saved["corpus"]["bpe"]["eval_tokens"]
                                                 / saved["corpus"]["bpe"]["eval_bytes"])
    assert saved["host"]["cpu"] and saved["host"]["matmul_gflop_s"] > 0
    for name in ("bits_per_byte_by_step.png", "compute_quality.png", "budgets.png"):
        assert (tmp_path / "study" / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "equal wall-clock budget" in printed and "looped" in printed


def test_seeds_run_apart_combine_into_one_summary(corpus, tmp_path, capsys, monkeypatch):
    study = load_study(monkeypatch)
    common = ["--smoke", "--tokenizers", "byte", "--seeds", "1", "--variants", "looped,dense_params",
              "--corpus", str(corpus)]
    for seed in (0, 1):
        study.main([*common, "--first-seed", str(seed), "--out", str(tmp_path / f"seed{seed}")])
    combined = study.main(["--combine", str(tmp_path / "seed0"), str(tmp_path / "seed1"),
                           "--out", str(tmp_path / "both")])
    looped = next(entry for entry in combined["summary"] if (entry["arm"], entry["variant"]) == ("tokens", "looped"))
    assert looped["seeds"] == [0, 1] and looped["bits_per_byte_std"] is not None
    runs = [row for row in combined["runs"] if (row["arm"], row["variant"]) == ("tokens", "looped")]
    assert looped["bits_per_byte"] == pytest.approx(sum(row["bits_per_byte"] for row in runs) / 2)
    assert "looped" in (tmp_path / "both" / "results.md").read_text()
    assert (tmp_path / "both" / "budgets.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="same tokenizer, budget, model and seed twice"):
        study.main(["--combine", str(tmp_path / "seed0"), str(tmp_path / "seed0"), "--out", str(tmp_path / "x")])


def test_entropy_beta_sets_stage_ones_weight(monkeypatch):
    """--entropy-beta reaches the looped models' Stage I (the study's 0.05 unless given)."""
    study = load_study(monkeypatch)
    looped = study.study_variants(1, 4)["looped"]
    for argv, beta in (([], 0.05), (["--entropy-beta", "0.1"], 0.1)):
        args = study.parse_args(argv)
        assert study.run_config(looped, args, Path("shards"), 259, 10, 0).train.entropy_beta == beta

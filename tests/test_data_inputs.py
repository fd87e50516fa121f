"""Data quick-starts: .parquet and .jsonl with a chosen text field, mixed directories, and hf: datasets
(local save_to_disk directories and the local datasets cache), all on tiny local fixtures, offline."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from looplm.cli import main
from looplm.config import DataConfig
from looplm.data.documents import read_documents
from looplm.data.hub import HubSpec
from looplm.data.prepare import prepared_shards
from looplm.data.shards import TokenShards, read_meta
from looplm.data.source import open_training_data
from looplm.errors import LoopLMError

pytest.importorskip("pyarrow")
import pyarrow.parquet  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def write_parquet(path, **columns):
    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    return path


def all_tokens_text(directory) -> str:
    from looplm.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(directory)
    tokens = [*TokenShards(directory).tokens.tolist(), *TokenShards(directory, "val").tokens.tolist()]
    return tokenizer.decode(tokens)


def test_parquet_rows_are_documents_of_the_chosen_column(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", body=["first row", "second row"], id=[1, 2])
    assert list(read_documents(path, text_field="body")) == ["first row", "second row"]


def test_a_directory_mixes_txt_jsonl_and_parquet_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "from jsonl"}) + "\n")
    (tmp_path / "a.txt").write_text("from txt")
    write_parquet(tmp_path / "c.parquet", content=["from parquet"])
    (tmp_path / "notes.csv").write_text("ignored")
    assert list(read_documents(tmp_path, text_field="content")) == ["from txt", "from jsonl", "from parquet"]


@pytest.mark.parametrize(("columns", "fragment"), [
    ({"body": ["x"]}, "has no column 'text' (it has body)"),
    ({"text": [1, 2]}, "row 1 of"),
    ({"text": ["ok", None]}, "row 2 of"),
    ({"text": pyarrow.array([], pyarrow.string())}, "is empty"),
])
def test_bad_parquet_files_are_one_line(tmp_path, columns, fragment):
    path = write_parquet(tmp_path / "bad.parquet", **columns)
    with pytest.raises(LoopLMError) as error:
        list(read_documents(path))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_damaged_parquet_file_is_one_line(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LoopLMError, match="not a readable parquet file"):
        list(read_documents(tmp_path / "broken.parquet"))


def test_prepare_reads_parquet_and_jsonl_with_a_text_field(tmp_path, capsys):
    write_parquet(tmp_path / "one.parquet", content=["parquet document " * 20] * 3)
    (tmp_path / "two.jsonl").write_text(json.dumps({"content": "jsonl document " * 20}) + "\n")
    assert main(["prepare", str(tmp_path / "one.parquet"), str(tmp_path / "two.jsonl"), "--text-field", "content",
                 "--out", str(tmp_path / "shards")]) == 0
    text = all_tokens_text(tmp_path / "shards")
    assert "parquet document" in text and "jsonl document" in text
    assert read_meta(tmp_path / "shards")["provenance"]["source"]["text_field"] == "content"
    # The old option name still works.
    assert main(["prepare", str(tmp_path / "two.jsonl"), "--jsonl-field", "content", "--out",
                 str(tmp_path / "old-option")]) == 0


def test_train_data_reads_parquet_with_data_text_field(tmp_path):
    write_parquet(tmp_path / "train.parquet", story=[f"story number {index} " * 10 for index in range(30)])
    opened = open_training_data(DataConfig(path=str(tmp_path / "train.parquet"), text_field="story"), 2, 8, 1,
                                tmp_path / "run")
    assert opened.tokenizer.decode(opened.validation[0][0][0].tolist()) == "story nu"


def test_hub_spec_parsing():
    assert HubSpec.parse("hf:owner/name") == HubSpec("owner/name", None, "train")
    assert HubSpec.parse("hf:owner/name:test") == HubSpec("owner/name", None, "test")
    assert HubSpec.parse("hf:wikitext:wikitext-2-raw-v1:validation") == HubSpec("wikitext", "wikitext-2-raw-v1",
                                                                                "validation")
    assert HubSpec.parse("hf:name:train[:10%]") == HubSpec("name", None, "train[:10%]")
    for bad in ("hf:", "hf::train", "hf:a:b:c:d", "hf:name:"):
        with pytest.raises(LoopLMError, match="is not a dataset name"):
            HubSpec.parse(bad)


def test_hf_reads_a_saved_dataset_and_a_split_of_a_saved_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_dict({"text": ["alpha", "beta"]})
    single.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": single, "test": datasets.Dataset.from_dict({"text": ["gamma"]})}).save_to_disk(
        str(tmp_path / "dict"))
    assert list(read_documents(f"hf:{tmp_path / 'single'}")) == ["alpha", "beta"]
    assert list(read_documents(f"hf:{tmp_path / 'dict'}:test")) == ["gamma"]
    with pytest.raises(LoopLMError, match="has no split 'valid'"):
        list(read_documents(f"hf:{tmp_path / 'dict'}:valid"))
    with pytest.raises(LoopLMError, match="has no column 'body'"):
        list(read_documents(f"hf:{tmp_path / 'single'}", text_field="body"))


def test_hf_data_is_fingerprinted_so_a_changed_dataset_is_tokenized_again(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": ["first version " * 30] * 3}).save_to_disk(saved)
    first = prepared_shards(f"hf:{saved}", tmp_path / "root")
    assert prepared_shards(f"hf:{saved}", tmp_path / "root") == first
    datasets.Dataset.from_dict({"text": ["second version " * 30] * 3}).save_to_disk(str(tmp_path / "next"))
    os.replace(saved, tmp_path / "old")
    os.replace(tmp_path / "next", saved)
    second = prepared_shards(f"hf:{saved}", tmp_path / "root")
    assert second != first and "second version" in all_tokens_text(second)


def run_python(code: str, cwd, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=300)


def test_hf_name_loads_from_the_local_datasets_cache_while_offline(tmp_path):
    pytest.importorskip("datasets")
    source = tmp_path / "tinytext"
    (source / "data").mkdir(parents=True)
    write_parquet(source / "data" / "train-00000-of-00001.parquet", content=["cached document " * 20] * 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home"), "LOOPLM_CACHE": str(tmp_path / "looplm-cache")}
    # Loading the directory once puts the dataset into the cache under its name, as a download would;
    # then the name alone finds it there (the working directory holds no such directory).
    result = run_python(f"""
        import sys
        import datasets
        from looplm.cli import main
        datasets.load_dataset({str(source)!r}, split="train")
        sys.exit(main(["prepare", "hf:tinytext:train", "--text-field", "content", "--out", {str(tmp_path / 'out')!r}]))
        """, elsewhere, env)
    assert result.returncode == 0, result.stderr
    assert "cached document" in all_tokens_text(tmp_path / "out")


def test_hf_offline_without_the_dataset_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "looplm", "prepare", "hf:nobody/no-such-dataset", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env={**os.environ, **env},
                            timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("looplm: error:"), result.stderr
    assert "not in the local Hugging Face cache" in lines[0] and "offline" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_data_extra_is_one_line_naming_the_install(tmp_path, monkeypatch):
    import importlib

    from looplm.data import rows

    real_import = importlib.import_module

    def without_extra(name, *args):
        if name.split(".")[0] in ("datasets", "pyarrow"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(rows.importlib, "import_module", without_extra)
    path = write_parquet(tmp_path / "rows.parquet", text=["a"])
    for source in (path, "hf:owner/name"):
        with pytest.raises(LoopLMError, match=r"needs (pyarrow|datasets): pip install 'looplm\[data\]'"):
            list(read_documents(source))

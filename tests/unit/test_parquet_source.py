"""data.source: a hub download of GSM8K (parquet files, one folder per configuration) read like a jsonl folder.

The folders are built in tmp from a few real rows of ../shared/gsm8k, in the layout that
`hf download openai/gsm8k --repo-type dataset --local-dir DIR` leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tune_llama.data import load_splits, load_test
from tune_llama.errors import SpecError, UserError
from tune_llama.spec import DataSpec


def real_rows(gsm8k_dir: Path, split: str, count: int) -> list[dict[str, str]]:
    with (gsm8k_dir / f"{split}.jsonl").open() as f:
        return [json.loads(next(f)) for _ in range(count)]


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub_download(tmp_path, gsm8k_dir) -> Path:
    """DIR/main/{train,test}-00000-of-00001.parquet, and socratic/ with its train split in two shards."""
    root = tmp_path / "gsm8k"
    train, test = real_rows(gsm8k_dir, "train", 12), real_rows(gsm8k_dir, "test", 5)
    write_parquet(root / "main" / "train-00000-of-00001.parquet", train)
    write_parquet(root / "main" / "test-00000-of-00001.parquet", test)
    # Socratic answers carry sub-questions; marked here so a test can tell which folder was read.
    socratic = [{**row, "answer": "How many? ** " + row["answer"]} for row in train]
    write_parquet(root / "socratic" / "train-00000-of-00002.parquet", socratic[:7])
    write_parquet(root / "socratic" / "train-00001-of-00002.parquet", socratic[7:])
    write_parquet(root / "socratic" / "test-00000-of-00001.parquet", test)
    (root / "README.md").write_text("the data set card\n")
    return root


def test_a_hub_download_folder_reads_the_main_configuration_rows_in_file_order(hub_download, gsm8k_dir):
    data = DataSpec(source=str(hub_download), val_size=0)
    assert load_splits(data).train == real_rows(gsm8k_dir, "train", 12)
    assert load_test(data) == real_rows(gsm8k_dir, "test", 5)


def test_data_config_picks_the_folder_and_every_shard_is_read_in_order(hub_download, gsm8k_dir):
    train = load_splits(DataSpec(source=str(hub_download), config="socratic", val_size=0)).train
    assert [row["question"] for row in train] == [row["question"] for row in real_rows(gsm8k_dir, "train", 12)]
    assert all(row["answer"].startswith("How many? ** ") for row in train)


def test_the_source_may_be_the_configuration_folder_itself(hub_download):
    inside = DataSpec(source=str(hub_download / "socratic"), config="socratic", val_size=0)
    above = DataSpec(source=str(hub_download), config="socratic", val_size=0)
    assert load_splits(inside).train == load_splits(above).train and len(load_test(inside)) == 5


def test_a_configuration_folder_other_than_data_config_is_a_spec_error_naming_both(hub_download):
    with pytest.raises(SpecError, match="^data.config: 'main', but data.source .*socratic") as err:
        load_splits(DataSpec(source=str(hub_download / "socratic"), val_size=0))
    assert "data.config: socratic" in str(err.value) and "\n" not in str(err.value)


def test_a_jsonl_file_wins_over_parquet_files_beside_it(hub_download, gsm8k_dir):
    rows = real_rows(gsm8k_dir, "train", 3)
    (hub_download / "main" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_splits(DataSpec(source=str(hub_download / "main"), val_size=0)).train == rows


def test_a_folder_with_neither_names_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here\n")
    with pytest.raises(UserError) as err:
        load_splits(DataSpec(source=str(tmp_path), val_size=0))
    message = str(err.value)
    assert message.startswith("data.source: found neither ") and "\n" not in message
    assert str(tmp_path / "train.jsonl") in message and str(tmp_path / "main" / "train-*.parquet") in message


def test_an_unknown_data_config_lists_the_configurations_the_download_has(hub_download):
    with pytest.raises(UserError, match=r"socratc/train-\*\.parquet.*data.config is one of: main, socratic$"):
        load_splits(DataSpec(source=str(hub_download), config="socratc", val_size=0))


def test_a_missing_test_split_is_an_error_only_when_the_test_split_is_read(hub_download):
    (hub_download / "main" / "test-00000-of-00001.parquet").unlink()
    data = DataSpec(source=str(hub_download), val_size=2)
    splits = load_splits(data)
    assert len(splits.train) == 10
    with pytest.raises(UserError, match=r"^data.source: found neither .*main/test-\*\.parquet"):
        splits.test


def test_a_parquet_file_without_the_gsm8k_columns_names_the_file_and_its_columns(tmp_path):
    write_parquet(tmp_path / "main" / "train-00000-of-00001.parquet", [{"question": "q", "solution": "s"}])
    with pytest.raises(UserError, match=r"train-00000-of-00001.parquet: no column answer \(has question, solution\)$"):
        load_splits(DataSpec(source=str(tmp_path), val_size=0))


def test_a_file_that_is_not_parquet_is_a_one_line_user_error_naming_it(tmp_path):
    broken = tmp_path / "main" / "train-00000-of-00001.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"<html>rate limited</html>")  # what a failed download can leave behind
    with pytest.raises(UserError, match=f"^data.source: {broken}: not a readable parquet file") as err:
        load_splits(DataSpec(source=str(tmp_path), val_size=0))
    assert "\n" not in str(err.value)


def test_without_pyarrow_a_hub_download_is_one_line_saying_to_install_it(hub_download, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import raise ImportError
    with pytest.raises(UserError, match=r"^data.source: reading .*train-00000-of-00001.parquet needs pyarrow: "
                                        r"pip install pyarrow$"):
        load_splits(DataSpec(source=str(hub_download), val_size=0))


def test_the_command_line_exits_2_with_one_line_for_a_folder_with_neither(tmp_path, repo_root):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{name: 'random:tiny'}}\ndata: {{source: '{tmp_path / 'empty'}'}}\n")
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "tune_llama.data", "stats", str(spec)], cwd=repo_root,
                            env=os.environ, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: data.source: found neither ")


def test_data_stats_counts_the_test_split_of_a_hub_download(hub_download, tmp_path, capsys):
    from tune_llama.__main__ import run_command
    spec = tmp_path / "hub.yaml"
    spec.write_text(f"model: {{name: 'random:tiny'}}\ndata: {{source: '{hub_download}', val_size: 2}}\n")
    with pytest.raises(SystemExit) as exit_:
        run_command("data", ["stats", str(spec), "--json"])
    assert exit_.value.code == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"] == {"problems": 5}

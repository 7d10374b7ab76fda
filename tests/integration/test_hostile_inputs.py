"""Issue 15, item 5 and 6 (part): bad numbers and empty inputs end in one clear line and a non-zero exit,
before any work, never in a traceback or a silent success."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tledge.cli import main
from tests.conftest import FASHION


@pytest.mark.parametrize("args, match", [
    (["--epochs", "0"], "--epochs 0 is not a positive count"),
    (["--batch-size", "0"], "--batch-size 0 is not a positive count"),
    (["--patience", "-1"], "--patience -1 is not a positive count"),
    (["--lr", "0"], "--lr 0.0 is not a positive learning rate"),
])
def test_tune_refuses_bad_numbers_before_any_work(tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["tune", str(FASHION), "--out", str(out), *args])
    assert r.exit_code != 0 and match in r.output and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("batch", ["0", "-4", "1,0"])
def test_bench_refuses_batch_sizes_below_one(tmp_path: Path, batch: str) -> None:
    r = CliRunner().invoke(main, ["bench", str(tmp_path), "--batch", batch])
    assert r.exit_code != 0 and "every batch size must be 1 or more" in r.output and "Traceback" not in r.output


def test_predict_on_a_folder_without_images_is_an_error(default_run_64: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    r = CliRunner().invoke(main, ["predict", str(default_run_64), str(empty)])
    assert r.exit_code != 0 and f"no images in {empty}" in r.output and "Traceback" not in r.output

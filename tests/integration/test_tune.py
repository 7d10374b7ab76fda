"""`tledge tune` end to end on real images: run directory, model card, cache reuse, predict, resume."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tledge import card as card_mod
from tledge.cli import main
from tledge.model import load_classifier
from tledge.tune import TuneConfig, run_tune
from tests.conftest import tledge_env

FAST = dict(backbone="mobilenet_v2", image_size=64, epochs=30, patience=30, workers=0)


def test_tune_end_to_end_writes_a_complete_run(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    card = run_tune(tiny_data, out, TuneConfig(**FAST))
    for f in ("checkpoint.safetensors", "model_card.json", "metrics.csv", "training_curve.png"):
        assert (out / f).is_file(), f
    assert not (out / ".resume").exists()
    assert card["classes"] == sorted(p.name for p in (tiny_data / "train").iterdir())
    assert card["backbone"]["weights"]["sha256"].startswith("b0353104")
    assert card["preprocess"]["crop"] == 64
    val = card["metrics"]["val"]
    assert val["n"] == 12 and len(val["confusion_matrix"]) == 3
    assert sum(map(sum, val["confusion_matrix"])) == 12
    # the merged checkpoint reproduces the reported accuracy through the full network
    model = load_classifier(out)
    pre = card_mod.preprocess_of(card)
    files = sorted((tiny_data / "val").rglob("*.png"))
    x = torch.from_numpy(np.stack([pre(f) for f in files]))
    y = np.array([card["classes"].index(f.parent.name) for f in files])
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(val["top1"])
    assert acc > 1 / 3  # real ImageNet features separate these classes far above chance
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "phase,epoch,train_loss,val_loss,val_acc,lr" and len(lines) == 31


def test_second_tune_reuses_feature_cache(tiny_data: Path, tmp_path: Path) -> None:
    a = run_tune(tiny_data, tmp_path / "a", TuneConfig(**FAST))
    b = run_tune(tiny_data, tmp_path / "b", TuneConfig(**FAST))
    assert a["feature_cache"]["computed"] == 48 and a["feature_cache"]["cached"] == 0
    assert b["feature_cache"]["computed"] == 0 and b["feature_cache"]["cached"] == 48
    assert b["metrics"]["val"]["top1"] == a["metrics"]["val"]["top1"]
    # another input size is another key: nothing reused
    c = run_tune(tiny_data, tmp_path / "c", TuneConfig(**{**FAST, "image_size": 72}))
    assert c["feature_cache"]["cached"] == 0


def test_finished_run_is_not_overwritten_without_flag(tiny_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["tune", str(tiny_data), "--out", str(tmp_path / "r"), "--image-size", "64", "--epochs", "3",
            "--workers", "0"]
    assert runner.invoke(main, args).exit_code == 0
    r = runner.invoke(main, args)
    assert r.exit_code != 0 and "already holds a finished run" in r.output and "--overwrite" in r.output
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_cli_errors_are_one_clear_line(tiny_data: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["tune", str(tiny_data), "--out", str(tmp_path / "r"), "--backbone", "resnet5"])
    assert r.exit_code == 2 and "did you mean resnet50" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["tune", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and str(tmp_path / "nothing") in r.output


def test_weights_none_is_said_loudly(tiny_data: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tledge", "tune", str(tiny_data), "--out", str(tmp_path / "r"),
                        "--weights", "none", "--image-size", "64", "--epochs", "2", "--workers", "0"],
                       capture_output=True, text=True, env=tledge_env())
    assert r.returncode == 0, r.stderr
    assert "RANDOMLY INITIALISED" in r.stderr
    assert json.loads((tmp_path / "r" / "model_card.json").read_text())["backbone"]["weights"]["source"] == "none"


def test_predict_prints_top_k(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_tune(tiny_data, out, TuneConfig(**FAST))
    img = sorted((tiny_data / "val").rglob("*.png"))[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    r = CliRunner().invoke(main, ["predict", str(out), str(img), str(bad), "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(rows[0]["top"]) == 2 and rows[0]["top"][0]["prob"] >= rows[0]["top"][1]["prob"]
    assert "not-an-image" in rows[1]["error"]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tiny_data: Path, tmp_path: Path) -> None:
    """Interrupt a fine-tuning run (SIGINT) after an epoch checkpoint; --resume finishes it, and the result
    equals an uninterrupted run with the same seed."""
    args = [str(tiny_data), "--image-size", "64", "--epochs", "10", "--unfreeze", "1", "--ft-epochs", "8",
            "--workers", "0"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "tledge", "tune", *args, "--out", str(ref)], check=True,
                   env=tledge_env(), capture_output=True)
    out = tmp_path / "run"
    # SIGINT after fine-tune epoch 3's checkpoint, sent by the run itself (TLEDGE_INTERRUPT_AT): polling
    # for the checkpoint from here raced a run that finished its 8 epochs first
    # SIGINT's default action restored in the child: a test run in the background (`make test &`, nohup)
    # inherits SIGINT ignored, and Python then installs no Ctrl-C handler
    proc = subprocess.run([sys.executable, "-m", "tledge", "tune", *args, "--out", str(out)],
                          env={**tledge_env(), "TLEDGE_INTERRUPT_AT": "finetune:2"}, capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "--resume" in proc.stderr
    assert not (out / "model_card.json").exists(), "an interrupted run must not look finished"
    state_file = out / ".resume" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["phase"] == "finetune" and state["epoch"] == 2  # epochs 4-8 are left to resume
    r = subprocess.run([sys.executable, "-m", "tledge", "tune", *args, "--out", str(out), "--resume"],
                       env=tledge_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming fine-tuning" in r.stderr
    a, b = load_file(str(ref / "checkpoint.safetensors")), load_file(str(out / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ca, cb = card_mod.read(ref), card_mod.read(out)
    assert ca["metrics"]["val"]["top1"] == cb["metrics"]["val"]["top1"]
    assert len(ca["training"]["finetune"]) and cb["training"]["finetune"]["stages"] == ca["training"]["finetune"]["stages"]

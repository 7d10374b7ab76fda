"""Issue 14: quantization-aware fine-tuning (`tledge export --int8 --qat`) on the real 64 px mobilenet_v2 run:
the torch fake-quant network is the Q/DQ graph, the exported graph is what torch trained, QAT brings the INT8
logits closer to FP32, it needs --int8, --qat auto runs it from the gate, and a killed QAT export restarts
cleanly."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tledge import card as card_mod
from tledge.data import scan
from tledge.errors import AccuracyError, UsageError
from tledge.export import ort
from tledge.export.artefacts import FILES, qat_file
from tledge.export.int8.passes.qat import build, node_check, weight_fake_quant
from tledge.export.int8.quantize import centred_offsets, weight_axis
from tledge.export.pipeline import run_export
from tests.conftest import FASHION, copy_run, export_cfg, tledge_env

FORMS = ("tensorrt", "cpu")
# ids without the word "tensorrt": conftest skips tests carrying that keyword where TensorRT is absent, and these
# run the TensorRT-form graph in onnxruntime
FORM_IDS = ["trt-form", "cpu-form"]


@pytest.fixture(scope="module")
def ptq_run(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("ptq") / "run")
    run_export(run, export_cfg())
    return run


@pytest.fixture(scope="module")
def qat_run(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("qat") / "run")
    run_export(run, export_cfg(qat="on", qat_steps=40))
    return run


@pytest.fixture(scope="module")
def qat_learned_run(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """QAT with learned activation scales (not the default since 2026-12-02): graphs whose scales are not the
    calibrated ones."""
    run = copy_run(default_run_64, tmp_path_factory.mktemp("qat_learned") / "run")
    run_export(run, export_cfg(qat="on", qat_steps=40, qat_scales="learned"))
    return run


@pytest.fixture(scope="module")
def val_x(default_run_64: Path) -> np.ndarray:
    pre = card_mod.preprocess_of(card_mod.read(default_run_64))
    return np.stack([pre(s.path) for s in scan(FASHION).val[:400]])


def _reference(q: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime with graph optimisations off: the Q/DQ graph's own semantics (the optimised CPU session
    fuses Q/DQ into integer kernels whose requantization rounds differently again)."""
    return ort.logits(q, _batches(x), optimize=False)


def _batches(x: np.ndarray) -> list[np.ndarray]:
    return [x[i:i + 100] for i in range(0, len(x), 100)]


def _torch(q: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    net = build(q)
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(b)).numpy() for b in _batches(x)])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_the_fake_quant_network_computes_the_qdq_graph(ptq_run: Path, val_x: np.ndarray, form: str) -> None:
    """The torch network built from the Q/DQ graph computes that graph: as close to onnxruntime's reference
    execution as onnxruntime's own optimised (integer-kernel) execution is. Exact equality is not possible:
    a float sum in another order moves a value across a rounding boundary now and then, and the INT8 network
    carries the one-step change on (measured at 64 px on 1,000 val images, quantizers with ONNX's division:
    torch against the reference 99.2% / 99.2% top-1 agreement for the two forms, the reference against
    onnxruntime's optimised session 97.8% / 99.5%; after QAT 99.3% / 99.8% and 97.9% / 99.7%)."""
    q = onnx.load(str(ptq_run / FILES[f"int8-{form}"]))
    z, r = _torch(q, val_x), _reference(q, val_x)
    opt = ort.logits(q, _batches(val_x))
    assert _agreement(z, r) >= min(0.98, _agreement(opt, r) - 0.005), (_agreement(z, r), _agreement(opt, r))
    _flips_within_runtime_noise(z, r, opt)


def _flips_within_runtime_noise(z: np.ndarray, r: np.ndarray, opt: np.ndarray) -> None:
    """Torch's logits ``z`` differ from onnxruntime's reference ``r`` by one-step flips only: on average no more
    than onnxruntime's own optimised session ``opt`` differs from ``r`` on the same graph, and never by a logit.
    Measured at 64 px on 400 val images, TensorRT form: torch 0.031 / 0.048 / 0.050 mean against onnxruntime's own
    0.098 / 0.090 / 0.073 (--centre off / exact / padded: a centred quantizer has twice the levels, so twice the
    rounding boundaries a float-order difference can cross); INT8 against FP32 differs ~5x more."""
    mean, worst, own = float(np.abs(z - r).mean()), float(np.abs(z - r).max()), float(np.abs(opt - r).mean())
    assert mean <= max(own, 0.03) and worst < 1.0, (mean, worst, own)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_node_by_node_the_fake_quant_network_is_the_qdq_graph(ptq_run: Path, qat_run: Path, qat_learned_run: Path,
                                                              val_x: np.ndarray, form: str) -> None:
    """Each node fed onnxruntime's own inputs gives onnxruntime's quantized output (measured at 64 px on 32 val
    images: 0 of 18 million values differ in either form, before or after QAT; a float sum in another order may
    still flip one at a near-tie now and then, hence the allowance). End to end the same two executions disagree
    on ~1-3% of top-1, as onnxruntime's own optimised and reference sessions do: each flip is carried on and
    grows."""
    x = val_x[:32]
    for run in (ptq_run, qat_run, qat_learned_run):  # calibrated scales (QAT's default keeps them), learned ones
        q = onnx.load(str(run / FILES[f"int8-{form}"]))
        r = node_check(q, x)
        assert r["elements"] > 10_000_000  # every activation quantizer of the network was compared
        assert r["differing"] <= 1e-6 * r["elements"] and r["max_steps"] <= 1, r
    # the check can fail: one quantizer's scale 1% off in the torch network is seen at once
    net = build(q)
    key = next(k for k, n in net.steps if n.op_type == "QuantizeLinear" and n.input[0] != q.graph.input[0].name)
    with torch.no_grad():
        net.s[key].mul_(1.01)
    bad = node_check(q, x, net)
    assert bad["differing"] > 100 * max(1, r["differing"]) and bad["worst"][0] == net.steps[
        [k for k, _ in net.steps].index(key)][1].name, bad


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_the_exported_graph_is_what_torch_trained(qat_run: Path, val_x: np.ndarray, form: str) -> None:
    from safetensors.numpy import load_file
    m = json.loads((qat_run / "export_manifest.json").read_text())
    assert m["int8"]["qat"][form]["file"] == qat_file(form)
    trained = load_file(str(qat_run / qat_file(form)))
    q = onnx.load(str(qat_run / FILES[f"int8-{form}"]))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    checked = 0
    for n in q.graph.node:
        if n.op_type not in ("Conv", "Gemm") or n.input[1] not in producer:
            continue
        dq = producer[n.input[1]]
        wq, ws = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
        base = dq.input[0][: -len(f"__{n.name}__q")]           # the float weight's initializer name
        w = torch.from_numpy(trained[base])
        axis = weight_axis(n)
        want = weight_fake_quant(w, axis).numpy()
        shape = [1] * wq.ndim
        shape[axis] = -1
        np.testing.assert_allclose(wq * ws.reshape(shape), want, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked >= 50  # every conv and the head
    # the TensorRT form was trained and exported centred (--centre exact, the default): passes.qat.uncentre wrote
    # the trained biases back as the float graph's, and the export's centring gives back the trained graph
    assert (len(centred_offsets(q)) > 0) == (form == "tensorrt")
    z, r = _torch(q, val_x), _reference(q, val_x)
    assert _agreement(z, r) >= 0.98
    _flips_within_runtime_noise(z, r, ort.logits(q, _batches(val_x)))


def test_qat_brings_the_int8_logits_closer_to_fp32(ptq_run: Path, qat_run: Path, val_x: np.ndarray) -> None:
    m = json.loads((qat_run / "export_manifest.json").read_text())
    fp32 = _reference(onnx.load(str(qat_run / FILES["fp32"])), val_x)
    for form in FORMS:
        rec = m["int8"]["forms"][form]["qat"]
        hist = rec["details"]["history"]
        best = min(h["held_out_kl"] for h in hist)
        assert best < hist[0]["held_out_kl"]  # held-out training images, as the pass measured (issue 14's test)
        # and on val images no step trained on: no worse than PTQ by more than noise. Lower, as it was for the
        # TensorRT form before centring, is no longer what 40 steps at 64 px give: since the refit lost its dropout
        # (3b4448d) the CPU form's PTQ start, and since centring the TensorRT form's, is close enough that the steps
        # lowered held-out KL but not val MSE (CPU 0.05775 -> 0.05788; TensorRT 0.06718 -> 0.06748). A QAT that
        # exported other weights than it trained (e.g. centred biases written back as the float graph's) is far
        # worse than 5%.
        z = {name: ort.logits(onnx.load(str(run / FILES[f"int8-{form}"])), _batches(val_x))
             for name, run in (("ptq", ptq_run), ("qat", qat_run))}
        mse = {name: float(((v - fp32) ** 2).mean()) for name, v in z.items()}
        assert mse["qat"] < 1.05 * mse["ptq"], (form, mse)


def test_qat_needs_int8(tmp_path: Path, ptq_run: Path) -> None:
    with pytest.raises(UsageError, match="no INT8 export was asked for"):
        dataclasses.replace(export_cfg(qat="on"), int8=False).validate()
    r = subprocess.run([sys.executable, "-m", "tledge", "export", str(ptq_run), "--fp16", "--qat"], env=tledge_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "add --int8" in r.stderr, r.stderr


def test_bad_qat_values_are_refused() -> None:
    with pytest.raises(UsageError, match="--qat-mix -0.5 is not a mixup alpha"):
        export_cfg(qat="on", qat_mix=-0.5).validate()
    export_cfg(qat="on", qat_mix=0.0).validate()  # 0: no mixup, allowed
    with pytest.raises(UsageError, match="--qat-ema 1.0 is not a moving-average decay"):
        export_cfg(qat="on", qat_ema=1.0).validate()
    with pytest.raises(UsageError, match="--qat-seed -1 is not a seed"):
        export_cfg(qat="on", qat_seed=-1).validate()


def test_qat_auto_runs_from_the_gate_before_any_fallback(default_run_64: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(default_run_64, tmp_path / "run")
    # the CPU form's PTQ drop at 64 px is 0.30 pt: --max-drop 0 misses it, so the gate runs QAT first
    cfg = export_cfg(max_drop=0.0, fallback=False, forms=("cpu",), qat="auto", qat_steps=6, qat_augment=True)
    try:
        m = run_export(run, cfg)
        assert "rescue" in m["int8"]["gate"]["cpu"] and m["int8"]["gate"]["cpu"]["final"]["drop_points"] <= 0
    except AccuracyError as e:  # still missed after QAT: --no-fallback then refuses, as it says
        assert "--no-fallback" in e.what
    err = capsys.readouterr().err
    assert "fine-tuning through the quantizers (--qat auto)" in err and "after QAT" in err
    assert "training images (shifted and flipped, mixup)" in " ".join(err.split())  # --qat-augment's path ran


def test_qat_that_finds_nothing_keeps_the_ptq_graph_and_says_so(default_run_64: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A learning rate that only makes things worse: early stopping keeps step 0, the record and a warning say
    that QAT kept the post-training graph (not "fine-tuned"), the INT8 graph is PTQ's byte for byte and no QAT
    weights are written."""
    ptq = copy_run(default_run_64, tmp_path / "ptq")
    run_export(ptq, export_cfg(forms=("tensorrt",)))
    run = copy_run(default_run_64, tmp_path / "run")
    m = run_export(run, export_cfg(forms=("tensorrt",), qat="on", qat_steps=10, qat_lr=1.0))
    rec = m["int8"]["forms"]["tensorrt"]["qat"]
    # checks every step (10 steps); the 2 warm-up checks do not count, then --qat-patience 5 checks: stopped at 7
    assert rec["details"]["best_step"] == 0 and rec["details"]["steps_run"] == 2 + 5 and rec["details"]["patience"] == 5
    assert rec["decision"].startswith("no step lowered the held-out KL") and "PTQ start kept" in rec["decision"]
    assert "warning: INT8 tensorrt: QAT no step lowered" in " ".join(capsys.readouterr().err.split())
    assert (run / FILES["int8-tensorrt"]).read_bytes() == (ptq / FILES["int8-tensorrt"]).read_bytes()
    assert "tensorrt" not in m["int8"].get("qat", {}) and not (run / qat_file("tensorrt")).exists()


def test_a_killed_qat_export_restarts_cleanly(ptq_run: Path, tmp_path: Path) -> None:
    run = copy_run(ptq_run, tmp_path / "run")
    before = (run / "export_manifest.json").read_bytes()
    args = [sys.executable, "-m", "tledge", "export", str(run), "--int8", "--qat", "--qat-steps", "12", "--qat-ema", "0.9",
            "--qat-seed", "3",
            "--escalate", "off", "--max-drop", "100", "--threads", "2"]
    r = subprocess.run(args, env={**tledge_env(), "TLEDGE_KILL_AT": "qat:4"}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert (run / "export_manifest.json").read_bytes() == before  # the previous export is whole
    assert not (run / "qat").exists()
    r = subprocess.run(args, env=tledge_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "export_manifest.json").read_text())
    assert set(m["int8"]["qat"]) == set(FORMS) and not (run / ".export-staging").exists()
    assert all(f in m["files"] for f in (qat_file("tensorrt"), qat_file("cpu")))
    assert all(m["int8"]["forms"][f]["qat"]["details"]["ema"] == 0.9 for f in FORMS)  # --qat-ema's path ran
    assert all(m["int8"]["forms"][f]["qat"]["details"]["seed"] == 3 for f in FORMS)

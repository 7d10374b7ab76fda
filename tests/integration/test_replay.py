"""`tledge export RUN --int8 --replay MANIFEST`: the decisions of an earlier export, taken instead of made (the same
choices on another CPU, whose last float bits differ)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from tledge.cli import main
from tledge.errors import UsageError
from tledge.export.int8.quantize import activation_quantizers
from tledge.export.pipeline import run_export
from tledge.fsutil import read_json
from tests.conftest import copy_run, export_cfg

GRAPHS = ("model.int8.trt.onnx", "model.int8.cpu.onnx")
# every decision point exercised: the expensive recipe runs (learned rounding, small), empirical correction judged
OPTS = ["--escalate", "on", "--adaround-iters", "30", "--adaround-layers", "3", "--refit-count", "300",
        "--max-drop", "100", "--threads", "2"]


def _export(run: Path, *extra: str) -> dict:
    r = CliRunner().invoke(main, ["export", str(run), "--int8", *OPTS, *extra])
    assert r.exit_code == 0, r.output
    return read_json(run / "export_manifest.json")


def _sha(run: Path) -> dict[str, str]:
    return {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in GRAPHS}


@pytest.fixture(scope="module")
def recorded(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run exported once with every decision point on (read-only: copy before changing)."""
    run = copy_run(default_run_64, tmp_path_factory.mktemp("replay") / "recorded")
    _export(run)
    return run


@pytest.mark.slow
def test_a_replay_makes_the_recorded_decisions_and_the_same_graphs(recorded: Path, tmp_path: Path) -> None:
    """On the machine that made them, replaying the decisions gives the same graphs byte for byte, and no pass
    chose anything: each says it replayed."""
    run = copy_run(recorded, tmp_path / "run")
    m0 = read_json(recorded / "export_manifest.json")
    m = _export(run, "--replay", str(recorded / "export_manifest.json"))
    assert _sha(run) == _sha(recorded)
    assert m["int8"]["replay"]["source"] == str(recorded / "export_manifest.json")
    for form, rec in m["int8"]["forms"].items():
        old = m0["int8"]["forms"][form]
        assert [p["decision"] for p in rec["cheap"] + rec["expensive"]] == \
               [p["decision"] for p in old["cheap"] + old["expensive"]]
        assert rec["kept"] == old["kept"] and rec["check"]["escalate"] is True
        assert rec["centre"]["mode"] == old["centre"]["mode"]  # --centre auto's choice, replayed
        ran = [p for p in rec["cheap"] + rec["expensive"] if p["name"] in ("ranges", "learned_rounding")]
        assert ran and all(p["why"].startswith("replayed from") for p in ran)
        assert all(not p["scores"] for p in ran)  # nothing was scored
        assert m["int8"]["gate"][form]["replayed_from"]


@pytest.mark.slow
def test_a_replay_takes_its_decisions_from_the_manifest(recorded: Path, tmp_path: Path) -> None:
    """Other recorded decisions give other graphs: the replay follows the manifest, it does not decide. The
    TensorRT form is replayed with another range method, analytic correction, the cheap recipe and one quantizer
    kept in float."""
    m0 = read_json(recorded / "export_manifest.json")
    trt = m0["int8"]["forms"]["tensorrt"]
    method = next(x for x in ("minmax", "mse") if f"method {x}" != trt["cheap"][0]["decision"])
    trt["cheap"][0]["decision"] = f"method {method}"
    bc = next(p for p in trt["cheap"] if p["name"] == "bias_correction")
    bc["decision"] = "analytic"
    trt["kept"] = "cheap"
    q = onnx.load(str(recorded / GRAPHS[0]))
    tensor = sorted(n.input[0] for n in activation_quantizers(q))[3]
    m0["int8"]["gate"]["tensorrt"]["kept_float"] = [tensor]
    trt["centre"]["centred"] += 5  # as a tledge with other centring rules would have recorded
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(m0))

    run = copy_run(recorded, tmp_path / "run")
    r = CliRunner().invoke(main, ["export", str(run), "--int8", *OPTS, "--replay", str(doctored), "--form", "tensorrt"])
    assert r.exit_code == 0, r.output
    m = read_json(run / "export_manifest.json")
    # a centring that differs from the recorded one is said, not silent
    assert f"the replayed export centred {trt['centre']['centred']} activation quantizers" in r.output
    assert m["int8"]["forms"]["tensorrt"]["centre"]["centred"] == trt["centre"]["centred"] - 5
    rec = m["int8"]["forms"]["tensorrt"]
    assert rec["cheap"][0]["decision"] == f"method {method}" and rec["kept"] == "cheap"
    assert next(p for p in rec["cheap"] if p["name"] == "bias_correction")["decision"] == "analytic"
    assert m["int8"]["gate"]["tensorrt"]["kept_float"] == [tensor]
    g = onnx.load(str(run / GRAPHS[0]))
    assert tensor not in {n.input[0] for n in activation_quantizers(g)}
    assert not (run / GRAPHS[1]).exists()  # only the form asked for
    assert hashlib.sha256((run / GRAPHS[0]).read_bytes()).digest() != \
        hashlib.sha256((recorded / GRAPHS[0]).read_bytes()).digest()


def _manifest(recorded: Path, tmp_path: Path, **changes: object) -> Path:
    m = read_json(recorded / "export_manifest.json")
    for k, v in changes.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(m))
    return p


@pytest.mark.slow
@pytest.mark.parametrize("case, match", [
    ("another checkpoint", "exported from another checkpoint"),
    ("no int8", "records no INT8 export"),
    ("other options", r"calib\.method: 'auto' recorded, 'minmax' here"),
    ("qat", "QAT's early stopping is not replayed"),
    ("missing file", "no export manifest there"),
    ("not json", "not a readable export manifest"),
    ("no --int8", "no INT8 export was asked for"),
])
def test_a_replay_that_cannot_apply_is_refused_before_any_work(recorded: Path, tmp_path: Path, case: str,
                                                               match: str) -> None:
    run = copy_run(recorded, tmp_path / "run")
    src = recorded / "export_manifest.json"
    m0 = read_json(src)
    opts = {"escalate": "on", "adaround_iters": 30, "adaround_layers": 3, "refit_count": 300}
    calib = None
    if case == "another checkpoint":
        src = _manifest(recorded, tmp_path, checkpoint_sha256="0" * 64)
    elif case == "no int8":
        src = _manifest(recorded, tmp_path, int8=None)
    elif case == "other options":
        calib = {"method": "minmax"}
    elif case == "qat":
        opts["qat"] = "on"
    elif case == "missing file":
        src = tmp_path / "nowhere.json"
    elif case == "not json":
        src = tmp_path / "broken.json"
        src.write_text('{"int8": ')
    elif case == "no --int8":
        opts["int8"] = False
        opts["fp16"] = True
    cfg = export_cfg(calib=calib, replay=str(src), **opts)
    assert m0["config"]["calib"]["method"] == "auto"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(UsageError, match=match):
        run_export(run, cfg)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing written or replaced

"""tledge and `tledge --help` import no torch/onnx/tensorrt; every module imports without TensorRT."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import tledge


def test_import_and_help_load_no_heavy_packages() -> None:
    code = ("import sys; from click.testing import CliRunner; import tledge.cli as c; "
            "r = CliRunner().invoke(c.main, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'torchvision') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_module_imports_without_tensorrt() -> None:
    names = [m.name for m in pkgutil.walk_packages(tledge.__path__, "tledge.")]
    assert "tledge.tune" in names
    for name in names:
        importlib.import_module(name)
    assert "tensorrt" not in sys.modules or sys.modules["tensorrt"] is not None


def test_python_dash_m_tledge() -> None:
    out = subprocess.run([sys.executable, "-m", "tledge", "--version"], capture_output=True, text=True, check=True)
    assert tledge.__version__ in out.stdout

"""tledge.cli.run: once torch is loaded the command exits without the interpreter's teardown (1-2 s after the last
line); the exit status, the output and the atexit handlers must be exactly those of a normal exit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, sys
from pathlib import Path
{pre}
flag = Path(sys.argv[1])
atexit.register(lambda: flag.write_text("atexit ran"))
sys.argv = ["tledge", *sys.argv[2:]]
from tledge.cli import run
run()
"""


def _run(tmp_path: Path, args: list[str], pre: str = "import torch") -> tuple[subprocess.CompletedProcess, Path]:
    flag = tmp_path / "flag"
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(pre=pre), str(flag), *args], capture_output=True,
                       text=True, timeout=120)
    return p, flag


def test_success_keeps_status_output_and_atexit(tmp_path):
    p, flag = _run(tmp_path, ["backbones"])
    assert p.returncode == 0, p.stderr
    assert "mobilenet_v2" in p.stdout          # flushed before the process ended
    assert flag.read_text() == "atexit ran"


def test_error_keeps_its_status_and_message(tmp_path):
    p, flag = _run(tmp_path, ["export", str(tmp_path / "missing")])
    assert p.returncode != 0
    assert "does not exist" in p.stderr and "fix:" in p.stderr
    assert flag.read_text() == "atexit ran"


def test_usage_error_status_is_clicks(tmp_path):
    p, flag = _run(tmp_path, ["export", str(tmp_path), "--qat-steps", "0"])
    assert p.returncode == 2                  # click's usage error status, not 0 or 1
    assert "--qat-steps" in p.stderr
    assert flag.read_text() == "atexit ran"


def test_without_torch_the_normal_exit(tmp_path):
    p, flag = _run(tmp_path, ["--version"], pre="")
    assert p.returncode == 0 and "tledge" in p.stdout
    assert flag.read_text() == "atexit ran"


def test_python_dash_m_uses_run():
    src = (Path(__file__).resolve().parents[2] / "tledge" / "__main__.py").read_text()
    assert "run()" in src

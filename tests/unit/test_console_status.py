"""console.status: a step without a count says what it does (issue 12: no silent seconds at start-up)."""
from __future__ import annotations

from tledge import console


def test_status_off_a_terminal_is_one_note_and_runs_the_block(monkeypatch, capsys):
    monkeypatch.setenv("TLEDGE_PROGRESS", "0")
    ran = []
    with console.status("loading PyTorch"):
        ran.append(True)
    err = capsys.readouterr().err
    assert ran == [True]
    assert err.count("loading PyTorch") == 1


def test_status_on_a_terminal_spins_and_leaves_no_line(monkeypatch):
    import io

    from rich.console import Console
    buf = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buf, force_terminal=True, width=80))
    monkeypatch.setattr(console, "progress_enabled", lambda: True)
    with console.status("loading PyTorch"):
        pass
    out = buf.getvalue()
    assert "loading PyTorch" in out          # drawn while the block ran
    assert out.endswith("\x1b[1A\x1b[2K")   # and erased after it (cursor up, clear line): no stale spinner line

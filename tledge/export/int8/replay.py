"""``tledge export RUN --int8 --replay MANIFEST``: an INT8 export that takes every decision from an earlier
export's manifest instead of making it again.

Why: the export's budgets count images, layers and iterations, so one machine gives the same graph at any load
and thread count; but float arithmetic differs between CPUs (kernel widths and blocking decide the order of every
sum), and an INT8 network turns a last-bit difference into a one-step difference now and then. Decisions taken
by a threshold then flip: the same code, options and embedded default gave the CPU form's learned rounding "not
learned" on an Intel Xeon and 150 s of learning on an AMD EPYC (Zen 4) (docs/int8.md, 2026-12-02). A replay
makes the same choices as the export it replays: range method, bias correction and its depth, whether the
expensive recipe ran and which recipe was kept, learned rounding, the centring --centre auto kept, the
quantizers the gate kept in float. Only
the values are computed here (statistics, corrections, the refit head), so the graph is the recorded one up to
the machine's last bits. (Polygraphy replays TensorRT's tactic choices the same way: --save-tactics /
--load-tactics.) It is also faster: no candidate is scored.

Refused before any work: a manifest of another checkpoint, one without an INT8 export, decision-making options
that differ from the recorded ones (they would make other decisions), forms it does not record, and QAT (its
early stopping is not replayed yet).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tledge.errors import UsageError
from tledge.export import artefacts
from tledge.export.config import ExportConfig

# options that do not change a decision (or are checked another way)
NOT_COMPARED = {"quant": {"forms", "replay"}}
FIX = "export without --replay to decide anew"


@dataclass(frozen=True)
class FormDecisions:
    method: str                        # range rule
    bias: dict[str, str]               # stage -> "analytic" | "empirical" | "skipped"
    bias_layers: dict[str, int]        # stage -> layers corrected (empirical only)
    escalate: bool                     # whether the expensive recipe ran
    rounding: str                      # learned_rounding's decision: "not learned" | "nearest rounding" | ...
    kept: str                          # "cheap" | "expensive"
    kept_float: tuple[str, ...]        # activation quantizers the gate kept in float
    centred: int | None = None         # centred activation quantizers (None: a manifest from before --centre)
    centre_mode: str | None = None     # the kept recipe's centring, off | exact | padded (--centre auto's choice)


@dataclass(frozen=True)
class Replay:
    source: str
    forms: dict[str, FormDecisions]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "forms": {f: asdict(d) for f, d in self.forms.items()}}


def _form(rec: dict[str, Any], gate: dict[str, Any], where: str) -> FormDecisions:
    try:
        bias, layers = {}, {}
        method = None
        rounding = "skipped"
        for stage in ("cheap", "expensive"):
            passes = {r["name"]: r for r in rec.get(stage, [])}
            if "ranges" in passes and method is None:
                method = passes["ranges"]["decision"].removeprefix("method ").strip()
            if "bias_correction" in passes:
                b = passes["bias_correction"]
                kind = b["decision"]
                bias[stage] = kind
                if kind == "empirical":
                    layers[stage] = int(b["details"]["empirical"]["layers"])
            if "learned_rounding" in passes:
                rounding = passes["learned_rounding"]["decision"]
        if method is None:
            raise KeyError("ranges")
        if rec["kept"] not in ("cheap", "expensive") or (rec["kept"] == "expensive" and not rec["check"]["escalate"]):
            raise ValueError(f"kept recipe {rec['kept']!r} (escalated: {rec['check']['escalate']})")
        return FormDecisions(method=method, bias=bias, bias_layers=layers, escalate=bool(rec["check"]["escalate"]),
                             rounding=rounding, kept=rec["kept"], kept_float=tuple(gate.get("kept_float", ())),
                             centred=int(rec["centre"]["centred"]) if "centre" in rec else None,
                             centre_mode=str(rec["centre"]["mode"]) if "centre" in rec else None)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"--replay {where}: the manifest's INT8 record is incomplete ({e!r} missing or malformed).",
                         f"pass the export_manifest.json an INT8 export wrote, unedited, or {FIX}.") from e


# options that manifests written before them lack, and what those exports did
OLDER_DEFAULTS = {("quant", "centre"): "off"}


def load(path: str | Path, ckpt_sha: str, cfg: ExportConfig) -> Replay:
    """Read and check ``path`` (an export_manifest.json, or a run directory holding one) for replaying into an
    export of the checkpoint ``ckpt_sha`` with ``cfg``. Raises UsageError, naming the file and the fix."""
    p = Path(path)
    if p.is_dir():
        p = p / artefacts.MANIFEST
    if not p.is_file():
        raise UsageError(f"--replay {path}: no export manifest there.",
                         "pass the export_manifest.json of an INT8 export (or the run directory holding it).")
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--replay {p}: not a readable export manifest ({e}).",
                         f"pass the export_manifest.json an INT8 export wrote, unedited, or {FIX}.") from e
    i8 = m.get("int8") if isinstance(m, dict) else None
    if not isinstance(i8, dict) or not isinstance(i8.get("forms"), dict):
        raise UsageError(f"--replay {p}: the manifest records no INT8 export.",
                         "replay the manifest of an export made with --int8.")
    if m.get("checkpoint_sha256") != ckpt_sha:
        raise UsageError(f"--replay {p}: it was exported from another checkpoint (SHA-256 "
                         f"{str(m.get('checkpoint_sha256'))[:12]}..., this run's is {ckpt_sha[:12]}...).",
                         "replay the manifest of this run's own checkpoint (copy the run directory with it), or "
                         + FIX + ".")
    if cfg.quant.qat != "off":
        raise UsageError(f"--replay {p} with --qat {cfg.quant.qat}: QAT's early stopping is not replayed yet.",
                         "replay a post-training export (no --qat), or " + FIX + ".")
    recorded = m.get("config", {})
    current = cfg.to_dict()
    diffs = []
    for section in ("calib", "quant", "gate"):
        for k, v in current[section].items():
            if k in NOT_COMPARED.get(section, set()):
                continue
            r = recorded.get(section, {}).get(k, OLDER_DEFAULTS.get((section, k)))
            if (list(r) if isinstance(r, (list, tuple)) else r) != (list(v) if isinstance(v, (list, tuple)) else v):
                diffs.append(f"{section}.{k}: {r!r} recorded, {v!r} here")
    if diffs:
        raise UsageError(f"--replay {p}: these options differ from the export it records, so its decisions would "
                         f"not be theirs: {'; '.join(diffs)}.",
                         "pass the recorded options (the manifest's `config`), or " + FIX + ".")
    missing = [f for f in cfg.quant.forms if f not in i8["forms"]]
    if missing:
        raise UsageError(f"--replay {p}: it records no {', '.join(missing)} form.",
                         f"ask for the forms it records (--form {' --form '.join(i8['forms'])}), or {FIX}.")
    gate = i8.get("gate", {})
    return Replay(str(p), {f: _form(i8["forms"][f], gate.get(f, {}), str(p)) for f in cfg.quant.forms})


def mismatch(what: str, source: str) -> UsageError:
    """A recorded decision this machine cannot carry out (e.g. a quantizer the graph does not have)."""
    return UsageError(f"--replay {source}: {what}.", FIX + ", or replay a manifest of this tledge version.")

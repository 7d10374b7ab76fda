"""Form pass: a quantization-tolerant head. The linear classification head is re-fitted on the features
the INT8 backbone computes for training images (never val), so it learns the decision margins of the
features it will really see. The FP32 model is unchanged; only the INT8 graph's head differs.
Optionally distilled from the FP32 logits of the same images (Hinton et al. 2015, ``--refit-distill``).
Fixed epochs and seeds, a fixed 2 torch threads and float64 arithmetic: the same head on every x86 CPU (refit_head)."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from tledge import card as card_mod
from tledge.console import progress
from tledge.data import stratified_split
from tledge.evalset import EvalSet
from tledge.export.config import ExportConfig
from tledge.export.graph import attr, copy_model
from tledge.export.int8.context import FormState, Int8Context, torch_threads
from tledge.export.int8.plan import PassRecord
from tledge.export.ort import probe_session


def head_gemm(model: Any) -> Any | None:
    """The classifier's final Gemm when the head is a single linear layer fed by the backbone features."""
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    if len(gemms) != 1 or model.graph.output[0].name not in gemms[0].output:
        return None
    return gemms[0]


def features_through(q: Any, names: list[str], batches: Iterable[np.ndarray], threads: int | None = None,
                     advance: Any = None) -> list[np.ndarray]:
    """The tensors ``names`` of ``q`` (e.g. the features the quantized head sees, after the input's Q/DQ),
    each concatenated over ``batches``, from one run per batch."""
    sess, inp = probe_session(q, names, threads, optimize=True)
    out: list[list[np.ndarray]] = [[] for _ in names]
    for x in batches:
        for acc, v in zip(out, sess.run(names, {inp: x})):
            acc.append(v)
        if advance is not None:
            advance(len(x))
    return [np.concatenate(v) if v else np.zeros((0,), np.float32) for v in out]


def refit_head(features: np.ndarray, labels: np.ndarray, w0: np.ndarray, b0: np.ndarray, epochs: int,
               weight_decay: float, label_smoothing: float, dropout: float, lr: float = 1e-3, seed: int = 0,
               batch: int = 256, teacher: np.ndarray | None = None, distill: float = 0.0,
               temperature: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """AdamW + cosine from the FP32 head, a fixed number of epochs (no selection on val). The loss mixes
    cross-entropy on the labels with, weighted by ``distill``, knowledge distillation towards ``teacher``,
    the FP32 network's logits for the same images.

    In float64, returned as float32: the same head on every x86 CPU. In float32 the head depended on the CPU's
    vector width (torch's exp/log and matmul kernels differ in the last bits between AVX-512, AVX2 and plain
    code): the same features gave heads 1e-7 apart and, in the demo's TensorRT form at 64 px, INT8 head weights
    that differed. In float64 the three gave byte-identical float32 heads (benchmarks/cpu_repro.py emulates the
    narrower CPUs). The cost is nil: a 1280 x 10 linear layer."""
    import torch

    if distill > 0 and teacher is None:
        raise ValueError("distillation needs the teacher's logits")
    with torch_threads():
        torch.manual_seed(seed)
        lin = torch.nn.Linear(w0.shape[1], w0.shape[0], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w0))
            lin.bias.copy_(torch.from_numpy(b0))
        head = torch.nn.Sequential(torch.nn.Dropout(dropout), lin)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        x, y = torch.from_numpy(features).double(), torch.from_numpy(labels).long()
        tz = torch.from_numpy(teacher).double() if teacher is not None else None
        steps = max(1, epochs * ((len(x) + batch - 1) // batch))
        k = 0
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch):
                for grp in opt.param_groups:
                    grp["lr"] = lr * 0.5 * (1 + np.cos(np.pi * k / steps))
                k += 1
                idx = perm[i:i + batch]
                logits = head(x[idx])
                loss = (1 - distill) * torch.nn.functional.cross_entropy(logits, y[idx],
                                                                         label_smoothing=label_smoothing)
                if distill > 0:
                    t = temperature
                    loss = loss + distill * t * t * torch.nn.functional.kl_div(
                        torch.log_softmax(logits / t, 1), torch.log_softmax(tz[idx] / t, 1), log_target=True,
                        reduction="batchmean")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return lin.weight.detach().numpy().astype(np.float32), lin.bias.detach().numpy().astype(np.float32)


def with_head(model: Any, gemm: Any, w: np.ndarray, b: np.ndarray) -> Any:
    from onnx import numpy_helper

    m = copy_model(model)
    inits = {i.name: i for i in m.graph.initializer}
    trans_b = attr(gemm, "transB", 0)
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(w if trans_b else w.T.copy(), gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(b, gemm.input[2]))
    return m


def head_weights(model: Any, gemm: Any) -> tuple[np.ndarray, np.ndarray]:
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float32)
    if not attr(gemm, "transB", 0):
        w = w.T.copy()
    return w, numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float32)


def train_images(ctx: Int8Context) -> EvalSet:
    """The refit's training images, preprocessed once for every form and recipe."""
    if "train" not in ctx.cache:
        pool = ctx.train_samples
        n = ctx.cfg.quant.refit_count
        if len(pool) > n:
            pool = stratified_split(pool, n / len(pool), 4321)[1]
        ctx.cache["train"] = EvalSet(pool, card_mod.preprocess_of(ctx.card), label="train images (head refit)")
    return ctx.cache["train"]


def train_teacher_logits(ctx: Int8Context) -> np.ndarray:
    """The FP32 graph's logits on ``train_images`` (computed once, shared by the refit and QAT)."""
    return _train_fp32(ctx)[1]


def _train_fp32(ctx: Int8Context) -> tuple[np.ndarray | None, np.ndarray]:
    """The FP32 graph's head features (None without a linear head) and logits on ``train_images``, from one
    pass (it was two at 2,000 images: the distilled refit's teacher, then the refit reference's features)."""
    if "train_fp32" not in ctx.cache:
        train, gemm = train_images(ctx), head_gemm(ctx.base)
        out = ctx.base.graph.output[0].name
        names = [gemm.input[0], out] if gemm is not None else [out]
        with progress() as prog:
            task = prog.add_task("FP32 on the training images (teacher)", total=len(train), info="")
            vals = features_through(ctx.base, names, train.batches(32), ctx.threads, lambda n: prog.advance(task, n))
        ctx.cache["train_fp32"] = (vals[0], vals[1]) if gemm is not None else (None, vals[0])
    return ctx.cache["train_fp32"]


def refit_recipe(ctx: Int8Context) -> tuple[int, dict[str, Any]]:
    """Epochs and options of the refit: the tune's own head recipe (weight decay, label smoothing, dropout scaled
    by the label share of the loss unless --refit-dropout, learning rate, seed), for at least 10 epochs."""
    tr = ctx.card["training"]["config"]
    epochs = max(10, int(ctx.card["training"]["head"].get("best_epoch") or 30))
    q = ctx.cfg.quant
    # the label part of the loss keeps the tune's regularisation; a distilled refit's target is FP32's exact logits
    dropout = ctx.card["head"].get("dropout", 0.2) * (1 - q.refit_distill) if q.refit_dropout is None \
        else q.refit_dropout
    return epochs, {"weight_decay": tr.get("weight_decay", 1e-4), "label_smoothing": tr.get("label_smoothing", 0.1),
                    "dropout": dropout,
                    "lr": tr.get("lr", 1e-3), "seed": tr.get("seed", 0)}


def fp32_refit_logits(ctx: Int8Context, evalset: EvalSet) -> np.ndarray | None:
    """Val logits of the FP32 model given the same head refit as the INT8 graphs (same images, recipe, seed,
    distillation weight, on FP32 features). The INT8 figure against this model is quantization alone: on a
    short tune the refit also trains the head further, and against PyTorch the two effects mix (a 3-epoch
    tune reported "drop -27.5 pt"). None when no linear head is re-fitted."""
    gemm = head_gemm(ctx.base)
    if gemm is None or not ctx.cfg.quant.head_refit or ctx.card["head"]["kind"] != "linear":
        return None
    train = train_images(ctx)
    feats = _train_fp32(ctx)[0]
    with progress() as prog:
        task = prog.add_task("FP32 val features for the refit reference", total=len(evalset), info="")
        val_feats, = features_through(ctx.base, [gemm.input[0]], evalset.batches(32), ctx.threads,
                                      lambda n: prog.advance(task, n))
    w0, b0 = head_weights(ctx.base, gemm)
    distill = ctx.cfg.quant.refit_distill
    teacher = feats @ w0.T + b0 if distill > 0 else None
    epochs, kw = refit_recipe(ctx)
    w, b = refit_head(feats, train.labels, w0, b0, epochs, teacher=teacher, distill=distill, **kw)
    return val_feats @ w.T + b


class HeadRefit:
    name = "head_refit"

    def escalates(self, cfg: ExportConfig) -> bool:
        return False

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        if not cfg.quant.head_refit:
            return False, "--no-head-refit"
        return True, f"on at most {cfg.quant.refit_count} training images"

    def run(self, state: FormState, ctx: Int8Context) -> PassRecord:
        gemm = head_gemm(state.model)
        if gemm is None or ctx.card["head"]["kind"] != "linear":
            return PassRecord(self.name, state.form, "not applied", "only linear heads are re-fitted")
        key = state.input_key()
        done = ctx.cache.setdefault("refit", {})
        if key in done:  # the same graph, ranges and rounding as a recipe already re-fitted: the same head
            state.model, state.rounding, rec = done[key]
            return PassRecord(self.name, state.form, rec.decision, "same input as an earlier refit: reused",
                              details=rec.details)
        train = train_images(ctx)
        q = ctx.quantize(state)
        with progress() as prog:
            task = prog.add_task(f"refit features ({state.form})", total=len(train), info="")
            feats, = features_through(q, [gemm.input[0]], train.batches(32), ctx.threads,
                                      lambda n: prog.advance(task, n))
        w0, b0 = head_weights(state.model, gemm)
        distill = ctx.cfg.quant.refit_distill
        teacher = None
        if distill > 0:
            teacher = train_teacher_logits(ctx)
        epochs, kw = refit_recipe(ctx)
        w, b = refit_head(feats, train.labels, w0, b0, epochs, teacher=teacher, distill=distill, **kw)
        state.model = with_head(state.model, gemm, w, b)
        # the re-fitted head is new weights: nearest rounding for them, not the rounding learned for the old
        state.rounding = {k: v for k, v in state.rounding.items() if k != gemm.input[1]}
        rec = PassRecord(self.name, state.form, f"head re-fitted on {len(train)} training images, {epochs} epochs",
                         details={"images": len(train), "epochs": epochs, "distill": distill,
                                  "source": "training split"})
        done[key] = (state.model, state.rounding, rec)
        return rec

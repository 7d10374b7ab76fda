"""The `tledge` command line: options -> one library call each; no logic here.

Heavy modules (torch, onnx, tensorrt) are imported inside the commands, so `tledge --help` is instant.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from tledge import __version__

# The resize modes (tledge/deploy/tledge_runtime/preprocess.py RESIZE_MODES; a test checks they agree), spelled
# out here so that `tledge --help` imports neither numpy nor Pillow.
RESIZE_MODES = ("shorter-side+center-crop", "stretch", "letterbox", "letterbox-topleft")
CENTRE_MODES = ("off", "exact", "padded", "auto")   # export.config.CENTRE_MODES (a test checks they agree)


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """TledgeError -> one clear line and a non-zero exit; a traceback only with --debug."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tledge.errors import TledgeError
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except TledgeError as exc:
            if debug:
                raise
            click.echo(f"error: {exc.what}", err=True)
            if exc.fix:
                click.echo(f"fix: {exc.fix}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tledge")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """tledge: from a folder of labelled images to a fast, accurate model on an NVIDIA Jetson.

    \b
    tledge tune DATA --out RUN          fine-tune a head on a pretrained backbone
    tledge predict RUN IMAGE...         top-k classes from the tuned checkpoint
    tledge export RUN --int8 | --fp16   ONNX graphs (and TensorRT engines where TensorRT is present)
    tledge bench RUN                    latency and accuracy of every artefact against PyTorch
    """
    from tledge.perf import tune_allocator
    tune_allocator()


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Run directory to write.")
@click.option("--backbone", "-b", default="mobilenet_v2", show_default=True,
              help="Backbone name (see `tledge backbones`).")
@click.option("--weights", default="imagenet", show_default=True,
              help="'imagenet' (torchvision's hub cache), 'none' (random init) or a .safetensors/.pth state dict.")
@click.option("--image-size", type=int, default=None, help="Input size (default: the weights' own, e.g. 224).")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=RESIZE_MODES[0], show_default=True,
              help="How images are fitted to the input, recorded in the model card and used everywhere after: the "
                   "weights' resize + centre crop, or what DeepStream's nvinfer does (stretch; letterbox = "
                   "maintain-aspect-ratio with symmetric padding; letterbox-topleft = without).")
@click.option("--head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True)
@click.option("--epochs", type=int, default=100, show_default=True, help="Head epochs (early stopping on val top-1).")
@click.option("--patience", type=int, default=20, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True, help="Head training batch size.")
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--no-balance", is_flag=True, help="Do not weight the loss by inverse class frequency.")
@click.option("--unfreeze", type=int, default=0, show_default=True,
              help="Also fine-tune the last N backbone stages (BatchNorm stays frozen).")
@click.option("--ft-epochs", type=int, default=5, show_default=True)
@click.option("--ft-lr", type=float, default=1e-4, show_default=True)
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="For DATA/<class>/* layouts: stratified share held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Image decoding processes.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Feature cache (default $TLEDGE_CACHE_DIR or ~/.cache/tledge/features).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--overwrite", is_flag=True, help="Replace a finished run in --out.")
@_handle_errors
def tune(data: Path, out: Path, backbone: str, weights: str, image_size: int | None, resize_mode: str, head: str,
         epochs: int,
         patience: int, lr: float, batch_size: int, label_smoothing: float, no_balance: bool, unfreeze: int,
         ft_epochs: int, ft_lr: float, val_fraction: float, seed: int, workers: int, cache_dir: Path | None,
         resume: bool, overwrite: bool) -> None:
    """Fine-tune a classification head on a pretrained BACKBONE from the ImageFolder DATA."""
    from tledge.console import status
    from tledge.distributed import from_env, shutdown
    with status("loading PyTorch"):  # ~2-3 s that said nothing
        from tledge.tune import TuneConfig, run_tune

    cfg = TuneConfig(backbone=backbone, weights=weights, image_size=image_size, resize_mode=resize_mode, head=head,
                     epochs=epochs,
                     patience=patience, lr=lr, batch_size=batch_size, label_smoothing=label_smoothing,
                     balance=not no_balance, unfreeze=unfreeze, ft_epochs=ft_epochs, ft_lr=ft_lr,
                     val_fraction=val_fraction, seed=seed, workers=workers,
                     cache_dir=str(cache_dir) if cache_dir else None)
    d = from_env()  # torchrun: join the process group (no-op for one process)
    try:
        card = run_tune(data, out, cfg, resume=resume, overwrite=overwrite, dist=d)
    except BaseException as exc:
        if d.enabled:  # say which rank failed; torchrun then stops the others
            click.echo(f"rank {d.rank}/{d.world} failed: {exc}", err=True)
        raise
    finally:
        shutdown(d)
    if not d.is_main:
        return
    m = card["metrics"]["val"]
    click.echo(f"val top-1 {m['top1']:.4f} on {m['n']} images; run written to {out} "
               f"(checkpoint.safetensors, model_card.json, metrics.csv, training_curve.png) "
               f"in {card['timing_s']['total']:.1f}s")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@_handle_errors
def predict(run: Path, images: tuple[Path, ...], top_k: int, as_json: bool) -> None:
    """Print the top-k classes for IMAGES (files or folders) from RUN's checkpoint."""
    from tledge.predict import format_prediction, predict_files

    for res in predict_files(run, [str(p) for p in images], top_k):
        click.echo(format_prediction(res, as_json))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--int8", is_flag=True, help="INT8 graphs (TensorRT and CPU forms), calibrated on real images.")
@click.option("--fp16", is_flag=True, help="FP16 graph.")
@click.option("--form", "forms", multiple=True, type=click.Choice(["tensorrt", "cpu"]),
              help="INT8 forms to write (default: both).")
@click.option("--method", default="auto", show_default=True,
              help="Calibration: auto (closest to FP32 on calibration images), minmax, percentile, entropy, mse.")
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--calib", default="auto", show_default=True,
              help="Calibration images: auto (the shipped set for the embedded default, else a stratified "
                   "sample of the training split), train, or a folder of images. Never the val split.")
@click.option("--calib-count", type=int, default=512, show_default=True)
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Largest top-1 loss (points, val split, against PyTorch) an INT8 graph may have.")
@click.option("--no-fallback", is_flag=True, help="Fail instead of keeping sensitive layers in float.")
@click.option("--no-cle", is_flag=True, help="INT8: no cross-layer equalization.")
@click.option("--no-bias-correction", is_flag=True, help="INT8: no bias correction (same as --bias-correction off).")
@click.option("--bias-correction", "bias_correction_mode", type=click.Choice(["auto", "analytic", "empirical", "off"]),
              default="auto", show_default=True,
              help="INT8: analytic (weight rounding only), empirical (measured on calibration images, per form), "
                   "or auto: both, and the one closer to FP32 on the judge images is kept.")
@click.option("--no-head-refit", is_flag=True, help="INT8: keep the FP32 head instead of re-fitting it on INT8 features.")
@click.option("--refit-count", type=click.IntRange(1), default=2000, show_default=True,
              help="INT8 head refit: training images used (stratified).")
@click.option("--refit-dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="INT8: dropout on the features in the head refit (default: the tune's head dropout x (1 - "
                   "--refit-distill): none for the default distilled refit).")
@click.option("--refit-distill", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="INT8 head refit: weight of distillation from the FP32 logits (the rest: the labels). 1 makes "
                   "the INT8 model follow the FP32 one (agreement); 0 trains the head further on the labels, which "
                   "can raise top-1 past FP32's; the export also reports the drop against an FP32 model given the "
                   "same refit (quantization alone).")
@click.option("--centre", type=click.Choice(CENTRE_MODES), default="auto", show_default=True,
              help="INT8 TensorRT form: quantize ReLU6 outputs centred on their range, all 255 levels instead of the "
                   "128 a symmetric quantizer leaves a non-negative tensor, by moving constants between biases "
                   "(exact: where the graph needs no new node; padded: also the inputs of convolutions that pad, whose "
                   "padding becomes a Pad node in front of the quantizer, the shape EfficientNet-Lite's graph has; "
                   "its cost on the device is not measured: check it with tledge bench there; auto: exact, and "
                   "padded as well when exact misses --target-agreement, the one closer to FP32 kept, as the log "
                   "says).")
@click.option("--escalate", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="INT8: run the expensive passes (learned rounding, then the cheap passes on it) when the cheap "
                   "recipe misses --target-agreement (auto), always (on) or never (off).")
@click.option("--target-agreement", type=click.FloatRange(0, 1, min_open=True), default=0.96, show_default=True,
              help="INT8: top-1 agreement with FP32 on held-out calibration images the cheap recipe must reach.")
@click.option("--adaround/--no-adaround", default=True, show_default=True,
              help="INT8: allow learned weight rounding (AdaRound) in the expensive passes.")
@click.option("--adaround-iters", type=click.IntRange(1), default=2000, show_default=True,
              help="INT8: learned rounding iterations per layer.")
@click.option("--adaround-layers", type=click.IntRange(1), default=16, show_default=True,
              help="INT8: learn the rounding of at most this many layers, those nearest rounding costs most first.")
@click.option("--qat", type=click.Choice(["off", "on", "auto"]), default="off", show_default=True, is_flag=False,
              flag_value="on",
              help="INT8: quantization-aware fine-tuning through the graph's own quantizers, distilled from FP32 on "
                   "training images: on (both forms), auto (only when the gate misses --max-drop, before keeping "
                   "quantizers in float). `--qat` alone means on.")
@click.option("--qat-steps", type=click.IntRange(1), default=300, show_default=True, help="QAT training steps.")
@click.option("--qat-batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--qat-lr", type=float, default=1e-5, show_default=True, help="QAT learning rate (Adam).")
@click.option("--qat-scales", type=click.Choice(["fixed", "learned"]), default="fixed", show_default=True,
              help="QAT: learn the activation scales from the calibrated ones (LSQ-style), or keep them fixed.")
@click.option("--qat-mix", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="QAT: distil on mixup pairs of training images (Beta(a, a) weights, the FP32 teacher run on each "
                   "mixed batch); 0 distils on the training images as they are.")
@click.option("--qat-augment/--no-qat-augment", default=False, show_default=True,
              help="QAT: random shifts (up to 1/8 of the side) and horizontal flips of the distillation images, "
                   "the FP32 teacher run on the same images.")
@click.option("--qat-ema", type=float, default=0.0, show_default=True,
              help="QAT: check and keep an exponential moving average of the weights with this decay per step "
                   "(e.g. 0.98) instead of the last step's; 0 is off.")
@click.option("--qat-patience", type=click.IntRange(1), default=5, show_default=True,
              help="QAT: stop after this many held-out checks (every tenth of the steps) without a lower KL; checks "
                   "during the learning rate's warm-up do not count. The best checked step is what is kept.")
@click.option("--qat-seed", type=click.IntRange(0), default=0, show_default=True,
              help="QAT: seed of every random draw (held-out split, batch mixing and augmentation); another seed "
                   "shows how much the result owes to the draw. The same seed gives the same graph on every machine.")
@click.option("--replay", type=click.Path(path_type=Path), default=None,
              help="INT8: take every decision (ranges, bias correction, recipe, rounding, quantizers kept in float) "
                   "from this earlier export's manifest, e.g. the build server's, instead of making them here.")
@click.option("--engine", type=click.Choice(["fp16", "int8"]), default=None,
              help="Build this TensorRT engine (fails without TensorRT).")
@click.option("--batch", default="1,1,32", show_default=True,
              help="Engine batch profile min,opt,max (TensorRT tunes its kernels for opt: batch 1, the usual "
                   "Jetson case, by default).")
@click.option("--workspace", type=int, default=1024, show_default=True, help="Engine workspace limit (MiB).")
@click.option("--dla-core", type=int, default=None, help="Build for this DLA core (Jetson), GPU fallback on.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache file, reused across builds (default RUN/timing.cache).")
@click.option("--input", "input_kind", type=click.Choice(["normalized", "raw"]), default="normalized", show_default=True,
              help="What the graphs take: normalized tensors, or raw 0-255 RGB pixels (NCHW) that the graph "
                   "normalises itself as its first op: exact in DeepStream (net-scale-factor=1) and Triton.")
@click.option("--input-dtype", type=click.Choice(["float32", "uint8"]), default="float32", show_default=True,
              help="With --input raw: the pixels' type (DeepStream feeds float32; uint8 quarters a client's upload).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--simplify", is_flag=True, help="Simplify the FP32 graph with onnxslim (kept only if the check stays green).")
@click.option("--threads", type=int, default=None, help="CPU threads for onnxruntime and torch (default: all cores; the graphs do not depend on it).")
@_handle_errors
def export(run: Path, int8: bool, fp16: bool, forms: tuple[str, ...], method: str, percentile: float, calib: str,
           calib_count: int, max_drop: float, no_fallback: bool, no_cle: bool, no_bias_correction: bool,
           bias_correction_mode: str, no_head_refit: bool, refit_count: int, refit_distill: float, refit_dropout: float | None, centre: str,
           escalate: str, target_agreement: float, adaround: bool, adaround_iters: int, adaround_layers: int, qat: str,
           qat_steps: int, qat_batch: int, qat_lr: float, qat_scales: str, qat_mix: float, qat_augment: bool,
           qat_ema: float, qat_patience: int, qat_seed: int, replay: Path | None, engine: str | None, batch: str, workspace: int, dla_core: int | None, timing_cache: Path | None,
           input_kind: str, input_dtype: str, opset: int, simplify: bool, threads: int | None) -> None:
    """Export RUN as ONNX (checked against PyTorch), FP16/INT8 graphs and TensorRT engines."""
    from tledge.export.config import CalibConfig, EngineOptions, ExportConfig, GateConfig, Int8Config
    from tledge.export.pipeline import run_export
    from tledge.export.tensorrt import parse_batch

    cfg = ExportConfig(
        fp16=fp16, int8=int8, opset=opset, simplify=simplify, threads=threads, input=input_kind,
        input_dtype=input_dtype,
        calib=CalibConfig(source=calib, count=calib_count, method=method, percentile=percentile),
        quant=Int8Config(forms=forms or ("tensorrt", "cpu"), cle=not no_cle,
                         bias_correction="off" if no_bias_correction else bias_correction_mode,
                         head_refit=not no_head_refit, refit_count=refit_count, refit_distill=refit_distill,
                         refit_dropout=refit_dropout, centre=centre,
                         escalate=escalate, target_agreement=target_agreement, adaround=adaround,
                         adaround_iters=adaround_iters, adaround_layers=adaround_layers, qat=qat,
                         qat_steps=qat_steps, qat_batch=qat_batch, qat_lr=qat_lr, qat_scales=qat_scales,
                         qat_mix=qat_mix, qat_augment=qat_augment, qat_ema=qat_ema, qat_patience=qat_patience,
                         qat_seed=qat_seed,
                         replay=str(replay) if replay else None),
        gate=GateConfig(max_drop=max_drop, fallback=not no_fallback),
        engine=EngineOptions(engine=engine, batch=parse_batch(batch), workspace_mib=workspace, dla_core=dla_core,
                             timing_cache=str(timing_cache) if timing_cache else None))
    m = run_export(run, cfg)
    for name, art in m["artefacts"].items():
        chk = m["checks"].get(name, {})
        res = chk.get("final", chk)
        acc = (f"val top-1 {res['top1']:.4f} (drop {res['drop_points']:.2f} pt, agreement with FP32 "
               f"{res['top1_agreement']:.2%})" if "top1_agreement" in res else
               f"val top-1 {res['top1']:.4f} (drop {res['drop_points']:.2f} pt)" if "top1" in res else "")
        click.echo(f"{name:<14} {', '.join(art['files']):<28} {art['bytes'] / 1e6:7.2f} MB  {acc}")
    for prec, e in m.get("engines", {}).items():
        click.echo(f"engine {prec:<7} " + (e["engine"] if e.get("built") else "not built here (built on the device)"))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes to sweep.")
@click.option("--budget", type=float, default=1.5, show_default=True, help="Seconds of timing per artefact and batch.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: all cores).")
@click.option("--no-e2e", is_flag=True, help="Skip end-to-end (decode + preprocess + infer) timing.")
@click.option("--compile", "use_compile", is_flag=True, help="Also time torch.compile.")
@click.option("--cuda-graph", is_flag=True, help="Also time TensorRT engines replayed as CUDA graphs.")
@click.option("--max-images", type=int, default=None, help="Use at most this many val images for accuracy.")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=None,
              help="Measure accuracy with images fitted this way instead of the model card's mode: the cost of "
                   "deploying with another resize than the model was tuned with.")
@click.option("--compare", "compare_with", type=click.Path(path_type=Path), default=None,
              help="Another bench.json to show side by side.")
@_handle_errors
def bench(run: Path, batches: str, budget: float, warmup: int, threads: int | None, no_e2e: bool, use_compile: bool,
          cuda_graph: bool, max_images: int | None, resize_mode: str | None, compare_with: Path | None) -> None:
    """Latency and accuracy of every artefact in RUN against the PyTorch model."""
    from tledge.bench.report import compare_table, load, print_report, write_all
    from tledge.bench.run import BenchConfig, run_bench
    from tledge.console import out
    from tledge.errors import UsageError

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise UsageError(f"--batch {batches!r} is not a comma-separated list of sizes.", "pass e.g. --batch 1,8,32.") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch {batches!r}: every batch size must be 1 or more.", "pass e.g. --batch 1,8,32.")
    other = load(compare_with) if compare_with else None
    result = run_bench(run, BenchConfig(batches=sizes, budget_s=budget, warmup=warmup, threads=threads,
                                        end_to_end=not no_e2e, compile=use_compile, cuda_graph=cuda_graph,
                                        max_images=max_images, resize_mode=resize_mode))
    paths = write_all(result, run)
    print_report(result)
    if other:
        out.print(compare_table(result, other, "this", compare_with.name))
    click.echo("wrote " + ", ".join(str(p) for p in paths) + f" in {result['seconds']:.0f}s")


@main.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@_handle_errors
def compare_cmd(a: Path, b: Path) -> None:
    """Show two bench.json results side by side (e.g. a laptop and a Jetson)."""
    from tledge.bench.report import compare_table, load
    from tledge.console import out
    out.print(compare_table(load(a), load(b), a.parent.name or "a", b.parent.name or "b"))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Bundle folder (default RUN/deploy).")
@click.option("--precision", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True,
              help="The engine precision the device builds by default.")
@click.option("--batch", default="1,1,32", show_default=True,
              help="Engine batch profile min,opt,max (TensorRT tunes its kernels for opt: batch 1, the usual "
                   "Jetson case, by default).")
@click.option("--target", "targets", multiple=True, type=click.Choice(["python", "deepstream", "triton"]),
              help="What the bundle serves (repeat for several; default python): tledge_runtime, DeepStream nvinfer "
                   "configs (primary and secondary classifier), a Triton model repository.")
@click.option("--deepstream-resize", type=click.Choice(RESIZE_MODES[1:]), default=None,
              help="--target deepstream: fit images this way although the model was tuned with another mode (nvinfer "
                   "cannot centre-crop); `tledge bench RUN --resize-mode MODE` shows what it costs.")
@click.option("--no-archive", is_flag=True, help="Write the folder only, no .tar.gz.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), default=None,
              help="Sign bundle.json with this ed25519 private key (`tledge bundle-keygen`); the device checks it "
                   "with `python3 -m tledge_runtime --key NAME.pub ...`.")
@_handle_errors
def bundle(run: Path, out: Path | None, precision: str, batch: str, targets: tuple[str, ...],
           deepstream_resize: str | None, no_archive: bool, sign_key: Path | None) -> None:
    """Write a self-contained deploy bundle (folder + .tar.gz) for a Jetson: no PyTorch needed there."""
    from tledge.deploy.bundle import make_bundle
    from tledge.export.tensorrt import parse_batch

    r = make_bundle(run, out, precision, parse_batch(batch), archive=not no_archive, sign=sign_key,
                    targets=targets or ("python",), deepstream_resize=deepstream_resize)
    click.echo(f"bundle {r['folder']} ({r['files']} files, {r['bytes'] / 1e6:.1f} MB)"
               + (f"; archive {r['archive']} ({r['archive_bytes'] / 1e6:.1f} MB)" if "archive" in r else ""))
    for t in r["targets"]:
        if t != "python":
            click.echo(f"{t}: see {Path(r['folder']) / t / 'README.md'}")
    fetch = f"tar xzf {Path(r['archive']).name} && " if "archive" in r else f"(copy the folder {Path(r['folder']).name}/) "
    click.echo(f"on the device: {fetch}cd {Path(r['folder']).name} && "
               "python3 -m tledge_runtime build && python3 -m tledge_runtime predict IMAGES")


@main.command("bundle-keygen")
@click.argument("name", type=click.Path(path_type=Path))
@_handle_errors
def bundle_keygen(name: Path) -> None:
    """Make an ed25519 key pair for signed bundles: NAME.key (private, 0600) and NAME.pub (for the devices)."""
    from tledge.deploy.bundle import keygen
    priv, pub = keygen(name)
    click.echo(f"wrote {priv} (keep it private: `tledge bundle RUN --sign {priv}`) and {pub} (copy it to the "
               f"devices: `python3 -m tledge_runtime --key {pub.name} verify`)")


@main.command("backbones")
def list_backbones() -> None:
    """List the registered backbones."""
    from tledge import backbones
    for n in backbones.names():
        s = backbones.get(n)
        click.echo(f"{n:<20} features {s.feature_dim:>5}  input {s.input_size}  weights "
                   f"{s.weights_filename or 'package'}")


@main.group()
def weights() -> None:
    """Manage pretrained weights for offline machines."""


@weights.command("add")
@click.argument("file", type=click.Path(path_type=Path))
@_handle_errors
def weights_add(file: Path) -> None:
    """Check a downloaded torchvision weights FILE and put it in torch's hub cache."""
    from tledge.backbones import add_weights_file
    click.echo(f"installed {add_weights_file(file)}")


def run() -> None:
    """The `tledge` command (console script and `python -m tledge`): ``main``, then, once torch is loaded, an exit
    that skips the interpreter's teardown. Tearing down torch's, torchvision's and onnxruntime's modules took 1-2 s
    after the last line of every command (benchmarks/silent_gaps.py: 2.4 s after `tledge export`'s last line); the
    atexit handlers (temporary folders, multiprocessing, logging) still run, stdout and stderr are flushed, and
    the exit status is main's. Where a non-daemon thread still runs, the normal exit waits for it as usual."""
    try:
        main()
        code: object = 0
    except SystemExit as exc:   # click's standalone mode always ends here
        code = exc.code
    if "torch" not in sys.modules or _busy_threads():
        sys.exit(code)
    fast_exit(code)


def _busy_threads() -> bool:
    import threading
    return any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate())


def fast_exit(code: object) -> None:
    """Exit with SystemExit ``code``'s status (None: 0; a message: printed, 1) after the atexit handlers, without
    the interpreter's module teardown."""
    import atexit
    import os
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be said
            pass
    os._exit(status)

"""Command line: `python -m jpq_core COMMAND --help` for each command.

    python -m jpq_core train stereo                     # train the stereo network on synthetic scenes
    python -m jpq_core train resnet20 --data digits     # train ResNet-20 on scikit-learn's digits
    python -m jpq_core evaluate --network stereo --data middlebury --json
    python -m jpq_core baselines --json                 # OpenCV SGBM and BM on the same pair and metric
    python -m jpq_core compress --network stereo --criterion taylor --sparsity 0.95 --wbits 4 --abits 8 --json
    python -m jpq_core export --onnx net.onnx --network resnet20 --sparsity 0.9 --form qdq   # ONNX, checked in ONNX Runtime
    python -m jpq_core sweep configs/smoke.toml         # a grid of compress runs, one table row each
    python -m jpq_core report                           # docs/results.md from the table
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path

from jpq_core.errors import JPQError

# Training recipes of the shipped checkpoints; flags override any field.
RECIPES = {
    "stereo": dict(data="synthetic", steps=5000, batch_size=4, lr=1e-3, height=192, width=384),
    "resnet20": dict(data="digits", steps=600, batch_size=64, lr=0.1),
    "resnet18": dict(data="digits", steps=600, batch_size=64, lr=0.05),
}
# Fine-tuning budget of `compress` when --steps is not given: a few minutes each on this 2-core machine.
DEFAULT_FINETUNE_STEPS = {"stereo": 150, "classification": 300}
def _stereo_samples(args) -> list:
    from jpq_core.data import stereo_eval_samples, stereo_files

    if args.left or args.right:
        if not (args.left and args.right):
            raise JPQError("give both --left and --right (and optionally --gt).")
        sample = stereo_files.load_pair(args.left, args.right, args.gt, args.gt_scale)
        for notice in sample.notices:  # e.g. a big pair was downscaled: the metrics are at the smaller size
            print(f"note: {notice}", file=sys.stderr)
        return [sample]
    return stereo_eval_samples(args.data)


def evaluate_network(network: str, model, data: str) -> dict:
    """Metrics of `model` on a named data set (what `evaluate` prints under "metrics")."""
    from jpq_core.data import stereo_eval_samples
    from jpq_core.data.classification import load_classification
    from jpq_core.evaluation import evaluate_classifier, evaluate_stereo
    from jpq_core.models import task_of

    if task_of(network) == "stereo":
        return evaluate_stereo(model, stereo_eval_samples(data))
    images, labels = load_classification(data, "test")
    return evaluate_classifier(model, images, labels)


def cmd_train(args) -> int:
    from jpq_core.models import shipped_checkpoint, task_of
    from jpq_core.training import TrainConfig, train

    recipe = dict(RECIPES[args.network])
    for key in ("data", "steps", "batch_size", "lr", "seed", "threads"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    cfg = TrainConfig(network=args.network, **recipe)
    out = Path(args.out or f"runs/{args.network}")

    def evaluate(model):
        if task_of(args.network) == "stereo":
            return {"middlebury": evaluate_network("stereo", model, "middlebury"),
                    "synthetic_validation": evaluate_network("stereo", model, "synthetic")}
        return {cfg.data: evaluate_network(args.network, model, cfg.data)}

    sidecar = train(cfg, out, evaluate=evaluate, progress=not args.quiet)
    weights = out / f"{args.network}.safetensors"
    if args.ship:
        target = shipped_checkpoint(args.network)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, target)
        shutil.copyfile(weights.with_suffix(".json"), target.with_suffix(".json"))
    print(json.dumps({"weights": str(weights), "metrics": sidecar["metrics"], "train_seconds": sidecar["train_seconds"]}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from jpq_core.evaluation import evaluate_stereo
    from jpq_core.models import task_of
    from jpq_core.pipeline import load_any

    _use_model_flag(args)
    num_classes = None
    if task_of(args.network) != "stereo":
        from jpq_core.tasks import make_task

        num_classes = make_task(args.network, args.data if args.data != "middlebury" else "digits").num_classes
    model, compressed = load_any(args.network, args.checkpoint, num_classes)
    if task_of(args.network) == "stereo":
        samples = _stereo_samples(args)
        if any(s.disparity is None for s in samples):
            raise JPQError("this pair has no ground truth; give --gt to score it.")
        data = "user-pair" if args.left else args.data
        metrics = evaluate_stereo(model, samples)
    else:
        data = args.data if args.data != "middlebury" else "digits"
        metrics = evaluate_network(args.network, model, data)
    result = {"network": args.network, "data": data, "checkpoint": str(args.checkpoint or "shipped"), "metrics": metrics}
    if compressed is not None:
        result["compressed"] = compressed  # what the network is: criterion, sparsity, bit widths
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_baselines(args) -> int:
    from jpq_core.baselines import run_baselines

    samples = _stereo_samples(args)
    if any(s.disparity is None for s in samples):
        raise JPQError("this pair has no ground truth; give --gt to score the baselines.")
    result = {"data": "user-pair" if args.left else args.data, "baselines": run_baselines(samples)}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _use_model_flag(args) -> None:
    """--model FILE.py:FACTORY: run the user's file (named on this command line) and use its network."""
    if getattr(args, "model", None):
        from jpq_core.models import register_factory

        args.network = register_factory(args.model)


def _set_threads(threads: int | None) -> None:
    """PyTorch threads for this command; None keeps PyTorch's default (all cores)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _bits(text: str):
    try:
        return None if text in ("float", "32", "none") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width (a whole number or 'float')") from None


def _layer_bits(text: str | None) -> dict:
    """"stem.0=8,fc=8" -> {"stem.0": 8, "fc": 8}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, bits = item.partition("=")
        if not sep:
            raise JPQError(f"--layer-wbits wants LAYER=BITS pairs separated by commas, got {item!r}.")
        out[name.strip()] = _bits(bits.strip())
    return out


def compression_config(args, training: bool):
    """The CompressionConfig of the configuration options (the parser's `add_configuration_args`); without
    `training`, one with nothing to fine-tune (`compress_without_training`'s path)."""
    from jpq_core.models import task_of
    from jpq_core.pipeline import CompressionConfig

    if training:
        fine_tuning = dict(pipeline=args.pipeline, finetune=args.finetune, schedule=args.schedule, lr=args.lr,
                           lr_schedule=args.lr_schedule,
                           steps=args.steps if args.steps is not None else DEFAULT_FINETUNE_STEPS[task_of(args.network)])
    else:
        fine_tuning = dict(finetune="none", steps=0)
    return CompressionConfig(
        network=args.network, criterion=args.criterion, sparsity=args.sparsity, wbits=args.wbits, abits=args.abits,
        allocation=args.allocation, layer_wbits=_layer_bits(args.layer_wbits), protect_first_last=not args.no_protect,
        per_channel=not args.per_tensor, symmetric=not args.asymmetric, calibration=args.calibration,
        calibration_batches=args.calibration_batches, learned_step=args.learned_step, recovery=args.recovery,
        recovery_samples=args.recovery_samples, seed=args.seed, **fine_tuning,
    ).check()


def cmd_compress(args) -> int:
    from tqdm import tqdm

    from jpq_core.curve import LearningCurve
    from jpq_core.models import load_network, task_of
    from jpq_core.finetuning import CHECKPOINT_EVERY
    from jpq_core.pipeline import compress, save_compressed
    from jpq_core.tasks import make_task

    _set_threads(args.threads)
    _use_model_flag(args)
    config = compression_config(args, training=True)
    data = args.data if args.data else ("middlebury" if task_of(args.network) == "stereo" else "digits")
    task = make_task(args.network, data)
    model = load_network(args.network, args.checkpoint, getattr(task, "num_classes", None))
    bar = tqdm(desc="compress", disable=args.quiet, unit="batch")  # stderr: --json output stays clean

    def progress(stage, i, n):
        bar.set_description(stage)
        bar.total = n
        bar.n = i
        bar.refresh()

    if args.curve and (args.curve_every < 1 or args.curve_every % CHECKPOINT_EVERY):
        raise JPQError(f"--curve-every must be a positive multiple of {CHECKPOINT_EVERY} (the steps between saves), "
                       f"not {args.curve_every}.")
    curve = LearningCurve(args.curve, args.curve_every) if args.curve else None
    net, report = compress(model, task, config, progress=progress, state=args.state, device=args.device, curve=curve)
    bar.close()
    report["data"] = data
    if args.save:
        report["saved"] = str(save_compressed(net, args.save, report))
    if not args.layers:
        report["layers"] = [{k: l[k] for k in ("name", "sparsity", "wbits", "abits", "weight_bits", "macs", "bops")} for l in report["layers"]]
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _pairs(items: list[str]) -> dict:
    """{key: value} of KEY=VALUE words, each value read as TOML when it is a number or boolean, else as text."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise JPQError(f"--one wants KEY=VALUE words (e.g. sparsity=0.5), got {item!r}.")
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
    return out


def cmd_sweep(args) -> int:
    from jpq_core import sweeps

    table = Path(args.out) if args.out else sweeps.RESULTS
    if args.import_reports:
        added, problems = sweeps.import_reports(args.import_reports, table, f"imported from {args.import_reports}")
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        print(f"{added} rows added to {table}")
        return 0
    if bool(args.grid) == bool(args.one):
        raise JPQError("give a grid file (configs/*.toml) or --one KEY=VALUE ..., or --import-reports FILE.")
    if args.workers is not None and args.workers < 1:
        raise JPQError("--workers must be 1 or more.")
    configs = sweeps.load_grid(args.grid) if args.grid else sweeps.expand_grid({"grid": [_pairs(args.one)]}, "--one")
    summary = sweeps.run_sweep(configs, table, workers=args.workers, ray_address=args.ray_address,
                               grid=Path(args.grid).stem if args.grid else "one", progress=not args.quiet,
                               engine=args.engine_latency)
    print(summary)
    print(f"results in {table}")
    return 1 if summary.failed else 0


def cmd_report(args) -> int:
    from jpq_core import report

    problems = report.write_report(Path(args.results) if args.results else None, Path(args.out))
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"wrote {args.out} and its figures")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def cmd_bench(args) -> int:
    if args.target == "live":
        return _bench_live(args)
    from jpq_core.engine.bench import benchmark
    from jpq_core.pruning import check_sparsity

    _use_model_flag(args)
    for s in args.sparsities:
        check_sparsity(s)
    result = benchmark(args.network, args.sparsities, [_bits(b) for b in args.wbits.split(",")], batch=args.batch,
                       threads=args.threads, repeats=args.repeats, torch_sparse=not args.no_torch_sparse,
                       height=args.height, width=args.width, checkpoint=args.checkpoint,
                       first_call=not args.no_first_call, peers=args.peers, deepsparse_python=args.deepsparse_python,
                       allocation=args.allocation, progress=None if args.json else _print_bench_row)
    for peer, note in result.get("peer_notes", {}).items():
        print(f"note: {peer} was not timed: {note}", file=sys.stderr)
    for t in result["targets"]:
        print(f"target {t['sparsity']:.0%} w{t['wbits']}: engine {t['ratio']:.2f}x {t['against']} "
              f"(at least {t['target']:g}x): {'met' if t['met'] else 'not met'}", file=sys.stderr)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _print_bench_row(row: dict) -> None:
    from jpq_core.engine.peers import PEERS

    peers = "".join(f", {peer} {row[f'{peer}_ms']:.2f} ms" for peer in PEERS if row.get(f"{peer}_ms") is not None)
    print(f"sparsity {row['sparsity']:.3f} w{row['wbits']}: dense {row['dense_ms']:.2f} ms, engine {row['engine_ms']:.2f} ms "
          f"({row['speedup']:.1f}x){peers}", file=sys.stderr)


MAX_EXPORT_PIXELS = 40_000_000  # batch x height x width of an exported graph's input, as for uploaded images


def check_export_target(args) -> None:
    """Refuse a bad output path or input size before minutes of compression (an unwritable folder, a batch
    of 0 or a 10^6-pixel side would otherwise fail, or exhaust memory, after the work)."""
    import os

    target = args.onnx
    if not target or "\x00" in target:
        raise JPQError(f"--onnx {target[:60]!r} is not a file name; give a path such as net.onnx.")
    path = Path(target)
    folder = path.parent
    if len(path.name.encode()) > 255:
        raise JPQError(f"--onnx {target[:60]}...: the file name is longer than 255 bytes; give a shorter one.")
    if path.is_dir():
        raise JPQError(f"--onnx {target[:200]}: is a folder; give the path of the .onnx file to write in it.")
    if folder.exists() and not folder.is_dir():
        raise JPQError(f"--onnx {target[:200]}: {str(folder)[:200]} is a file, not a folder; give a path in a folder.")
    if not folder.is_dir():
        raise JPQError(f"--onnx {target[:200]}: the folder {str(folder)[:200]} does not exist; create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise JPQError(f"--onnx {target[:200]}: the folder {str(folder)[:200]} is not writable; choose another one.")
    for option in ("batch", "height", "width"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise JPQError(f"--{option} must be 1 or more, got {value}.")
    height, width = args.height or 500, args.width or 741  # the stereo defaults; classifiers use 32 x 32
    if args.batch * height * width > MAX_EXPORT_PIXELS:
        raise JPQError(f"--batch {args.batch} x {height} x {width} is more than {MAX_EXPORT_PIXELS:,} input pixels; "
                       "export a smaller input (the graph's size does not depend on it).")


def cmd_export(args) -> int:
    from jpq_core.compression import compress_without_training
    from jpq_core.engine.bench import bench_inputs
    from jpq_core.models import load_network, task_of
    from jpq_core.onnx_export import export_onnx, require_onnx
    from jpq_core.pipeline import load_compressed
    from jpq_core.tasks import make_task

    check_export_target(args)
    require_onnx()  # before minutes of compression
    _set_threads(args.threads)
    _use_model_flag(args)
    if args.compressed:
        net, side = load_compressed(args.compressed)
        args.network = side["config"]["network"]
    else:
        config = compression_config(args, training=False)
        task = make_task(args.network, args.data if args.data else ("middlebury" if task_of(args.network) == "stereo" else "digits"))
        model = load_network(args.network, args.checkpoint, getattr(task, "num_classes", None))
        net = compress_without_training(model, task, config)
    inputs = bench_inputs(args.network, args.batch, args.height, args.width)
    report = export_onnx(net, inputs, args.onnx, args.form, args.threads or 1)
    report = {"network": args.network, "input": [list(x.shape) for x in inputs], **report}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if report["check"]["ok"] else 1


def _bench_live(args) -> int:
    """Seconds per slider change of the Explore page (the dashboard's own functions, no browser)."""
    from jpq_core.live import interaction_benchmark

    result = interaction_benchmark(args.network, args.criterion, args.threads, progress=None if args.json else lambda r: print(
        f"sparsity {r['sparsity']:.2f} w{r['wbits']}: {r['seconds']:.2f} s", file=sys.stderr))
    if args.recovery != "none":
        from jpq_core.recovery_bench import benchmark

        result["recovery"] = benchmark(args.network, args.recovery, args.threads, args.repeats,
                                       samples=args.recovery_samples, progress=None if args.json else
                                       lambda r: print(f"recovery {r['method']} at sparsity {r['sparsity']:.2f} w{r['wbits']}: "
                                                       f"{r['seconds']:.2f} s ({r['ratio']:.1f} forward passes of {r['forward_s']:.2f} s)", file=sys.stderr))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jpq_core", description="JPQ Explorer: joint pruning and quantization.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a network from scratch (resumable)")
    p.add_argument("network", choices=sorted(RECIPES))
    p.add_argument("--data", help="classification data: digits, cifar10:PATH or imagefolder:PATH")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="PyTorch threads (default 1)")
    p.add_argument("--out", help="run folder (default runs/NETWORK); re-running resumes from it")
    p.add_argument("--ship", action="store_true", help="copy the final weights to cached_runs/checkpoints/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    def add_data_args(p, default):
        p.add_argument("--data", default=default, help="middlebury, synthetic, digits, cifar10:PATH, imagefolder:PATH")
        p.add_argument("--left", help="left image of your own pair")
        p.add_argument("--right", help="right image of your own pair")
        p.add_argument("--gt", help="ground-truth disparity (.pfm, .npy, or 16-bit .png)")
        p.add_argument("--gt-scale", type=float, default=256.0, help="PNG ground truth = disparity * scale (default 256)")
        p.add_argument("--json", action="store_true", help="one line of JSON")

    network_help = ("stereo, resnet20, resnet18, or tv:NAME for any torchvision classification model (e.g. "
                    "tv:mobilenet_v2; randomly initialised unless --checkpoint gives weights)")
    model_help = ("your own network: FILE.py:FACTORY, a function returning a torch.nn.Module (given num_classes= "
                  "when it takes it); the file runs as Python, so name only files you trust")

    p = sub.add_parser("evaluate", help="score a network (shipped or --checkpoint) on data")
    p.add_argument("--network", default="stereo", help=network_help)
    p.add_argument("--model", help=model_help)
    p.add_argument("--checkpoint", help="your own .safetensors or .pt state dict (loaded as weights only), or a "
                   "compressed network saved by `compress --save` or a sweep (with its .json)")
    add_data_args(p, "middlebury")
    p.set_defaults(func=cmd_evaluate)

    def add_configuration_args(p, training: bool):
        """The options that make a compression configuration (`compression_config`); `training`: also the
        fine-tuning ones."""
        p.add_argument("--network", default="stereo", help=network_help)
        p.add_argument("--model", help=model_help)
        p.add_argument("--checkpoint", help="start from your own weights instead of the shipped ones")
        p.add_argument("--data", help="evaluation data (stereo: middlebury or synthetic; classifiers: digits, cifar10:PATH, ...)")
        p.add_argument("--criterion", default="taylor", help="magnitude, taylor(-abs|-square)(-norm), fisher, snip, gradient, random; channel level: group-l1, group-l2, bn-scale, group-taylor, group-fisher")
        p.add_argument("--sparsity", type=float, default=0.9, help="share of prunable weights removed, in [0, 1)")
        p.add_argument("--wbits", type=_bits, default=8, help="weight bits: 1, 2, 3..8, 16 or float")
        p.add_argument("--abits", type=_bits, default=8, help="activation bits: 4..16 or float")
        if training:
            p.add_argument("--pipeline", default="prune-then-quantize", help="prune-then-quantize, quantize-then-prune, joint, prune-only, quantize-only")
            p.add_argument("--finetune", default="masked", help="none, masked, distill, distill-cost (stereo: KL to the dense network's cost volume), regrow")
            p.add_argument("--steps", type=int, help="fine-tuning steps in all (default: a few minutes on 2 cores)")
            p.add_argument("--schedule", default="oneshot", help="oneshot, iterative (4 rounds) or gradual (AGP); joint is always gradual")
        p.add_argument("--layer-wbits", help="per-layer weight bits overriding --wbits, e.g. 'stem.0=8,fc=8'")
        p.add_argument("--allocation", default="global", help="global (one threshold), uniform (same sparsity per layer) sensitivity (per-layer, from a scan) or recovery-aware (per-layer, from each layer's output error after least squares; pair it with --recovery lsq)")
        p.add_argument("--no-protect", action="store_true", help="also prune the first and last layers")
        p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel")
        p.add_argument("--asymmetric", action="store_true", help="asymmetric weight grid (zero point)")
        p.add_argument("--learned-step", action="store_true",
                       help="weights at 3-16 bits learn their quantization step in QAT (LSQ) instead of max|w| / qmax")
        p.add_argument("--calibration", default="minmax", help="activation range: minmax, percentile or mse")
        p.add_argument("--calibration-batches", type=int, default=8, help="batches for gradient scores and activation ranges")
        p.add_argument("--recovery", default="none", help="one-shot recovery before fine-tuning: none, bn, lsq, obc or "
                       "scale, or methods joined by + (lsq+scale, obc+bn+scale, ...; jpq_core.recovery.CHOICES)")
        p.add_argument("--recovery-samples", type=int, help="calibration samples for recovery (default: 8 stereo crops, "
                       "512 training images)")
        if training:
            p.add_argument("--lr", type=float, help="fine-tuning learning rate (default per task)")
            p.add_argument("--lr-schedule", default="constant", help="constant; cosine (warm-up, then decay to zero per stage); or constant-decay "
                           "(constant, then cosine decay to zero over the last 20%% of each stage)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int)

    p = sub.add_parser("compress", help="prune and quantize a network, fine-tune, report accuracy and cost")
    add_configuration_args(p, training=True)
    p.add_argument("--device", default="auto", help="where fine-tuning runs: auto (a CUDA GPU when there is one, else "
                   "the CPU), cpu, or cuda[:N]; everything else runs on the CPU")
    p.add_argument("--save", help="save the compressed weights (masked and quantized) as safetensors + JSON")
    p.add_argument("--state", metavar="FILE", help="keep the run's progress in FILE every 100 fine-tuning steps; run the "
                   "same command again to continue after an interruption (FILE is deleted when the run completes)")
    p.add_argument("--curve", metavar="FILE", help="append the task's metrics every --curve-every fine-tuning steps of "
                   "each stage to FILE (JSON lines; a resumed run does not write a point twice)")
    p.add_argument("--curve-every", type=int, default=2500, help="steps between curve points, a multiple of 100 (default 2500)")
    p.add_argument("--layers", action="store_true", help="full per-layer cost detail")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export", help="write the compressed network as ONNX (float or int8 QDQ), checked in ONNX Runtime")
    p.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write")
    p.add_argument("--form", choices=["float", "qdq"], default="float", help="float: effective weights, exact zeros "
                   "where pruned, float activations; qdq: the network's own integer weights and activation scales as "
                   "QuantizeLinear/DequantizeLinear (default float)")
    p.add_argument("--compressed", metavar="FILE", help="export a network saved by `compress --save` (fine-tuned) "
                   "instead of compressing one from the options below")
    add_configuration_args(p, training=False)
    p.add_argument("--batch", type=int, default=1, help="batch of the exported graph's input (default 1)")
    p.add_argument("--height", type=int, help="input height (default: 500 for stereo, 32 for classifiers)")
    p.add_argument("--width", type=int, help="input width (default: 741 for stereo, 32 for classifiers)")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="run a grid of compression configurations (resumable), locally or on Ray")
    p.add_argument("grid", nargs="?", help="grid file, e.g. configs/smoke.toml")
    p.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    p.add_argument("--one", nargs="+", metavar="KEY=VALUE", help="one configuration instead of a grid file, "
                   "e.g. network=resnet20 criterion=taylor sparsity=0.5 wbits=4 finetune=distill (grid axes and settings)")
    p.add_argument("--ray-address", help="run on a Ray cluster: HOST:PORT of its head (README: 'Sweeps on a Ray "
                   "cluster'), auto (the one started on this machine), or local (start one here)")
    p.add_argument("--out", help="results table (default cached_runs/results/sweeps.jsonl)")
    p.add_argument("--import-reports", metavar="FILE", help="add `compress --json` lines from FILE to the table")
    p.add_argument("--engine-latency", action="store_true", help="also time each network on the sparse engine (engine_ms)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="write docs/results.md and its figures from the results table")
    p.add_argument("--results", help="results table (default cached_runs/results/sweeps.jsonl)")
    p.add_argument("--out", default="docs/results.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baselines", help="OpenCV StereoSGBM and StereoBM on the same data and metrics")
    add_data_args(p, "middlebury")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("bench", help="latency of the sparse integer engine against dense and sparse PyTorch")
    p.add_argument("target", choices=["engine", "live"],
                   help="engine: sparse integer engine vs PyTorch; live: seconds per slider change in the app")
    p.add_argument("--criterion", default="taylor", help="live: the criterion whose scores are cached")
    p.add_argument("--recovery", default="none", help="live: also time one-shot recovery with this method (e.g. lsq+bn)")
    p.add_argument("--recovery-samples", type=int, help="live: calibration samples for that recovery (default: 8 stereo "
                   "crops, 512 training images)")
    p.add_argument("--network", default="stereo", help=network_help)
    p.add_argument("--model", help=model_help)
    p.add_argument("--checkpoint", help="your own weights instead of the shipped ones")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads for PyTorch and the engine alike (default 1; the app uses all)")
    p.add_argument("--sparsities", type=_floats, default=[0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995])
    p.add_argument("--wbits", default="8,4", help="weight bit widths, comma-separated (default 8,4)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per configuration (median)")
    p.add_argument("--height", type=int, help="input height (default: Middlebury 500 for stereo, 32 for classifiers)")
    p.add_argument("--width", type=int, help="input width (default: 741 for stereo, 32 for classifiers)")
    p.add_argument("--allocation", choices=["global", "uniform"], default="global",
                   help="engine: how magnitude pruning spreads the sparsity; uniform for a randomly initialised network "
                        "(tv:NAME without --checkpoint), whose whole layers one global threshold would remove")
    p.add_argument("--no-torch-sparse", action="store_true", help="skip PyTorch's sparse path (slow at full size)")
    p.add_argument("--no-first-call", action="store_true", help="skip timing the first call in a new process")
    p.add_argument("--peers", action="store_true", help="also time ONNX Runtime fp32 and int8 (static quantization) on "
                   "each configuration's ONNX export (onnxruntime_ms, onnxruntime_int8_ms)")
    p.add_argument("--deepsparse-python", metavar="PATH", help="with --peers: also time DeepSparse, run by this Python "
                   "interpreter (one with deepsparse installed; deepsparse_ms)")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JPQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

"""Live compression for the dashboard: one slider change = re-threshold cached scores, fake-quantize, evaluate.

No fine-tuning happens here (that takes minutes; fine-tuned results come from `cached_runs/`). What makes a
change fast:
- criterion statistics (one gradient pass, or the weights alone for magnitude) are computed once per
  network and criterion and kept (`LiveNetwork.stats`, plus the on-disk score cache);
- layer geometry (positions per layer, for MACs) is traced once per network;
- activation ranges are calibrated on one small batch of training data per configuration;
- one full-resolution evaluation of the compressed network on the chosen data.

`LiveNetwork` is shared between browser sessions (the app caches it as a resource): it never changes after the
first computation of each statistic, which happens under a lock, and every `compress` call builds its own
compressed copy.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.nn.utils import parametrize

from jpq_core.costs import layer_geometry, network_cost
from jpq_core.compressed import attach, current_masks
from jpq_core.compression import compress_without_training, gradient_stats, recover, trace_groups
from jpq_core.data.stereo_types import StereoSample
from jpq_core.errors import JPQError
from jpq_core.evaluation import classifier_logits, predict_disparity
from jpq_core.live_engine import EnginePath
from jpq_core.metrics import confusion_matrix, stereo_metrics, top1
from jpq_core.models import task_of
from jpq_core.pipeline import CompressionConfig
from jpq_core.registry import get_criterion
from jpq_core.pruning import sparsity_of
from jpq_core.recovery import CHOICES, best_method
from jpq_core.tasks import StereoTask, make_task

# The bit widths the dashboard offers (the library takes every width from 1 to 8 and 16).
LIVE_WEIGHT_BITS = (1, 2, 3, 4, 6, 8, 16, None)
LIVE_ACTIVATION_BITS = (4, 6, 8, 16, None)
# "recovery-aware" where its scan is saved (shipped in cached_runs/scans/ or made once from the CLI); the metric
# sensitivity scan takes minutes and is left to the CLI.
LIVE_ALLOCATIONS = ("global", "uniform", "recovery-aware")
# Torchvision architectures offered live, beside the shipped networks: each compiles in the engine
# (tests/test_engine_zoo.py) and, randomly initialised at 32 x 32 on digits, takes seconds per change; smallest first.
LIVE_TORCHVISION = ("tv:mobilenet_v3_small", "tv:squeezenet1_0", "tv:mobilenet_v2", "tv:regnet_x_400mf",
                    "tv:efficientnet_b0", "tv:resnet18")
LIVE_NETWORKS = ("stereo", "resnet20") + LIVE_TORCHVISION
# Sparsity slider stops: coarse where little changes, fine near the extreme where everything happens.
# Recovery without training: "auto" = the best measured method for the network's task (jpq_core.recovery.BEST).
RECOVERY_CHOICES = ("auto",) + CHOICES
# Calibration samples for live recovery. Classifiers: fewer training images than the CLI's default keep a change
# in seconds (ResNet-20, 90%, w4/a8, obc+bn: top-1 99.4% with 128, as with 512). Stereo: twice the CLI's 8 crops,
# still within recovery's 5 s (lsq+scale at 90%: 2.0 s on one thread, 1.5 s on two) and far better at 90%
# (bad-3 25.2% against 30.8%; docs/recovery.md).
LIVE_RECOVERY_SAMPLES = {"classification": 128, "stereo": 16}
# "auto" leaves a network alone whose accuracy without recovery is this close to the dense network's (a share:
# 0.01 = one point of bad-3 or top-1): there recovery costs seconds and shows nothing new.
AUTO_RECOVERY_MARGIN = 0.01
SPARSITY_CHOICES = tuple(sorted({round(x, 4) for x in (
    [i / 100 for i in range(0, 90, 5)] + [i / 100 for i in range(90, 98)] + [i / 1000 for i in range(980, 1000)])}))


@dataclass(frozen=True)
class LiveConfig:
    """What the sliders choose. Frozen and hashable, so it can key caches and travel in a URL."""

    network: str = "stereo"
    criterion: str = "taylor"
    allocation: str = "global"
    sparsity: float = 0.5
    wbits: int | None = 8
    abits: int | None = 8
    protect_first_last: bool = True
    calibration: str = "percentile"
    checkpoint: str = ""  # "" = the shipped weights; else the content hash of an uploaded checkpoint
    recovery: str = "auto"  # one-shot recovery without training (RECOVERY_CHOICES)

    def compression_config(self) -> CompressionConfig:
        return CompressionConfig(
            network=self.network, criterion=self.criterion, sparsity=self.sparsity, wbits=self.wbits,
            abits=self.abits, pipeline="prune-then-quantize", finetune="none", steps=0,
            allocation=self.allocation, protect_first_last=self.protect_first_last, calibration=self.calibration,
            recovery=self.recovery_method, recovery_samples=LIVE_RECOVERY_SAMPLES.get(task_of(self.network)),
        ).check()

    @property
    def untrained(self) -> bool:
        """Whether the network has random weights (a torchvision architecture without uploaded weights): its
        accuracy means nothing, its cost, criterion scores and engine speed do."""
        from jpq_core.models import is_shipped

        return not is_shipped(self.network) and not self.checkpoint

    @property
    def recovery_method(self) -> str:
        """The recovery methods this configuration runs ("auto" resolved for its network; none for random
        weights, whose outputs are not worth seconds of refitting towards)."""
        if self.recovery != "auto":
            return self.recovery
        return "none" if self.untrained else best_method(task_of(self.network))

    def needs_recovery(self, raw_metrics: dict, dense_metrics: dict) -> bool:
        """Whether to recover, given the metrics without recovery: a chosen method always runs; "auto" runs
        when the network is more than AUTO_RECOVERY_MARGIN worse than dense on its primary metric."""
        if self.recovery_method == "none":
            return False
        if self.recovery != "auto":
            return True
        key, higher_is_better = ("top1", True) if "top1" in raw_metrics else ("bad3", False)
        loss = dense_metrics[key] - raw_metrics[key] if higher_is_better else raw_metrics[key] - dense_metrics[key]
        return not loss <= AUTO_RECOVERY_MARGIN  # NaN counts as broken

    def without_recovery(self) -> "LiveConfig":
        """The same configuration, not recovered: what the page shows while recovery runs."""
        return replace(self, recovery="none")

    @property
    def granularity(self) -> str:
        return get_criterion(self.criterion).level

    def to_query(self) -> dict[str, str]:
        """URL query parameters that give this configuration back through `from_query`."""
        return {k: ("float" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
                for k, v in asdict(self).items()}

    @classmethod
    def from_query(cls, params) -> tuple["LiveConfig", list[str]]:
        """A configuration from URL query parameters; what cannot be used falls back to the default and is
        reported (a shared link with a typo still opens, and says what it ignored)."""
        from jpq_core.models import NETWORKS
        from jpq_core.quantization import check_bits

        known = (*NETWORKS, *LIVE_TORCHVISION)

        default, values, problems = cls(), {}, []
        parsers = {
            "network": lambda v: v if v in known else _bad(f"unknown network {v!r}; the app offers {', '.join(known)}"),
            "criterion": lambda v: (get_criterion(v), v)[1],
            "allocation": lambda v: v if v in LIVE_ALLOCATIONS else _bad(f"allocation must be {' or '.join(LIVE_ALLOCATIONS)}"),
            "sparsity": lambda v: min(SPARSITY_CHOICES, key=lambda c: abs(c - _fraction(v))),
            "wbits": lambda v: _choice(check_bits(None if v == "float" else int(v)), LIVE_WEIGHT_BITS, "weight bits"),
            "abits": lambda v: _choice(check_bits(None if v == "float" else int(v), (4, 5, 6, 7, 8, 10, 12, 16, None),
                                                  "activation"), LIVE_ACTIVATION_BITS, "activation bits"),
            "protect_first_last": lambda v: {"true": True, "false": False}.get(v.lower()) if v.lower() in ("true", "false")
            else _bad("protect_first_last must be true or false"),
            "calibration": lambda v: v if v in ("minmax", "percentile", "mse") else _bad("calibration must be minmax, percentile or mse"),
            "recovery": lambda v: v if v in RECOVERY_CHOICES else _bad(f"recovery must be one of {', '.join(RECOVERY_CHOICES)}"),
            "checkpoint": lambda v: v if v == "" or (len(v) == 40 and all(c in "0123456789abcdef" for c in v))
            else _bad("checkpoint must be the hash of an uploaded file"),
        }
        for key, parse in parsers.items():
            if key not in params:
                continue
            raw = params[key]
            try:
                values[key] = parse(str(raw))
            except (JPQError, ValueError) as exc:
                problems.append(f"ignored {key}={raw!r} from the link ({exc}); using {getattr(default, key)!r}.")
        return cls(**values), problems


def _bad(message: str):
    raise JPQError(message)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise JPQError("sparsity must be in [0, 1)")
    return value


def _choice(value, allowed, what: str):
    if value not in allowed:
        raise JPQError(f"{what} must be one of {', '.join('float' if b is None else str(b) for b in allowed)}")
    return value


@dataclass
class Evaluation:
    """What the app shows of one network: metrics, plus the disparity map (stereo) or the predictions."""

    metrics: dict
    disparity: np.ndarray | None = None  # stereo: H x W, in pixels of the evaluated pair
    predicted: np.ndarray | None = None  # classifier: predicted class per test image
    confusion: np.ndarray | None = None
    seconds: float = 0.0
    path: str = "PyTorch"  # what computed it: "PyTorch" or "engine"


@dataclass
class LiveResult:
    config: LiveConfig
    model: torch.nn.Module
    evaluation: Evaluation
    sparsity: float
    cost: dict
    layers: list[dict]
    timings: dict = field(default_factory=dict)  # seconds per stage of this change
    path_note: str = ""  # why the engine did or did not compute the evaluation
    raw_metrics: dict | None = None  # with recovery: the same configuration's metrics without it
    recovery: dict | None = None  # with recovery: {"method", "seconds", "samples"}

    def summary(self) -> dict:
        """JSON-friendly: the configuration, metrics, achieved sparsity, totals of the cost model, timings."""
        return {"config": asdict(self.config), "metrics": self.evaluation.metrics, "sparsity": self.sparsity,
                "cost": {k: v for k, v in self.cost.items() if k != "assumptions"}, "timings": self.timings}


class _FixedBatches:
    """A task whose `batches` are always the same, already-made ones (for calibration)."""

    def __init__(self, task, batches: list):
        self.predict, self._batches = task.predict, batches

    def batches(self, count: int, seed: int = 0, start: int = 0):
        return iter(self._batches[start:count])


class LiveNetwork:
    """A dense network ready for live compression, with everything that does not depend on the sliders cached."""

    def __init__(self, network: str, model: torch.nn.Module, data: str | None = None, compressed_from: dict | None = None):
        self.network = network
        self.compressed_from = compressed_from  # what the starting weights are when they come from a compressed network
        self.task = make_task(network, data)
        self.dense = model.eval()
        for p in self.dense.parameters():
            p.requires_grad_(True)
        # Activation ranges are calibrated on one small training batch, made once: a slider change stays fast.
        source = StereoTask(batch_size=2) if task_of(network) == "stereo" else self.task
        self.calibration_task = _FixedBatches(source, list(source.batches(1, seed=17)))
        self._lock = threading.Lock()
        self._stats: dict[str, object] = {}
        self._groups: dict[bool, list] = {}
        self._geometry = None
        self._dense_evaluation = None
        self.engine = EnginePath(network)

    @property
    def is_stereo(self) -> bool:
        return task_of(self.network) == "stereo"

    @property
    def geometry(self):
        with self._lock:
            if self._geometry is None:
                self._geometry = layer_geometry(self.dense, self.task.example_inputs())
            return self._geometry

    def groups(self, protect_first_last: bool):
        """Coupled channel groups, traced once per setting of `protect_first_last` (it decides which are prunable)."""
        with self._lock:
            if protect_first_last not in self._groups:
                self._groups[protect_first_last] = trace_groups(self.dense, self.task, protect_first_last)
            return self._groups[protect_first_last]

    def groups_for(self, config: LiveConfig):
        """The channel groups the configuration's criterion removes channels by (None for weight criteria)."""
        return self.groups(config.protect_first_last) if get_criterion(config.criterion).level == "channel" else None

    def stats(self, config: LiveConfig, progress=None):
        """The criterion's statistics of the dense network (None for criteria that need weights only)."""
        criterion = get_criterion(config.criterion)
        if not criterion.needs_gradients:
            return None
        groups = self.groups_for(config)
        key = self._stats_key(config)
        with self._lock:
            if key not in self._stats:
                model = attach(copy.deepcopy(self.dense), None, None)  # scores are taken through the parametrization
                self._stats[key] = gradient_stats(model, self.task, config.compression_config(), criterion, groups, progress)
            return self._stats[key]

    def has_stats(self, config: LiveConfig) -> bool:
        criterion = get_criterion(config.criterion)
        return not criterion.needs_gradients or self._stats_key(config) in self._stats

    @staticmethod
    def _stats_key(config: LiveConfig) -> str:
        # Weight statistics serve every weight criterion; channel statistics are per criterion and per group
        # tracing, which protect_first_last changes.
        return "weight" if get_criterion(config.criterion).level == "weight" else f"{config.criterion}:{config.protect_first_last}"

    def warm_up(self, config: LiveConfig | None = None) -> None:
        """Do now what the first view of `config` (default: the page's default) would wait for: the layer
        geometry, the dense evaluation, the criterion's statistics, one compression without recovery, which
        also starts the engine's kernels loading (`EnginePath.warm_up`), and recovery's calibration data."""
        from jpq_core.recovery import calibration_inputs, DEFAULT_SAMPLES

        config = config or LiveConfig(network=self.network)
        self.geometry  # noqa: B018 - traced once, cached
        self.dense_evaluation()
        self.stats(config)
        self.compress(config.without_recovery())
        if config.recovery_method != "none":  # rendering the synthetic crops took 3 s of the first recovery
            settings = config.compression_config()
            calibration_inputs(self.task, settings.recovery_samples or DEFAULT_SAMPLES[self.task.name], settings.seed)

    def dense_evaluation(self) -> Evaluation:
        """The dense network on the default evaluation data, computed once."""
        with self._lock:
            if self._dense_evaluation is None:
                self._dense_evaluation = self.evaluate(self.dense)
            return self._dense_evaluation

    def evaluate(self, model: torch.nn.Module, sample: StereoSample | None = None) -> Evaluation:
        """Metrics of `model`: on `sample` (stereo; default the task's evaluation pair) or the test split.

        Always at full resolution: a half-resolution preview measured bad-3 34% where full resolution gives 16%
        (the network was trained at full scale), so it would mislead more than it would save."""
        start = time.perf_counter()
        if self.is_stereo:
            sample = sample if sample is not None else self._default_sample()
            with parametrize.cached():  # each quantized weight computed once per pass, not per call
                disparity = predict_disparity(model, sample)
            metrics = stereo_metrics(disparity, sample.disparity) if sample.disparity is not None else {}
            metrics = {k: v for k, v in metrics.items() if k != "valid_pixels"}
            return Evaluation(metrics, disparity=disparity, seconds=time.perf_counter() - start)
        logits = classifier_logits(model, self.task.test_x)
        labels = self.task.test_y.numpy()
        predicted = logits.argmax(1)
        return Evaluation({"top1": top1(logits, labels)}, predicted=predicted,
                          confusion=confusion_matrix(predicted, labels, logits.shape[1]), seconds=time.perf_counter() - start)

    def compress(self, config: LiveConfig, sample: StereoSample | None = None, progress=None,
                 engine: bool | None = None, raw: "LiveResult | None" = None) -> LiveResult:
        """Prune (no fine-tuning) and quantize a copy of the dense network by `config`, then evaluate it: with the
        sparse integer engine where it is faster (`jpq_core.live_engine`), else with PyTorch. `engine`: None =
        decide so, False = PyTorch always, True = the engine always (stereo; waits for its kernels).

        With recovery, the network is the configuration's without recovery (`raw`, when already made), copied
        and recovered: the result keeps the raw metrics beside its own."""
        if config.network != self.network:
            raise JPQError(f"this live network is {self.network}, the configuration asks for {config.network}.")
        if config.allocation not in LIVE_ALLOCATIONS:
            raise JPQError(f"live allocation must be one of {', '.join(LIVE_ALLOCATIONS)}; sensitivity allocation "
                           "needs a scan of every layer and is available from the CLI (`compress --allocation sensitivity`).")
        per_layer = None
        if config.allocation == "recovery-aware":
            from jpq_core.sensitivity import recovery_aware_allocation

            per_layer = recovery_aware_allocation(self.dense, self.task, config.compression_config(), config.sparsity,
                                                  scan=False)
        if config.recovery_method != "none":
            raw = raw or self.compress(config.without_recovery(), sample, progress, engine)
            dense = self.dense_evaluation() if sample is None else self.evaluate(self.dense, sample)
            if not config.needs_recovery(raw.evaluation.metrics, dense.metrics):
                return replace(raw, config=config)  # auto: close enough to dense without it
            return self._recovered(config, raw, sample, engine)
        timings = {}
        t = time.perf_counter()
        stats = self.stats(config, progress)
        timings["scores"] = time.perf_counter() - t

        net = compress_without_training(self.dense, self.task, config.compression_config(), stats=stats,
                                        groups=self.groups_for(config), allocation=per_layer,
                                        calibration_task=self.calibration_task, calibration_batches=1, timings=timings)
        return self._measured(config, net, timings, sample, engine)

    def _recovered(self, config: LiveConfig, raw: "LiveResult", sample, engine) -> "LiveResult":
        """`config` = `raw`'s configuration with recovery: a copy of `raw`'s network recovered, then measured."""
        if raw.config != config.without_recovery():
            raise JPQError("the network to recover must be this configuration without recovery.")
        timings = {k: raw.timings[k] for k in ("scores", "masks", "calibrate")}
        report = {}
        net = recover(copy.deepcopy(raw.model), self.dense, self.task, config.compression_config(), timings=timings,
                      recovered=report)
        return replace(self._measured(config, net, timings, sample, engine), raw_metrics=raw.evaluation.metrics,
                       recovery={"method": config.recovery_method, **report})

    def _measured(self, config: LiveConfig, net, timings: dict, sample, engine) -> "LiveResult":
        masks = current_masks(net)
        with parametrize.cached():  # compiling and the cost model read each layer's weight: quantize it once
            evaluation, note, timings["compile"] = self._evaluate_fastest(net.eval(), config, sample, engine)
            timings["evaluate"] = evaluation.seconds
            t = time.perf_counter()
            cost = network_cost(net, masks, config.wbits, config.abits, self.geometry)
            timings["cost"] = time.perf_counter() - t
        layers = cost.pop("layers")
        return LiveResult(config, net, evaluation, sparsity_of(masks), cost, layers, timings, note)

    def _evaluate_fastest(self, net, config: LiveConfig, sample, engine: bool | None) -> tuple[Evaluation, str, float]:
        """Evaluate `net` with the engine where `EnginePath` says it is faster and its kernels are ready, else
        with PyTorch; returns the evaluation, why that path, and the seconds spent compiling a program.
        `engine`: None = decide, False = PyTorch, True = the engine whenever it can run the network."""
        reason = self.engine.why_not(config.wbits, config.abits, config.sparsity) if engine is None else (
            None if engine and self.is_stereo else "PyTorch asked for")
        if reason is not None:
            return self.evaluate(net, sample), reason, 0.0
        from jpq_core.engine import compile_network

        start = time.perf_counter()
        program = compile_network(net)
        compile_s = time.perf_counter() - start
        sample = sample if sample is not None else self._default_sample()
        if engine is None and not self.engine.ready(program):
            evaluation = self.evaluate(net, sample)
            self.engine.warm_up(program, sample)  # after this answer, not competing with it for the cores
            return evaluation, "the engine's kernels for this program are being compiled in the background", compile_s
        if engine and not self.engine.ready(program):
            self.engine.wait_until_ready(program, sample, timeout=3600)
        return self.evaluate_program(program, sample), "integer configuration above the engine's crossover", compile_s

    def evaluate_program(self, program, sample: StereoSample | None = None) -> Evaluation:
        """Like `evaluate`, with the disparity computed by an engine program (stereo only)."""
        start = time.perf_counter()
        sample = sample if sample is not None else self._default_sample()
        disparity = self.engine.disparity(program, sample)
        metrics = stereo_metrics(disparity, sample.disparity) if sample.disparity is not None else {}
        metrics = {k: v for k, v in metrics.items() if k != "valid_pixels"}
        return Evaluation(metrics, disparity=disparity, seconds=time.perf_counter() - start, path="engine")

    def _default_sample(self) -> StereoSample:
        from jpq_core.data import stereo_eval_samples

        return stereo_eval_samples(self.task.eval_data)[0]


_SHARED: dict[str, LiveNetwork] = {}  # shipped networks only: a handful, each a few MB
_SHARED_LOCK = threading.Lock()


def shared_live_network(network: str) -> LiveNetwork:
    """The live network of a shipped `network` with its shipped weights: one per process, shared by every
    browser session (and warmed up by `app_support.serve` before the first one arrives)."""
    from jpq_core.models import is_shipped, load_network

    if not is_shipped(network):
        raise JPQError(f"{network} has no shipped weights to share; build LiveNetwork(network, model) with yours.")
    with _SHARED_LOCK:
        if network not in _SHARED:
            _SHARED[network] = LiveNetwork(network, load_network(network))
        return _SHARED[network]


def matching_runs(results, config: LiveConfig):
    """Rows of the results table (`jpq_core.report.load_results`) measured for this network, criterion,
    sparsity and bit widths: fine-tuned versions of the live configuration, when they exist."""
    if results.empty:
        return results

    def same_bits(column, bits):
        return results[column].isna() if bits is None else results[column] == bits

    keep = ((results["network"] == config.network) & (results["criterion"] == config.criterion)
            & ((results["sparsity"] - config.sparsity).abs() < 1e-6)
            & same_bits("wbits", config.wbits) & same_bits("abits", config.abits))
    return results[keep]


def config_from_row(row) -> tuple[LiveConfig, list[str]]:
    """The live configuration nearest to a results-table row (what "load in Explore" opens), and what differs."""
    settings = row.get("config") if isinstance(row.get("config"), dict) else {}
    allocation = settings.get("allocation", "global")
    recovery = settings.get("recovery", "none")  # a recovered row opens recovered the same way; others, the page's default
    query = {"network": row["network"], "criterion": row["criterion"], "sparsity": str(row["sparsity"]),
             "wbits": _bits_text(row["wbits"]), "abits": _bits_text(row["abits"]),
             "allocation": allocation if allocation in LIVE_ALLOCATIONS else "global"}
    if recovery != "none":
        query["recovery"] = recovery
    return LiveConfig.from_query(query)


def _bits_text(bits) -> str:
    return "float" if bits is None or bits != bits else str(int(bits))  # NaN (float in a table) != itself


def compress_command(config: LiveConfig, finetune: str = "distill", ray_address: str | None = None) -> str:
    """The CLI command that fine-tunes this configuration (what to run when no cached run exists). Given a Ray
    cluster's address (`cluster.configured_address()`): a one-configuration sweep on that cluster, the path of
    `sweep --ray-address`, whose row joins the sweeps table the pages read."""
    bits = {k: "float" if v is None else str(v) for k, v in (("wbits", config.wbits), ("abits", config.abits))}
    if ray_address:
        return (f"python -m jpq_core sweep --ray-address {ray_address} --one network={config.network} "
                f"criterion={config.criterion} sparsity={config.sparsity} wbits={bits['wbits']} abits={bits['abits']} "
                f"allocation={config.allocation} pipeline=prune-then-quantize finetune={finetune}")
    return (f"python -m jpq_core compress --network {config.network} --criterion {config.criterion} --sparsity {config.sparsity} "
            f"--wbits {bits['wbits']} --abits {bits['abits']} --allocation {config.allocation} "
            f"--pipeline prune-then-quantize --finetune {finetune} --json")


def engine_inputs(live: LiveNetwork, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """What the Engine page runs: the Middlebury pair (stereo) or the first `batch` test digits."""
    if live.is_stereo:
        from jpq_core.data import stereo_eval_samples

        sample = stereo_eval_samples("middlebury")[0]
        return tuple(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None] for img in (sample.left, sample.right))
    return (live.task.test_x[:batch],)


def engine_comparison(result: LiveResult, inputs: tuple, threads: int, repeats: int = 5, peers_task=None) -> dict:
    """The live configuration compiled by the engine and timed against dense PyTorch and PyTorch's sparse path
    (same thread count, interleaved repetitions, medians), with the engine's agreement with the PyTorch
    reference and its packed size against the cost model. With `peers_task` (the network's task, whose
    calibration data ONNX Runtime's int8 quantization uses), also ONNX Runtime fp32 and int8 on the network's
    ONNX export (`jpq_core.engine.peers`): "onnxruntime_ms", "onnxruntime_int8_ms", and "peer_notes" for a
    peer that could not run."""
    import contextlib

    import numba

    from jpq_core.engine import compile_network
    from jpq_core.engine.bench import (CALIBRATION_BATCHES, describe_machine, machine, plain_copy, time_interleaved,
                                       torch_sparse_copy)
    from jpq_core.engine.peers import peer_runs
    from jpq_core.engine.program import memory_report

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    start = time.perf_counter()
    program = compile_network(result.model, tuple(x[:1] for x in inputs))
    compile_s = time.perf_counter() - start
    plain = plain_copy(result.model, result.config.network)
    sparse = torch_sparse_copy(plain)
    peer_notes = {}
    with contextlib.ExitStack() as stack:
        runs = {"dense": lambda: plain(*inputs), "torch_sparse": lambda: sparse(*inputs), "engine": lambda: program.run(*inputs)}
        if peers_task is not None:
            runs.update(stack.enter_context(peer_runs(result.model, inputs, peers_task, threads, CALIBRATION_BATCHES, 0,
                                                      notes=peer_notes)))
        with torch.inference_mode():
            reference = result.model(*inputs).numpy()
            engine_out = program.run(*inputs)
            medians = time_interleaved(runs, repeats)
    scale = float(np.abs(reference).max()) or 1.0
    return {"threads": threads, "compile_s": compile_s, **{f"{k}_ms": v for k, v in medians.items()},
            "speedup": medians["dense"] / medians["engine"], "torch_sparse_speedup": medians["dense"] / medians["torch_sparse"],
            "max_abs_diff": float(np.abs(engine_out - reference).max()), "output_scale": scale,
            "layers_ms": program.profile(*inputs, repeats=3), "layers": program.summary(), "memory": memory_report(program),
            "program": program, "machine": describe_machine(machine()),
            **({"peer_notes": peer_notes} if peers_task is not None else {})}


# Slider changes the interaction benchmark replays: sparsity up, then bits down, as a user explores.
INTERACTION_CHANGES = ((0.5, 8), (0.7, 8), (0.8, 8), (0.9, 8), (0.95, 8), (0.95, 4), (0.98, 4), (0.99, 4), (0.99, 2))


def interaction_benchmark(network: str = "stereo", criterion: str = "taylor", threads: int = 2, progress=None) -> dict:
    """Seconds per slider change as the Explore page computes it (scores cached, then masks, quantization,
    calibration, one full-resolution evaluation and the cost model), for a replayed sequence of changes.

    The one-off costs (the gradient pass, tracing layer geometry, the dense evaluation) are reported apart:
    the app pays them once per network and criterion, not per change."""
    from jpq_core.models import load_network

    torch.set_num_threads(threads)
    live = LiveNetwork(network, load_network(network))
    first = LiveConfig(network=network, criterion=criterion)
    once = {}
    start = time.perf_counter()
    live.stats(first)
    once["scores_s"] = time.perf_counter() - start
    start = time.perf_counter()
    live.geometry  # noqa: B018 - traced once per network
    live.evaluate(live.dense)
    once["geometry_and_dense_evaluation_s"] = time.perf_counter() - start
    changes = []
    for sparsity, wbits in INTERACTION_CHANGES:
        # without recovery: what the page answers a move with (recovery is timed apart, `bench live --recovery`)
        config = LiveConfig(network=network, criterion=criterion, sparsity=sparsity, wbits=wbits, abits=8, recovery="none")
        start = time.perf_counter()
        result = live.compress(config)
        seconds = time.perf_counter() - start
        row = {"sparsity": sparsity, "wbits": wbits, "seconds": seconds, **result.timings,
               "metric": result.evaluation.metrics}
        changes.append(row)
        if progress:
            progress(row)
    seconds = [c["seconds"] for c in changes]
    return {"network": network, "criterion": criterion, "threads": threads, "once": once, "changes": changes,
            "median_s": float(np.median(seconds)), "max_s": max(seconds), "target_s": 1.5}

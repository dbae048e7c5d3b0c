"""The compression pipeline: score, prune, quantize, fine-tune; in the order a pipeline names.

The compressed network it works on (masks and quantizers on every convolution and linear layer) is
`jpq_core.compressed`'s.

Pipelines, all with the same total fine-tuning budget of `steps`:
    prune-only          prune -> fine-tune
    quantize-only       quantize -> fine-tune (QAT)
    prune-then-quantize prune -> fine-tune (steps/2) -> quantize -> QAT (steps/2)      (the paper's two stages)
    quantize-then-prune quantize -> QAT (steps/2) -> prune (scores of the quantized net) -> fine-tune (steps/2)
    joint               quantize, then prune gradually (AGP) during QAT over all steps
Fine-tuning modes (none, masked, distill, distill-cost, regrow) and the training loop are `jpq_core.finetuning`'s;
a pipeline with nothing to fine-tune is `jpq_core.compression.compress_without_training`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from jpq_core.compressed import (activation_bits, add_activation_quantizers, attach, calibrate_activations, current_masks,
                                 effective_state_dict, effective_weights, layer_bits)
from jpq_core.compression import compress_without_training, gradient_stats, layer_widths, prune_masks, trace_groups
from jpq_core.costs import layer_geometry, network_cost
from jpq_core.errors import JPQError
from jpq_core.finetuning import FINETUNE_MODES, finetune, get_mode
from jpq_core.layers import first_and_last, prunable_layers
from jpq_core.pruning import agp_sparsity, check_sparsity, sparsity_of
from jpq_core.quantization import ACTIVATION_BITS, check_bits
from jpq_core.registry import get_criterion

PIPELINES = ("prune-then-quantize", "quantize-then-prune", "joint", "prune-only", "quantize-only")
SCHEDULES = ("oneshot", "iterative", "gradual")
LR_SCHEDULES = ("constant", "cosine", "constant-decay")
ALLOCATIONS = ("global", "uniform", "sensitivity", "recovery-aware")
ITERATIVE_ROUNDS = 4


@dataclass
class CompressionConfig:
    network: str = "stereo"
    criterion: str = "taylor"
    sparsity: float = 0.9
    wbits: int | None = 8
    abits: int | None = 8
    pipeline: str = "prune-then-quantize"
    finetune: str = "masked"
    steps: int = 200
    schedule: str = "oneshot"  # oneshot, iterative, gradual (the joint pipeline always prunes gradually)
    allocation: str = "global"
    layer_wbits: dict = field(default_factory=dict)  # per-layer overrides: {layer: bits or None}
    layer_abits: dict = field(default_factory=dict)
    protect_first_last: bool = True
    symmetric: bool = True
    per_channel: bool = True
    calibration: str = "minmax"
    calibration_batches: int = 8
    lr: float | None = None  # None: the task's default (fine-tuning rates differ by task)
    # Learning rate over each fine-tuning stage: constant; cosine decay to zero after a short warm-up; or
    # constant-decay: constant, then cosine decay to zero over the stage's last 20%.
    # "constant" is the default because every row measured before this option existed used it.
    lr_schedule: str = "constant"
    # Weights at 3-16 bits learn their quantization step during QAT (LSQ) instead of taking max|w| / qmax.
    learned_step: bool = False
    # One-shot recovery once the final masks and bit widths are set, before the last fine-tuning stage
    # (jpq_core.recovery): none, bn, lsq, obc, lsq+bn, obc+bn; samples None: the task's default.
    recovery: str = "none"
    recovery_samples: int | None = None
    seed: int = 0

    def check(self) -> "CompressionConfig":
        check_sparsity(self.sparsity)
        self.wbits = check_bits(self.wbits)
        self.abits = check_bits(self.abits, ACTIVATION_BITS, "activation")
        get_criterion(self.criterion)
        if self.pipeline not in PIPELINES:
            raise JPQError(f"unknown pipeline {self.pipeline!r}; choose one of: {', '.join(PIPELINES)}.")
        if self.finetune not in FINETUNE_MODES:
            raise JPQError(f"unknown fine-tuning mode {self.finetune!r}; choose one of: {', '.join(FINETUNE_MODES)}.")
        if self.finetune != "none":
            get_mode(self.finetune).check(self.network)
        if self.steps < 0:
            raise JPQError("steps must be 0 or more.")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise JPQError(f"the learning rate must be a positive number, got {self.lr!r}; leave it out for the task's default.")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise JPQError(f"calibration batches must be a whole number >= 1, got {self.calibration_batches!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise JPQError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}.")
        if self.schedule not in SCHEDULES:
            raise JPQError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}.")
        self.layer_wbits = {k: check_bits(v) for k, v in self.layer_wbits.items()}
        self.layer_abits = {k: check_bits(v, ACTIVATION_BITS, "activation") for k, v in self.layer_abits.items()}
        if self.allocation not in ALLOCATIONS:
            raise JPQError(f"allocation must be one of {', '.join(ALLOCATIONS)}, not {self.allocation!r}.")
        from jpq_core.recovery import check_methods

        self.recovery = check_methods(self.recovery)
        samples = self.recovery_samples
        from jpq_core.recovery import MAX_SAMPLES

        most = max(MAX_SAMPLES.values())
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= most):
            raise JPQError(f"recovery samples must be a whole number from 1 to {most:,}, got {str(samples)[:40]}; leave it "
                           "out for the task's default (8 stereo crops, 512 training images).")
        if self.learned_step and not self.symmetric:
            raise JPQError("learned step sizes (LSQ) are for the symmetric weight grid; leave out the asymmetric "
                           "option or the learned step.")
        return self


# Options added after rows and run states were saved: at its default, such an option is left out of a
# configuration's identity, so that what was saved before it existed is still found.
LATER_OPTIONS = {"lr_schedule": "constant", "learned_step": False, "recovery": "none", "recovery_samples": None}


def config_identity(config: CompressionConfig | dict) -> dict:
    """The configuration as a plain dict, without the later options at their defaults."""
    d = asdict(config) if isinstance(config, CompressionConfig) else config
    return {k: v for k, v in d.items() if k not in LATER_OPTIONS or v != LATER_OPTIONS[k]}


class _Budget:
    """Hands out the fine-tuning steps so that every pipeline spends exactly the same number."""

    def __init__(self, total: int):
        self.total, self.used = total, 0

    def take(self, share: float) -> int:
        n = min(self.total - self.used, math.ceil(self.total * share))
        self.used += n
        return n




class RunState:
    """A compression run's progress in one file, so that an interrupted run goes on where it stopped.

    Saved (atomically) every `jpq_core.finetuning.CHECKPOINT_EVERY` fine-tuning steps and at the end of each fine-tuning stage:
    the stage and step reached, the network's state (weights, masks, activation ranges, batch-norm
    statistics) and the optimiser's. `compress` started again with the same file, configuration, task data
    and starting network replays the pipeline's structural steps, skips the fine-tuning stages already done,
    loads the state at the stage it reached and continues from the step after the save; training batches
    are a function of (seed, step), so it sees the batches the uninterrupted run would have. The result is
    then the uninterrupted run's (tested), except where scores are taken after an earlier fine-tuning stage
    (quantize-then-prune with gradual pruning or a sensitivity scan): those come from the restored weights.
    The file is deleted when the run completes. It holds tensors and numbers only (read with weights_only).
    """

    def __init__(self, path, config: CompressionConfig, model: nn.Module, task):
        self.path = Path(path)
        fingerprint = hashlib.sha1()
        for name, tensor in sorted(model.state_dict().items()):
            fingerprint.update(name.encode())
            fingerprint.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.key = json.dumps({"config": config_identity(config), "data": getattr(task, "data_key", task.name),
                               "model": fingerprint.hexdigest()}, sort_keys=True)
        self.saved = None
        if self.path.exists():
            try:
                saved = torch.load(self.path, weights_only=True, map_location="cpu")  # saved on a GPU, read anywhere
            except Exception as error:  # any unreadable file: say which and what to do
                raise JPQError(f"{self.path}: not a run state written by compress ({error}); delete it to start afresh.")
            if not isinstance(saved, dict) or saved.get("key") != self.key:
                raise JPQError(f"{self.path}: holds the state of another run (other settings, data or starting network); "
                               "give another --state file, or delete this one to start afresh.")
            self.saved = saved

    @property
    def elapsed(self) -> float:
        return float(self.saved["elapsed"]) if self.saved else 0.0

    def save(self, stage: int, step: int, net: nn.Module, optimizer, elapsed: float) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": self.key, "stage": stage, "step": step, "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(), "elapsed": elapsed}, tmp)
        os.replace(tmp, self.path)  # a run killed while saving leaves the previous state intact

    def finished(self) -> None:
        self.path.unlink(missing_ok=True)


class _Run:
    """One compression run: the network being compressed, its budget, and the stages pipelines combine."""

    def __init__(self, model, task, config: CompressionConfig, progress, state: RunState | None = None, device="cpu",
                 curve=None, training=None):
        self.task, self.config, self.device, self.curve = task, config, device, curve
        self.training = training  # training(done, total, loss) after every fine-tuning step, over the whole budget
        # progress(stage, i, n), with stage "scores" (gradient pass) or "fine-tune"
        self.progress = progress or (lambda stage, i, n: None)
        self.dense = copy.deepcopy(model).eval()
        self.net = attach(copy.deepcopy(model).eval(), None, None)
        self.budget = _Budget(config.steps if config.finetune != "none" else 0)
        self.wbits = None  # weight widths in force: float until the network is quantized
        self.abits = None
        self.lr = config.lr if config.lr is not None else task.default_lr
        self._seed = config.seed
        self._groups = None
        self.scan = None
        self.state = state
        self._stage = 0  # fine-tuning stages begun, which is how a saved state says where it was
        self._steps_before = 0  # fine-tuning steps of the stages before this one (the curve's step axis)
        self.recovery = {"method": "none", "seconds": 0.0}
        self.started = time.time() - (state.elapsed if state else 0.0)

    @property
    def groups(self):
        """Coupled channel groups, traced once on the dense copy (same layer names as the compressed net)."""
        if self._groups is None:
            self._groups = trace_groups(self.dense, self.task, self.config.protect_first_last)
        return self._groups

    def groups_for(self, criterion):
        """The channel groups a criterion removes channels by (None for weight criteria)."""
        return self.groups if criterion.level == "channel" else None

    def allocation_for(self, sparsity, criterion, stats=None):
        """Per-layer sparsities from a sensitivity scan when the configuration asks for them (weight criteria)."""
        if self.config.allocation == "sensitivity" and criterion.level == "weight":
            return self.sensitivity_allocation(sparsity, criterion, stats)
        if self.config.allocation == "recovery-aware" and criterion.level == "weight":
            from jpq_core.sensitivity import recovery_aware_allocation

            return recovery_aware_allocation(self.dense, self.task, self.config, sparsity, stats,
                                             progress=lambda i, n: self.progress("sensitivity", i, n))
        return None

    def masks(self, sparsity, stats=None):
        criterion = get_criterion(self.config.criterion)
        return prune_masks(self.net, self.task, self.config, sparsity, stats, self.groups_for(criterion),
                           allocation=self.allocation_for(sparsity, criterion, stats),
                           progress=lambda i, n: self.progress("scores", i, n))

    def sensitivity_allocation(self, sparsity, criterion, stats):
        """Per-layer sparsities from a sensitivity scan of the network as it is now (scanned once per run)."""
        from jpq_core.sensitivity import allocate, sensitivity_scan

        if self.scan is None:
            if criterion.needs_gradients and stats is None:
                stats = gradient_stats(self.net, self.task, self.config, criterion)
            scores = criterion.scores({k: v.detach().clone() for k, v in effective_weights(self.net).items()}, stats)
            kept = current_masks(self.net)
            self.scan = sensitivity_scan(self.net, self.task, scores, set_masks=self.set_masks)
            self.set_masks(kept)
        sizes = {k: l.weight.numel() for k, l in prunable_layers(self.net).items()}
        protect = first_and_last(self.net) if self.config.protect_first_last else set()
        return allocate(self.scan, sizes, sparsity, protect)

    def without_training(self, recovery=None):
        """The whole run when it has nothing to fine-tune between its stages: `compress_without_training`."""
        c = self.config
        criterion = get_criterion(c.criterion)
        timings, recovered = {}, {}
        self.net = compress_without_training(self.dense, self.task, c, groups=self.groups_for(criterion),
                                             allocation=self.allocation_for(c.sparsity, criterion), recovery=recovery,
                                             progress=lambda i, n: self.progress("scores", i, n), timings=timings,
                                             recovered=recovered)
        if "recovery" in timings:
            self.recovery = {"method": c.recovery, **recovered, "seconds": round(timings["recovery"], 3)}
        self.wbits = layer_widths(self.net, c.wbits, c.layer_wbits, c.network)
        self.abits = layer_widths(self.net, c.abits, c.layer_abits, c.network)

    def set_masks(self, masks):
        attach(self.net, masks, self.wbits, self.config.symmetric, self.config.per_channel, self.config.learned_step)

    def finetune(self, steps: int, on_step=None):
        self._seed += 1
        self._stage += 1
        before, self._steps_before = self._steps_before, self._steps_before + steps
        saved = self.state.saved if self.state else None
        if saved is not None and self._stage < saved["stage"]:
            return  # done before the interruption: the saved state, loaded at its own stage, holds the result
        start, opt_state = 0, None
        if saved is not None and self._stage == saved["stage"]:
            self.net.load_state_dict(saved["model"])
            start, opt_state = saved["step"], saved["optimizer"]
            self.state.saved = None
        stage = self._stage

        def checkpoint(done, opt):
            if self.curve and self.curve.due(done):  # before the save: a run resumed from it reaches this point again
                self.curve.record(self.net, self.task, stage, done, before + done, quantized=self.wbits is not None)
                self.net.train()
            if self.state:
                self.state.save(stage, done, self.net, opt, time.time() - self.started)
        finetune(self.net, self.task, steps, self.config.finetune, self.lr, self._seed, teacher=self.dense,
                 on_step=on_step, progress=lambda i, n: self.progress("fine-tune", i, n), lr_schedule=self.config.lr_schedule,
                 start=start, opt_state=opt_state, checkpoint=checkpoint if self.state or self.curve else None,
                 device=self.device,
                 on_loss=(lambda done, loss: self.training(before + done, self.budget.total, loss)) if self.training else None)

    def recover(self):
        """One-shot recovery (jpq_core.recovery) of the network as it is now: called once, when the final masks
        and bit widths are set, before the last fine-tuning stage."""
        from jpq_core import recovery

        if self._stage < (self.state.saved["stage"] if self.state and self.state.saved else 0):
            return  # a continued run: the saved state holds the network after recovery
        c = self.config
        self.recovery = recovery.apply(self.net, self.dense, self.task, c.recovery, c.recovery_samples, c.seed)

    def quantize(self):
        c = self.config
        self.wbits = layer_widths(self.net, c.wbits, c.layer_wbits, c.network)
        self.abits = layer_widths(self.net, c.abits, c.layer_abits, c.network)
        self.set_masks(current_masks(self.net))
        add_activation_quantizers(self.net, self.abits, c.calibration)
        calibrate_activations(self.net, self.task, c.calibration_batches, c.seed)

    def prune(self, share: float, schedule: str, final: bool):
        """Prune to the target sparsity under `schedule`, fine-tuning with `share` of the budget."""
        c = self.config
        if schedule == "oneshot":
            self.set_masks(self.masks(c.sparsity))
            if final:
                self.recover()
            self.finetune(self.budget.take(1.0 if final else share))
        elif schedule == "iterative":  # equal pruning ratios per round: s_i = 1 - (1 - s)^(i / rounds)
            for i in range(1, ITERATIVE_ROUNDS + 1):
                self.set_masks(self.masks(1 - (1 - c.sparsity) ** (i / ITERATIVE_ROUNDS)))
                last = i == ITERATIVE_ROUNDS
                if final and last:
                    self.recover()
                self.finetune(self.budget.take(1.0 if final and last else share / ITERATIVE_ROUNDS))
        else:  # gradual (AGP), scores gathered once so that the masks are nested as sparsity grows
            criterion = get_criterion(c.criterion)
            stats = gradient_stats(self.net, self.task, c, criterion, self.groups_for(criterion), lambda i, n: self.progress("scores", i, n)) \
                if criterion.needs_gradients else None
            steps = self.budget.take(1.0 if final else share)
            every = max(1, steps // 10)

            def on_step(step, total):
                if step % every == 0:
                    self.set_masks(self.masks(agp_sparsity(step + every, total, c.sparsity), stats))
            self.finetune(steps, on_step=on_step)
            self.set_masks(self.masks(c.sparsity, stats))
            if final:  # gradual pruning ends with its training: recovery comes after it
                self.recover()


def check_device(device) -> torch.device:
    """The torch device fine-tuning runs on: "cpu", "cuda" ("cuda:N"), or "auto" (a GPU when there is one)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise JPQError(f"unknown device {device!r}; use cpu, cuda (or cuda:N) or auto.") from None
    if device.type not in ("cpu", "cuda"):
        raise JPQError(f"fine-tuning runs on cpu or cuda, not {device.type}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JPQError("no CUDA GPU is visible here; fine-tune with --device cpu (or auto, which picks one when there is one).")
    return device


def compress(model: nn.Module, task, config: CompressionConfig, progress=None, state=None,
             device="cpu", curve=None, recovery=None, training=None) -> tuple[nn.Module, dict]:
    """Run the configured pipeline on a copy of `model`; returns (compressed model, report).

    `progress(stage, i, n)` is told about the gradient pass ("scores") and fine-tuning ("fine-tune").
    `state`: a file that keeps the run's progress (see `RunState`); a run interrupted with one continues when
    started again with it. `device`: where fine-tuning runs (see `check_device`); scores, masks, calibration,
    evaluation and costs stay on the CPU. `curve`: a `LearningCurve` that records the task's metrics every so many
    steps of each fine-tuning stage. `recovery`: a one-shot recovery step for runs without fine-tuning (see
    `jpq_core.compression.compress_without_training`). `training(done, total, loss)` is told after every
    fine-tuning step: steps done over the whole budget (all stages, counted on across a resumed run) and that
    step's loss (the page's job queue shows it).
    """
    config = config.check()
    without_training = config.pipeline == "prune-then-quantize" and config.schedule == "oneshot" and \
        (config.finetune == "none" or config.steps == 0)
    if recovery is not None and not without_training:
        raise JPQError("a recovery step stands in for fine-tuning: use it with the prune-then-quantize pipeline, a "
                       "one-shot schedule and no fine-tuning (--finetune none).")
    device = check_device(device)
    gradual = config.schedule == "gradual" or config.pipeline == "joint"
    if device.type != "cpu" and gradual and (get_criterion(config.criterion).level == "channel" or config.allocation == "sensitivity"):
        raise JPQError("gradual pruning with channel criteria or a sensitivity scan scores the network as it trains, "
                       "which runs on the CPU only: fine-tune with --device cpu, or choose a one-shot or iterative schedule.")
    torch.manual_seed(config.seed)
    run = _Run(model, task, config, progress, RunState(state, config, model, task) if state else None, device,
               curve, training)
    if without_training:  # nothing to fine-tune between the stages: the path the live view and the engine share
        run.without_training(recovery)
    elif config.pipeline == "prune-only":
        run.prune(1.0, config.schedule, final=True)
    elif config.pipeline == "quantize-only":
        run.quantize()
        run.recover()
        run.finetune(run.budget.take(1.0))
    elif config.pipeline == "prune-then-quantize":
        run.prune(0.5, config.schedule, final=False)
        run.quantize()
        run.recover()
        run.finetune(run.budget.take(1.0))
    elif config.pipeline == "quantize-then-prune":
        run.quantize()
        run.finetune(run.budget.take(0.5))
        run.prune(0.5, config.schedule, final=True)
    else:  # joint: pruning happens gradually during quantization-aware training
        run.quantize()
        run.prune(1.0, "gradual", final=True)
    net = run.net.eval()
    metrics = task.evaluate(net)
    broken = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if broken:
        raise JPQError(f"the compressed network's {', '.join(broken)} came out as NaN or infinite; it does not work at "
                       "these settings. Try more bits, a lower sparsity or a lower learning rate.")
    masks = current_masks(net)
    geometry = layer_geometry(net, task.example_inputs())
    cost = network_cost(net, masks, run.wbits, run.abits, geometry, config.per_channel)
    report = {
        "network": config.network,
        "granularity": get_criterion(config.criterion).level,
        "config": asdict(config),
        "metrics": metrics,
        "dense_metrics": task.evaluate(run.dense),
        "sparsity": sparsity_of(masks),
        "cost": cost,
        "layers": cost.pop("layers"),
        "finetune_steps": run.budget.used,
        "sensitivity": run.scan,
        "recovery": run.recovery,
        "seconds": round(time.time() - run.started, 1),
        "device": str(device),  # where fine-tuning ran
    }
    if run.state:
        run.state.finished()
    return net, report


MASK_PREFIX = "jpq_mask::"


def save_compressed(net: nn.Module, path, report: dict) -> Path:
    """One safetensors file with the effective weights, the masks and the activation ranges, plus a JSON
    sidecar with the configuration and per-layer bit widths: everything the engine and the app need."""
    from jpq_core.checkpoints import save_checkpoint

    baked = effective_state_dict(net)
    layers = prunable_layers(net)
    extra = {MASK_PREFIX + k: m.to(torch.uint8) for k, m in current_masks(net).items()}
    wbits = {k: layer_bits(l) for k, l in layers.items()}
    abits = {k: activation_bits(l) for k, l in layers.items()}

    class _WithMasks(nn.Module):  # save_checkpoint writes a module's state dict; add the masks to it
        def state_dict(self, *a, **kw):
            return {**baked, **extra}

    path = Path(path).with_suffix(".safetensors")
    save_checkpoint(_WithMasks(), path, {
        "config": {"network": report["network"], "architecture": {}},
        "compressed": True, "compression": report["config"], "layer_wbits": wbits, "layer_abits": abits,
        "metrics": report["metrics"], "sparsity": report["sparsity"],
    })
    return path


def _compressed_sidecar(path: Path) -> dict:
    """The sidecar of a `save_compressed` file, checked for every entry `load_compressed` reads."""
    from jpq_core.checkpoints import read_sidecar
    from jpq_core.models import NETWORKS

    side = read_sidecar(path)
    if not side.get("compressed"):
        raise JPQError(f"{path}: not a compressed network (no 'compressed' entry in its sidecar); save one with `compress --save`.")
    cfg = side.get("compression")
    problem = None
    if not isinstance(side["config"].get("network"), str) or side["config"]["network"] not in NETWORKS:
        problem = f"'config.network' is {side['config'].get('network')!r}, not one of {', '.join(NETWORKS)}"
    elif not isinstance(cfg, dict) or not {"symmetric", "per_channel", "calibration"} <= set(cfg):
        problem = "'compression' lacks symmetric, per_channel or calibration"
    elif not all(isinstance(side.get(k), dict) for k in ("layer_wbits", "layer_abits")):
        problem = "'layer_wbits' and 'layer_abits' must map layers to bit widths"
    if problem:
        raise JPQError(f"{path.with_suffix('.json')}: the sidecar of this compressed network is damaged ({problem}); "
                       "save it again with `compress --save`.")
    side["layer_wbits"] = {k: check_bits(v) for k, v in side["layer_wbits"].items()}
    side["layer_abits"] = {k: check_bits(v, ACTIVATION_BITS, "activation") for k, v in side["layer_abits"].items()}
    return side


def load_compressed(path) -> tuple[nn.Module, dict]:
    """A network saved by `save_compressed`, with its masks, quantizers and activation ranges restored.

    Every layer needs a weight-shaped mask and a bit width; a file that lacks them, or whose tensors do not
    fit the network, is refused with the names of the offending entries.
    """
    from jpq_core.checkpoints import fit_state_dict, read_state_dict
    from jpq_core.models import build_network

    path = Path(path)
    side = _compressed_sidecar(path)
    state = read_state_dict(path)
    masks = {k[len(MASK_PREFIX):]: v for k, v in state.items() if k.startswith(MASK_PREFIX)}
    weights = {k: v for k, v in state.items() if not k.startswith(MASK_PREFIX)}
    network, cfg = side["config"]["network"], side["compression"]
    net = build_network(network).eval()
    layers = prunable_layers(net)
    bad = sorted(f"{k} (no mask)" for k in set(layers) - set(masks))
    bad += sorted(f"{k} (mask {tuple(m.shape)} vs weight {tuple(layers[k].weight.shape)})" for k, m in masks.items()
                  if k in layers and m.shape != layers[k].weight.shape)
    bad += sorted(f"{k} (no such layer)" for k in set(masks) - set(layers))
    bad += sorted(f"{k} (no bit width)" for k in set(layers) - (set(side["layer_wbits"]) & set(side["layer_abits"])))
    if bad:
        raise JPQError(f"{path}: the masks or bit widths do not fit the {network} network: {', '.join(bad[:5])}"
                       f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; save it again with `compress --save`.")
    if any(b is not None for b in side["layer_abits"].values()):
        add_activation_quantizers(net, side["layer_abits"], cfg["calibration"])
        for layer in layers.values():
            layer.input_quantizer.calibrating = False
    net.load_state_dict(fit_state_dict(net, weights, path))
    attach(net, {k: m != 0 for k, m in masks.items()}, side["layer_wbits"], cfg["symmetric"], cfg["per_channel"])
    return net.eval(), side


def compressed_summary(side: dict) -> dict:
    """What a compressed network saved by `save_compressed` is, from its sidecar: criterion, sparsity (achieved
    and asked for), bit widths (the configuration's and the distinct per-layer ones), pipeline and fine-tuning."""
    cfg = side.get("compression", {})

    def distinct(widths: dict):
        return sorted({w for w in widths.values()}, key=lambda w: (w is None, w or 0))

    return {"criterion": cfg.get("criterion"), "sparsity": side.get("sparsity"), "target_sparsity": cfg.get("sparsity"),
            "wbits": cfg.get("wbits"), "abits": cfg.get("abits"),
            "layer_wbits": distinct(side.get("layer_wbits", {})), "layer_abits": distinct(side.get("layer_abits", {})),
            "pipeline": cfg.get("pipeline"), "finetune": cfg.get("finetune"), "steps": cfg.get("steps")}


def load_any(network: str, checkpoint=None, num_classes: int | None = None) -> tuple[nn.Module, dict | None]:
    """`network` from `checkpoint` (the shipped weights when None), whatever the project wrote there:

    - a compressed network with its sidecar (`compress --save`, the sweeps): loaded by `load_compressed`, masks,
      weight quantizers and activation ranges restored; returns (network, `compressed_summary`);
    - a compressed network's weights without the sidecar (an upload of the .safetensors alone): its effective
      (pruned, quantized) weights as a plain network, the activation quantizers left out, since their bit widths
      are in the sidecar; returns (network, {"sparsity", "note"});
    - plain weights: `jpq_core.models.load_network`; returns (network, None).
    `num_classes`: the classifier's outputs, for torchvision models and user factories (see `build_network`).
    """
    from jpq_core.checkpoints import fit_state_dict, read_sidecar, read_state_dict
    from jpq_core.models import build_network, load_network

    if checkpoint is None:
        return load_network(network, None, num_classes), None
    path = Path(checkpoint)
    if read_sidecar(path).get("compressed"):
        net, side = load_compressed(path)
        if side["config"]["network"] != network:
            raise JPQError(f"{path}: is a compressed {side['config']['network']} network, not {network}; "
                           f"give --network {side['config']['network']}.")
        return net, compressed_summary(side)
    state = read_state_dict(path)
    masks = {k: v for k, v in state.items() if k.startswith(MASK_PREFIX)}
    if not masks:
        return load_network(network, path, num_classes), None
    weights = {k: v for k, v in state.items() if not k.startswith(MASK_PREFIX) and ".input_quantizer." not in k}
    net = build_network(network, num_classes).eval()
    net.load_state_dict(fit_state_dict(net, weights, path))
    kept = sum(int((m != 0).sum()) for m in masks.values())
    return net, {"sparsity": 1.0 - kept / max(1, sum(m.numel() for m in masks.values())),
                 "note": "a compressed network without its sidecar (.json): its pruned and quantized weights, "
                         "activations in float; put the .json beside it for its bit widths and activation ranges."}

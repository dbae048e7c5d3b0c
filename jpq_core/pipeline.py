"""The compression pipeline: score, prune, quantize, fine-tune; in the order a pipeline names.

A compressed network is the original network with, on every convolution and linear layer:
- a weight parametrization w_eff = Q(w * mask) (torch.nn.utils.parametrize), Q = weight quantizer with a
  straight-through estimator, so the same module serves evaluation, masked fine-tuning and QAT, and a
  pruned weight is exactly zero in every forward pass;
- an input activation quantizer (forward pre-hook), calibrated on training data.

Pipelines, all with the same total fine-tuning budget of `steps`:
    prune-only          prune -> fine-tune
    quantize-only       quantize -> fine-tune (QAT)
    prune-then-quantize prune -> fine-tune (steps/2) -> quantize -> QAT (steps/2)      (the paper's two stages)
    quantize-then-prune quantize -> QAT (steps/2) -> prune (scores of the quantized net) -> fine-tune (steps/2)
    joint               quantize, then prune gradually (AGP) during QAT over all steps
Fine-tuning modes: none, masked (task loss), distill (task loss + the dense network's own outputs as soft
targets), distill-cost (stereo: task loss + KL divergence to the dense network's distribution over disparity
shifts in the cost volume), regrow (masked, plus RigL-style mask updates: drop the smallest kept weights, grow
the pruned ones with the largest gradient; Evci et al. 2020).
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
from torch.nn.utils import parametrize

from jpq_core.channels import channel_groups, channel_masks, gather_group_stats
from jpq_core.costs import layer_geometry, network_cost
from jpq_core.criteria import get_criterion, prunable_layers
from jpq_core.errors import JPQError
from jpq_core.pruning import agp_sparsity, check_sparsity, first_and_last, make_masks, sparsity_of
from jpq_core.score_cache import cached_gradient_stats
from jpq_core.quantization import (ACTIVATION_BITS, ActivationQuantizer, check_bits, learned_step_quantize,
                                   quantize_weight, step_bound, ste)

PIPELINES = ("prune-then-quantize", "quantize-then-prune", "joint", "prune-only", "quantize-only")
FINETUNE_MODES = ("none", "masked", "distill", "distill-cost", "regrow")
SCHEDULES = ("oneshot", "iterative", "gradual")
LR_SCHEDULES = ("constant", "cosine", "constant-decay")
ALLOCATIONS = ("global", "uniform", "sensitivity")
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
        from jpq_core.models import task_of

        if self.finetune == "distill-cost" and task_of(self.network) != "stereo":
            raise JPQError("distill-cost distils the stereo network's cost volume; for a classifier use distill, "
                           "which already matches the dense network's class probabilities.")
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
        if self.learned_step and not self.symmetric:
            raise JPQError("learned step sizes (LSQ) are for the symmetric weight grid; leave out the asymmetric "
                           "option or the learned step.")
        return self


class MaskedQuantizedWeight(nn.Module):
    """Parametrization w -> Q(w * mask) with a straight-through estimator for Q; with a learned step (LSQ,
    symmetric 3-16 bits), Q uses it as its scale, capped at max|w| / qmax.

    The step is learned as its logarithm, `log_step`: Adam's updates do not depend on the gradient's scale, so
    a step learned directly would move by about the learning rate per update (1e-3 against steps of 1e-3 to
    1e-1: measured, ResNet-20 at 4 bits lost 10.6 points of top-1 that way); its logarithm moves by about
    0.1% of the step per update."""

    def __init__(self, mask: torch.Tensor, bits, symmetric: bool, per_channel: bool):
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        self.register_parameter("log_step", None)
        self._step_bits = None
        self.dense_grad: torch.Tensor | None = None  # filled when regrowth asks for it

    def forward(self, w):
        masked = w * self.mask
        if masked.requires_grad and self.dense_grad is not None:
            masked.register_hook(self._keep_grad)
        if self.bits is None:
            return masked
        if self.log_step is not None:
            return learned_step_quantize(masked, self.log_step.exp(), self.bits, self.per_channel)
        return ste(masked, quantize_weight(masked.detach(), self.bits, self.symmetric, self.per_channel))

    def learn_step(self, weight: torch.Tensor, learned: bool) -> None:
        """Give this layer a learned step, starting at min/max's (kept while the width stays), or take it away."""
        if not (learned and self.bits is not None and self.bits >= 3 and self.symmetric):
            self.log_step = None
        else:
            bound = step_bound(weight * self.mask, self.bits, self.per_channel)
            if self.log_step is None or self._step_bits != self.bits or self.log_step.shape != bound.shape:
                self.log_step = nn.Parameter(bound.log())
        self._step_bits = self.bits

    @torch.no_grad()
    def project_step(self, weight: torch.Tensor) -> None:
        """Keep the learned step at or below its bound after an optimiser step (projected gradient descent):
        above it the cap would hide the step from its gradient and it could drift up for good."""
        if self.log_step is not None:
            bound = step_bound(weight * self.mask, self.bits, self.per_channel)
            self.log_step.copy_(torch.minimum(self.log_step, bound.log()))

    def _keep_grad(self, g):
        self.dense_grad += g.detach().abs()


def _transform(layer) -> MaskedQuantizedWeight:
    return layer.parametrizations.weight[0]


def bits_for(spec, name):
    """Bit width of layer `name` from one width for all layers or a {layer: width} dict."""
    return spec.get(name) if isinstance(spec, dict) else spec


def attach(model: nn.Module, masks: dict | None, wbits, symmetric=True, per_channel=True, learned_step=False) -> nn.Module:
    """Give every prunable layer its mask and weight quantizer (replacing earlier ones).

    `wbits` is one width for all layers or {layer: width}; None means float. `learned_step`: layers at
    3-16 bits learn their step (LSQ); a step already learned is kept while the layer's width stays.
    """
    for name, layer in prunable_layers(model).items():
        mask = masks[name] if masks is not None else torch.ones_like(layer.weight, dtype=torch.bool)
        bits = bits_for(wbits, name)
        if parametrize.is_parametrized(layer, "weight"):
            t = _transform(layer)
            t.mask.copy_(mask)
            t.bits, t.symmetric, t.per_channel = bits, symmetric, per_channel
        else:
            parametrize.register_parametrization(layer, "weight", MaskedQuantizedWeight(mask, bits, symmetric, per_channel))
        _transform(layer).learn_step(layer.parametrizations.weight.original, learned_step)
    return model


def project_steps(model: nn.Module) -> None:
    """Cap every learned step at its bound (after each optimiser step)."""
    for layer in prunable_layers(model).values():
        if parametrize.is_parametrized(layer, "weight"):
            _transform(layer).project_step(layer.parametrizations.weight.original)


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _transform(l).mask.clone() for n, l in prunable_layers(model).items() if parametrize.is_parametrized(l, "weight")}


def add_activation_quantizers(model: nn.Module, abits, method: str = "minmax") -> nn.Module:
    """Put an (uncalibrated) input quantizer on every prunable layer; `abits` one width or {layer: width}."""
    for name, layer in prunable_layers(model).items():
        bits = bits_for(abits, name)
        if hasattr(layer, "input_quantizer"):
            layer.input_quantizer.reset(bits, method)
        else:
            layer.input_quantizer = ActivationQuantizer(bits, method)
            layer.register_forward_pre_hook(lambda mod, args: (mod.input_quantizer(args[0]), *args[1:]))
    return model


def calibrate_activations(model: nn.Module, task, batches: int, seed: int) -> nn.Module:
    """Run training batches through the network and fix every input quantizer's range."""
    model.eval()
    with torch.inference_mode():
        for batch in task.batches(batches, seed=seed + 17):
            task.predict(model, batch)
    for layer in prunable_layers(model).values():
        if layer.input_quantizer.bits is not None:
            layer.input_quantizer.finish_calibration()
        else:
            layer.input_quantizer.samples.clear()
            layer.input_quantizer.calibrating = False
    return model


def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain network that computes what `model` computes: each parametrized weight
    replaced by its effective (masked, quantized) value. (Removing parametrizations from a deep copy is no
    option: the copy shares its parametrized class with the original and would break it.)"""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations.weight." not in k}
    for name, layer in prunable_layers(model).items():
        state[f"{name}.weight"] = layer.weight.detach().clone()
    return state


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


def finetune(model, task, steps: int, mode: str, lr: float, seed: int, teacher=None, on_step=None, progress=None,
             lr_schedule: str = "constant", start: int = 0, opt_state=None, checkpoint=None, device="cpu"):
    """Fine-tune the parametrized model in place for `steps` steps.

    `on_step(step, steps)` runs before each step (gradual pruning uses it); regrowth updates the masks
    every 25 steps; `progress(i, n)` is told after each step. `lr_schedule` "cosine" warms up over the first
    5% of the steps (at most 50; Adam's fresh moments make the first steps large) and decays to zero;
    "constant-decay" holds the rate, then decays it to zero over the last 20% of the steps.
    To continue an interrupted stage: `start` (steps already done) and `opt_state` (the optimiser's state
    then). `checkpoint(done, optimizer)` is called every CHECKPOINT_EVERY steps and after the last one.
    `device`: where the steps run (model, teacher and batches are moved there, and the model back to the CPU
    at the end, where the rest of the pipeline runs).
    """
    from jpq_core.training import constant_decay_lr, cosine_lr

    if mode == "none" or steps == 0:
        return model
    model.to(device).train()
    if teacher is not None:
        teacher.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    layers = prunable_layers(model)
    regrow_every = 25
    if mode == "regrow":
        for layer in layers.values():
            _transform(layer).dense_grad = torch.zeros_like(_transform(layer).mask, dtype=torch.float32)
    if progress and start:
        progress(start, steps)
    for step, batch in enumerate(task.batches(steps, seed=seed, start=start), start=start):
        batch = tuple(b.to(device) for b in batch)
        if on_step:
            on_step(step, steps)
        if lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step, steps, warmup=min(50, max(1, steps // 20)))
        elif lr_schedule == "constant-decay":
            for group in opt.param_groups:
                group["lr"] = constant_decay_lr(lr, step, steps)
        if mode == "distill":
            with torch.no_grad():
                target = task.predict(teacher, batch)
            loss = task.distill_loss(model, target, batch)
        elif mode == "distill-cost":
            loss = task.cost_distill_loss(model, teacher, batch)
        else:
            loss = task.loss(model, batch)
        if not torch.isfinite(loss):  # Adam would spread the NaN to every weight and the report would show NaN
            raise JPQError(f"fine-tuning diverged at step {step + 1} of {steps} (the loss became {loss.item()}); "
                           f"lower the learning rate (it was {lr:g}) or use fewer steps.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        project_steps(model)
        if mode == "regrow" and (step + 1) % regrow_every == 0 and step + 1 < steps:
            _regrow(layers, drop_fraction=0.3 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if progress:
            progress(step + 1, steps)
        if checkpoint and ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps):
            checkpoint(step + 1, opt)
    if mode == "regrow":
        for layer in layers.values():
            _transform(layer).dense_grad = None
    if teacher is not None:
        teacher.cpu()
    return model.cpu().eval()


@torch.no_grad()
def _regrow(layers, drop_fraction: float) -> None:
    """RigL update per layer: drop the kept weights of smallest |w|, grow as many pruned weights with the
    largest accumulated |gradient|, starting at zero. The layer's sparsity is unchanged."""
    for layer in layers.values():
        t = _transform(layer)
        mask, w = t.mask, layer.parametrizations.weight.original
        kept = int(mask.sum())
        n = int(drop_fraction * kept)
        if n == 0 or kept == mask.numel():
            t.dense_grad.zero_()
            continue
        drop_score = torch.where(mask, w.abs(), torch.full_like(w, float("inf")))
        drop = torch.topk(drop_score.flatten(), n, largest=False).indices
        grow_score = torch.where(mask, torch.full_like(w, -1.0), t.dense_grad)
        grow = torch.topk(grow_score.flatten(), n).indices
        flat = mask.flatten()
        flat[drop] = False
        flat[grow] = True
        w.view(-1)[grow] = 0.0
        t.dense_grad.zero_()


def prune_masks(model, task, config: CompressionConfig, sparsity: float, stats=None, groups=None, progress=None,
                allocation=None):
    """Masks for `sparsity` from the config's criterion, computed on the model as it is now.

    Weight-level criteria score every weight; channel-level ones score the coupled channel `groups`
    (from `jpq_core.channels.channel_groups`) and remove whole channels. `stats` are reused when given;
    `allocation` (a per-layer sparsity dict) overrides the config's.
    """
    criterion = get_criterion(config.criterion)
    if criterion.needs_gradients and stats is None:
        stats = gradient_stats(model, task, config, criterion, groups, progress)
    if criterion.level == "channel":
        return channel_masks(model, groups, criterion.group_scores(model, groups, stats), sparsity)
    weights = {k: v.detach().cpu().clone() for k, v in _effective_weights(model).items()}  # where stats are
    scores = criterion.scores(weights, stats)
    protect = first_and_last(model) if config.protect_first_last else set()
    if allocation is None and config.allocation == "sensitivity":
        raise JPQError("sensitivity allocation needs a scan; compress() runs one (see jpq_core.sensitivity).")
    return make_masks(scores, {k: w.shape for k, w in weights.items()}, sparsity, allocation or config.allocation, protect)


def gradient_stats(model, task, config: CompressionConfig, criterion, groups=None, progress=None):
    """One pass over the calibration batches: per-weight statistics, or per-channel ones for channel criteria."""
    if criterion.level == "channel":
        return gather_group_stats(model, groups, task.batches(config.calibration_batches, seed=config.seed + 1), task.loss, progress)
    return cached_gradient_stats(model, task, config.calibration_batches, config.seed + 1, progress=progress)


def _effective_weights(model):
    return {n: l.weight.detach() for n, l in prunable_layers(model).items()}


CHECKPOINT_EVERY = 100  # fine-tuning steps between saves of a run's state (a stereo step: 1-3 s on one core)


class RunState:
    """A compression run's progress in one file, so that an interrupted run goes on where it stopped.

    Saved (atomically) every CHECKPOINT_EVERY fine-tuning steps and at the end of each fine-tuning stage:
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

    def __init__(self, model, task, config: CompressionConfig, progress, state: RunState | None = None, device="cpu"):
        self.task, self.config, self.device = task, config, device
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
        self.recovery = {"method": "none", "seconds": 0.0}
        self.started = time.time() - (state.elapsed if state else 0.0)

    @property
    def groups(self):
        """Coupled channel groups, traced once on the dense copy (same layer names as the compressed net)."""
        if self._groups is None:
            ignored = [next(iter(prunable_layers(self.dense)))] if self.config.protect_first_last else []
            self._groups = channel_groups(self.dense, self.task.trace_inputs(), ignored_layers=ignored)
        return self._groups

    def masks(self, sparsity, stats=None):
        criterion = get_criterion(self.config.criterion)
        groups = self.groups if criterion.level == "channel" else None
        allocation = None
        if self.config.allocation == "sensitivity" and criterion.level == "weight":
            allocation = self.sensitivity_allocation(sparsity, criterion, stats)
        return prune_masks(self.net, self.task, self.config, sparsity, stats, groups, allocation=allocation,
                           progress=lambda i, n: self.progress("scores", i, n))

    def sensitivity_allocation(self, sparsity, criterion, stats):
        """Per-layer sparsities from a sensitivity scan of the network as it is now (scanned once per run)."""
        from jpq_core.sensitivity import allocate, sensitivity_scan

        if self.scan is None:
            if criterion.needs_gradients and stats is None:
                stats = gradient_stats(self.net, self.task, self.config, criterion)
            scores = criterion.scores({k: v.detach().clone() for k, v in _effective_weights(self.net).items()}, stats)
            kept = current_masks(self.net)
            self.scan = sensitivity_scan(self.net, self.task, scores, set_masks=self.set_masks)
            self.set_masks(kept)
        sizes = {k: l.weight.numel() for k, l in prunable_layers(self.net).items()}
        protect = first_and_last(self.net) if self.config.protect_first_last else set()
        return allocate(self.scan, sizes, sparsity, protect)

    def layer_bits(self, default, overrides):
        names = list(prunable_layers(self.net))
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise JPQError(f"no layer named {', '.join(unknown)} in {self.config.network}; layers are: {', '.join(names)}.")
        return {name: overrides.get(name, default) for name in names}

    def set_masks(self, masks):
        attach(self.net, masks, self.wbits, self.config.symmetric, self.config.per_channel, self.config.learned_step)

    def finetune(self, steps: int, on_step=None):
        self._seed += 1
        self._stage += 1
        saved = self.state.saved if self.state else None
        if saved is not None and self._stage < saved["stage"]:
            return  # done before the interruption: the saved state, loaded at its own stage, holds the result
        start, opt_state = 0, None
        if saved is not None and self._stage == saved["stage"]:
            self.net.load_state_dict(saved["model"])
            start, opt_state = saved["step"], saved["optimizer"]
            self.state.saved = None
        stage = self._stage
        checkpoint = None if self.state is None else \
            (lambda done, opt: self.state.save(stage, done, self.net, opt, time.time() - self.started))
        finetune(self.net, self.task, steps, self.config.finetune, self.lr, self._seed, teacher=self.dense,
                 on_step=on_step, progress=lambda i, n: self.progress("fine-tune", i, n), lr_schedule=self.config.lr_schedule,
                 start=start, opt_state=opt_state, checkpoint=checkpoint, device=self.device)

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
        self.wbits = self.layer_bits(c.wbits, c.layer_wbits)
        self.abits = self.layer_bits(c.abits, c.layer_abits)
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
            groups = self.groups if criterion.level == "channel" else None
            stats = gradient_stats(self.net, self.task, c, criterion, groups, lambda i, n: self.progress("scores", i, n)) \
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
             device="cpu") -> tuple[nn.Module, dict]:
    """Run the configured pipeline on a copy of `model`; returns (compressed model, report).

    `progress(stage, i, n)` is told about the gradient pass ("scores") and fine-tuning ("fine-tune").
    `state`: a file that keeps the run's progress (see `RunState`); a run interrupted with one continues when
    started again with it. `device`: where fine-tuning runs (see `check_device`); scores, masks, calibration,
    evaluation and costs stay on the CPU.
    """
    config = config.check()
    device = check_device(device)
    gradual = config.schedule == "gradual" or config.pipeline == "joint"
    if device.type != "cpu" and gradual and (get_criterion(config.criterion).level == "channel" or config.allocation == "sensitivity"):
        raise JPQError("gradual pruning with channel criteria or a sensitivity scan scores the network as it trains, "
                       "which runs on the CPU only: fine-tune with --device cpu, or choose a one-shot or iterative schedule.")
    torch.manual_seed(config.seed)
    run = _Run(model, task, config, progress, RunState(state, config, model, task) if state else None, device)
    if config.pipeline == "prune-only":
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
    wbits = {k: _transform(l).bits for k, l in layers.items()}
    abits = {k: (l.input_quantizer.bits if hasattr(l, "input_quantizer") else None) for k, l in layers.items()}

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

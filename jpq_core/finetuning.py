"""Fine-tuning a compressed network: the training loop and the modes it runs in.

A mode is one small class with one interface (the pattern of the criteria): the loss of a step, and what it
does around the steps. Masks stay fixed (pruned weights are exactly zero through the parametrization) except
where a mode changes them (regrowth). A new mode is one class added to MODES.

    masked        the task loss
    distill       the task loss and the dense network's own outputs as soft targets (Hinton et al. 2015)
    distill-cost  stereo: the task loss and the KL divergence to the dense network's distribution over
                  disparity shifts in the cost volume
    regrow        masked, plus RigL-style mask updates: drop the smallest kept weights, grow the pruned ones
                  with the largest gradient (Evci et al. 2020)
"""

from __future__ import annotations

import math

import torch

from jpq_core.compressed import project_steps, raw_weight, transform
from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers
from jpq_core.training import constant_decay_lr, cosine_lr

CHECKPOINT_EVERY = 100  # fine-tuning steps between saves of a run's state (a stereo step: 1-3 s on one core)


class FinetuneMode:
    """Shared interface: `loss(model, task, batch, teacher)` of one step; `begin`, `after_step` and `end` run
    around the steps (with the network's prunable layers by name)."""

    name = "mode"

    def check(self, network: str) -> None:
        """Refuse a network this mode cannot fine-tune (a JPQError saying what to use instead)."""

    def begin(self, layers: dict) -> None:
        pass

    def loss(self, model, task, batch, teacher):
        raise NotImplementedError

    def after_step(self, layers: dict, step: int, steps: int) -> None:
        pass

    def end(self, layers: dict) -> None:
        pass


class Masked(FinetuneMode):
    """The task loss; pruned weights stay pruned."""

    name = "masked"

    def loss(self, model, task, batch, teacher):
        return task.loss(model, batch)


class Distill(FinetuneMode):
    """The task's distillation loss against the dense network's outputs (Hinton et al. 2015)."""

    name = "distill"

    def loss(self, model, task, batch, teacher):
        with torch.no_grad():
            target = task.predict(teacher, batch)
        return task.distill_loss(model, target, batch)


class DistillCost(FinetuneMode):
    """The task loss plus the KL divergence to the dense network's matching distribution in the cost volume
    (the task's `cost_distill_loss`; only the stereo task has a cost volume)."""

    name = "distill-cost"

    def check(self, network: str) -> None:
        from jpq_core.tasks import task_class

        if not hasattr(task_class(network), "cost_distill_loss"):
            raise JPQError("distill-cost distils the stereo network's cost volume; for a classifier use distill, "
                           "which already matches the dense network's class probabilities.")

    def loss(self, model, task, batch, teacher):
        return task.cost_distill_loss(model, teacher, batch)


class Regrow(Masked):
    """Masked fine-tuning with a RigL update every `every` steps (Evci et al. 2020): a share of the kept weights,
    0.3 decaying by a cosine, is dropped (smallest |w|) and as many pruned ones grown (largest accumulated
    |gradient|), so the sparsity stays."""

    name, every = "regrow", 25

    def begin(self, layers):
        for layer in layers.values():
            transform(layer).dense_grad = torch.zeros_like(transform(layer).mask, dtype=torch.float32)

    def after_step(self, layers, step, steps):
        if (step + 1) % self.every == 0 and step + 1 < steps:
            _regrow(layers, drop_fraction=0.3 * 0.5 * (1 + math.cos(math.pi * step / steps)))

    def end(self, layers):
        for layer in layers.values():
            transform(layer).dense_grad = None


MODES = {mode.name: mode for mode in (Masked, Distill, DistillCost, Regrow)}
FINETUNE_MODES = ("none", *MODES)  # "none": no fine-tuning at all


def get_mode(name: str) -> FinetuneMode:
    if name not in MODES:
        raise JPQError(f"unknown fine-tuning mode {name!r}; choose one of: {', '.join(FINETUNE_MODES)}.")
    return MODES[name]()


def finetune(model, task, steps: int, mode: str, lr: float, seed: int, teacher=None, on_step=None, progress=None,
             lr_schedule: str = "constant", start: int = 0, opt_state=None, checkpoint=None, device="cpu", on_loss=None):
    """Fine-tune the parametrized model in place for `steps` steps.

    `on_step(step, steps)` runs before each step (gradual pruning uses it); regrowth updates the masks
    every 25 steps; `progress(i, n)` is told after each step. `lr_schedule` "cosine" warms up over the first
    5% of the steps (at most 50; Adam's fresh moments make the first steps large) and decays to zero;
    "constant-decay" holds the rate, then decays it to zero over the last 20% of the steps.
    To continue an interrupted stage: `start` (steps already done) and `opt_state` (the optimiser's state
    then). `checkpoint(done, optimizer)` is called every CHECKPOINT_EVERY steps and after the last one.
    `device`: where the steps run (model, teacher and batches are moved there, and the model back to the CPU
    at the end, where the rest of the pipeline runs). `on_loss(steps_done, loss)` is told each step's loss (a
    float) after the step: what a progress display shows.
    """
    if mode == "none" or steps == 0:
        return model
    strategy = get_mode(mode)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    layers = prunable_layers(model)
    strategy.begin(layers)
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
        loss = strategy.loss(model, task, batch, teacher)
        if not torch.isfinite(loss):  # Adam would spread the NaN to every weight and the report would show NaN
            raise JPQError(f"fine-tuning diverged at step {step + 1} of {steps} (the loss became {loss.item()}); "
                           f"lower the learning rate (it was {lr:g}) or use fewer steps.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        project_steps(model)
        strategy.after_step(layers, step, steps)
        if progress:
            progress(step + 1, steps)
        if on_loss:
            on_loss(step + 1, loss.item())
        if checkpoint and ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps):
            checkpoint(step + 1, opt)
    strategy.end(layers)
    if teacher is not None:
        teacher.cpu()
    return model.cpu().eval()


@torch.no_grad()
def _regrow(layers, drop_fraction: float) -> None:
    """RigL update per layer: drop the kept weights of smallest |w|, grow as many pruned weights with the
    largest accumulated |gradient|, starting at zero. The layer's sparsity is unchanged."""
    for layer in layers.values():
        t = transform(layer)
        mask, w = t.mask, raw_weight(layer)
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

"""Training the networks from scratch: seedable, resumable, with a progress bar.

A run keeps its state (weights, optimiser, step) in `OUT_DIR/train_state.pt`, saved atomically every
`save_every` steps and read back with `weights_only=True`; calling the same command again continues from
there. Training data for step t is a pure function of (seed, t), so a resumed run sees the same batches an
uninterrupted one would. At the end the weights go to `OUT_DIR/NAME.safetensors` with a JSON sidecar.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from jpq_core.checkpoints import atomic_write, save_checkpoint
from jpq_core.errors import JPQError
from jpq_core.models import build_network
from jpq_core.tasks import task_class
from jpq_core.untrusted import decoding


@dataclass
class TrainConfig:
    network: str
    data: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    threads: int = 1
    save_every: int = 100
    architecture: dict = field(default_factory=dict)
    # stereo only: crop size and disparity range of the synthetic scenes
    height: int = 192
    width: int = 384
    max_scene_disparity: float = 90.0
    # classification only
    weight_decay: float = 5e-4


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


DECAY_SHARE = 0.2  # the final share of the steps over which "constant-decay" anneals


def constant_decay_lr(base: float, step: int, total: int, share: float = DECAY_SHARE) -> float:
    """Constant, then cosine decay to zero over the last `share` of the steps: warmup-stable-decay without the
    warm-up (Zhai et al. 2022; Hu et al. 2024, MiniCPM). Up to the decay it is the constant schedule, step
    for step."""
    decay = max(1, round(total * share))
    start = total - decay
    if step < start:
        return base
    return 0.5 * base * (1 + math.cos(math.pi * (step - start) / decay))


def train(cfg: TrainConfig, out_dir: Path, evaluate=None, progress: bool = True) -> dict:
    """Train (or resume) `cfg.network`; returns the sidecar written next to the final weights.

    `evaluate(model) -> dict` is called at the end; its metrics go into the sidecar.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.network, **cfg.architecture)
    task = task_class(cfg.network)  # the optimiser, the data and the loss are the task's
    opt = task.training_optimizer(model, cfg)

    state_path = out_dir / "train_state.pt"
    start, elapsed, history = 0, 0.0, []
    if state_path.exists():
        with decoding(state_path, "not a training state written by train", "delete it to start afresh."):
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if state["config"] != json.loads(json.dumps(asdict(cfg))):
                raise JPQError(f"{state_path}: holds a run with other settings; use another --out folder or delete the file.")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, elapsed, history = state["step"], state["elapsed"], state["history"]

    loader = task.training_batches(cfg, start)

    def save_state(step):
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                 "history": history, "config": json.loads(json.dumps(asdict(cfg)))}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.network}", disable=not progress, dynamic_ncols=True)
    running, t0 = None, time.time()
    for step, batch in enumerate(loader, start=start):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.lr, step, cfg.steps, warmup=min(200, cfg.steps // 10))
        loss = task.training_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            elapsed += time.time() - t0
            t0 = time.time()
            history.append({"step": step + 1, "loss": running, "elapsed_s": round(elapsed, 1)})
            save_state(step + 1)
    bar.close()

    model.eval()
    metrics = evaluate(model) if evaluate else {}
    sidecar = {
        "config": {"network": cfg.network, "architecture": cfg.architecture},
        "training": asdict(cfg),
        "steps": cfg.steps,
        "train_seconds": round(elapsed, 1),
        "history": history,
        "metrics": metrics,
    }
    save_checkpoint(model, out_dir / f"{cfg.network}.safetensors", sidecar)
    return sidecar

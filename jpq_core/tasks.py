"""What the compression pipeline needs to know about a task: data, loss, distillation, evaluation.

Two tasks: stereo (synthetic training scenes for calibration and fine-tuning, Middlebury or synthetic
validation for evaluation) and classification (a data spec from `jpq_core.data.classification`).
"""

from __future__ import annotations

import queue
import threading

import torch
import torch.nn.functional as F

from jpq_core.data.synthetic_stereo import make_batch, scene_seed
from jpq_core.evaluation import evaluate_classifier, evaluate_stereo

# Fine-tuning and calibration draw training scenes from here on, away from the first million that
# trained the shipped network, so "fine-tuning data" is never "the data it memorised".
STEREO_FINETUNE_SEED_BASE = 500_000_000


def prefetched(make, count: int, depth: int = 2):
    """make(0), ..., make(count - 1), computed up to `depth` items ahead in a background thread.

    Rendering a stereo batch (OpenCV and NumPy, which release the GIL) takes about a fifth of a fine-tuning
    step; done ahead, it overlaps the step. The items and their order are those of the plain loop; an
    error in `make` is raised here; stopping early stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for i in range(count):
                if not offer((make(i), None)):
                    return
        except Exception as error:  # handed to the consumer, which raises it where it would have happened
            offer((None, error))

    threading.Thread(target=work, daemon=True, name="prefetch").start()
    try:
        for _ in range(count):
            item, error = ready.get()
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()


# ---- training from scratch (`jpq_core.training.train`; `cfg` is its TrainConfig) ---------------------------------


class _StereoBatches(torch.utils.data.IterableDataset):
    """Synthetic batches for steps start..total-1, rendered in a worker process."""

    def __init__(self, cfg, start: int):
        self.cfg, self.start = cfg, start

    def __iter__(self):
        c = self.cfg
        for step in range(self.start, c.steps):
            first = (c.seed * 10_000_000 + step * c.batch_size)
            seeds = [scene_seed("train", first + i) for i in range(c.batch_size)]
            yield tuple(torch.from_numpy(a) for a in make_batch(seeds, c.height, c.width, c.max_scene_disparity))


def stereo_loss(outputs, gt: torch.Tensor, max_disparity: float) -> torch.Tensor:
    """Smooth-L1 on the refined and (half-weighted) coarse disparity, over pixels with ground truth."""
    full, coarse = outputs
    valid = torch.isfinite(gt) & (gt < max_disparity)
    target = gt[valid]
    return F.smooth_l1_loss(full[valid], target) + 0.5 * F.smooth_l1_loss(coarse[valid], target)


def _classifier_batches(cfg, images: torch.Tensor, labels: torch.Tensor, start: int):
    """Shuffled mini-batches with random +-2 px translations; the order depends only on (seed, epoch)."""
    n = len(images)
    per_epoch = max(1, n // cfg.batch_size)
    for step in range(start, cfg.steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        batch = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))
        yield batch, labels[idx]


# ---- the tasks -------------------------------------------------------------------------------------------------


class StereoTask:
    name = "stereo"
    default_lr = 1e-3  # at 95% sparsity, 300 steps: bad-3 29.6% at 1e-3 vs 67% after 150 steps at 2e-4
    primary_metric = ("bad3", False)  # (name, higher is better)

    def __init__(self, eval_data: str = "middlebury", crop=(192, 384), batch_size: int = 4):
        self.eval_data, self.crop, self.batch_size = eval_data, crop, batch_size
        self._eval_samples = None

    def batches(self, count: int, seed: int = 0, start: int = 0):
        """Synthetic training batches start..count-1 (left, right, disparity), rendered ahead in a thread."""
        return prefetched(lambda i: self.batch(start + i, seed), count - start)

    def batch(self, index: int, seed: int = 0):
        h, w = self.crop
        first = STEREO_FINETUNE_SEED_BASE + seed * 1_000_000 + index * self.batch_size
        return tuple(torch.from_numpy(a) for a in make_batch([scene_seed("train", first + j) for j in range(self.batch_size)], h, w))

    @staticmethod
    def predict(model, batch):
        return model(batch[0], batch[1])

    def loss(self, model, batch):
        return self._disparity_loss(self.predict(model, batch), batch[2], model.max_disparity)

    @staticmethod
    def _disparity_loss(pred, gt, max_disparity):
        """Smooth L1 of the full-resolution disparity over the pixels with ground truth in range."""
        full = pred[0] if isinstance(pred, tuple) else pred
        valid = torch.isfinite(gt) & (gt < max_disparity)
        return F.smooth_l1_loss(full[valid], gt[valid])

    def distill_loss(self, model, teacher_output, batch):
        """Half task loss, half distance to the dense network's own disparity (its soft target), from one forward
        pass (until 7c3f4b2 the task loss ran a second one, which also moved batch-norm statistics twice a step)."""
        pred = self.predict(model, batch)
        full = pred[0] if isinstance(pred, tuple) else pred
        return 0.5 * self._disparity_loss(pred, batch[2], model.max_disparity) + 0.5 * F.smooth_l1_loss(full, teacher_output)

    def cost_distill_loss(self, model, teacher, batch):
        """The task loss plus the KL divergence from the dense network's matching distribution to the compressed
        one's, at every 1/4-resolution pixel: softmax over the D disparity shifts of the logits that soft-argmin
        reads. Knowledge distillation (Hinton et al. 2015) applied to the cost volume: where the final disparity
        gives one number per pixel, this says how sure the dense network is of every shift, ambiguities included."""
        with torch.no_grad():
            _, target = teacher.forward_with_logits(batch[0], batch[1])
        pred, logits = model.forward_with_logits(batch[0], batch[1])
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target, 1), log_target=True, reduction="none").sum(1).mean()
        return self._disparity_loss(pred, batch[2], model.max_disparity) + kl

    def example_inputs(self):
        from jpq_core.data.stereo_files import middlebury_motorcycle

        s = middlebury_motorcycle()
        shape = (1, 3, *s.shape)
        return torch.zeros(shape), torch.zeros(shape)

    @property
    def data_key(self) -> str:
        """What determines the training batches (for cache keys)."""
        return f"synthetic{self.crop[0]}x{self.crop[1]}n{self.batch_size}"

    @staticmethod
    def trace_inputs():
        """Small inputs for tracing the network's structure (channel coupling)."""
        return torch.zeros(1, 3, 64, 128), torch.zeros(1, 3, 64, 128)

    @staticmethod
    def training_optimizer(model, cfg):
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)

    @staticmethod
    def training_batches(cfg, start: int):
        return torch.utils.data.DataLoader(_StereoBatches(cfg, start), batch_size=None, num_workers=1, prefetch_factor=4)

    @staticmethod
    def training_loss(model, batch):
        left, right, gt = batch
        return stereo_loss(model(left, right), gt, model.max_disparity)

    def evaluate(self, model) -> dict:
        if self._eval_samples is None:
            from jpq_core.data import stereo_eval_samples

            self._eval_samples = stereo_eval_samples(self.eval_data)
        return evaluate_stereo(model, self._eval_samples)


class ClassificationTask:
    name = "classification"
    default_lr = 1e-3
    primary_metric = ("top1", True)

    def __init__(self, data: str = "digits", batch_size: int = 64):
        from jpq_core.data.classification import load_classification

        self.data, self.batch_size = data, batch_size
        self.train_x, self.train_y = load_classification(data, "train")
        self.test_x, self.test_y = load_classification(data, "test")

    def batches(self, count: int, seed: int = 0, start: int = 0):
        """Random training batches start..count-1 of the sequence that `seed` fixes."""
        g = torch.Generator().manual_seed(seed)
        for i in range(count):
            idx = torch.randint(0, len(self.train_x), (self.batch_size,), generator=g)
            if i >= start:
                yield self.train_x[idx], self.train_y[idx]

    @staticmethod
    def predict(model, batch):
        return model(batch[0])

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def distill_loss(self, model, teacher_output, batch, temperature: float = 4.0):
        """Hinton et al. 2015: KL to the dense network's softened outputs plus the task loss."""
        logits = model(batch[0])
        soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(teacher_output / temperature, 1), reduction="batchmean")
        return 0.5 * F.cross_entropy(logits, batch[1]) + 0.5 * soft * temperature**2

    @property
    def data_key(self) -> str:
        return f"{self.data.replace(':', '_').replace('/', '_')}n{self.batch_size}"

    @property
    def num_classes(self) -> int:
        """Classes in the data (labels 0..n-1): the classifier's outputs for a network built for it."""
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    def example_inputs(self):
        """One zero image at the data's size (channels, height, width)."""
        return (torch.zeros(1, *self.train_x.shape[1:]),)

    trace_inputs = example_inputs

    def evaluate(self, model) -> dict:
        return {"top1": evaluate_classifier(model, self.test_x, self.test_y)["top1"]}

    @staticmethod
    def training_optimizer(model, cfg):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)

    @staticmethod
    def training_batches(cfg, start: int):
        from jpq_core.data.classification import load_classification

        images, labels = load_classification(cfg.data, "train")
        return _classifier_batches(cfg, images, labels, start)

    @staticmethod
    def training_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


TASKS = {"stereo": StereoTask, "classification": ClassificationTask}


def task_class(network: str):
    """The task class of a network (what it is trained, compressed and evaluated on), without loading its data."""
    from jpq_core.models import task_of

    return TASKS[task_of(network)]


def make_task(network: str, data: str | None = None):
    if task_class(network) is StereoTask:
        return StereoTask(eval_data=data or "middlebury")
    return ClassificationTask(data or "digits")

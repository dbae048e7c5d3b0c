"""Bad-3 / top-1 of magnitude-pruned, w4/a8 networks without fine-tuning, per recovery method (docs/results.md).

    python scripts/recovery_table.py --network stereo --sparsities 0.8,0.9,0.95 --methods none,bn,lsq+bn,obc+bn
    python scripts/recovery_table.py --network stereo --allocation recovery-aware --methods lsq --samples 16
"""
import argparse
import copy
import json
import time

import torch

from jpq_core import recovery
from jpq_core.models import load_network
from jpq_core.compressed import add_activation_quantizers, attach, calibrate_activations
from jpq_core.compression import prune_masks
from jpq_core.pipeline import CompressionConfig
from jpq_core.sensitivity import recovery_aware_allocation
from jpq_core.tasks import make_task


def compressed(model, task, sparsity, wbits, abits, allocation, criterion):
    config = CompressionConfig(network="x", criterion=criterion, sparsity=sparsity, wbits=wbits, abits=abits,
                               finetune="none", allocation=allocation, calibration_batches=2).check()
    per_layer = recovery_aware_allocation(model, task, config, sparsity) if allocation == "recovery-aware" else None
    net = attach(copy.deepcopy(model).eval(), None, None)
    attach(net, prune_masks(net, task, config, sparsity, allocation=per_layer), config.wbits)
    add_activation_quantizers(net, config.abits, config.calibration)
    calibrate_activations(net, task, config.calibration_batches, 0)
    return net.eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--network", default="stereo")
    p.add_argument("--sparsities", default="0.8,0.9,0.95")
    p.add_argument("--methods", default="none,bn,lsq+bn,obc+bn")
    p.add_argument("--samples", type=int)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--allocation", default="global")
    p.add_argument("--criterion", default="magnitude")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_network(a.network).eval()
    task = make_task(a.network)
    metric = task.primary_metric[0]
    for s in [float(v) for v in a.sparsities.split(",")]:
        base = compressed(model, task, s, a.wbits, a.abits, a.allocation, a.criterion)
        for m in a.methods.split(","):
            net = copy.deepcopy(base)
            info = recovery.apply(net, model, task, m, samples=a.samples)
            value = task.evaluate(net)[metric]
            print(json.dumps({"network": a.network, "sparsity": s, "allocation": a.allocation, "criterion": a.criterion,
                              "wbits": a.wbits, "abits": a.abits, **info, metric: round(value, 4)}), flush=True)


if __name__ == "__main__":
    main()

"""Sessions at the same time in one server process (issue 22, found by scripts/many_users.py): one session's
engine compilation traces with torch.fx, which patches `nn.Module.__call__` for the whole process while it
runs; another session's forward or compilation must neither fail nor be traced into it."""

import threading
import time

import torch
import torch.nn as nn

from jpq_core.compressed import attach
from jpq_core.engine import compile_network
from jpq_core.engine.lowering import trace


class Deep(nn.Module):
    """Many layers in a forward torch.fx traces through (not a Sequential): a trace long enough to overlap."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(40))

    def forward(self, x):
        x = torch.relu(self.first(x))
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return x


def small_network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = Deep().eval()
    masks = {n: torch.rand_like(m.weight) > 0.5 for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    return attach(net, masks, 4)  # masked, quantized weights: parametrizations, i.e. module calls on every access


def test_compiling_in_one_thread_while_others_run_and_compile():
    nets = [small_network(i) for i in range(3)]
    x = torch.rand(1, 3, 6, 6)
    expected = [net(x) for net in nets]
    errors, stop = [], threading.Event()

    def forwards(net, want):
        while not stop.is_set():
            try:
                with torch.no_grad():
                    assert torch.equal(net(x), want)
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                errors.append(f"forward: {type(exc).__name__}: {exc}")
                return

    def compiles(net):
        for i in range(60):
            try:
                trace(net, "net") if i % 6 else compile_network(net)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"compile: {type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=forwards, args=(nets[0], expected[0])),
               threading.Thread(target=compiles, args=(nets[1],)), threading.Thread(target=compiles, args=(nets[2],))]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    for t in threads[1:]:
        t.join(timeout=max(1, deadline - time.time()))
    stop.set()
    threads[0].join(timeout=30)
    assert not errors, errors[:3]
    assert nn.Module.__call__ is torch.nn.modules.module.Module.__call__ and "wrapper" not in nn.Module.__call__.__qualname__
    assert torch.equal(nets[0](x), expected[0])  # nothing left patched

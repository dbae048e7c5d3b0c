"""Output channels that nothing reads.

A sparse consumer reads only the input channels where it keeps a weight, for the output channels that are read
in turn. At extreme sparsity most channels go unread: in the stereo network at 99%, features.half_res.1.0 reads
4 of the first convolution's 24 channels, and aggregation.4.0 reads 8 of aggregation.3.0's 48. The engine
computes no unread channel: the sparse kernel skips it (accumulators and epilogue), and the dense path's direct
kernel leaves it out of its channel blocks (`direct.group_taps`' channels). An unread channel's bytes in a
consumer's input buffer keep their padding value from creation.

A channel counts as read unless every reader is known to skip it. The analysis goes from the last op back, so
that each consumer's own unread channels are known when its producers are marked:

- the program's output, a glue op (correlation, soft-argmin, ...), or a conv that takes the output through its
  own store of the float tensor (not written into its input buffer by the producer): every channel;
- a conv that runs dense (matrix products over all taps) or as a linear layer: every channel;
- a sparse conv into whose input buffer the producer writes (its `targets`, at channel offset c0; whichever slot
  the conv names as its input): channels ci - c0 of its kept weights (o, ci) whose output channel o is read;
- a conv that adds the output as its residual: the channels it reads of its own output.

    mark_unread_channels(ops, output)   # after linking, before the first run (`lowering.link`)
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

def mark_unread_channels(ops: list, output: int) -> None:
    """Set each conv's `unread` (bool per output channel, or None where every channel is read); `output` is the
    program's output slot."""
    readers = defaultdict(list)  # slot -> [(op, whether it takes the slot as its residual)]
    for op in ops:
        for slot in op.inputs:
            readers[slot].append((op, False))
        if op.kind == "conv" and op.residual is not None:
            readers[op.residual].append((op, True))
    for op in reversed(ops):
        if op.kind == "conv":
            read = _channels_read(op, readers[op.output], output)
            op.unread = None if read is None or read.all() else ~read


def _channels_read(conv, readers: list, output: int) -> np.ndarray | None:
    """Which of `conv`'s output channels are read (bool per channel), or None: all of them. `readers`: the ops
    that take its output slot; the consumers it writes directly (`targets`) read it too, also where they take
    it through a slot of their own (StereoNet's refinement reads the left view's half of the features)."""
    targets = [(consumer, target[1]) for consumer, target in zip(conv.consumers, conv.targets or [])]
    if conv.output == output or not (readers or targets) or conv.linear:
        return None
    c_out = conv.shape[0]
    read = np.zeros(c_out, bool)
    for reader, as_residual in readers:
        if reader.kind != "conv" or reader.linear:
            return None
        if as_residual:
            if reader.shape[0] != c_out:
                return None
            read |= _read_outputs(reader)
        elif not any(consumer is reader for consumer, _ in targets):  # it stores the float output itself
            return None
    for consumer, c0 in targets:
        if consumer.dense or consumer.linear:
            return None
        c, ci = consumer._decoded()[:2]
        ci = ci[_read_outputs(consumer)[c]] - c0
        read[ci[(ci >= 0) & (ci < c_out)]] = True
    return read


def _read_outputs(conv) -> np.ndarray:
    """Bool per output channel of `conv`: read (as marked already)."""
    return np.ones(conv.shape[0], bool) if conv.unread is None else ~conv.unread

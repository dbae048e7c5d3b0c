"""Structured (channel-level) pruning with coupled channels.

Removing output channel c of a convolution also removes input channel c of every layer that reads it and
the batch-norm channel c in between. Residual additions couple more: in y = relu(x + f(x)) channel c of x and
of f(x) are added one to one, so channel c of every convolution feeding the same sum must go together.
torch-pruning's DependencyGraph (Fang et al., CVPR 2023, "DepGraph: Towards Any Structural Pruning") traces
the network with autograd and collects such coupled channels into groups; a `ChannelGroup` lists one group by
layer name. Group channel j is output channel j of the group's `root` layer.

Group criteria score every group channel c (higher = more important; pruning removes the lowest):

    GroupL1 / GroupL2  sum over producing layers l of ||W_l[c]||_p            (Li et al., ICLR 2017)
    BNScale            sum over the group's batch norms of |gamma[c]|          (Liu et al., ICCV 2017, Network Slimming)
    GroupTaylor        1/B sum_b (sum_{params s removed with c} g_b,s * w_s)^2 (Molchanov et al., CVPR 2019)
    GroupFisher        sum_n (sum_{l in group} sum_hw a^l_nchw dL/da^l_nchw)^2 / params(c)
                                                                               (Liu et al., ICML 2021, "Group Fisher Pruning")

GroupFisher is the Fisher information of one mask m_c shared by the coupled activations a^l (the outputs of the
batch norms after the group's convolutions): dL/dm_c = sum_l sum_hw a^l dL/da^l for sample n, squared and summed
over samples, divided by the prunable weights the channel frees. Gradient criteria read `GroupStats`, gathered
in one pass by `gather_group_stats`.

`channel_masks` removes the lowest-scoring channels until a weight sparsity is reached. Its masks zero both the
producing rows and the consuming columns, so the masked network computes exactly what the smaller network made
by `physically_prune` computes (a removed channel's batch-norm output is a constant that nobody reads any more).

Channels that the network returns (classifier outputs, the stereo network's disparity shifts and refinement
output) are never pruned. Networks whose forward reduces over channels without weights (the stereo correlation
is a mean over channels) need a tracing function that cuts the graph there; the stereo one is built in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from jpq_core.compressed import raw_weight, transform
from jpq_core.criterion import Criterion
from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers
from jpq_core.models.stereo import StereoNet
from jpq_core.pruning import apply_masks, check_sparsity

_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Member:
    """Channels of one layer in a group: `index[k]` of layer `layer` is group channel `root[k]`.

    kind "out": output channels (weight rows) of a convolution / linear layer; "in": their input channels (weight
    columns); "bn": batch-norm channels; "act": the layer whose output is the channel's activation (GroupFisher).
    """

    layer: str
    kind: str
    index: torch.Tensor
    root: torch.Tensor


@dataclass
class ChannelGroup:
    root: str
    size: int
    members: list[Member]

    def layers(self, kind: str) -> list[str]:
        return [m.layer for m in self.members if m.kind == kind]

    def __repr__(self) -> str:
        return f"ChannelGroup(root={self.root!r}, size={self.size}, out={self.layers('out')}, in={self.layers('in')})"


# ---- tracing -------------------------------------------------------------------------------------------


def _stereo_tracer(model: StereoNet, inputs):
    """Traces StereoNet up to its weight-free channel reductions, which autograd tracing cannot see through.

    The correlation (a mean over channels) and the soft-argmin (a sum over disparity shifts) would otherwise be
    taken for element-wise operations, coupling unrelated layers. The cost volume and the coarse disparity enter
    the aggregation and the refinement as constant placeholders of the right width, so torch-pruning places the
    context and the 1/2-res features at the right input channels and never prunes the placeholder channels.
    The 1/4-res matching features are returned as an output: the correlation reads them without weights (a bias
    and the 1/C of its mean would survive any weight mask), so their channels are kept.
    """
    left, right = inputs
    n, _, h, w = left.shape
    hp, wp = h + (-h) % 8, w + (-w) % 8
    cost = nn.Parameter(torch.zeros(n, model.shifts, hp // 4, wp // 4, device=left.device))
    disparity = nn.Parameter(torch.zeros(n, 1, hp // 2, wp // 2, device=left.device))

    def forward(model, inputs):
        pad = (0, wp - w, 0, hp - h)
        half, quarter = model.features(F.pad(inputs[0], pad))
        _, quarter_right = model.features(F.pad(inputs[1], pad))
        logits = model.aggregation(torch.cat([cost, model.context(quarter)], 1))
        residual = model.refine(torch.cat([half, disparity], 1))
        return [quarter * quarter_right, logits, residual]

    return forward, [(cost, 1), (disparity, 1)]


# type -> tracer(model, inputs) -> (forward_fn, unwrapped parameters): for networks with weight-free channel reductions
TRACERS = {StereoNet: _stereo_tracer}


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _runs(model: nn.Module, inputs) -> bool:
    """Whether the network's forward accepts `inputs`."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
        return True
    except Exception:  # any failure means the inputs do not fit
        return False
    finally:
        model.train(was_training)


def _trace(model: nn.Module, example_inputs, ignored_layers=()):
    """(DependencyGraph, [(ChannelGroup, torch-pruning group)]) for every prunable group of `model`."""
    inputs = _as_tuple(example_inputs)
    names = {m: n for n, m in model.named_modules()}
    unknown = set(ignored_layers) - set(names.values())
    if unknown:
        raise JPQError(f"cannot ignore unknown layers: {', '.join(sorted(unknown))}.")
    tracer = TRACERS.get(type(model))
    forward_fn, unwrapped = tracer(model, inputs) if tracer else (None, None)
    was_training = model.training
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, inputs, forward_fn=forward_fn, unwrapped_parameters=unwrapped, verbose=False
            )
    except Exception as e:  # a wrong number or shape of inputs surfaces here as anything at all
        shapes = ", ".join(str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__ for x in inputs)
        if _runs(model, inputs):  # the inputs fit: torch-pruning cannot follow this network's channels
            raise JPQError(
                f"torch-pruning could not follow the channel coupling of {type(model).__name__} ({type(e).__name__}: {e}), "
                "e.g. through a channel shuffle; channel-level criteria are not available for it: use a weight-level "
                "criterion (magnitude, taylor, fisher, snip, gradient, random).") from e
        raise JPQError(
            f"could not trace {type(model).__name__} with example inputs of shapes ({shapes}): {e}. Pass a tuple of "
            "inputs its forward accepts, e.g. (left, right) for the stereo network."
        ) from e
    finally:
        model.train(was_training)

    # Output layers: channels that reach a network output (directly or through element-wise ops) are kept.
    def reaches_output(group) -> bool:
        for dep, _ in group:
            node = dep.target
            if node.type == tp.ops.OPTYPE.OUTPUT:
                return True
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(node.module, nn.Module) and not node.outputs:
                return True
        return False

    output_layers = {dep.target.module for g in graph.get_all_groups() if reaches_output(g) for dep, _ in g
                     if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and graph.is_out_channel_pruning_fn(dep.handler)}
    ignored = list(output_layers) + [model.get_submodule(n) for n in ignored_layers]
    return graph, [(_describe(graph, g, names), g) for g in graph.get_all_groups(ignored_layers=ignored)]


def _describe(graph, group, names) -> ChannelGroup:
    members = []
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        if not isinstance(module, (nn.Conv2d, nn.Linear, *_NORMS)) or any(r is None for r in item.root_idxs):
            continue
        if isinstance(module, _NORMS):
            kind = "bn"
        else:
            kind = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
        members.append(Member(names[module], kind, torch.tensor(item.idxs), torch.tensor(item.root_idxs)))
    # Activation of each producing layer: its batch norm's output when one follows it, else its own output.
    norms = {m.layer: m for m in members if m.kind == "bn"}
    for m in [m for m in members if m.kind == "out"]:
        following = [names.get(n.module) for n in graph.module2node[graph.model.get_submodule(m.layer)].outputs]
        bn = next((norms[f] for f in following if f in norms), None)
        members.append(Member((bn or m).layer, "act", (bn or m).index, (bn or m).root))
    root = names[group[0].dep.target.module]
    return ChannelGroup(root, len(group[0].idxs), members)


def channel_groups(model: nn.Module, example_inputs, ignored_layers=()) -> list[ChannelGroup]:
    """The groups of coupled channels of `model`, traced with `example_inputs` (a tuple of forward's inputs).

    Layers whose output channels the network returns are never pruned; `ignored_layers` (names) adds more.
    """
    return [g for g, _ in _trace(model, example_inputs, ignored_layers)[1]]


# ---- criteria -------------------------------------------------------------------------------------------


def freed_parameters(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Prunable weights (convolution / linear weights) removed with each group channel, one count per channel."""
    count = torch.zeros(group.size)
    for m in group.members:
        w = model.get_submodule(m.layer).weight
        if m.kind == "out":
            count.index_add_(0, m.root, torch.full((len(m.root),), float(w[0].numel())))
        elif m.kind == "in":
            count.index_add_(0, m.root, torch.full((len(m.root),), float(w[:, 0].numel())))
    return count


@dataclass
class GroupStats:
    """Per group, one value per group channel: taylor = 1/B sum_b (sum g*w)^2, fisher = sum_n s_nc^2."""

    taylor: list[torch.Tensor]
    fisher: list[torch.Tensor]
    batches: int


def gather_group_stats(model: nn.Module, groups: list[ChannelGroup], batches, loss_fn, progress=None) -> GroupStats:
    """One backward pass per calibration batch; `loss_fn(model, batch) -> scalar loss`.

    A gate of ones, one per (sample, group channel), multiplies every activation of the group (forward
    hooks), so the forward is unchanged and the gate's gradient is s_nc = sum_l sum_hw a dL/da. The model runs
    in eval mode (batch norm on running statistics, as at inference); its mode and weights are restored.
    """
    by_layer: dict[str, list] = {}
    for gi, g in enumerate(groups):
        for m in g.members:
            if m.kind == "act":
                by_layer.setdefault(m.layer, []).append((gi, m.index, m.root))
    gates: dict[int, torch.Tensor] = {}

    def hook(module, inputs, output, name):
        n, c = output.shape[:2]
        mult = output.new_ones(n, c)
        for gi, index, root in by_layer[name]:
            if gi not in gates:
                gates[gi] = output.new_ones(n, groups[gi].size, requires_grad=True)
            mult = mult.index_copy(1, index.to(output.device), gates[gi][:, root.to(output.device)])
        return output * mult.view(n, c, *([1] * (output.dim() - 2)))

    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
               for name in by_layer]
    taylor = [torch.zeros(g.size) for g in groups]
    fisher = [torch.zeros(g.size) for g in groups]
    was_training = model.training
    model.eval()
    batches = list(batches)
    try:
        for b, batch in enumerate(batches):
            gates.clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(model, batch).backward()
            for gi, g in enumerate(groups):
                t = torch.zeros(g.size)
                for m in g.members:
                    t.index_add_(0, m.root, _member_gw(model.get_submodule(m.layer), m))
                taylor[gi] += t**2
                if gi in gates and gates[gi].grad is not None:
                    fisher[gi] += (gates[gi].grad.detach().cpu() ** 2).sum(0)
            if progress:
                progress(b + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return GroupStats([t / max(1, len(batches)) for t in taylor], fisher, len(batches))


def _member_gw(module: nn.Module, m: Member) -> torch.Tensor:
    """sum of g * w over the parameters of `module` that belong to each of the member's channels."""
    zero = torch.zeros(len(m.index))
    if m.kind == "act" or module.weight is None:  # a batch norm without affine parameters has none
        return zero
    params = [(raw_weight(module), module.weight)] + ([(module.bias, module.bias)] if module.bias is not None else [])
    total = zero
    for p, w in params:
        if p.grad is None or (m.kind == "in" and w.dim() < 2):
            continue
        gw = (p.grad.detach() * w.detach()).cpu()
        if m.kind == "in":
            gw = gw.transpose(0, 1)
        total = total + gw[m.index].reshape(len(m.index), -1).sum(1)
    return total


class GroupCriterion(Criterion):
    """A criterion that scores whole channels: `group_scores(model, groups, stats)` -> one score per group channel,
    groups concatenated; the masks remove the lowest-scoring channels with everything coupled to them
    (`channel_masks`)."""

    name = "group-criterion"
    level = "channel"
    needs_gradients = False

    def masks(self, model, sparsity, stats=None, *, groups=None, protect=frozenset(), allocation="global"):
        if groups is None:
            raise JPQError(f"{self.name!r} removes coupled channels: pass their groups "
                           "(jpq_core.compression.trace_groups).")
        return channel_masks(model, groups, self.group_scores(model, groups, stats), sparsity)

    def group_scores(self, model: nn.Module, groups: list[ChannelGroup], stats: GroupStats | None = None) -> torch.Tensor:
        return torch.cat([self._scores(model, g, i, stats) for i, g in enumerate(groups)]) if groups else torch.zeros(0)

    def _scores(self, model, group, i, stats) -> torch.Tensor:
        raise NotImplementedError

    def _need(self, stats):
        if stats is None:
            raise JPQError(f"criterion {self.name!r} needs gradients: pass gather_group_stats(model, groups, batches, loss_fn).")
        return stats

    def __repr__(self) -> str:
        return self.name


class GroupL1(GroupCriterion):
    """sum over the group's producing layers of the filter's L1 norm (Li et al., ICLR 2017)."""

    name, p = "group-l1", 1

    def _scores(self, model, group, i, stats):
        s = torch.zeros(group.size)
        for m in group.members:
            if m.kind == "out":
                w = model.get_submodule(m.layer).weight.detach().cpu()
                s.index_add_(0, m.root, w[m.index].flatten(1).norm(p=self.p, dim=1))
        return s


class GroupL2(GroupL1):
    """sum over the group's producing layers of the filter's L2 norm."""

    name, p = "group-l2", 2


class BNScale(GroupCriterion):
    """sum of |gamma| over the group's batch norms (Liu et al., ICCV 2017, "Learning Efficient Convolutional
    Networks through Network Slimming")."""

    name = "bn-scale"

    def _scores(self, model, group, i, stats):
        bns = [m for m in group.members if m.kind == "bn"]
        if not bns:
            raise JPQError(f"the channel group of {group.root!r} has no batch norm to read |gamma| from; use GroupL1.")
        s = torch.zeros(group.size)
        for m in bns:
            s.index_add_(0, m.root, model.get_submodule(m.layer).weight.detach().cpu()[m.index].abs())
        return s


class GroupTaylor(GroupCriterion):
    """1/B sum_b (sum over every parameter removed with the channel of g_b * w)^2 (Molchanov et al., CVPR 2019,
    "Importance Estimation for Neural Network Pruning"): the first-order loss change of removing the channel."""

    name, needs_gradients = "group-taylor", True

    def _scores(self, model, group, i, stats):
        return self._need(stats).taylor[i].clone()


class GroupFisher(GroupCriterion):
    """sum_n (sum_l sum_hw a dL/da)^2 over the group's coupled activations, divided by the prunable weights the
    channel frees (Liu et al., ICML 2021, "Group Fisher Pruning for Practical Network Compression")."""

    name, needs_gradients = "group-fisher", True

    def _scores(self, model, group, i, stats):
        return self._need(stats).fisher[i] / freed_parameters(model, group).clamp_min(1.0)


# ---- masks and physical pruning -------------------------------------------------------------------------


def channel_masks(model: nn.Module, groups: list[ChannelGroup], group_scores, sparsity: float,
                  min_channels: int = 1) -> dict[str, torch.Tensor]:
    """Keep-masks (weight-shaped, True = kept) for every prunable layer that remove whole group channels.

    Channels go lowest score first (ties by position) until `sparsity` of the prunable weights (the weights of
    `prunable_layers(model)`) is reached or just exceeded; each group keeps its `min_channels` best channels.
    `group_scores` is one tensor of all group channels (as `group_scores()` returns) or one tensor per group.
    The achieved sparsity is `jpq_core.pruning.sparsity_of(masks)`.
    """
    sparsity = check_sparsity(sparsity)
    if int(min_channels) != min_channels or min_channels < 1:
        raise JPQError(f"min_channels must be a whole number >= 1 (a group without channels breaks the network), got {min_channels}.")
    sizes = [g.size for g in groups]
    flat = torch.cat([torch.as_tensor(s).flatten() for s in group_scores]) if isinstance(group_scores, (list, tuple)) \
        else torch.as_tensor(group_scores).flatten()
    if flat.numel() != sum(sizes):
        raise JPQError(f"got {flat.numel()} channel scores for {len(groups)} groups with {sum(sizes)} channels; "
                       "score the same groups you pass.")
    layers = prunable_layers(model)
    masks = {k: torch.ones(m.weight.shape, dtype=torch.bool) for k, m in layers.items()}
    total = sum(m.numel() for m in masks.values())
    target = sparsity * total

    # Candidates: every channel but each group's min_channels best, lowest score first.
    start, candidates = 0, []
    for gi, g in enumerate(groups):
        s = flat[start : start + g.size].double()
        protected = torch.argsort(s, descending=True, stable=True)[: min(min_channels, g.size)]
        free = torch.ones(g.size, dtype=torch.bool)
        free[protected] = False
        candidates += [(start + int(c), gi, int(c)) for c in torch.nonzero(free).flatten()]
        start += g.size
    candidates.sort(key=lambda t: (float(flat[t[0]]), t[0]))

    removed = 0  # weights removed so far, counted exactly as they leave the masks
    for _, gi, c in candidates:
        if removed >= target:
            break
        for m in groups[gi].members:
            if m.kind not in ("out", "in") or m.layer not in masks:
                continue
            for idx in m.index[m.root == c].tolist():
                removed += _remove_channel(masks[m.layer], layers[m.layer], m.kind, idx)
    if removed < target:
        raise JPQError(
            f"sparsity {sparsity:.4g} cannot be reached by removing channels: keeping min_channels={min_channels} per "
            f"group, never pruning output layers or the network's input channels, at most {removed / total:.4g} of the "
            "prunable weights can go. Lower the sparsity or min_channels."
        )
    return masks


def _remove_channel(mask: torch.Tensor, layer: nn.Module, kind: str, idx: int) -> int:
    """Clear output channel `idx` (kind "out") or input channel `idx` (kind "in") of a layer's mask; returns how
    many kept weights that removed. A grouped convolution's input channel idx is column idx % (C_in / groups)
    of the output channels of group idx // (C_in / groups)."""
    if kind == "out":
        part = mask[idx]
    else:
        per_group = mask.shape[1]
        groups = getattr(layer, "groups", 1)
        rows = mask.shape[0] // groups
        group = idx // per_group if groups > 1 else 0
        part = mask[group * rows:(group + 1) * rows, idx % per_group] if groups > 1 else mask[:, idx]
    count = int(part.sum())
    part[...] = False
    return count


def _masks_from_channels(model, traced, channels: dict) -> dict[str, torch.Tensor]:
    """{layer: output channels to remove} -> masks removing those channels' whole groups."""
    masks = {k: torch.ones(m.weight.shape, dtype=torch.bool) for k, m in prunable_layers(model).items()}
    for layer, idxs in channels.items():
        owner = [(g, m) for g, _ in traced for m in g.members if m.kind == "out" and m.layer == layer]
        if not owner:
            raise JPQError(f"{layer!r} has no prunable output channels (an output layer, ignored, or not a layer).")
        g, member = owner[0]
        for i in idxs:
            hit = member.root[member.index == int(i)]
            if len(hit) == 0:
                raise JPQError(f"{layer!r} has no output channel {i}.")
            for m in g.members:
                for j in m.index[m.root == hit[0]].tolist():
                    if m.kind in ("out", "in"):
                        _remove_channel(masks[m.layer], model.get_submodule(m.layer), m.kind, j)
    return masks


def physically_prune(model: nn.Module, example_inputs, masks_or_channels: dict) -> nn.Module:
    """A smaller copy of `model` that computes what the masked model computes.

    `masks_or_channels` is {layer: weight-shaped keep-mask} (e.g. from `channel_masks`) or {layer: output
    channels to remove}. Masks are applied to the copy, then every group channel whose weights are all masked
    is removed with torch-pruning (each group keeps at least one channel). `model` is not changed.
    """
    if any(transform(m) is not None for m in prunable_layers(model).values()):
        raise JPQError("physically_prune needs plain weights: take the plain network first "
                       "(jpq_core.compressed.detach(model)).")
    pruned = copy.deepcopy(model)
    graph, traced = _trace(pruned, example_inputs)
    values = list(masks_or_channels.values())
    is_masks = all(torch.is_tensor(v) and v.dtype == torch.bool for v in values)
    given = dict(masks_or_channels) if is_masks else _masks_from_channels(pruned, traced, masks_or_channels)
    layers = prunable_layers(pruned)
    for k, v in given.items():
        if k not in layers or tuple(v.shape) != tuple(layers[k].weight.shape):
            raise JPQError(f"mask {k!r} does not match a prunable layer's weight shape; make masks for this network.")
    masks = {k: given[k].cpu() if k in given else torch.ones(m.weight.shape, dtype=torch.bool) for k, m in layers.items()}
    apply_masks(pruned, masks)
    for group, tp_group in traced:
        gone = torch.ones(group.size, dtype=torch.bool)
        for m in group.members:
            if m.kind in ("out", "in"):
                mask = masks[m.layer] if m.kind == "out" else masks[m.layer].transpose(0, 1)
                alive = mask[m.index].flatten(1).any(1)
                gone[m.root[alive]] = False
        idxs = torch.nonzero(gone).flatten().tolist()
        if len(idxs) == group.size:
            idxs = idxs[1:]  # zero weights stay; a layer without channels would not run
        if idxs:
            tp_group.prune(idxs=idxs)
    return pruned

"""Recording the routing of a network's (d)MoE blocks per attribute level, with forward hooks.

- a forward pre-hook on the network reads each window's input and decodes every attribute's level per sample from
  its channel (:func:`nnunet_dmoe.data.attribute.decode_attribute_levels`, the rule the network itself uses; a window
  whose channel is 0 everywhere, e.g. outside the image footprint, is "unknown", as for the network);
- a forward hook on the router (:class:`~nnunet_dmoe.method.dmoe.NoisyTopKRouter`) of every
  :class:`~nnunet_dmoe.method.dmoe.DistributionAwareMoE` counts, per sample, the tokens sent to each expert (top-k counted)
  and sums their gate values.

A block that runs more than once per forward pass (a transformer's shared (d)MoE after every transformer block)
gives one row set per call. :class:`RoutingRecorder` works on any network with (d)MoE blocks.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_dmoe.commands.routing_summary import js_summary
from nnunet_dmoe.data.attribute import UNKNOWN_LEVEL, AttributeSpec, decode_attribute_levels
from nnunet_dmoe.method.routing import route_index_for_levels
from nnunet_dmoe.method.dmoe import DistributionAwareMoE

__all__ = ["RoutingRecorder", "unwrap", "UNKNOWN", "COUNTING"]

UNKNOWN = UNKNOWN_LEVEL
COUNTING = ("fraction[e]: share of the row's tokens that have expert e among their top-k (each token counts once "
            "for each of its k experts, so a row sums to k); mean_gate[e]: mean gate value of expert e over the "
            "tokens that selected it (null where none did); tokens: tokens (voxels or transformer tokens) of all "
            "sliding windows, mirrored (TTA) windows and folds, background and padding included.")
_NO_MOE = ("{where} has no (d)MoE block (no nnunet_dmoe.method.dmoe.DistributionAwareMoE module): there is no routing to "
           "report. Use a model trained with a (d)MoE trainer, e.g. nnUNetTrainerDMoE or nnUNetTrainerMoE "
           "(nnUNetv2_dmoe_list_trainers lists them).")


def unwrap(network: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` / DistributedDataParallel wrappers."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(network, (OptimizedModule, DistributedDataParallel)):
        network = network._orig_mod if isinstance(network, OptimizedModule) else network.module
    return network


def _block_label(network: nn.Module, path: str, call: int, calls: int) -> Tuple[str, Optional[int]]:
    """A readable name of a block (``encoder stage 2``, ``transformer block 5``) and its stage/block index."""
    from nnunet_dmoe.networks.unet import AttributeUNet
    from nnunet_dmoe.networks.transformer import AttributeTransformer

    last = path.rsplit(".", 1)[-1]
    index = int(last) if last.isdigit() else None
    if isinstance(network, AttributeUNet) and index is not None:
        return f"encoder stage {index}", index
    if isinstance(network, AttributeTransformer):
        block = call if calls > 1 or network.placement == "shared" else index
        return f"transformer block {block}", block
    return (path if calls == 1 else f"{path} call {call}"), (index if calls == 1 else call)


class RoutingRecorder:
    """Forward hooks on ``network`` that count, per (d)MoE block and attribute level, the tokens routed to each expert.

    Use as a context manager around the forward passes (the hooks are removed on exit), then :meth:`blocks`::

        with RoutingRecorder(network, specs) as rec:
            network(x)
        rec.blocks()

    ``specs``: the attributes (:func:`nnunet_dmoe.data.attribute.attribute_specs_from_dataset_json`); each sample's level
    of attribute ``a`` is decoded from input channel ``specs[a].channel``. Rows are (attribute, level) with
    "unknown" last for each attribute. Counting stays on the network's device (no host synchronisation besides the
    decoding check of codes above the number of levels, which the network does too).
    """

    def __init__(self, network: nn.Module, specs: Sequence[AttributeSpec], where: str = "the network"):
        self.network = unwrap(network)
        self.specs = list(specs)
        self.moes = [(name, m) for name, m in self.network.named_modules() if isinstance(m, DistributionAwareMoE)]
        if not self.moes:
            raise ValueError(_NO_MOE.format(where=where))
        # one row per router, in route_index_for_levels' order: each attribute's levels, then its unknown
        self.rows: List[Tuple[str, str]] = [(s.name, lv) for s in self.specs for lv in [*s.levels, UNKNOWN]]
        self._handles = []
        self._sample_rows: Optional[torch.Tensor] = None  # (A, b) row index per attribute and sample
        self._calls: Dict[str, int] = {}
        self._acc: Dict[Tuple[str, int], dict] = {}  # (module path, call) -> accumulators
        self._max_calls: Dict[str, int] = {}
        self.windows = 0

    # ---------------------------------------------------------------------------------------------------- hooks
    def __enter__(self):
        self._handles.append(self.network.register_forward_pre_hook(self._read_levels))
        for name, moe in self.moes:
            self._handles.append(moe.router.register_forward_hook(self._count(name, moe)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _read_levels(self, module, args):
        x = args[0]
        rows = []
        with torch.inference_mode():
            for spec in self.specs:
                if x.shape[1] <= spec.channel:
                    raise ValueError(f"the network's input has {x.shape[1]} channels, but attribute {spec.name!r} "
                                     f"is channel {spec.channel}: give the images with their attribute channel(s) "
                                     f"(nnUNetv2_dmoe_attach_attribute writes them)")
                level = decode_attribute_levels(x[:, spec.channel], spec.num_levels)
                rows.append(level)
            # a row per router: the network's own level -> router rule (each attribute's levels, then its unknown)
            self._sample_rows = route_index_for_levels(torch.stack(rows, dim=1),
                                                       [s.num_levels for s in self.specs], "dmoe").T
        self._calls = {}
        self.windows += x.shape[0]

    def _count(self, name: str, moe: DistributionAwareMoE):
        def hook(router, inputs, output):
            if self._sample_rows is None:
                raise RuntimeError("a (d)MoE router ran before the network's forward: RoutingRecorder counts routing "
                                   "only inside forward passes of the network it was given")
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            self._max_calls[name] = max(self._max_calls.get(name, 0), call + 1)
            gates, expert_index = output
            b = expert_index.shape[0]
            e = moe.num_experts
            with torch.inference_mode():
                idx = expert_index.reshape(b, -1)
                acc = self._acc.get((name, call))
                if acc is None:
                    dev = idx.device
                    gate_dtype = torch.float32 if dev.type == "mps" else torch.float64
                    acc = self._acc[(name, call)] = dict(
                        counts=torch.zeros(len(self.rows), e, dtype=torch.long, device=dev),
                        gate_sum=torch.zeros(len(self.rows), e, dtype=gate_dtype, device=dev),
                        tokens=torch.zeros(len(self.rows), dtype=torch.long, device=dev))
                counts = torch.zeros(b, e, dtype=torch.long, device=idx.device)
                counts.scatter_add_(1, idx, torch.ones_like(idx))
                gate_sum = torch.zeros(b, e, dtype=acc["gate_sum"].dtype, device=idx.device)
                gate_sum.scatter_add_(1, idx, gates.reshape(b, -1).to(gate_sum.dtype))
                rows = self._sample_rows.to(idx.device).reshape(-1)  # (A b,): attribute-major
                a = len(self.specs)
                acc["counts"].index_add_(0, rows, counts.repeat(a, 1))
                acc["gate_sum"].index_add_(0, rows, gate_sum.repeat(a, 1))
                acc["tokens"].index_add_(0, rows, torch.full((a * b,), expert_index.shape[1], dtype=torch.long,
                                                             device=idx.device))
        return hook

    # --------------------------------------------------------------------------------------------------- result
    def blocks(self) -> List[dict]:
        """One entry per (d)MoE block (and call), in forward order: name, label, index, channels, num_experts,
        top_k and, per attribute and level, tokens, fraction and mean_gate (see :data:`COUNTING`), and the
        Jensen-Shannon divergence between the levels (:data:`JS_NOTE`)."""
        out = []
        for (name, call) in self._acc:  # in the order of the first forward pass
            moe = dict(self.moes)[name]
            acc = {k: v.cpu() for k, v in self._acc[(name, call)].items()}
            label, index = _block_label(self.network, name, call, self._max_calls[name])
            block = {"name": name if self._max_calls[name] == 1 else f"{name}#{call}", "module": name, "call": call,
                     "label": label, "index": index, "channels": moe.dim, "num_experts": moe.num_experts,
                     "top_k": moe.top_k, "attributes": {}, "js_divergence": {}}
            for spec in self.specs:
                levels = {}
                for level in [*spec.levels, UNKNOWN]:
                    r = self.rows.index((spec.name, level))
                    n, counts, gsum = int(acc["tokens"][r]), acc["counts"][r].double(), acc["gate_sum"][r].double()
                    levels[level] = {
                        "tokens": n,
                        "fraction": (counts / n).tolist() if n else None,
                        "mean_gate": [float(g / c) if c else None for g, c in zip(gsum, counts)] if n else None}
                block["attributes"][spec.name] = levels
                block["js_divergence"][spec.name] = js_summary(levels, moe.top_k)
            out.append(block)
        return out


"""The agent's observation: one row per decision describing the layer whose bits are being chosen.

Rows come from the cost model's layer dims, which follow the forward-call order, the same order
policies are applied in, so row i always describes layer i of the policy (registration order
would not: a ResNet may register its downsample conv before or after the convs it runs beside).
"""
from __future__ import annotations

import numpy as np

from lib.simulator import CostModel
from lib.search.space import BitSpace

FEATURES = ("index", "kind", "in_channels", "out_channels", "kernel", "stride", "feature_map", "params",
            "row_tiles", "arrays", "slices", "decision", "previous_action")
STATIC = FEATURES[:8]
KIND_CODE = {"conv": 0.0, "depthwise": 0.5, "linear": 1.0}


def layer_kind(dims) -> str:
    if dims.type == "Dense":
        return "linear"
    return "depthwise" if dims.depthwise else "conv"


def raw_layer_features(cost_model: CostModel, index: int) -> dict:
    """Unnormalised static features of layer `index` (what the state row encodes)."""
    dims = cost_model.layer_dims[index]
    kernel = dims.kernel_size or (1, 1)
    stride = dims.stride or (1, 1)
    feature_map = dims.in_hw[0] * dims.in_hw[1] if dims.in_hw else 1
    return {"index": index, "kind": layer_kind(dims), "in_channels": dims.in_channels or dims.n,
            "out_channels": dims.out_channels or dims.m, "kernel": int(kernel[0]) * int(kernel[1]),
            "stride": int(stride[0]), "feature_map": feature_map, "params": dims.params or dims.m * dims.n}


class StateEncoder:
    """Builds normalised state rows: each feature divided by its maximum over the model, in [0, 1]."""

    def __init__(self, cost_model: CostModel, space: BitSpace) -> None:
        self.cost_model = cost_model
        self.space = space
        layers = len(cost_model)
        raw = [raw_layer_features(cost_model, i) for i in range(layers)]
        self.static = np.zeros((layers, len(STATIC)), dtype=np.float64)
        for i, feats in enumerate(raw):
            self.static[i] = [feats["index"], KIND_CODE[feats["kind"]]] + [float(feats[k]) for k in STATIC[2:]]
        scale = self.static.max(axis=0)
        scale[0] = max(layers - 1, 1)
        scale[1] = 1.0
        self.static /= np.where(scale > 0, scale, 1.0)
        top_w, top_a = space.max_bits("w"), space.max_bits("a")
        full = [cost_model.layer_cost(i, top_w, top_a) for i in range(layers)]
        self._tile_scale = max(max(c.row_tiles for c in full), 1)
        self._array_scale = max(max(c.arrays for c in full), 1)
        self._slice_scale = max(max(c.slices for c in full), 1)
        self.decisions = space.decisions

    @property
    def dim(self) -> int:
        return len(FEATURES)

    def row(self, layer: int, decision: str, w_bit: int, a_bit: int, previous_action: float) -> np.ndarray:
        """The state for choosing `decision` of `layer`, with the footprint at the bits known so far."""
        cost = self.cost_model.layer_cost(layer, w_bit, a_bit)
        dynamic = [min(cost.row_tiles / self._tile_scale, 1.0), min(cost.arrays / self._array_scale, 1.0),
                   min(cost.slices / self._slice_scale, 1.0),
                   self.decisions.index(decision) / max(len(self.decisions) - 1, 1), float(previous_action)]
        return np.concatenate([self.static[layer], np.asarray(dynamic)]).astype(np.float32)


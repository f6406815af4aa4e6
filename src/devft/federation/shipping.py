"""`model.ship_layers`: the server sends dense weights to clients that do not store the base.

Server (`LayerShipper`, driven by the strategy): per stage, it fuses the stage's layers once
from its own base with the clients' builder (`devft.models.stage_builder`) and adds them to a
node's train message, in a record of its own (`stage-weights`), until the node has replied to
a message that carried them; the embeddings, final norm and LM head go the same way once per
run. Tensors keep the base's dtype on the wire (bf16 as its 16-bit pattern). With
`model.quantization` the server quantizes each fused linear weight as the clients would, and
ships its packed bytes and statistics (`devft.models.quantize.weight_parts`), counted as sent:
the client uses them as they are.

Client (`shipped_source`): keeps what it was sent in the node's `context.state` (Flower
carries that state between a SuperNode's rounds; a stage's layers replace the previous
stage's) and builds its stage from it. Checkpoints do not save these records: after a resume
the server ships again.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from devft.config import RunConfig
from devft.errors import ConfigError, ModelError
from devft.models.families import get_attr
from devft.models.loading import DTYPES, local_model_dir
from devft.models.quantize import linear_weight, quantize_weight, weight_parts
from devft.models.stage_builder import (
    BaseLayout,
    base_layout,
    meta_model,
    quantized_modules,
    stage_names,
    stage_tensor,
)
from devft.models.submodel import StagePlan, sub_config
from devft.models.tensor_source import MemorySource, module_source

SHIPPED = "stage-weights"
"""Name of the train message's record of shipped dense tensors."""
STORE = "devft.shipped."
"""Prefix of the node-state records that hold them on the client (never checkpointed)."""
_FIXED, _LAYERS, _KEY = f"{STORE}fixed", f"{STORE}layers", f"{STORE}stage"


def stage_key(plan: StagePlan) -> str:
    """Identifies a stage's fused layers (the same on server and client)."""
    return json.dumps([plan.group_lists(), *plan.fusion_key()])


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors in their own dtype (bfloat16, which Flower cannot carry, as int16 bits)."""
    arrays = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        arrays[name] = Array(t.numpy())
    return ArrayRecord(arrays)


def _view(array: Array) -> torch.Tensor:
    """A zero-copy tensor over an Array's .npy bytes (int16 arrays are bfloat16 bits), in its
    own dtype (the source casts model tensors to model.dtype, never quantization statistics)."""
    buffer = io.BytesIO(array.data)
    version = np.lib.format.read_magic(buffer)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, np_dtype = read_header(buffer)
    if fortran:
        raise ModelError("a shipped tensor is in Fortran order; expected C order")
    flat = np.frombuffer(array.data, dtype=np_dtype, count=int(np.prod(shape)),
                         offset=buffer.tell())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensor = torch.from_numpy(flat.reshape(shape))  # frozen weights: never written
    return tensor.view(torch.bfloat16) if tensor.dtype == torch.int16 else tensor


def record_bytes(content: RecordDict, name: str) -> int:
    """Serialized bytes that record `name` adds to a message: its objects and its entry."""
    record = content[name]
    own = sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
    without = RecordDict({k: v for k, v in content.items() if k != name})
    return own + len(content.deflate()) - len(without.deflate())


class LayerShipper:
    """The server half: what each node still lacks, and the record that carries it."""

    def __init__(self, cfg: RunConfig, rule: Any) -> None:
        if rule.private_base or rule.personalized:
            raise ConfigError(
                "model.ship_layers", True,
                f"false for method {cfg.method}: its clients need the full base "
                "(FLoRA merges into it) or evaluate the full model on the client")
        self.base = rule.base_model()
        self.layout: BaseLayout = base_layout(str(local_model_dir(cfg.model.path)))
        self.source = module_source(self.base.model, f"the server's base {self.base.path}")
        self.dtype = DTYPES[cfg.model.dtype]
        self.quantization = cfg.model.quantization
        self.fixed: ArrayRecord | None = None
        self.layers: ArrayRecord | None = None
        self.key: str | None = None
        self.held: dict[int, tuple[bool, str | None]] = {}
        """node -> (has the fixed tensors, key of the stage layers it has), as confirmed."""
        self.pending: dict[int, tuple[bool, str | None]] = {}

    def begin_stage(self, plan: StagePlan) -> None:
        """Fuse the stage's layers once (and, the first time, collect the fixed tensors)."""
        key = stage_key(plan)
        if key == self.key:
            return
        self.layers = None  # release the previous stage's layers before fusing the next
        prefix, groups = self.layout.layer_prefix(), plan.group_lists()
        skeleton = meta_model(sub_config(self.layout.config, self.layout.family, groups,
                                         self.layout.depth), self.dtype)
        linears = quantized_modules(skeleton, self.layout, self.quantization)
        fixed, layers = {}, {}
        for name in stage_names(self.layout, plan.num_layers):
            if name.startswith(prefix):
                tensor = stage_tensor(self.source, self.layout, name, groups, plan.beta,
                                      plan.fusion, self.dtype, plan.residual)
                if name in linears:  # quantized on the server, as the client would
                    module = get_attr(skeleton, linears[name])
                    weight = quantize_weight(linear_weight(module, tensor), self.quantization,
                                             torch.device("cpu"))
                    layers.update(weight_parts(weight, name))
                else:
                    layers[name] = tensor
            elif self.fixed is None:
                fixed[name] = self.source.get(name, self.dtype)
        if self.fixed is None:
            self.fixed = to_record(fixed)
        self.layers, self.key = to_record(layers), key

    def payload(self, node_id: int) -> ArrayRecord | None:
        """The tensors `node_id` lacks for this stage (None: it has them all)."""
        has_fixed, has_key = self.held.get(node_id, (False, None))
        arrays: dict[str, Array] = {}
        if not has_fixed:
            arrays.update(self.fixed.items())
        if has_key != self.key:
            arrays.update(self.layers.items())
        self.pending[node_id] = (True, self.key)
        return ArrayRecord(arrays) if arrays else None

    def confirm(self, node_ids: Iterable[int]) -> None:
        """These nodes replied to a message of this round: they hold what it carried."""
        for node in node_ids:
            if node in self.pending:
                self.held[node] = self.pending.pop(node)


def shipped_source(msg: Message, context: Context, plan: StagePlan, cfg: RunConfig,
                   layer_prefix: str) -> tuple[MemorySource, Hashable]:
    """(source, key) of the stage's shipped tensors, storing newly received ones first."""
    state = context.state
    if SHIPPED in msg.content:
        incoming = msg.content[SHIPPED]
        layers = {k: v for k, v in incoming.items() if k.startswith(layer_prefix)}
        fixed = {k: v for k, v in incoming.items() if not k.startswith(layer_prefix)}
        if fixed:
            state[_FIXED] = ArrayRecord(fixed)
        if layers:
            state[_LAYERS] = ArrayRecord(layers)
            state[_KEY] = ConfigRecord({"key": stage_key(plan)})
    key = stage_key(plan)
    if _FIXED not in state or _KEY not in state or state[_KEY]["key"] != key:
        raise ModelError(
            f"model.ship_layers: this client holds no dense layers for stage {plan.stage} "
            "and the message carried none (the server sends them again after a failed round)")
    tensors = {k: _view(a) for name in (_FIXED, _LAYERS) for k, a in state[name].items()}
    return MemorySource(tensors, "the layers the server shipped"), ("shipped", key)

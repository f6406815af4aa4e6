"""C2A (Kim et al., Findings of ACL 2023): a hypernetwork generates client-specific adapters.

Sources: https://aclanthology.org/2023.findings-acl.75 (arXiv 2411.00311) and the official
code https://github.com/yeachan-kr/c2a (blocks.py HyperAdapterNetworks, solvers/hyper_fed_avg.py);
port to decoder LLMs with LoRA per shared/research/baselines_dofit_c2a.md §2.4.

Every LoRA factor of the stage submodel is generated from e = layer_emb[l] + module_emb[m] +
Linear(client category histogram) by a factorized head per (factor, width d):
W = (e · L) @ H + b, with L (t, r, c), H (c, d), b (r, d); A = W (r, d_in), B = Wᵀ (d_out, r).
Clients train only the hypernetwork (the LoRA is substituted through `functional_call`, so
train_local's loop, lr and FLOPs estimate apply; the generator's own small matmuls are not
counted) and upload it; the server takes the data-size-weighted mean (FedAvg, as C2A) and
evaluates the LoRA the global hypernetwork generates for the uniform descriptor (C2A's
test-time label distribution).
Our reading, where C2A is silent or differs: separate A and B heads, not C2A's tied up/down
weights (LoRA B must start at 0); heads shared by all factors of one width; no L2 row
normalisation of G (a scaled init instead, which lets B start exactly at 0); the bias added
as is, not summed over e; no context (hidden-state) part of the embedding; train.lr, not
C2A's 3e-4.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call

from devft.core.aggregation import weighted_mean
from devft.core.layerstate import StateDict
from devft.rules.base import ClientEnv, NodeSlot, Rule

log = logging.getLogger(__name__)
PREFIX = "c2a."


@dataclass(frozen=True)
class Slot:
    """One LoRA factor: its state key, layer, module name, kind ("A"/"B") and width d."""

    key: str
    layer: int
    module: str
    kind: str
    dim: int


def layout(template: StateDict) -> tuple[list[Slot], int]:
    """The slots of a PEFT LoRA state dict (sorted by key) and its rank r."""
    slots, rank = [], 0
    for key in sorted(template):
        parts = key.split(".")
        layer = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        kind = next((i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")), None)
        if layer is None or kind is None or kind <= layer:
            raise ValueError(f"C2A: LoRA key {key!r} is not inside a numbered layer")
        (rows, cols), a = template[key].shape, parts[kind] == "lora_A"  # A (r, d_in), B (d_out, r)
        rank, module = rows if a else cols, ".".join(parts[layer + 1 : kind])
        slots.append(Slot(key, int(parts[layer]), module, "AB"[not a], cols if a else rows))
    return slots, rank


class Head(nn.Module):
    """W(e) = (e · L) @ H + b: C2A's factorized generator reshape(L @ H) + b_G, applied to e."""

    def __init__(self, t: int, r: int, c: int, d: int, zero: bool, gen: torch.Generator) -> None:
        super().__init__()
        # A: std(W) ≈ 1/√(3d), PEFT's kaiming-uniform A; B: L = 0 so B = 0 and ΔW = 0 at init
        self.L = nn.Parameter(
            torch.zeros(t, r, c) if zero else torch.randn(t, r, c, generator=gen) / math.sqrt(t)
        )
        std = 1 / math.sqrt(c) if zero else 1 / math.sqrt(3 * c * d)
        self.H = nn.Parameter(torch.randn(c, d, generator=gen) * std)
        self.b = nn.Parameter(torch.zeros(r, d))

    def forward(self, e: Tensor) -> Tensor:  # (M, t) -> (M, r, d)
        return torch.einsum("mt,trc->mrc", e, self.L) @ self.H + self.b


class HyperLoRA(nn.Module):
    """Embeddings + one head per (kind, width); forward(descriptor) -> {LoRA key: tensor}."""

    def __init__(self, template: StateDict, num_categories: int, t: int, c: int, seed: int) -> None:
        super().__init__()
        self.slots, r = layout(template)
        modules = sorted({s.module for s in self.slots})
        gen = torch.Generator().manual_seed(seed)
        num_layers = max(s.layer for s in self.slots) + 1
        self.layer_emb = nn.Parameter(torch.randn(num_layers, t, generator=gen) / math.sqrt(2))
        self.module_emb = nn.Parameter(torch.randn(len(modules), t, generator=gen) / math.sqrt(2))
        self.client = nn.utils.skip_init(nn.Linear, num_categories, t)  # C2A's label part
        bound = 1 / math.sqrt(num_categories)
        with torch.no_grad():
            self.client.weight.copy_((torch.rand(t, num_categories, generator=gen) * 2 - 1) * bound)
            self.client.bias.zero_()
        self.groups: dict[str, list[int]] = {}
        for i, s in enumerate(self.slots):
            self.groups.setdefault(f"{s.kind}{s.dim}", []).append(i)
        self.heads = nn.ModuleDict(
            {
                name: Head(t, r, c, self.slots[idx[0]].dim, name[0] == "B", gen)
                for name, idx in sorted(self.groups.items())
            }
        )
        index = [(s.layer, modules.index(s.module)) for s in self.slots]
        self.register_buffer("index", torch.tensor(index), persistent=False)

    def forward(self, descriptor: Tensor) -> StateDict:
        layers, modules = self.index.unbind(1)
        e = self.layer_emb[layers] + self.module_emb[modules] + self.client(descriptor)
        out: StateDict = {}
        for name, idx in self.groups.items():
            w = self.heads[name](e[idx])  # (M, r, d); unbind: one backward op, not M selects
            w = w if name[0] == "A" else w.transpose(1, 2)
            out.update((self.slots[i].key, wi) for i, wi in zip(idx, w.unbind(0)))
        return out

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Generated(nn.Module):
    """The PEFT model run with the hypernetwork's LoRA in place of its lora_A/lora_B."""

    def __init__(self, model: nn.Module, net: HyperLoRA, descriptor: Tensor) -> None:
        super().__init__()
        self.model, self.net = model, net
        self.register_buffer("descriptor", descriptor)
        self.config = getattr(model, "config", None)  # train_local reads hidden_size
        adapter = getattr(model, "active_adapter", "default")
        names = [n for n, _ in model.named_parameters() if "lora_" in n]
        self.names = {n.replace(f".{adapter}.", "."): n for n in names}

    def forward(self, **kwargs: Any) -> Any:
        params = {self.names[k]: v for k, v in self.net(self.descriptor).items()}
        return functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)


def categories(cfg: Any) -> tuple[Any, list[str]]:
    """The run's federated data and its sorted category names."""
    from devft.data import federated_data

    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    return data, data.categories


def client_descriptor(shard: Any) -> Tensor:
    """The client's category histogram over its whole partition (`shard`, a ClientShard; our
    reading: C2A uses the batch's label distribution; instruction data has categories, not
    labels)."""
    counts = Counter(r.category for r in shard.rows)
    hist = torch.tensor([float(counts[n]) for n in shard.categories])
    return hist / hist.sum().clamp_min(1.0)


def uniform(k: int) -> Tensor:
    return torch.full((k,), 1.0 / k)


def to_wire(net: HyperLoRA) -> StateDict:
    return {PREFIX + k: v.detach().to("cpu", torch.float32) for k, v in net.state_dict().items()}


def from_wire(state: StateDict) -> StateDict:
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


@torch.no_grad()
def generate(net: HyperLoRA, descriptor: Tensor) -> StateDict:
    return {k: v.detach().float().cpu().clone() for k, v in net(descriptor).items()}


class C2A(Rule):
    name = "c2a"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.net: HyperLoRA | None = None
        self.descriptor = torch.ones(1)

    def build(self, template: StateDict, num_categories: int | None = None) -> HyperLoRA:
        """A hypernetwork for `template`'s LoRA keys, seeded from cfg.seed (the server counts
        the data set's categories; a client takes its shard's count)."""
        if num_categories is None:
            num_categories = len(categories(self.cfg)[1])
        return HyperLoRA(template, num_categories, self.cfg.c2a.embed_dim,
                         self.cfg.c2a.hidden_dim, self.cfg.seed)

    # ---- server half ---------------------------------------------------------------------
    def start_stage(self, sub_lora: StateDict, plan: Any) -> None:
        old, old_plan = self.net, self.plan
        super().start_stage(sub_lora, plan)
        self.net = self.build(sub_lora)
        if old is not None and old_plan is not None:
            carry_over(old, old_plan, self.net, plan)
        self.descriptor = uniform(self.net.client.in_features)  # C2A's test-time descriptor
        self.global_lora = generate(self.net, self.descriptor)
        sizes = self.net.param_count(), sum(v.numel() for v in sub_lora.values())
        log.info("C2A stage %d: hypernetwork of %d parameters for a LoRA of %d", plan.stage, *sizes)

    def message(self, node: NodeSlot) -> tuple[StateDict, dict[str, Any]]:
        assert self.net is not None
        return to_wire(self.net), {}

    def aggregate(
        self, uploads: list[StateDict], nodes: list[NodeSlot], weights: list[float]
    ) -> None:
        assert self.net is not None
        self.net.load_state_dict(from_wire(weighted_mean(uploads, weights)))
        self.global_lora = generate(self.net, self.descriptor)

    def trainable_count(self) -> int:
        return self.net.param_count()

    def expected_upload(self, node: NodeSlot) -> dict[str, tuple[int, ...]]:
        assert self.net is not None
        return {k: tuple(v.shape) for k, v in to_wire(self.net).items()}

    def state_dict(self) -> tuple[dict[str, StateDict], dict[str, Any]]:
        assert self.net is not None
        return {"global": self.global_lora, "hyper": to_wire(self.net)}, {}

    def load_state_dict(
        self, tensors: dict[str, StateDict], meta: dict[str, Any], plan: Any, global_model: Any
    ) -> None:
        super().load_state_dict(tensors, meta, plan, global_model)
        self.net = self.build(self.global_lora)
        self.net.load_state_dict(from_wire(tensors["hyper"]))
        self.descriptor = uniform(self.net.client.in_features)

    def export(self, path: Path, global_model: Any) -> bool:
        """The default adapter (generated LoRA) plus the hypernetwork itself."""
        global_model.save_adapter(path)
        if self.net is not None:
            save_file(to_wire(self.net), str(path / "c2a_hypernetwork.safetensors"))
        return True

    # ---- client half ---------------------------------------------------------------------
    def begin(self, received: StateDict, env: ClientEnv, template: StateDict) -> StateDict:
        net = self.build(template, len(env.data.categories))
        net.load_state_dict(from_wire(received))
        descriptor = client_descriptor(env.data)
        env.extra["c2a"] = (net, descriptor)
        return generate(net, descriptor)

    def trainable(self, key: str) -> bool:
        return False  # C2A trains the hypernetwork, never the adapters themselves

    def local_update(
        self, model: Any, batches: Any, env: ClientEnv, default: Callable[[], Any]
    ) -> Any:
        from devft.models.lora import set_lora_state

        net, descriptor = env.extra["c2a"]
        seq = np.random.SeedSequence([self.cfg.seed, env.partition, env.round])  # as default
        desc = f"client {env.partition} stage {env.plan.stage} (C2A)"
        seed = int(seq.generate_state(1)[0])
        result = train_hypernetwork(model, net, descriptor, batches, self.cfg, seed, desc)
        set_lora_state(model, generate(net, descriptor.to(next(net.parameters()).device)))
        return result

    def end(self, trained: StateDict, env: ClientEnv) -> StateDict:
        return to_wire(env.extra["c2a"][0])


def train_hypernetwork(
    model: Any, net: HyperLoRA, descriptor: Tensor, batches: Any, cfg: Any, seed: int, desc: str
) -> Any:
    """`train_local` on the hypernetwork alone, the PEFT model's LoRA generated each step."""
    from devft.models.families import family_of
    from devft.models.lora import set_trainable
    from devft.training.local import train_local

    set_trainable(model, lambda _: False)
    device = next(model.parameters()).device
    inner = model.base_model.model
    layers, head = family_of(inner).layers(inner), inner.get_output_embeddings()
    run = Generated(model, net.to(device), descriptor.to(device))
    return train_local(run, batches, cfg.train, layers, head, seed, cfg.output.progress, desc)


def carry_over(old: HyperLoRA, old_plan: Any, new: HyperLoRA, plan: Any) -> None:
    """Keep the previous stage's hypernetwork when shapes allow; new submodel layer n takes the
    old embedding of the layer that held its anchor (our reading; C2A has no stages)."""
    state, target = old.state_dict(), new.state_dict()
    if any(
        k not in state or state[k].shape != v.shape for k, v in target.items() if k != "layer_emb"
    ):
        return  # other modules or widths: a fresh hypernetwork for this stage
    where = {j: i for i, g in enumerate(old_plan.groups) for j in g}
    rows = [min(where.get(g[0], 0), old.layer_emb.shape[0] - 1) for g in plan.groups]
    if len(rows) != target["layer_emb"].shape[0]:
        return
    state["layer_emb"] = old.layer_emb.detach()[rows].clone()
    new.load_state_dict(state)

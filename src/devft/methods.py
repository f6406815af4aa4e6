"""Federated methods by name: how each stage's submodel is built and how updates are aggregated.

A method is the product of two choices:
- the *stage recipe*: which layers each stage trains and how they become submodel layers
  (DevFT: spectral grouping + differential fusion + LoRA transfer; ProgFed: the first L_s
  layers; LayerDrop: every k-th layer; the classic baselines: the full model every round);
- the *aggregation rule* applied to the clients' LoRA each round (FedAvg = FedIT, FLoRA,
  FedSA-LoRA, FFA-LoRA, HetLoRA, DoFIT, C2A).
`devft+<rule>` composes DevFT's stages with any rule. No torch here: the config validates
method names without importing the heavy stack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

RULE_NAMES: tuple[str, ...] = ("fedavg", "flora", "fedsa", "ffa", "hetlora", "dofit", "c2a")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    staged: bool
    """True: stages of growing submodels (devft.stages); False: the full model every round."""
    recipe: str = "spectral"
    """How a stage's layers are chosen/grouped (devft.core.recipes); staged methods only."""
    fusion: str = "differential"
    """How a group's layers become one submodel layer (devft.core.fusion)."""
    transfer: str = "copy"
    """How a submodel layer's LoRA goes back to its group's layers (devft.core.transfer)."""
    aggregation: str = "fedavg"
    """Aggregation rule for client LoRA updates (devft.rules)."""
    untrained_init: str = "fresh"
    """Initial LoRA of a never-trained group: `fresh` standard init, or `fused` random A as the
    formula gives (devft.core.initial_adapter)."""
    adapter: str = "all"
    """Which submodel layers train: `all`, or `boundary` (devft+offsite: only the real
    boundary layers; the fused middle is a frozen emulator until the last, full stage)."""
    stage_length: str = "fixed"
    """`fixed` rounds per stage, or `adaptive` (devft.core.adaptive; config: adaptive.*)."""
    calibrate: bool = False
    """True: the server picks β per stage on its calibration rows (devft.core.calibration;
    config: calibrate.betas)."""
    description: str = ""


_DEVFT = MethodSpec("devft", staged=True, description="DevFT: developmental stages, spectral "
                    "grouping, differential fusion, LoRA transfer; FedAvg within stages")

_FULL = {
    "fedit": "FedIT: FedAvg of LoRA A and B of the full model",
    "flora": "FLoRA: stack client LoRAs (exact sum of B·A), merge into the base, re-init",
    "fedsa": "FedSA-LoRA: share and average A; each client keeps its own B",
    "ffa": "FFA-LoRA: A frozen at a shared seeded init; only B trained and sent",
    "hetlora": "HetLoRA: per-client ranks, truncate down, zero-pad + norm-weighted average up",
    "dofit": "DoFIT: per-domain FedAvg + top-k shared modules with proximal perturbation",
    "c2a": "C2A: a hypernetwork generates client LoRA from embeddings; hypernetwork averaged",
}

METHODS: dict[str, MethodSpec] = {
    name: MethodSpec(name, staged=False, aggregation="fedavg" if name == "fedit" else name,
                     description=text)
    for name, text in _FULL.items()
}
METHODS["devft"] = _DEVFT
for _rule in ("flora", "fedsa", "ffa", "hetlora", "dofit", "c2a"):
    METHODS[f"devft+{_rule}"] = replace(
        _DEVFT, name=f"devft+{_rule}", aggregation=_rule,
        description=f"DevFT's stages with {_rule}'s aggregation")
METHODS.update({
    "progfed": replace(_DEVFT, name="progfed", recipe="prefix",
                       description="ProgFed-style growth: train the first L_s layers"),
    "layerdrop": replace(_DEVFT, name="layerdrop", recipe="layerdrop",
                         description="LayerDrop-style: L_s evenly spaced layers, no fusion"),
    "devft-contiguous": replace(_DEVFT, name="devft-contiguous", recipe="contiguous",
                                description="ablation: equal contiguous groups (EVEN)"),
    "devft-random": replace(_DEVFT, name="devft-random", recipe="random",
                            description="ablation: random grouping"),
    "devft-anchorfusion": replace(_DEVFT, name="devft-anchorfusion", fusion="anchor",
                                  description="ablation: the anchor layer alone (R-ONE)"),
    "devft-avgfusion": replace(_DEVFT, name="devft-avgfusion", fusion="average",
                               description="ablation: plain average of the group"),
    "devft-notransfer": replace(_DEVFT, name="devft-notransfer", transfer="none",
                                description="ablation: no LoRA transfer between stages"),
    "devft-scaledtransfer": replace(_DEVFT, name="devft-scaledtransfer", transfer="scaled",
                                    description="variant: transfer B/|g| to each group layer"),
    "devft-anchortransfer": replace(_DEVFT, name="devft-anchortransfer", transfer="anchor",
                                    description="variant: transfer to the anchor layer only"),
    "devft-fusedinit": replace(_DEVFT, name="devft-fusedinit", untrained_init="fused",
                               description="ablation: the fusion formula applied to the "
                               "untrained initial LoRA too (fused random A, shrunken)"),
    "devft-boundary": replace(_DEVFT, name="devft-boundary", recipe="boundary",
                              description="variant: the first and last devft.boundary_layers "
                              "layers are singletons in every stage; the middle grouped "
                              "spectrally"),
    "devft-adaptive": replace(_DEVFT, name="devft-adaptive", stage_length="adaptive",
                              description="variant: a stage ends when the submodel's "
                              "calibration loss improves by less than adaptive.threshold over "
                              "adaptive.window rounds (adaptive.min/max_rounds)"),
    "devft-calibrated": replace(_DEVFT, name="devft-calibrated", calibrate=True,
                                description="variant: the server picks β per stage on its "
                                "calibration rows (never the eval rows) from calibrate.betas"),
    "offsite": replace(_DEVFT, name="offsite", recipe="offsite",
                       description="Offsite-tuning: LoRA on the first offsite.k_bottom and last "
                       "offsite.k_top real layers around a frozen uniform-layer-drop emulator; "
                       "plugged back into the same layers exactly"),
    "devft+offsite": replace(_DEVFT, name="devft+offsite", recipe="boundary",
                             adapter="boundary",
                             description="DevFT's stages with real boundary layers "
                             "(offsite.k_bottom/k_top) as the trained adapter around the fused "
                             "middle as a frozen emulator; the last stage trains the full "
                             "model"),
})
for _rule in ("fedsa", "ffa"):
    METHODS[f"offsite+{_rule}"] = replace(
        METHODS["offsite"], name=f"offsite+{_rule}", aggregation=_rule,
        description=f"Offsite-tuning's adapters with {_rule}'s aggregation")

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method (names are validated by the config)."""
    return METHODS[name]

"""Federated methods by name: how each stage's submodel is built and how updates are aggregated.

A method is the product of two choices:
- the *submodel recipe*: which layers each stage trains and how (DevFT: spectral grouping +
  differential fusion + LoRA transfer; the full model for the classic baselines);
- the *aggregation rule* applied to the clients' LoRA updates each round (FedAvg = FedIT).
`devft+<rule>` composes DevFT's stages with another rule. No torch here: the config validates
method names without importing the heavy stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    staged: bool
    """True: stages of growing submodels (devft.stages); False: the full model every round."""
    grouping: str = "spectral"
    """How layers are grouped into a stage's submodel layers (staged methods only)."""
    fusion: str = "differential"
    """How a group's layers become one submodel layer (staged methods only)."""
    transfer: str = "copy"
    """How a submodel layer's LoRA goes back to its group's layers after a stage."""
    aggregation: str = "fedavg"
    """Aggregation rule for client LoRA updates."""
    description: str = ""


METHODS: dict[str, MethodSpec] = {
    "fedit": MethodSpec(
        "fedit",
        staged=False,
        description="FedIT: FedAvg of LoRA A and B of the full model every round",
    ),
    "devft": MethodSpec(
        "devft",
        staged=True,
        description="DevFT: developmental stages, spectral grouping, differential fusion, "
        "LoRA transfer; FedAvg within stages",
    ),
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method (names are validated by the config)."""
    return METHODS[name]

"""The text forms of per-client memory budgets and budget levers (issue 34). No torch here.

`federation.client_memory_mb` (MiB; the whole client process's peak, VmHWM, floor included;
0 = no limit):
- empty: no budgets;
- one number: every client;
- a comma list, one number per client in partition order (`0,0,900,900`);
- tiers, `COUNTxMiB` items in partition order adding up to the client count (`4x0,4x900`);
  plain numbers and tiers mix (`0,3x900`);
- `node`: each client reads its budget from its node config (`memory-mb`; a SuperNode's
  `--node-config "memory-mb=900"`), so only the data owner states it.
`federation.budget_levers`: the levers a client may use, in order, before it sits out:
`quantize` (nf4 base weights), `checkpoint` (gradient checkpointing), `shrink` (a shallower
submodel); `none` for no lever.
"""

from __future__ import annotations

from devft.config.tiers import parse_tiers
from devft.errors import ConfigError

NODE_BUDGETS = "node"
"""federation.client_memory_mb's value for budgets read from each node's config."""
NODE_BUDGET_KEY = "memory-mb"
"""The node-config key a SuperNode states its budget with (MiB)."""
LEVERS: tuple[str, ...] = ("quantize", "checkpoint", "shrink")
BUDGET_FORMS = ("empty (no budgets), one MiB number for every client, a comma list with one per "
                "client, tiers like 4x0,4x900 (count x MiB, in client order), or 'node' (each "
                "node's memory-mb)")


def parse_budgets(text: str, num_clients: int) -> list[int] | None:
    """Per-client budgets in MiB (0 = no limit), [] for none, None for `node`.

    Raises ConfigError naming federation.client_memory_mb."""
    field = "federation.client_memory_mb"
    text = str(text).strip()
    if not text:
        return []
    if text == NODE_BUDGETS:
        return None
    budgets = parse_tiers(text, field, BUDGET_FORMS, "budgets (MiB)")
    if len(budgets) == 1:
        budgets *= num_clients
    if len(budgets) != num_clients:
        raise ConfigError(field, text, f"{num_clients} budgets (federation.num_clients), or "
                          f"one for every client; got {len(budgets)}")
    return budgets


def node_budget(value: object, partition: int) -> int:
    """A node config's `memory-mb` as MiB (absent: 0, no limit)."""
    if value is None or value == "":
        return 0
    try:
        mib = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        mib = -1
    if mib < 0:
        raise ConfigError(f"{NODE_BUDGET_KEY} (node config of client {partition})", value,
                          "a whole number of MiB >= 0 (0 = no limit)")
    return mib


def parse_levers(text: str) -> tuple[str, ...]:
    """federation.budget_levers as a tuple of lever names in order (`none`: ())."""
    field = "federation.budget_levers"
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in LEVERS]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(field, text, f"a comma list of distinct levers from "
                          f"{', '.join(LEVERS)}, in the order to try them, or none")
    return tuple(names)

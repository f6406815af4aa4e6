"""The text form of `data.client_groups`: which task group each client belongs to. No torch.

`data.partition=groups` splits the data set's categories (sorted) into G contiguous groups of
near-equal size, G = the number of client groups, and gives the training rows of group g's
categories to the clients of group g, IID among them (`devft.data.partition`).
`data.client_groups` names each client's group, in partition order:
- a comma list, one group id per client (`0,0,1,1`);
- tiers, `COUNTxGROUP` items adding up to the client count (`4x0,4x1`: clients 0-3 in group
  0, clients 4-7 in group 1); plain ids and tiers mix (`0,3x1`).
Group ids are 0..G-1, each used by at least one client.
"""

from __future__ import annotations

from devft.config.tiers import parse_tiers
from devft.errors import ConfigError

FIELD = "data.client_groups"
GROUP_FORMS = ("a comma list with one group id per client (0,0,1,1) or tiers like 4x0,4x1 "
               "(count x group, in client order)")


def parse_client_groups(text: str) -> list[int]:
    """Each client's group id, in partition order ([] when `text` is empty).

    Raises ConfigError naming data.client_groups when the form is wrong or the ids are not
    0..G-1 with every group used. The count against federation.num_clients is checked with
    the whole config (`devft.config._check_across_sections`)."""
    groups = parse_tiers(text, FIELD, GROUP_FORMS, "group ids")
    if not groups:
        return []
    used = sorted(set(groups))
    if used != list(range(len(used))):
        raise ConfigError(FIELD, text, f"group ids 0..G-1 with every group used (got "
                          f"{', '.join(map(str, used))})")
    return groups


def num_groups(groups: list[int]) -> int:
    """G, the number of client (and category) groups."""
    return max(groups) + 1 if groups else 0

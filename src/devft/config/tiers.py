"""The tier form of per-client config lists: `4x0,4x900` = four clients with 0, four with 900.

Items are plain whole numbers or `COUNTxVALUE`, in client (partition) order, and mix freely
(`0,3x900`). Used by `federation.client_memory_mb` and `data.client_groups`. No torch here.
"""

from __future__ import annotations

from devft.errors import ConfigError


def parse_tiers(text: str, field: str, forms: str, what: str = "values") -> list[int]:
    """The per-client whole numbers a tier text stands for ([] for an empty text).

    Raises ConfigError naming `field` for a malformed item, a count below 1 or a negative
    value; `forms` says what is allowed."""
    text = str(text).strip()
    if not text:
        return []
    values: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        count, sep, value = item.partition("x")
        try:
            n, number = (int(count), int(value)) if sep else (1, int(item))
        except ValueError:
            raise ConfigError(field, text, forms) from None
        if n < 1 or number < 0:
            raise ConfigError(field, text, f"counts >= 1 and {what} >= 0; {forms}")
        values += [number] * n
    return values

"""Log lines of libraries devft uses that say nothing about devft's use of them, hidden.

bitsandbytes (imported by peft whenever it is installed) warns at import, on every
AVX512-BF16 CPU, that an optional kernel package is missing (its own CPU path serves), and
warns on every int8 call that fp16 inputs will be cast. `quiet_bitsandbytes` filters exactly
those lines; the import-time one only when it runs before bitsandbytes is first imported,
so the CLI calls it before anything imports peft. No torch here.
"""

from __future__ import annotations

import functools
import logging

_QUIET = {
    "bitsandbytes.backends.cpu.ops": "kernels-community",
    "bitsandbytes.autograd._functions": "will be cast from",
}


@functools.lru_cache(maxsize=1)
def quiet_bitsandbytes() -> None:
    """Filter bitsandbytes' noise lines (once per process)."""
    for name, text in _QUIET.items():
        logging.getLogger(name).addFilter(lambda record, t=text: t not in record.getMessage())

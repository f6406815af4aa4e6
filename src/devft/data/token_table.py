"""Many rows' token ids in one int32 array: what a shard stores instead of Python lists
(a list of token ids costs ~36 bytes a token; this costs 4)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from devft.data.formatting import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class TokenTable:
    """Row i is ids[starts[i]:starts[i + 1]]; its first prompt_lengths[i] tokens are the
    prompt (labels IGNORE_INDEX), the rest the response (labels = ids), as `encode` makes."""

    ids: np.ndarray
    starts: np.ndarray
    prompt_lengths: np.ndarray

    @classmethod
    def of(cls, encoded: list[Encoded]) -> TokenTable:
        prompts = []
        for e in encoded:
            n = sum(1 for label in e.labels if label == IGNORE_INDEX)
            if e.labels != [IGNORE_INDEX] * n + e.input_ids[n:]:
                raise ValueError("labels must be IGNORE_INDEX on a prompt, then the ids")
            prompts.append(n)
        lengths = [len(e.input_ids) for e in encoded]
        flat = [t for e in encoded for t in e.input_ids]
        return cls(np.asarray(flat, dtype=np.int32),
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                   np.asarray(prompts, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __iter__(self) -> Iterator[Encoded]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Encoded:
        ids = self.ids[self.starts[i]:self.starts[i + 1]].tolist()
        n = int(self.prompt_lengths[i])
        return Encoded(ids, [IGNORE_INDEX] * n + ids[n:])

    def to_json(self) -> dict[str, Any]:
        return {"ids_int32_base64": base64.b64encode(self.ids.astype("<i4").tobytes()).decode(),
                "lengths": np.diff(self.starts).tolist(),
                "prompt_lengths": self.prompt_lengths.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenTable:
        """The table `to_json` wrote; ValueError when its parts do not fit together."""
        ids = np.frombuffer(base64.b64decode(data["ids_int32_base64"]), dtype="<i4")
        lengths = np.asarray(data["lengths"], dtype=np.int64)
        prompts = np.asarray(data["prompt_lengths"], dtype=np.int64)
        if (len(lengths) != len(prompts) or int(lengths.sum()) != len(ids)
                or bool((prompts > lengths).any()) or bool((prompts < 0).any())):
            raise ValueError("token ids, lengths and prompt lengths do not fit together")
        return cls(ids.astype(np.int32), np.concatenate([[0], np.cumsum(lengths)]), prompts)

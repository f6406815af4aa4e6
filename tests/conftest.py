import json
from pathlib import Path

import pytest
import torch
from tiny import byte_tokenizer, save_tiny_model, tiny_model

torch.set_num_threads(1)  # tiny models: thread start-up dominates on 2-core machines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny LLaMA with a byte tokenizer, saved as a HF directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", num_layers=4)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama", 4)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory) -> Path:
    """A small JSONL instruction file with 3 categories (60 records)."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    rows = []
    for i in range(60):
        cat = ["math", "geo", "color"][i % 3]
        if cat == "math":
            rows.append(
                {
                    "instruction": f"What is {i} plus 1?",
                    "input": "",
                    "output": str(i + 1),
                    "category": cat,
                }
            )
        elif cat == "geo":
            rows.append(
                {
                    "instruction": "Name the capital.",
                    "input": f"Country number {i}",
                    "output": "Paris",
                    "category": cat,
                }
            )
        else:
            rows.append(
                {"instruction": "Say a color.", "input": "", "output": "blue", "category": cat}
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path

"""`devft generate`: prompts formatted as in training, greedy answers streamed, prompt files."""

import json

import pytest
import torch
from peft import PeftModel
from test_federation_run import tiny_cfg
from tiny import byte_tokenizer
from transformers import AutoModelForCausalLM

from devft.cli import main
from devft.data.formatting import encode, prompt_ids
from devft.data.records import Record
from devft.errors import DataError
from devft.federation.runner import run_method
from devft.generation import generate_answers, read_prompts


def _record(instruction, input_=""):
    return Record(instruction, input_, "", "default")


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_ids_are_exactly_the_prompt_training_sees(chat):
    tok = byte_tokenizer()
    if not chat:
        tok.chat_template = None
    record = Record("Name the capital.", "Country number 7", "Paris", "geo")
    encoded = encode(record, tok, max_len=512)
    n = sum(1 for label in encoded.labels if label == -100)
    assert prompt_ids(record, tok) == encoded.input_ids[:n]
    text = tok.decode(prompt_ids(record, tok))
    if chat:
        assert text == ("<|im_start|>user\nName the capital.\n\nCountry number 7<|im_end|>\n"
                        "<|im_start|>assistant\n")
    else:
        assert text.endswith("### Instruction:\nName the capital.\n\nCountry number 7\n\n"
                             "### Response:\n")


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second prompt \n")
    assert [r.instruction for r in read_prompts(text)] == ["first prompt", "second prompt"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"instruction": "Add.", "input": "2 and 3"}\n"plain string"\n')
    got = read_prompts(lines)
    assert [(r.instruction, r.input) for r in got] == [("Add.", "2 and 3"), ("plain string", "")]
    lines.write_text('{"instruction": "ok"}\n{"prompt": "no"}\n')
    with pytest.raises(DataError, match=r"p.jsonl: line 2 .*'instruction'"):
        read_prompts(lines)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    run_method(tiny_cfg(tiny_model_dir, tiny_data_file, out, "fedit", "federation.rounds=2"))
    return out


def _reference(tiny_model_dir, run_dir, prompt, max_new_tokens):
    """Greedy decoding of the adapted model on a prompt built from the chat template here."""
    tok = byte_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]


def test_generate_streams_the_greedy_answer_of_the_adapted_model(capsys, run_dir,
                                                                tiny_model_dir):
    prompt = "What is 4 plus 1?"
    want, new_tokens = _reference(tiny_model_dir, run_dir, prompt, 12)
    assert new_tokens > 0
    assert main(["generate", "--adapter", str(run_dir), "--prompt", prompt,
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # the base model alone answers differently: the adapter was applied
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", prompt,
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out != want + "\n"


def test_generate_answers_a_prompt_file_and_writes_jsonl(capsys, run_dir, tiny_model_dir,
                                                        tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "What is 4 plus 1?"}\n"Say a color."\n')
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--adapter", str(run_dir / "adapter"), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["What is 4 plus 1?", "Say a color."]
    for row in rows:
        assert row["answer"] == _reference(tiny_model_dir, run_dir, row["instruction"], 8)[0]
        assert f"> {row['instruction']}\n{row['answer']}\n" in printed


def test_sampling_differs_from_greedy_and_is_seeded(run_dir, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tok, records = byte_tokenizer(), [_record("Say a color.")]
    greedy = generate_answers(model, tok, records, 16, stream=False)
    assert generate_answers(model, tok, records, 16, stream=False) == greedy
    torch.manual_seed(1)
    a = generate_answers(model, tok, records, 16, temperature=5.0, stream=False)
    torch.manual_seed(1)
    assert generate_answers(model, tok, records, 16, temperature=5.0, stream=False) == a
    assert a != greedy


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens = 0"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature = -1.0"),
        (["--prompt", "x", "--top-p", "0"], "--top-p = 0.0"),
        (["--prompts", "/no/such/file"], "--prompts = '/no/such/file'"),
        (["--prompt", "x", "--adapter", "/no/such/run"], "--adapter = '/no/such/run'"),
    ],
)
def test_generate_errors_are_one_line(capsys, argv, expected):
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"devft: error: {expected}" in err


def test_the_adapter_describes_itself(run_dir):
    card = (run_dir / "adapter" / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert f"| base model | `{config['model']['path']}` (fp32) |" in card
    assert "| method | `fedit`: FedIT" in card
    assert f"| data | `{config['data']['name']}`, iid over 2 clients" in card
    assert f"| final held-out loss | {summary['final_eval_loss']:.4f} (initial " in card
    assert "devft generate --adapter" in card

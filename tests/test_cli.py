"""The command line: clear one-line errors for bad input (exit 2, no traceback), and outputs."""

import json

import pytest

from devft.cli import main


@pytest.fixture
def base_args(tiny_model_dir, tiny_data_file, tmp_path):
    return [
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        f"data.name={tiny_data_file}",
        "--set",
        "federation.num_clients=2",
        "--set",
        "federation.rounds=2",
        "--set",
        "devft.stages=2,4",
        "--set",
        "train.local_steps=1",
        "--set",
        "data.eval_examples=4",
        "--set",
        "output.progress=false",
        "--out",
        str(tmp_path / "out"),
    ]


def _fails(capsys, argv, *expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("devft: error:")]
    assert line, err
    for text in expected:
        assert text in line[0], (text, line[0])
    return line[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("devft.stages=4,2", ["devft.stages", "[4, 2]", "strictly increasing"]),
        ("devft.stages=1,3", ["devft.stages", "[1, 3]", "depth (4)"]),
        ("devft.stages=2,8", ["devft.stages", "more groups than layers"]),
        ("lora.r=0", ["lora.r", "0", "positive integer"]),
        ("devft.beta=1.5", ["devft.beta", "1.5", "[0, 1]"]),
        ("method=fedprox", ["method", "fedprox", "devft", "fedit"]),
        ("lora.target_modules=foo_proj", ["lora.target_modules", "foo_proj", "q_proj"]),
        ("data.name=nosuchdata", ["data.name", "nosuchdata", "tasks", "sharegpt"]),
        ("model.path=/no/such/model", ["model.path", "/no/such/model"]),
        ("federation.num_clients=0", ["federation.num_clients", "positive integer"]),
        ("federation.rounds=1", ["federation.rounds", "at least one round per stage"]),
        ("train.lr=fast", ["train.lr", "fast", "a number"]),
        ("lora.rank=8", ["lora.rank", "known key", "target_modules"]),
    ],
)
def test_bad_config_values_stop_with_one_clear_message(capsys, base_args, override, expected):
    _fails(capsys, ["run", *base_args, "--set", override], *expected)


def test_data_file_with_missing_field(capsys, base_args, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "no output"}\n')
    _fails(capsys, ["run", *base_args, "--set", f"data.name={bad}"], "bad.jsonl", "output")


def test_data_file_with_no_records(capsys, base_args, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    _fails(capsys, ["run", *base_args, "--set", f"data.name={empty}"], "empty.json", "no records")


def test_missing_config_file_and_bad_override_syntax(capsys, base_args, tmp_path):
    _fails(capsys, ["run", "--config", str(tmp_path / "nope.yaml"), *base_args], "--config")
    _fails(capsys, ["run", *base_args, "--set", "federation.rounds"], "--set", "key=value")


def test_unknown_method_in_compare(capsys, base_args):
    _fails(capsys, ["compare", "--methods", "devft,nosuch", *base_args], "--methods", "nosuch")


def test_compare_writes_table_json_and_plot(capsys, base_args, tmp_path):
    assert main(["compare", "--methods", "devft,fedit", *base_args]) == 0
    printed = capsys.readouterr().out
    assert "devft" in printed and "fedit" in printed and "time→target" in printed
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert set(comparison["methods"]) == {"devft", "fedit"}
    fedit = comparison["methods"]["fedit"]["vs_fedit"]
    assert fedit["final_eval_loss_delta"] == 0.0
    assert fedit["time_to_target_speedup"] is not None  # fedit always reaches its own target
    devft = comparison["methods"]["devft"]
    assert {"time_to_target_speedup", "bytes_to_target_reduction", "final_eval_loss_delta"} <= set(
        devft["vs_fedit"]
    )
    assert devft["summary"]["rounds"] == 2
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 1000
    for method in ("devft", "fedit"):
        assert (tmp_path / "out" / method / "adapter" / "adapter_model.safetensors").is_file()


def test_compare_reuses_finished_runs(capsys, base_args, tmp_path):
    assert main(["compare", "--methods", "fedit", *base_args]) == 0
    summary = (tmp_path / "out" / "fedit" / "summary.json").read_text()
    capsys.readouterr()
    assert main(["compare", "--methods", "fedit", *base_args]) == 0
    assert "reusing the finished run" in capsys.readouterr().err
    assert (tmp_path / "out" / "fedit" / "summary.json").read_text() == summary


def test_compare_reuses_a_run_saved_before_a_key_was_added_at_its_default(capsys, base_args,
                                                                          tmp_path):
    assert main(["compare", "--methods", "fedit", *base_args]) == 0
    config = tmp_path / "out" / "fedit" / "config.json"
    saved = json.loads(config.read_text())
    del saved["calibrate"]["residual_exponents"]  # as written by the code before that key
    config.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["compare", "--methods", "fedit", *base_args]) == 0
    assert "reusing the finished run" in capsys.readouterr().err
    changed = json.loads(json.dumps(saved))
    del changed["federation"]["max_client_share"]  # a key that came with new behaviour
    for edit in (changed, {**saved, "train": {**saved["train"], "lr": saved["train"]["lr"] * 2}}):
        config.write_text(json.dumps(edit))  # is a new run, as is a changed value
        assert main(["compare", "--methods", "fedit", *base_args]) == 0
        assert "reusing the finished run" not in capsys.readouterr().err


def test_compare_sets_aside_a_finished_run_of_another_config(capsys, base_args, tmp_path):
    assert main(["compare", "--methods", "fedit", *base_args]) == 0
    run = tmp_path / "out" / "fedit"
    old = {f: (run / f).read_text() for f in ("config.json", "metrics.jsonl", "summary.json")}
    (run / "mc_eval.json").write_text("{}")  # a score of the old run's adapter
    lr = json.loads(old["config.json"])["train"]["lr"] * 2
    capsys.readouterr()
    assert main(["compare", "--methods", "fedit", *base_args, "--set", f"train.lr={lr}"]) == 0
    assert "held a run of another config" in capsys.readouterr().err
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1  # the old run, whole: not read as the new one's, not lost
    assert {f: (aside[0] / f).read_text() for f in old} == old
    assert (aside[0] / "mc_eval.json").is_file() and not (run / "mc_eval.json").exists()
    assert (aside[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == lr
    assert (run / "summary.json").read_text() != old["summary.json"]


def test_beta_that_even_groups_would_clamp_is_refused(capsys, base_args):
    # 4 layers, stages 1,4: the first stage's one group of 4 allows beta <= 1/3
    line = _fails(capsys, ["run", *base_args, "--set", "devft.stages=1,4",
                           "--set", "devft.beta=0.5"], "devft.beta", "0.5", "0.3333")
    assert "1-layer stage" in line

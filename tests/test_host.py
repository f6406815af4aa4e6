"""A run records the hosts it ran on (CPU kernels decide its last digits), across resumes."""

from devft.files import read_json_object
from devft.reporting.host import UNRECORDED, host_fingerprint, with_host
from devft.reporting.recorder import SUMMARY_FILE, RunRecorder


def _recorder(tmp_path, fresh=True):
    return RunRecorder(tmp_path, "fedit", 2, progress=False, fresh=fresh)


def test_fingerprint_names_the_cpu_kernels_and_threads():
    host = host_fingerprint()
    assert host["cpu"] and isinstance(host["cpu_capability"], str) and host["cpu_capability"]
    assert host["threads"] >= 1 and host["torch"] and host["transformers"] and host["peft"]


def test_with_host_appends_only_a_new_host():
    a, b = {"cpu": "a"}, {"cpu": "b"}
    assert with_host([], a) == [a]
    assert with_host([a], a) == [a]
    assert with_host([a], b) == [a, b]
    assert with_host([a, b], a) == [a, b, a]


def test_summary_lists_each_host_of_a_resumed_run(tmp_path):
    first = _recorder(tmp_path)
    first.record_round({"round": 0, "eval_loss": 3.0})
    state = first.state()
    here = host_fingerprint()
    assert state["hosts"] == [here]

    elsewhere = {**here, "cpu_capability": "AVX512", "cpu": "another"}
    resumed = _recorder(tmp_path, fresh=False)
    resumed.restore({**state, "hosts": [elsewhere]}, first.records)
    resumed.record_round({"round": 1, "eval_loss": 2.0})
    resumed.finish({})
    assert read_json_object(tmp_path / SUMMARY_FILE)["hosts"] == [elsewhere, here]

    same = _recorder(tmp_path, fresh=False)
    same.restore(state, first.records)
    assert same.hosts == [here]


def test_a_checkpoint_without_hosts_marks_its_rounds_unrecorded(tmp_path):
    first = _recorder(tmp_path)
    first.record_round({"round": 0, "eval_loss": 3.0})
    state = {k: v for k, v in first.state().items() if k != "hosts"}
    resumed = _recorder(tmp_path, fresh=False)
    resumed.restore(state, first.records)
    assert resumed.hosts == [UNRECORDED, host_fingerprint()]

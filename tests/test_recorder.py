"""The run recorder: a fresh run's directory holds no summary until the run ends."""

from devft.reporting.recorder import METRICS_FILE, SUMMARY_FILE, RunRecorder


def test_a_fresh_recorder_drops_an_older_runs_summary_and_a_resumed_one_keeps_it(tmp_path):
    for fresh, kept in ((False, True), (True, False)):
        (tmp_path / SUMMARY_FILE).write_text('{"rounds": 9, "final_eval_loss": 1.0}')
        (tmp_path / METRICS_FILE).write_text('{"round": 0}\n')
        RunRecorder(tmp_path, "fedit", 2, progress=False, fresh=fresh)
        assert (tmp_path / SUMMARY_FILE).is_file() == kept
        assert ((tmp_path / METRICS_FILE).read_text() != "") == kept

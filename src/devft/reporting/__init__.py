"""Run outputs: per-round metrics, summaries, comparisons and plots."""

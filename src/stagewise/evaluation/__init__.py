"""Evaluation: pytrec_eval metrics per stage and end to end, latency, paired comparisons."""

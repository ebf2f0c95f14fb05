"""Batch jobs: `kvjax run CONFIG.yaml --input IN.jsonl --output OUT.jsonl`.

    config    the YAML config (model, dtype, mesh, policies, sampling, max_new_tokens, batch_size, chat)
    records   input lines, output records, resuming from an output file
    runner    the job itself: batches by length bucket, every policy, a progress bar, a summary

    from kvjax.jobs import run_job
    summary = run_job("configs/jobs/smollm2-compare.yaml", "in.jsonl", "out.jsonl")
"""

from kvjax.jobs.config import JobConfig, PolicySpec, Sampling, load as load_config, parse as parse_config
from kvjax.jobs.runner import Summary, run_job

__all__ = ["JobConfig", "PolicySpec", "Sampling", "Summary", "load_config", "parse_config", "run_job"]

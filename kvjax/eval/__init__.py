"""Evaluation tasks (pass-key retrieval, needles) and metrics."""

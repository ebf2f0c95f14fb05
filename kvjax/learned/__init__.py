"""Learned eviction scorers (issue 16): targets from the model's own attention, a small per-(layer,
KV head) model over each token's pre-RoPE key, value, position and distance to the end, trained with optax.

    kvjax.learned.targets   future-attention targets, blockwise (never [T, T])
    kvjax.learned.model     the scorer's features and pure score function
    kvjax.learned.texts     the default training texts: fact essays, essays, synthetic documents
    kvjax.learned.train     train_scorer (also `kvjax.train_scorer`)
    kvjax.learned.store     TrainedScorer, save / load_scorer (Orbax + JSON), the model-identity check

The policy is `kvjax.policies.Learned(path_or_scorer, budget)`. This package's __init__ imports
nothing, so the policies can import its modules without a cycle.
"""

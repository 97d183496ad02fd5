"""``unimp eval``: the paper's metrics on held-out users, through the public Runtime API, and the accuracy
guard that compares two artifact sets (``--against``).

It lives in ``runtime/`` (not beside ``benchmarks/``) because it is judged where the artifacts are served:
an optimised graph set is checked on the deployment machine, which has the runtime but not torch. It
imports only the runtime, numpy and tqdm.

Modules: ``data`` (split files), ``metrics`` (HR/NDCG/MRR, MAE/RMSE, ROUGE, BLEU-1, set P/R/F1),
``runner`` (requests and scoring beside the baselines), ``guard`` (two runs compared), ``report``
(Markdown), ``cli`` (the subcommand).
"""

"""The objective comparison at equal FLOPs (``benchmarks/compare_objectives.py``).

Modules: ``specs`` (the objectives, their gin files, claims and downstream
routes), ``budget`` (XLA FLOPs per curriculum stage, steps from a FLOPs
budget), ``runs`` (pre-training and fine-tuning subprocesses, their event
files), ``report`` (markdown table and plots), ``progress`` (bar and ETA).
"""

"""Stage 4, evaluation (driven by training/evaluate.py and training/sweep.py): held-out loss on a recipe's rows
(heldout), the preference figures on visitors' pairs - reward accuracy and margin against the base, as DPO/KTO
optimise them, and the raw log-prob rate (preference_rate) -, an optional pairwise judge (judge), what
serving a model costs on the Space's CPU (serving_cost), and the tables, plot and model-card section (report)."""

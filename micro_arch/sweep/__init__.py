"""`micro-arch sweep`: the Optuna study, and what it leaves beside the study."""

"""`micro-arch compare`: reading run folders, the fairness rules, plots, and the report files."""

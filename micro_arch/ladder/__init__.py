"""Scaling ladders: architectures x compute budgets x seeds, trained, fitted and reported (micro-arch ladder)."""

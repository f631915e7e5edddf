"""Integrations of kvxfer into serving frameworks (each needs its framework installed)."""

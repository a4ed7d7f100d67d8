"""Hydra config tree (package data so the installed entry points find it)."""

"""Adapters that let other tools drive fastllava (each imports its tool lazily)."""

"""Rendering of every document kind: one width-aware table, markdown/CSV/JSON writers."""

"""Figures (matplotlib) and a self-contained HTML report."""

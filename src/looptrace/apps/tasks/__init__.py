"""Offline task data: parity, Sudoku and a tiny arithmetic LM (nothing is downloaded)."""

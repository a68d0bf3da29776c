"""Analyses of influence and hidden-state arrays: arrays in, arrays and tables out (no models, no plots)."""

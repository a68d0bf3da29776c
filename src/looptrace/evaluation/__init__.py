"""Counterfactual evaluation of attribution scores (plain functions on arrays; see issue #13)."""

"""Helpers for tests that run devft on a real Flower deployment (SuperLink + SuperNodes)."""

"""Scaling analysis: collect run directories, fit scaling laws, draw figures, write the report."""

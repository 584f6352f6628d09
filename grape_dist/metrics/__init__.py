"""Metrics: alignment against a real backward pass, run logs, progress output."""

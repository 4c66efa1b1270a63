"""Whole models assembled from `dsv4.model_runtime.layers`."""

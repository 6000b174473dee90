"""Evaluation: the benchmark grid, its run folder, metrics, statistics, tables, figures and the report."""

"""Evaluation: distribution metrics against held-out craters, reports, and running models or folders."""

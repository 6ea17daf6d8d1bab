"""Runners, reports and plots for experiments on the Flower simulation engine."""

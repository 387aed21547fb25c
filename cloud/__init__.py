"""Tandem's cloud side: experts, feedback, registry and the training that feeds the edge."""

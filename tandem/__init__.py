"""Tandem: edge-cloud collaborative inference.

This package holds what every side shares: the CLI, configuration loading, the
environment-variable registry, task definitions and the generated wire stubs
(`tandem.v1`, from `proto/`).
"""

__version__ = "0.1.0"

"""Tandem's edge daemon: ONNX Runtime students, a confidence policy and a cloud fallback.

Imports nothing from `cloud`: the wire contract (`tandem.v1`) is all the two share.
"""

"""Tandem's edge daemon: ONNX Runtime students, a confidence policy, a cloud fallback, a
durable feedback outbox and a model updater.

Imports nothing from `cloud`: the wire contract (`tandem.v1`) and its limits and artifact
layout (`tandem.contract`) are all the two share.
"""

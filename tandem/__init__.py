"""Tandem: edge-cloud collaborative inference.

This package is the base every side shares and imports nothing from them: the edge-cloud
contract beyond the proto (`tandem.contract`), the generated wire stubs (`tandem.v1`, from
`proto/`), configuration loading, the environment-variable registry, task definitions,
signing, file and subprocess helpers. The `tandem` command lives above it, in `tandem_cli`.
"""

__version__ = "0.1.0"

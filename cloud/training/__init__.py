"""Fine-tuning the teacher and training, exporting and calibrating edge students.

Needs the `train` extra (torch, transformers, onnx) and the offline MiniLM package.
"""

import os

# Read once when torch starts OpenMP: busy-waiting threads double the wall time of
# a training step when anything else shares the 2 cores (measured in PLATFORM.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

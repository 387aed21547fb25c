"""Fine-tuning the teacher and training, exporting and calibrating edge students.

Needs the `train` extra (torch, transformers, onnx) and the offline MiniLM package.
"""

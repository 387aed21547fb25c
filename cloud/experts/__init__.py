"""Experts: vLLM engines that answer escalations with a label of the task's label set."""

"""Feedback capture: every escalation, correction, fallback and audit sample, stored once."""

from cloud.feedback.store import FeedbackStore

__all__ = ["FeedbackStore"]

"""The audit trail: who trained, signed, promoted, refused and enrolled what, hash-chained."""

from cloud.audit.log import AuditError, AuditLog, audit_uri

__all__ = ["AuditError", "AuditLog", "audit_uri"]

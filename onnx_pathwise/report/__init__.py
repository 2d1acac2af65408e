"""Reports a person reads: one self-contained HTML page per command run (:mod:`.html`)."""

from .html import MAX_CARDS, audit_page, diff_page, evaluate_page, explain_page, write_page

__all__ = ["MAX_CARDS", "audit_page", "diff_page", "evaluate_page", "explain_page", "write_page"]

"""mailer: an email-marketing and tracking engine in which consent is a gate, not a setting."""

from __future__ import annotations

__version__ = "0.1.0"

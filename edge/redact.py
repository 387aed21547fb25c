"""PII redaction: every text is passed through this before it leaves the device or is stored.

Patterns run in order, each replacing its matches with `[NAME]`; the order matters where
patterns overlap (a card number is also a run of digits that looks like a phone number).
"""

import re

from tandem.contract import TEXT_MAX_BYTES

DEFAULT_PATTERNS: dict[str, str] = {
    # 13 to 19 digits, single spaces or dashes allowed between them; not part of a longer number.
    "card": r"(?<![\d+])(?:\d[ -]?){12,18}\d(?!\d)",
    # Possessive local part that cannot start inside another word: linear time on long
    # texts without an @ (with backtracking it took time quadratic in the text length).
    "email": r"(?<![\w.+-])[\w.+-]++@[\w-]+(?:\.[\w-]+)+",
    # An optional + or (, then 7 to 15 digits with up to two of ` .-()` between them:
    # +44 20 7946 0958, (555) 123-4567, 555.123.4567, +4915112345678.
    "phone": r"(?<![\w+(])[+(]?(?:\d[ .()-]{0,2}){6,14}\d(?!\w)",
}


class Redactor:
    """Replaces every match of each named pattern with `[NAME]`, then keeps at most
    TEXT_MAX_BYTES of UTF-8: a replacement can be longer than what it hides (`a@b.c` →
    `[EMAIL]`), and the cloud refuses a longer text."""

    def __init__(self, patterns: dict[str, str]) -> None:
        self._rules = [(re.compile(pattern), f"[{name.upper()}]") for name, pattern in patterns.items()]

    def __call__(self, text: str) -> str:
        for pattern, replacement in self._rules:
            text = pattern.sub(replacement, text)
        return text.encode()[:TEXT_MAX_BYTES].decode(errors="ignore")  # never half a character

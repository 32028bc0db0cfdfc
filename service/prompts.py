"""What counts as text in a prompt."""

from __future__ import annotations

import unicodedata

# Letters and symbols that draw nothing: the Hangul fillers and the blank Braille pattern.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def has_visible_text(text: str) -> bool:
    """True when ``text`` has a character that draws something: a letter, digit, punctuation mark or
    symbol. Spaces, control and format characters (NUL, zero-width spaces and joiners, direction
    marks, byte-order marks, tag characters), combining marks on their own and private-use or
    unassigned code points do not count."""
    return any(unicodedata.category(c)[0] in "LNPS" and c not in _BLANK_GLYPHS for c in text)

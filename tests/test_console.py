"""safe_text: the one door for untrusted text to a terminal, a log, a caption or an error."""

from __future__ import annotations

import pytest

from gapcam.console import SAFE_TEXT_LIMIT, safe_text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("cat.png", "cat.png"),
        ("a\nb.png", "a\\nb.png"),
        ("\x1b]0;TITLE\x07\x1b[31mred.png", "\\x1b]0;TITLE\\x07\\x1b[31mred.png"),
        ("tab\there\r", "tab\\there\\r"),
        ("\x9bC1 control", "\\x9bC1 control"),
        ("evil\u202egnp.exe", "evil\\u202egnp.exe"),  # right-to-left override
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("chat noir, élégant 猫", "chat noir, élégant 猫"),  # printable Unicode stays
        ("bad\udcffname", "bad\\udcffname"),  # a file name that is not UTF-8
    ],
)
def test_control_characters_are_escaped_and_the_rest_kept(raw: str, shown: str) -> None:
    assert safe_text(raw) == shown
    assert safe_text(shown) == shown  # nothing left to escape: stable


def test_long_text_is_cut_and_says_so() -> None:
    shown = safe_text("x" * 50_000_000)
    assert shown.startswith("x" * SAFE_TEXT_LIMIT)
    assert shown.endswith(f"... ({50_000_000 - SAFE_TEXT_LIMIT} more characters)")
    assert len(shown) < SAFE_TEXT_LIMIT + 40
    # the limit counts what is shown, escapes included, and never splits one
    assert safe_text("abc\n" * 10, limit=6) == "abc\\na... (35 more characters)"
    assert safe_text("ab\x1b" * 10, limit=5) == "ab... (28 more characters)"
    assert len(safe_text("\x1b" * 10_000)) < SAFE_TEXT_LIMIT + 40


def test_any_object_is_shown_as_its_text() -> None:
    assert safe_text(ValueError("bad\nname")) == "bad\\nname"

"""Keys and metadata from uploaders as a person is shown them: no character may hide, reorder
or forge what is read."""

from __future__ import annotations

import pytest

from ntf_ray.untrusted_text import html_text, visible


@pytest.mark.parametrize("char, shown", [
    ("\u202e", r"\u202e"), ("\u202a", r"\u202a"), ("\u2066", r"\u2066"), ("\u2069", r"\u2069"),  # bidi
    ("\u200e", r"\u200e"), ("\u200f", r"\u200f"), ("\u200b", r"\u200b"), ("\ufeff", r"\ufeff"),  # marks, zero width
    ("\n", r"\x0a"), ("\x1b", r"\x1b"), ("\x7f", r"\x7f"), ("\x85", r"\x85"),  # controls
    ("\u2028", r"\u2028"), ("\u2029", r"\u2029"),  # line and paragraph separators
    ("\U000e0041", r"\U000e0041"),  # a tag character (Cf, beyond the BMP)
    ("\udcff", r"\udcff"),  # an undecodable byte of a local file name
    ("\\", "\\\\"),  # so that a key spelling "\u202e" is not shown like one holding U+202E
])
def test_each_hiding_character_is_shown_as_its_escape(char, shown):
    assert visible(f"a{char}b") == f"a{shown}b"


def test_text_of_any_script_stays_as_it_is():
    assert visible("photos/日本 é ü 😀 Привет.jpg") == "photos/日本 é ü 😀 Привет.jpg"


def test_two_keys_that_differ_are_shown_differently():
    assert visible("a\u202eb") != visible(r"a\u202eb")


def test_html_text_escapes_markup_after_making_characters_visible():
    assert html_text('<img src=x onerror="a">\u202e') == r"&lt;img src=x onerror=&quot;a&quot;&gt;\u202e"
    assert html_text(42) == "42"

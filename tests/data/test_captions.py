"""Caption cleaning: whitespace normalised; empty, whitespace-only, missing and non-UTF-8
captions are Skips by reason."""
import pytest

from data_tools.captions import clean_caption, clean_captions
from data_tools.errors import Skip


@pytest.mark.parametrize("raw, expected", [
    ("  a red  circle\n", "a red circle"),
    ("two\tsmall\r\nsquares", "two small squares"),
    ("café crème".encode("utf-8"), "café crème"),
    ("一只猫", "一只猫"),
    ("a valid \ufffd sign", "a valid \ufffd sign"),  # U+FFFD is a character like any other
])
def test_captions_are_cleaned(raw, expected):
    assert clean_caption(raw) == expected


@pytest.mark.parametrize("raw, reason", [
    ("", "empty_caption"),
    ("  \n\t ", "empty_caption"),
    (b"caf\xe9", "non_utf8_caption"),
    (b"\xff\xfe", "non_utf8_caption"),
    ("caf\udce9", "non_utf8_caption"),     # what errors="surrogateescape" leaves behind
    (None, "missing_caption"),
    (42, "missing_caption"),
])
def test_bad_captions_are_skips(raw, reason):
    with pytest.raises(Skip) as caught:
        clean_caption(raw, "item 3")
    assert caught.value.reason == reason


def test_clean_captions_keeps_the_valid_ones_in_order():
    assert clean_captions([" a ", "", b"b\n"]) == ["a", "b"]
    with pytest.raises(Skip, match="empty_caption"):
        clean_captions(["", "   "])
    with pytest.raises(Skip, match="missing_caption"):
        clean_captions([])

"""Caption cleaning: one rule set for every converter, bad captions become `Skip`s by reason."""
from __future__ import annotations

from data_tools.errors import Skip


def clean_caption(raw: str | bytes | None, name: str = "") -> str:
    """Decode (UTF-8 only), collapse whitespace runs (newlines included) to one space, strip.

    A caption that is missing, not valid UTF-8, or empty after cleaning raises Skip.
    """
    if raw is None:
        raise Skip("missing_caption", name)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("non_utf8_caption", f"{name}: {e.reason} at byte {e.start}") from None
    if not isinstance(raw, str):
        raise Skip("missing_caption", f"{name}: not a string ({type(raw).__name__})")
    # U+FFFD itself is a valid character (it may stand in a source caption); undecodable bytes
    # reach here only as lone surrogates (tables are read with errors="surrogateescape")
    if _has_surrogates(raw):
        raise Skip("non_utf8_caption", f"{name}: undecodable characters")
    caption = " ".join(raw.split())
    if not caption:
        raise Skip("empty_caption", name)
    return caption


def clean_captions(raws, name: str = "") -> list[str]:
    """Every valid caption of an item, in order; Skip (with the first reason) if none is valid."""
    captions, first_skip = [], None
    for raw in raws:
        try:
            captions.append(clean_caption(raw, name))
        except Skip as skip:
            first_skip = first_skip or skip
    if not captions:
        raise first_skip or Skip("missing_caption", name)
    return captions


def _has_surrogates(text: str) -> bool:
    """Lone surrogates appear when bytes were decoded with errors='surrogateescape'."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False

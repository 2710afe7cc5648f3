"""Human sizes ("64M", "1G", "4096") to bytes and back: every CLI flag and plugin key uses these."""

from __future__ import annotations

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a size such as ``512M``, ``1G``, ``1.5G``, ``4096`` or ``64KiB``.

    Raises:
        ValueError: with a message fit for a user, when the text is not a positive size.
    """
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = s, ""
    if s and s[-1] in _UNITS:
        num, unit = s[:-1], s[-1]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 64M, 1G, 4096)") from None
    result = int(value * _UNITS[unit])
    if result <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return result


def format_size(n: int) -> str:
    """Bytes as a short human string: 1536 -> '1.5K'."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"

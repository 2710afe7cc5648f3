"""The cluster secret: a random key every daemon and node reads from a 0600 file.

It never crosses the wire: blades use it for challenge-response (see ``auth.py``), the
coordinator accepts a token derived from it (``coordinator_token``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat


class SecretError(Exception):
    """The secret file is missing, unreadable, empty or readable by others."""


def generate_secret_file(path: str) -> None:
    """Write a fresh 32-byte secret (hex) to ``path`` with mode 0600, unless it exists."""
    if os.path.exists(path):
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def load_secret(path: str) -> bytes:
    """Read the secret; refuse a file that group or others may read."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"secret file {path} is readable by others (chmod 600 it)")
    if len(data) < 16:
        raise SecretError(f"secret file {path} is too short (need >= 16 bytes)")
    return data


def coordinator_token(secret: bytes) -> str:
    """The bearer token the coordinator's HTTP API accepts: derived, so the secret stays home."""
    return hmac.new(secret, b"rallocator-coordinator-v1", hashlib.sha256).hexdigest()

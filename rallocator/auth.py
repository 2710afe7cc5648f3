"""Challenge-response over the cluster secret: both sides prove they hold it; it never travels.

    blade -> node   HELLO  payload = nonce_b (32)
    node  -> blade  HELLO  addr = node id, payload = nonce_n (32) + mac_n (32)
    blade -> node   HELLO  status OK, payload = mac_b (32) + superblock   | status EAUTH

    mac_n = HMAC-SHA256(secret, "node"  | nonce_b | nonce_n | node id)
    mac_b = HMAC-SHA256(secret, "blade" | nonce_n | nonce_b | node id)

Fresh nonces on both sides stop replay in either direction; the node id is bound into both
MACs so a proof for one node cannot be reused for another.
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE = 32
MAC = 32


def new_nonce() -> bytes:
    return os.urandom(NONCE)


def node_proof(secret: bytes, nonce_b: bytes, nonce_n: bytes, node_id: int) -> bytes:
    return hmac.new(secret, b"node" + nonce_b + nonce_n + node_id.to_bytes(8, "little"),
                    hashlib.sha256).digest()


def blade_proof(secret: bytes, nonce_n: bytes, nonce_b: bytes, node_id: int) -> bytes:
    return hmac.new(secret, b"blade" + nonce_n + nonce_b + node_id.to_bytes(8, "little"),
                    hashlib.sha256).digest()


def check(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)

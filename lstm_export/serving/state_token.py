"""Stream state as a signed token, so that any replica holding the same key and model continues a
stream and none keeps per-stream state.

A token is base64url(payload || HMAC-SHA256(key, payload)), payload = MAGIC, the model's digest
(sha256 of its ONNX bytes), a digest of the sequence id, the step count, the state's layer and unit
counts, then h and c as little-endian float32. Everything is under the MAC: a forged, truncated or
edited token, one signed with another key, one made for another model or another sequence is
refused with a 4xx, never loaded as a state.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_export.common.errors import UserError

# 2: the sequence digest covers the id's type; a version-1 token is refused as not this format
MAGIC = b"lstm-export-state-2\0"
_HEAD = struct.Struct("<32s16sQII")  # model digest, sequence digest, steps, layers, hidden
MAC_BYTES = 32
MIN_KEY_BYTES = 16
KEY_ENV = "LSTM_EXPORT_STATE_KEY"


class TokenError(UserError):
    """A token that cannot be used: the server answers 400 (or 403 for a signature that fails)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StreamState:
    h: np.ndarray  # (L, H) float32
    c: np.ndarray
    steps: int


def load_key(path: str | None) -> bytes | None:
    """The signing key: the file at `path`, else $LSTM_EXPORT_STATE_KEY, else None (no tokens).
    Never a flag's value: a key on the command line shows in `ps`."""
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as e:
            raise UserError(f"--state-key-file {path}: {e.strerror}; give a file holding the key") from None
        where = f"--state-key-file {path}"
    elif os.environ.get(KEY_ENV):
        key, where = os.environ[KEY_ENV].encode().strip(), f"${KEY_ENV}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"{where} holds {len(key)} bytes; a state key needs at least {MIN_KEY_BYTES} "
                        "(e.g. `head -c 32 /dev/urandom | base64 > key`)")
    return key


def _sequence_digest(sequence_id) -> bytes:
    # the id's type is part of it: 7 and "7" are two sequences (as in Triton), and a token made for
    # one does not continue the other
    kind = "int" if isinstance(sequence_id, int) else "str"
    return hashlib.sha256(f"{kind}:{sequence_id}".encode()).digest()[:16]


def sign(key: bytes, model_digest: str, sequence_id, state: StreamState) -> str:
    h = np.ascontiguousarray(state.h, "<f4")
    c = np.ascontiguousarray(state.c, "<f4")
    payload = (MAGIC + _HEAD.pack(bytes.fromhex(model_digest), _sequence_digest(sequence_id), state.steps,
                                  h.shape[0], h.shape[1]) + h.tobytes() + c.tobytes())
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")


def verify(key: bytes, token, model_digest: str, sequence_id, layers: int, hidden: int) -> StreamState:
    """The state in `token`; TokenError naming what is wrong otherwise."""
    if not isinstance(token, str) or not token:
        raise TokenError("state_token must be the string a previous response returned")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise TokenError("state_token is not base64url; send it as the previous response gave it") from None
    size = len(MAGIC) + _HEAD.size + 2 * layers * hidden * 4 + MAC_BYTES
    if not raw.startswith(MAGIC):
        raise TokenError("state_token does not begin as this server's state tokens do (edited, from another "
                         "version of lstm-export, or not a state token); send it as the previous response gave it")
    if len(raw) != size:
        raise TokenError(f"state_token is {len(raw)} bytes, not the {size} of this model's state "
                         "(truncated, edited, or made for another model)")
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise TokenError("state_token's signature does not verify: it was forged, edited, or signed with "
                         "another key than this server's", status=403)
    digest, seq, steps, L, H = _HEAD.unpack_from(payload, len(MAGIC))
    if digest.hex() != model_digest:
        raise TokenError("state_token belongs to another model (a stream continues on the model it began on)")
    if seq != _sequence_digest(sequence_id):
        raise TokenError(f"state_token belongs to another sequence than {sequence_id!r}")
    if (L, H) != (layers, hidden):
        raise TokenError(f"state_token holds a ({L}, {H}) state; this model's is ({layers}, {hidden})")
    body = np.frombuffer(payload, "<f4", offset=len(MAGIC) + _HEAD.size).reshape(2, L, H)
    return StreamState(body[0].astype(np.float32), body[1].astype(np.float32), steps)

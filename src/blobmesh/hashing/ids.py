"""Text forms of 32-byte identifiers: a short prefix plus lowercase unpadded base32."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import ClassVar, Self

from blobmesh.errors import InvalidIdError

DIGEST_SIZE = 32
_B32_LEN = 52  # 32 bytes -> 52 base32 characters without padding
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def encode_b32(raw: bytes) -> str:
    """Lowercase, unpadded RFC 4648 base32."""
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def decode_b32(text: str, *, what: str) -> bytes:
    """Decode the 52-character form of 32 bytes; only the canonical spelling is accepted."""
    if len(text) != _B32_LEN:
        raise InvalidIdError(f"malformed {what}: expected {_B32_LEN} base32 characters, "
                             f"got {len(text)}", text=text)
    if not set(text) <= _ALPHABET:
        raise InvalidIdError(f"malformed {what}: characters outside lowercase base32 "
                             f"(a-z, 2-7)", text=text)
    try:
        raw = base64.b32decode(text.upper() + "====")
    except (binascii.Error, ValueError) as exc:
        raise InvalidIdError(f"malformed {what}: not base32 ({exc})", text=text) from exc
    if encode_b32(raw) != text:
        # non-zero trailing bits would give two spellings of one id
        raise InvalidIdError(f"malformed {what}: non-canonical base32", text=text)
    return raw


@dataclass(frozen=True, slots=True, order=True)
class PrefixedId:
    """A 32-byte identifier whose text form is ``PREFIX + base32``."""

    digest: bytes
    PREFIX: ClassVar[str] = ""
    KIND: ClassVar[str] = "id"

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise InvalidIdError(f"a {self.KIND} is {DIGEST_SIZE} bytes")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse the canonical text form, raising :class:`InvalidIdError` with the reason.

        Surrounding whitespace is ignored; anything else that is not exactly ``str(id)`` (other
        case, padding, wrong length or alphabet, non-zero trailing bits) is rejected, so one id
        has one spelling.
        """
        if not isinstance(text, str):
            raise InvalidIdError(f"a {cls.KIND} must be a string")
        text = text.strip()
        if not text.startswith(cls.PREFIX):
            raise InvalidIdError(
                f"malformed {cls.KIND} {text[:70]!r}: must start with {cls.PREFIX!r}", text=text
            )
        return cls(decode_b32(text[len(cls.PREFIX):], what=f"{cls.KIND} {text[:70]!r}"))

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def short(self) -> str:
        return str(self)[: len(self.PREFIX) + 10]

    def __str__(self) -> str:
        return self.PREFIX + encode_b32(self.digest)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


@dataclass(frozen=True, slots=True, order=True, repr=False)
class BlobId(PrefixedId):
    """The content id of a blob: the root of its hash tree (see ``docs/hashing.md``)."""

    PREFIX: ClassVar[str] = "bm1"
    KIND: ClassVar[str] = "blob id"

"""Text forms of 32-byte identifiers: a short prefix plus lowercase unpadded base32."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import ClassVar, Self

from blobmesh.errors import InvalidIdError

DIGEST_SIZE = 32
_B32_LEN = 52  # 32 bytes -> 52 base32 characters without padding


def encode_b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def decode_b32(text: str, *, what: str) -> bytes:
    if len(text) != _B32_LEN:
        raise InvalidIdError(f"malformed {what}: expected {_B32_LEN} base32 characters, "
                             f"got {len(text)}", text=text)
    try:
        raw = base64.b32decode(text.upper() + "====", casefold=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidIdError(f"malformed {what}: not base32 ({exc})", text=text) from exc
    if encode_b32(raw) != text.lower():
        # non-canonical trailing bits would give two spellings of one id
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
        """Parse the text form, raising :class:`InvalidIdError` with the reason."""
        if not isinstance(text, str):
            raise InvalidIdError(f"a {cls.KIND} must be a string")
        text = text.strip()
        if not text.lower().startswith(cls.PREFIX):
            raise InvalidIdError(
                f"malformed {cls.KIND} {text[:70]!r}: must start with {cls.PREFIX!r}", text=text
            )
        return cls(decode_b32(text[len(cls.PREFIX):].lower(), what=cls.KIND))

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

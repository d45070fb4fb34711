"""Node identities: Ed25519 key pairs whose public key is the node id."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from blobmesh.errors import IdentityError
from blobmesh.hashing.ids import PrefixedId

KEY_FILE = "identity.key"


@dataclass(frozen=True, slots=True, order=True, repr=False)
class NodeId(PrefixedId):
    """A node's Ed25519 public key; text form ``nd1`` + base32."""

    PREFIX: ClassVar[str] = "nd1"
    KIND: ClassVar[str] = "node id"


class Identity:
    """An Ed25519 key pair; its public key is this node's :class:`NodeId`."""

    __slots__ = ("_key", "_node_id")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._node_id = NodeId(key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> Identity:
        """A fresh, unsaved identity (tests, throwaway nodes)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, home: Path | str) -> Identity:
        """Load ``HOME/identity.key``, creating it (mode 0600, atomically) on first use.

        Raises :class:`IdentityError` if the file is group/world accessible or malformed.
        """
        path = Path(home) / KEY_FILE
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        Path(home).mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
                f.flush()
                os.fsync(f.fileno())
            # link(2) fails if another process created the key meanwhile: theirs wins
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise IdentityError(
                    f"{path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
                    f"run: chmod 600 {path}", path=str(path))
            data = f.read(64 * 1024)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not a valid identity key: {exc}",
                                path=str(path)) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} is not an Ed25519 key", path=str(path))
        return cls(key)

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._key

    def sign(self, message: bytes) -> bytes:
        """An Ed25519 signature (64 bytes) of ``message``."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Identity({self._node_id})"


def verify_signature(node_id: NodeId, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``node_id``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(node_id.digest).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True

"""The transfer messages' encoding."""

from __future__ import annotations

import pytest

from blobmesh.transfer.messages import Data, data_head, decode, encode


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 1024 * 1024])
def test_data_head_and_payload_are_the_encoded_message(n: int) -> None:
    payload = bytes(i % 251 for i in range(n))
    head = data_head(7, 1 << 20, n)
    assert head + payload == encode(Data(7, 1 << 20, memoryview(payload)))
    msg = decode(head + payload)
    assert isinstance(msg, Data) and (msg.piece, msg.offset) == (7, 1 << 20)
    assert msg.data == payload

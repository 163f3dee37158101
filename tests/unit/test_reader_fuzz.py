"""Fuzz the bounded reader: any bytes end in an event, a clean end, or a ProtocolViolation."""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wyoming_superwhisper.runtime.limits import ProtocolViolation, ReadLimits, read_event

LIMITS = ReadLimits(max_header_bytes=4096, max_data_bytes=2048, max_payload_bytes=4096, idle_timeout_s=2.0)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def adversarial_events(draw: st.DrawFn) -> bytes:
    """Headers that are almost right: wrong lengths, wrong types, lies about sizes."""
    header: dict[str, object] = {}
    if draw(st.booleans()):
        header["type"] = draw(
            st.sampled_from(["audio-chunk", "transcribe", "synthesize", "", "x" * 50]) | json_values
        )
    if draw(st.booleans()):
        header["data"] = draw(json_values)
    data_bytes = b""
    if draw(st.booleans()):
        data_bytes = json.dumps(draw(json_values)).encode()
        header["data_length"] = draw(
            st.sampled_from([len(data_bytes), len(data_bytes) + 5, -1, 10**12]) | json_values
        )
    payload = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        header["payload_length"] = draw(
            st.sampled_from([len(payload), len(payload) * 2, 0, 2**40]) | json_values
        )
    line = json.dumps(header).encode() + b"\n"
    return line + data_bytes + payload + draw(st.binary(max_size=8))


async def read_all(raw: bytes) -> list[object]:
    reader = asyncio.StreamReader(limit=LIMITS.max_header_bytes)
    reader.feed_data(raw)
    reader.feed_eof()
    outcomes: list[object] = []
    for _ in range(50):
        try:
            event = await read_event(reader, LIMITS)
        except ProtocolViolation as violation:
            assert violation.code
            outcomes.append(violation)
            break
        if event is None:
            break
        assert isinstance(event.type, str) and event.type
        assert isinstance(event.data, dict)
        assert event.payload is None or len(event.payload) <= LIMITS.max_payload_bytes
        outcomes.append(event)
    return outcomes


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_reader(raw: bytes) -> None:
    asyncio.run(read_all(raw))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(adversarial_events(), min_size=1, max_size=4))
def test_adversarial_headers_never_crash_the_reader(events: list[bytes]) -> None:
    asyncio.run(read_all(b"".join(events)))


def test_a_valid_event_after_garbage_is_not_reached() -> None:
    """After a violation the connection closes: nothing after it is interpreted."""
    raw = b'{"type": "x", "payload_length": "a lot"}\n' + b'{"type": "ping"}\n'
    outcomes = asyncio.run(read_all(raw))
    assert len(outcomes) == 1 and isinstance(outcomes[0], ProtocolViolation)

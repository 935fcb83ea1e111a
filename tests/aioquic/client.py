"""A QUIC client written by someone else: aioquic, speaking courier's wire v1 minimally.

Used by tests/it/foreign_client.rs (issue 18) to check what a client that is not quinn
meets when it misbehaves. Usage:

    python client.py HOST PORT TOKEN SCENARIO [SCENARIO ...]

Each scenario runs on a connection of its own and prints one JSON line:

    {"scenario": NAME, ...what it saw...}

Stream codes are what the server sent in STOP_SENDING or RESET_STREAM; a connection close
is {"code": N, "transport": true|false} (transport: a QUIC transport CONNECTION_CLOSE,
false: an application close carrying one of courier's codes). Every wait is bounded
(WAIT_SECS); nothing of a token or payload is printed.

Wire v1 (pipeline/src/wire/mod.rs): frame = len:u32 | type:u8 | body, little endian.
"""

import asyncio
import json
import logging
import os
import ssl
import struct
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

ALPN = "courier/1"
HELLO, SUBMIT, WELCOME, ACK = 0x01, 0x02, 0x81, 0x82
WAIT_SECS = 20.0


def frame(kind, body):
    return struct.pack("<IB", len(body), kind) + body


def hello(token):
    t = token.encode()
    return frame(HELLO, struct.pack("<HH", 1, len(t)) + t)


def submit(batch_id, client_id, recipient, payload):
    r = recipient.encode()
    body = struct.pack("<QI", batch_id, 1)
    body += struct.pack("<QB", client_id, len(r)) + r + struct.pack("<I", len(payload)) + payload
    return frame(SUBMIT, body)


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = asyncio.Queue()
        self.buffers = {}

    def quic_event_received(self, event):
        super().quic_event_received(event)
        self.events.put_nowait(event)

    async def next_event(self, want):
        """The next event matching `want`; a connection close ends the wait early."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECS
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("no answer from the server")
            e = await asyncio.wait_for(self.events.get(), left)
            if want(e) or isinstance(e, ConnectionTerminated):
                return e

    async def read_frame(self, stream_id):
        """The next whole frame on `stream_id`: (type, body), or the event that ended it."""
        while True:
            buf = self.buffers.get(stream_id, b"")
            if len(buf) >= 5:
                n, kind = struct.unpack_from("<IB", buf)
                if len(buf) >= 5 + n:
                    self.buffers[stream_id] = buf[5 + n :]
                    return kind, buf[5 : 5 + n]
            e = await self.next_event(
                lambda e: getattr(e, "stream_id", None) == stream_id
                and isinstance(e, (StreamDataReceived, StreamReset))
            )
            if not isinstance(e, StreamDataReceived):
                return None, e
            self.buffers[stream_id] = buf + e.data

    def send(self, data, stream_id=None):
        if stream_id is None:
            stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, data, end_stream=False)
        self.transmit()
        return stream_id

    async def stream_code(self, stream_id):
        """The code the server stopped or reset `stream_id` with."""
        e = await self.next_event(
            lambda e: isinstance(e, (StopSendingReceived, StreamReset))
            and e.stream_id == stream_id
        )
        return describe(e)

    async def handshake(self):
        e = await self.next_event(lambda e: isinstance(e, HandshakeCompleted))
        return None if isinstance(e, HandshakeCompleted) else describe(e)

    async def hello(self, token):
        sid = self.send(hello(token))
        kind, body = await self.read_frame(sid)
        if kind != WELCOME:
            raise RuntimeError(f"expected WELCOME, got {describe(body) if kind is None else kind}")
        business, batch_max, payload_max, frame_max = struct.unpack_from("<IIII", body)
        return {"frame_bytes_max": frame_max, "batch_messages_max": batch_max}

    async def submit_one(self, batch_id):
        # Client ids of its own: the quinn client of the same business uses small ones.
        client_id = 1_000_000 + batch_id
        sid = self.send(submit(batch_id, client_id, "+4915550000%03d" % batch_id, b"aioquic"))
        kind, body = await self.read_frame(sid)
        if kind != ACK:
            return {"ack": None, "ended": describe(body) if kind is None else kind}
        acked_batch, count = struct.unpack_from("<QI", body)
        statuses = [body[12 + 9 * i] for i in range(count)]
        return {"ack": {"batch": acked_batch, "statuses": statuses}}

    async def closed(self):
        e = await self.next_event(lambda e: False)
        return describe(e)


def describe(e):
    if isinstance(e, ConnectionTerminated):
        return {"close": {"code": e.error_code, "transport": e.frame_type is not None}}
    if isinstance(e, StopSendingReceived):
        return {"stop_sending": e.error_code}
    if isinstance(e, StreamReset):
        return {"reset": e.error_code}
    return {"other": type(e).__name__}


async def scenario(c, name, token):
    refused = await c.handshake()
    if refused is not None:
        return {"handshake": refused}
    out = {"handshake": "completed"}
    if name == "submit":
        await c.hello(token)
        out.update(await c.submit_one(1))
    elif name == "garbage":
        await c.hello(token)
        # A frame of a type wire v1 does not have, then bytes that are no frame at all.
        sid = c.send(frame(0xEE, b"\x00\x01\x02") + b"\xff\xfe\xfd")
        out["stream"] = await c.stream_code(sid)
        out.update(await c.submit_one(2))
    elif name == "oversized":
        limits = await c.hello(token)
        sid = c.send(struct.pack("<IB", limits["frame_bytes_max"] + 1, SUBMIT) + b"\x00" * 64)
        out["stream"] = await c.stream_code(sid)
        out.update(await c.submit_one(3))
    elif name == "before_hello":
        # SUBMIT before any HELLO: its stream is closed, and without HELLO the connection
        # is closed at the server's HELLO deadline.
        sid = c.send(submit(4, 4, "+491555000004", b"early"))
        out["stream"] = await c.stream_code(sid)
        out["then"] = await c.closed()
    elif name == "oversized_hello":
        # Before HELLO only HELLO-sized frames are read.
        sid = c.send(struct.pack("<IB", 1 << 20, HELLO) + b"\x00" * 64)
        out["stream"] = await c.stream_code(sid)
    else:
        raise ValueError(f"unknown scenario {name}")
    return out


async def run(host, port, token, name):
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name="localhost",
        # The server's certificate is self-signed; this client tests the wire, not trust.
        verify_mode=ssl.CERT_NONE,
        idle_timeout=WAIT_SECS,
    )
    async with connect(
        host, port, configuration=config, create_protocol=Client, wait_connected=False
    ) as c:
        # Without wait_connected, connect() leaves the first flight unsent.
        c.transmit()
        out = await scenario(c, name, token)
        c.close()
        return out


def main():
    if os.environ.get("COURIER_AIOQUIC_DEBUG") == "1":
        logging.basicConfig(level=logging.DEBUG)
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for name in sys.argv[4:]:
        try:
            out = asyncio.run(asyncio.wait_for(run(host, port, token, name), WAIT_SECS * 2))
        except Exception as e:  # reported, not raised: the test reads every line
            out = {"error": f"{type(e).__name__}: {e}"}
        out["scenario"] = name
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

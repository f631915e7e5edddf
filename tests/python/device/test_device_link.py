"""The emulated link: a real TCP proxy on loopback with delay, rate, loss and disconnects."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from kvxfer.device.errors import BadSettingsError
from kvxfer.device.link import Cut, LinkProxy, LinkSpec


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                self.request.sendall(data)
            except OSError:
                return


@pytest.fixture
def echo_port():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _roundtrip(port: int, payload: bytes, timeout=10.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - t0


def test_delay_is_applied_each_way(echo_port):
    with LinkProxy(echo_port, up=LinkSpec(delay=0.05), down=LinkSpec(delay=0.05)) as p:
        got, rtt = _roundtrip(p.port, b"ping")
    assert got == b"ping"
    assert 0.1 <= rtt < 0.5


def test_rate_limits_and_jitter_keeps_bytes_in_order(echo_port):
    payload = bytes(range(256)) * 400  # 100 KiB
    down = LinkSpec(delay=0.001, jitter=0.005, rate=1e6)
    with LinkProxy(echo_port, down=down, seed=3) as p:
        got, t = _roundtrip(p.port, payload)
    assert got == payload  # byte for byte, in order
    assert t >= 0.09  # 102400 bytes at 1 MB/s


def test_loss_is_a_stall_not_a_hole(echo_port):
    payload = b"x" * 1000
    with LinkProxy(echo_port, down=LinkSpec(loss=0.99, rto=0.1), seed=1) as p:
        got, t = _roundtrip(p.port, payload)
        lost = p.stats.lost_chunks
    assert got == payload and lost >= 1 and t >= 0.1


def test_cut_after_bytes_breaks_the_stream_mid_way(echo_port):
    with LinkProxy(echo_port, cut=Cut(after_down_bytes=100)) as p:
        got, _ = _roundtrip(p.port, b"y" * 1000)
        assert len(p.stats.cuts) == 1
    assert got == b"y" * 100


def test_cut_on_demand(echo_port):
    with LinkProxy(echo_port) as p:
        s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        s.sendall(b"a")
        assert s.recv(10) == b"a"
        p.cut()
        end = b"?"
        try:
            end = s.recv(10)
        except ConnectionResetError:
            end = b""
        s.close()
    assert end == b""


def test_bad_spec_is_refused():
    with pytest.raises(BadSettingsError):
        LinkSpec(delay=-1)
    with pytest.raises(BadSettingsError):
        LinkSpec(rate=0)
    with pytest.raises(BadSettingsError):
        LinkSpec(loss=1.0)

"""Raw-socket peers for wire-level tests: they log exactly the bytes that arrive.

``RawUpstream`` is a lenient HTTP/1.1 server, the kind a smuggling attack needs: it frames
requests by Content-Length or chunked, reads a request with neither as bodyless, and treats
whatever follows as the next request. Tests assert on ``connections`` (raw bytes per accepted
connection) and ``requests`` (what it parsed), so a body read as a second request shows up.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from proxy.demo import make_tls_files


@dataclass
class RawRequest:
    head: bytes
    body: bytes

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


@dataclass
class RawUpstream:
    tls_dir: Path | None = None
    port: int = 0
    # False: read and log, never answer (an upstream that hangs).
    answer: bool = True
    # Bytes of extra response header lines (an upstream with a huge head).
    response_padding: int = 0
    connections: list[bytearray] = field(default_factory=list)
    requests: list[RawRequest] = field(default_factory=list)
    _sock: socket.socket | None = None

    @property
    def ca_file(self) -> Path:
        assert self.tls_dir is not None
        return self.tls_dir / "upstream-ca.pem"

    def start(self) -> RawUpstream:
        ctx: ssl.SSLContext | None = None
        if self.tls_dir is not None:
            self.tls_dir.mkdir(parents=True, exist_ok=True)
            _, cert, key = make_tls_files(self.tls_dir)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            # HTTP/1.1 only: the proxy must translate an HTTP/2 client's requests.
            ctx.set_alpn_protocols(["http/1.1"])
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, args=(ctx,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _accept(self, ctx: ssl.SSLContext | None) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, ctx), daemon=True).start()

    def _serve(self, conn: socket.socket, ctx: ssl.SSLContext | None) -> None:
        raw = bytearray()
        self.connections.append(raw)
        try:
            sock: socket.socket = ctx.wrap_socket(conn, server_side=True) if ctx else conn
            sock.settimeout(10)
            buf = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                raw += data
                buf += data
                while (parsed := _parse(buf)) is not None:
                    request, buf = parsed
                    self.requests.append(request)
                    if not self.answer:
                        continue
                    body = b'{"ok": true}'
                    pad = b"X-Pad: " + b"p" * self.response_padding + b"\r\n" if self.response_padding else b""
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + pad
                                 + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()


def _parse(buf: bytes) -> tuple[RawRequest, bytes] | None:
    """One request off the front of ``buf`` the lenient way, or None if it is incomplete."""
    buf = buf.lstrip(b"\r\n")
    end = buf.find(b"\r\n\r\n")
    if end == -1:
        return None
    head, rest = buf[:end], buf[end + 4:]
    req = RawRequest(head, b"")
    te = (req.header(b"transfer-encoding") or b"").lower()
    if b"chunked" in te:
        body = b""
        while True:
            nl = rest.find(b"\r\n")
            if nl == -1:
                return None
            size = int(rest[:nl].split(b";")[0], 16)
            if len(rest) < nl + 2 + size + 2:
                return None
            body += rest[nl + 2:nl + 2 + size]
            rest = rest[nl + 2 + size + 2:]
            if size == 0:
                break
        req.body = body
        return req, rest
    length = int(req.header(b"content-length") or b"0")
    if len(rest) < length:
        return None
    req.body = rest[:length]
    return req, rest[length:]

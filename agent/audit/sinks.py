"""Audit sinks (`--audit-sink URL`): the chained lines, once written to the local audit file, are copied to each
sink's disk spool by the writer thread and shipped in order by one sender thread per sink.

The local file stays the source of truth. Nothing here runs on the request path: the writer appends to
spool files (bounded; a batch over the bound is dropped for that sink, counted and alerted), and a sender
that cannot reach its receiver retries with a bounded backoff while records wait on disk.

URLs (validated before the agent starts; no credentials in them, none in metric labels):
  syslog+tcp://HOST:PORT, syslog+tls://HOST:PORT[?ca=PEM][&cert=PEM&key=PEM]   RFC 5424 / RFC 6587
  otlp://HOST:PORT, otlps://HOST:PORT[?ca=...&cert=...&key=...]               OTLP/gRPC logs
  otlp+http://HOST:PORT[/PATH], otlp+https://...                             OTLP/HTTP protobuf (/v1/logs)
and on any of them `spool=SIZE` (default 256MiB): the spool's bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from agent.audit.spool import Position, Spool
from agent.server.limits import parse_bytes

log = logging.getLogger("agent.audit.sinks")

DEFAULT_SPOOL_BYTES = 256 << 20
BATCH_BYTES = 512 << 10  # a send reads about this much from the spool
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0
IDLE_S = 1.0  # an idle sender looks at its connection this often
SCHEMES = ("syslog+tcp", "syslog+tls", "otlp", "otlps", "otlp+http", "otlp+https")
TLS_SCHEMES = frozenset({"syslog+tls", "otlps", "otlp+https"})


@dataclass(frozen=True, slots=True)
class SinkConfig:
    scheme: str
    host: str
    port: int
    path: str  # otlp+http(s) only: where to POST
    spool_bytes: int
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def label(self) -> str:
        """What metrics and status call the sink: scheme, host and port (never userinfo or a query)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def sink_id(self) -> str:
        """The spool directory's name: readable scheme and host, and a short digest of the label."""
        readable = re.sub(r"[^A-Za-z0-9.-]", "_", f"{self.scheme}-{self.host}-{self.port}")
        return f"{readable}-{hashlib.sha256(self.label.encode()).hexdigest()[:8]}"


def parse_sink(url: str) -> SinkConfig:
    """A validated sink; ValueError says what is wrong (never echoing a password)."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ValueError(f"audit sink {_safe(url)}: not a valid URL ({e})") from None
    where = f"audit sink {_safe(url)}"
    if u.scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown scheme {u.scheme!r}; use one of " + ", ".join(f"{s}://" for s in SCHEMES))
    if u.username is not None or u.password is not None:
        raise ValueError(f"{where}: no user or password in the URL (TLS client certificates: &cert=PEM&key=PEM)")
    if not u.hostname:
        raise ValueError(f"{where}: no host")
    if port is None or port == 0:
        raise ValueError(f"{where}: no port (write HOST:PORT)")
    if u.fragment:
        raise ValueError(f"{where}: no #fragment")
    http = u.scheme.startswith("otlp+")
    if u.path not in ("", "/") and not http:
        raise ValueError(f"{where}: no path for {u.scheme}://")
    try:
        query = parse_qs(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError:
        raise ValueError(f"{where}: the query is not NAME=VALUE&...") from None
    known = {"spool", "ca", "cert", "key"} if u.scheme in TLS_SCHEMES else {"spool"}
    for name, values in query.items():
        if name not in known:
            takes = ", ".join(sorted(known))
            raise ValueError(f"{where}: unknown query parameter {name!r}; {u.scheme}:// takes {takes}")
        if len(values) != 1 or not values[0]:
            raise ValueError(f"{where}: {name} needs one value")
    one = {name: values[0] for name, values in query.items()}
    spool_bytes = DEFAULT_SPOOL_BYTES
    if "spool" in one:
        try:
            spool_bytes = parse_bytes(one["spool"])
        except ValueError as e:
            raise ValueError(f"{where}: spool: {e}") from None
        if spool_bytes < 4096:
            raise ValueError(f"{where}: spool must be at least 4KiB")
    if ("cert" in one) != ("key" in one):
        raise ValueError(f"{where}: cert and key go together")
    for name in ("ca", "cert", "key"):
        if name in one and not os.path.isfile(one[name]):
            raise ValueError(f"{where}: {name}: no such file {one[name]}")
    path = (u.path if u.path not in ("", "/") else "/v1/logs") if http else ""
    return SinkConfig(u.scheme, u.hostname, port, path, spool_bytes, one.get("ca"), one.get("cert"), one.get("key"))


def _safe(url: str) -> str:
    """The URL as an error may show it: without userinfo and query values."""
    try:
        u = urlsplit(url)
        netloc = u.netloc.rpartition("@")[2]
        query = "&".join(f"{p.partition('=')[0]}=..." for p in u.query.split("&") if p)
    except ValueError:
        return "(unparseable)"
    return f"{u.scheme}://{netloc}{u.path}" + (f"?{query}" if query else "")


def tls_context(config: SinkConfig) -> ssl.SSLContext:
    """TLS 1.2 or later (1.3 when the receiver has it), the server's certificate and hostname verified."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    if config.cert and config.key:
        ctx.load_cert_chain(config.cert, config.key)
    return ctx


class Connection(Protocol):
    settle_s: float

    def send(self, lines: list[bytes]) -> None: ...
    def check(self) -> None: ...
    def finish(self, timeout_s: float = 2.0) -> bool: ...
    def close(self) -> None: ...


def connect(config: SinkConfig, hostname: str) -> Connection:
    """A connection to the sink's receiver (raises OSError when it cannot be made)."""
    if config.scheme.startswith("syslog+"):
        from agent.audit.syslog import SyslogConnection

        tls = tls_context(config) if config.scheme == "syslog+tls" else None
        return SyslogConnection.open(config.host, config.port, hostname, tls)
    if config.scheme in ("otlp", "otlps"):
        import grpc

        from agent.audit.otlp import OtlpGrpcConnection

        creds = None
        if config.scheme == "otlps":
            creds = grpc.ssl_channel_credentials(
                _read(config.ca), _read(config.key), _read(config.cert)
            )  # fmt: skip
        host = f"[{config.host}]" if ":" in config.host else config.host
        return OtlpGrpcConnection(f"{host}:{config.port}", hostname, creds)
    from agent.audit.otlp import OtlpHttpConnection

    tls = tls_context(config) if config.scheme == "otlp+https" else None
    return OtlpHttpConnection(config.host, config.port, config.path, hostname, tls)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _why(e: BaseException) -> str:
    """An error as status shows it: its type and the OS's words, never a path or a peer's text beyond that."""
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    text = str(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class Sink:
    """One sink: its spool (appended by the writer thread) and its sender thread."""

    def __init__(self, config: SinkConfig, directory: Path, hostname: str | None = None) -> None:
        self.config = config
        self.label = config.label
        self.spool = Spool(directory, config.spool_bytes)
        self.hostname = hostname or socket.gethostname()
        self.sent = 0
        self.up = False
        self.last_error: str | None = None
        self.connects = 0
        self._stop = threading.Event()
        self._deadline = float("inf")  # when stopping: the sender gives up sending at this time
        self._thread = threading.Thread(target=self._run, name=f"audit-sink {self.label}", daemon=True)

    @property
    def dropped(self) -> int:
        return self.spool.dropped

    def start(self) -> None:
        self._thread.start()

    def offer(self, data: bytes | bytearray) -> int:
        """(The writer thread.) Chained lines for this sink; returns how many were dropped for room."""
        return self.spool.append(data)[1]

    def stop(self, timeout_s: float) -> None:
        """Send what is spooled for at most timeout_s (when the receiver is up), then stop; the rest stays."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self.spool.wake()
        if self._thread.ident is not None:
            self._thread.join(timeout_s + 5.0)
        self.spool.close()

    def status(self) -> dict[str, object]:
        return {
            "up": self.up,
            "last_error": self.last_error,
            "sent": self.sent,
            "dropped": self.dropped,
            "spool_bytes": self.spool.disk_bytes,
        }

    def _down(self, e: BaseException) -> None:
        why = _why(e)
        if self.up or why != self.last_error:
            log.warning("audit sink %s: %s; records wait in the spool", self.label, why)
        self.up = False
        self.last_error = why

    def _confirm(self, pending: deque[tuple[Position, float, int]], before: float) -> None:
        """Batches acknowledged before `before` are delivered: the cursor moves past them."""
        last = None
        while pending and pending[0][1] <= before:
            last, _, n = pending.popleft()
            self.sent += n
        if last is not None:
            self.spool.commit(last)

    def _run(self) -> None:
        from agent.audit.syslog import PeerClosed

        spool = self.spool
        backoff = BACKOFF_MIN_S
        conn: Connection | None = None
        pending: deque[tuple[Position, float, int]] = deque()  # sent and acknowledged, not yet delivered
        position = spool.cursor
        while True:
            stopping = self._stop.is_set()
            if stopping and time.monotonic() >= self._deadline:
                break
            if conn is None:
                try:
                    conn = connect(self.config, self.hostname)
                    conn.check()
                except (OSError, ValueError) as e:
                    if conn is not None:
                        conn.close()
                        conn = None
                    self._down(e)
                    if stopping:
                        break
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                self.connects += 1
                position = spool.cursor  # from the first record not delivered
            live: Connection = conn
            lines: list[bytes] = []
            after = position
            try:
                self._confirm(pending, time.monotonic() - live.settle_s)
                lines, after = spool.read(position, BATCH_BYTES)
                if lines:
                    conn.send(lines)
                    pending.append((after, time.monotonic(), len(lines)))
                    position = after
                    self.up, self.last_error, backoff = True, None, BACKOFF_MIN_S
                    continue
                self.up, self.last_error = True, None
                if stopping:
                    if conn.finish():
                        self._confirm(pending, float("inf"))
                    conn = None
                    break
                spool.wait(position, min(IDLE_S, conn.settle_s or IDLE_S))
                conn.check()
            except PeerClosed as e:
                self._confirm(pending, float("inf"))  # it read what it acknowledged, of this batch too
                if e.acked and lines:
                    rest = sum(len(line) + 1 for line in lines[e.acked :])
                    spool.commit(Position(after.segment, after.offset - rest))
                    self.sent += e.acked
                self._down(e)
                live.close()
                conn = None
            except (OSError, ValueError) as e:
                pending.clear()  # sent again from the cursor
                self._down(e)
                live.close()
                conn = None
                if stopping:  # the rest waits in the spool for the next start
                    break
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        if conn is not None:
            conn.close()
        self.up = False


class SinkSet:
    """Every configured sink. The writer thread offers each batch of chained lines; drops are alerted at most
    once per `alert_cooldown_s` per sink through `on_drop(detail)` (the agent's alert path)."""

    def __init__(self, sinks: list[Sink], on_drop: Callable[[dict[str, object]], None] | None = None) -> None:
        self.sinks = sinks
        self.on_drop = on_drop
        self.alert_cooldown_s = 300.0
        self._alerted: dict[str, tuple[float, int]] = {}  # label -> (last alert time, dropped then)

    @classmethod
    def build(cls, urls: list[str], spool_root: Path, hostname: str | None = None) -> SinkSet:
        configs = [parse_sink(url) for url in urls]
        labels = [c.label for c in configs]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"audit sink {label} is given twice")
        return cls([Sink(c, spool_root / c.sink_id, hostname) for c in configs])

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def offer(self, data: bytes | bytearray) -> None:
        """(The writer thread.) Each sink spools the lines (or drops them, counted and alerted). A fault no check
        foresaw costs that sink this batch, counted and alerted as a full spool is: never the other sinks'."""
        for sink in self.sinks:
            why = ""
            try:
                dropped = sink.offer(data)
            except Exception as e:  # noqa: BLE001 - counted, alerted and logged (by type) below
                sink.spool.dropped += data.count(b"\n")
                dropped, why = 1, f"the batch could not be spooled ({type(e).__name__})"
            if dropped:
                self._alert(sink, why or f"spool full ({sink.spool.max_bytes} bytes)")

    def _alert(self, sink: Sink, why: str) -> None:
        now = time.monotonic()
        last, before = self._alerted.get(sink.label, (float("-inf"), 0))
        if now - last < self.alert_cooldown_s:
            return
        total = sink.dropped
        self._alerted[sink.label] = (now, total)
        log.error("audit sink %s: %s; %d records dropped so far for it", sink.label, why, total)
        if self.on_drop is not None:
            self.on_drop({"sink": sink.label, "count": total - before, "total": total})

    def close(self, timeout_s: float = 5.0) -> None:
        """(After the writer stopped.) Each sender sends what it can within timeout_s; the rest waits on disk."""
        threads = [threading.Thread(target=s.stop, args=(timeout_s,)) for s in self.sinks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def status(self) -> dict[str, object]:
        return {s.label: s.status() for s in self.sinks}

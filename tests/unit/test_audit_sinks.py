"""Audit sinks without a receiver: RFC 5424 messages and RFC 6587 framing read back, the disk spool (order, bound,
drops, cursor across restarts, segment cleanup), sink URL validation, and the OTLP log records."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from agent.audit import syslog
from agent.audit.chain import Chain
from agent.audit.otlp import export_request
from agent.audit.sinks import SinkSet, parse_sink
from agent.audit.spool import Position, Spool

# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP STRUCTURED-DATA SP MSG
RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) "
    rb"(?P<procid>[\x21-\x7e]{1,128}) (?P<msgid>[\x21-\x7e]{1,32}) (?P<sd>-|\[(?:[^\]\\]|\\.)*\]) (?P<msg>.*)",
    re.S,
)


def chained(*records: dict[str, object]) -> list[bytes]:
    chain = Chain()
    return [chain.link(orjson.dumps(r)) for r in records]


def test_a_decision_and_an_alert_read_back_as_rfc5424_with_the_line_as_msg() -> None:
    decision, alert = chained(
        {"type": "decision", "time": "2026-01-02T03:04:05.678Z", "service": 'or"d]e\\rs', "decision_id": "d1"},
        {"type": "alert", "time": "2026-01-02T03:04:06.000Z", "alert": "audit_sink_dropped", "sink": "x"},
    )
    stream = b"".join(syslog.frame(syslog.message(line, b"pod-1", b"42")) for line in (decision, alert))
    msgs = syslog.unframe(stream)
    assert len(msgs) == 2
    m = RFC5424.fullmatch(msgs[0])
    assert m is not None
    assert int(m["pri"]) == 13 * 8 + 6 == 110  # log audit, informational
    assert (m["ts"], m["host"], m["app"], m["procid"], m["msgid"]) == (
        b"2026-01-02T03:04:05.678Z", b"pod-1", b"authz-agent", b"42", b"decision")  # fmt: skip
    assert m["sd"] == rb'[authz@32473 seq="1" service="or\"d\]e\\rs"]'
    assert m["msg"] == decision  # byte for byte: the chain can be checked from the SIEM's copy
    a = RFC5424.fullmatch(msgs[1])
    assert a is not None and int(a["pri"]) == 13 * 8 + 4 == 108 and a["msgid"] == b"alert"
    assert a["sd"] == b'[authz@32473 seq="2"]' and a["msg"] == alert


def test_framing_counts_octets_of_utf8_and_a_partial_frame_is_refused() -> None:
    line = chained({"type": "decision", "path": "/v1/caf\u00e9", "text": "\u2603 and 10 spaces:          "})[0]
    msg = syslog.message(line, b"h", b"1", now=0.0)
    framed = syslog.frame(msg)
    assert framed.startswith(b"%d " % len(msg)) and syslog.unframe(framed) == [msg]
    with pytest.raises(ValueError):
        syslog.unframe(framed[:-1])


def test_header_fields_are_printable_ascii_and_a_bad_time_is_replaced() -> None:
    assert syslog.header_token("my host\u00e9", 255) == b"my_host__"
    assert syslog.header_token("", 32) == b"-" and len(syslog.header_token("x" * 300, 255)) == 255
    line = chained({"type": "decision", "time": "yesterday"})[0]
    m = RFC5424.fullmatch(syslog.message(line, b"h", b"1", now=86400.5))
    assert m is not None and m["ts"] == b"1970-01-02T00:00:00.500Z"
    odd = syslog.message(b"not json", b"h", b"1", now=0.0)
    m = RFC5424.fullmatch(odd)
    assert m is not None and m["msgid"] == b"-" and m["sd"] == b"-" and m["msg"] == b"not json"


def lines(n: int, start: int = 0, pad: int = 0) -> bytes:
    return b"".join(b'{"seq":%d,"pad":"%s"}\n' % (i, b"x" * pad) for i in range(start, start + n))


def read_all(spool: Spool, position: Position, max_bytes: int = 1 << 20) -> tuple[list[bytes], Position]:
    out: list[bytes] = []
    for _ in range(10_000):
        got, position = spool.read(position, max_bytes)
        if not got:
            return out, position
        out += got
    raise AssertionError("the spool never ran out")


def test_the_spool_gives_lines_back_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 1 << 20, segment_bytes=200)
    for i in range(0, 100, 7):
        assert spool.append(lines(7, i)) == (7, 0)
    assert len(list((tmp_path / "s").glob("seg-*.log"))) > 5
    got, end = read_all(spool, spool.cursor, max_bytes=100)
    assert [orjson.loads(g)["seq"] for g in got] == list(range(105))
    assert spool.pending_bytes == spool.disk_bytes == len(lines(105))
    spool.commit(end)
    assert spool.pending_bytes == 0 and len(list((tmp_path / "s").glob("seg-*.log"))) == 1  # only the open one
    assert spool.read(end, 100) == ([], end)


def test_a_full_spool_keeps_whole_lines_that_fit_and_counts_the_rest(tmp_path: Path) -> None:
    one = len(lines(1, pad=50))
    spool = Spool(tmp_path / "s", one * 10 + 5)
    assert spool.append(lines(6, 0, pad=50)) == (6, 0)
    assert spool.append(lines(6, 6, pad=50)) == (4, 2)  # four fit; the batch's last two are dropped
    assert spool.append(lines(3, 12, pad=50)) == (0, 3)
    assert spool.dropped == 5 and spool.disk_bytes == one * 10
    got, end = read_all(spool, spool.cursor)
    assert [orjson.loads(g)["seq"] for g in got] == list(range(10))
    spool.commit(end)  # delivered: room again (the segment read to its end goes once the sender is past it)
    assert spool.pending_bytes == 0 and spool.append(lines(2, 20, pad=50)) == (2, 0)
    spool.close()
    again = Spool(tmp_path / "s", one * 10 + 5)
    assert again.pending_bytes == len(lines(2, 20, pad=50))
    kept, dropped = again.append(lines(9, 22, pad=50))
    assert kept == (again.max_bytes - len(lines(2, 20, pad=50))) // len(lines(1, 22, pad=50)) and kept + dropped == 9
    got, end = read_all(again, again.cursor)
    assert [orjson.loads(g)["seq"] for g in got] == list(range(20, 22 + kept))
    again.commit(end)
    assert [p.name for p in (tmp_path / "s").glob("seg-*.log")] == ["seg-000000000001.log"]  # since the restart


def test_the_cursor_survives_a_restart_and_nothing_delivered_is_read_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 1 << 20, segment_bytes=300)
    spool.append(lines(20))
    got, _ = spool.read(spool.cursor, 120)
    first, after = spool.read(spool.cursor, 1 << 20)
    spool.commit(Position(after.segment, after.offset))
    delivered = len(first)
    spool.close()
    # A crash left a partial line at the end of the last segment: cut off, never shipped half.
    last = max((tmp_path / "s").glob("seg-*.log"))
    with last.open("ab") as f:
        f.write(b'{"seq":99,"half')
    again = Spool(tmp_path / "s", 1 << 20, segment_bytes=300)
    assert again.cursor == after
    again.append(lines(5, 20))
    rest, _ = read_all(again, again.cursor)
    assert [orjson.loads(g)["seq"] for g in rest] == list(range(delivered, 25))
    assert got == first[: len(got)]


def test_a_cursor_past_what_is_left_starts_at_the_oldest_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 1 << 20)
    spool.append(lines(3))
    spool.close()
    (tmp_path / "s" / "cursor").write_text("garbage")
    again = Spool(tmp_path / "s", 1 << 20)
    got, _ = read_all(again, again.cursor)
    assert len(got) == 3


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://h:1", "unknown scheme 'kafka'"),
        ("syslog+tcp://h", "no port"),
        ("syslog+tcp://:514", "no host"),
        # pragma: allowlist nextline secret (test fixture: a URL with a password, refused without echoing it)
        ("syslog+tcp://user:hunter2@h:514", "no user or password"),
        ("syslog+tcp://h:514?ca=/etc/hosts", "unknown query parameter 'ca'"),
        ("syslog+tls://h:514?cert=/etc/hosts", "cert and key go together"),
        ("syslog+tls://h:514?ca=/nonexistent.pem", "no such file"),
        ("syslog+tcp://h:514?spool=lots", "spool: not a size"),
        ("syslog+tcp://h:514?spool=1", "at least 4KiB"),
        ("syslog+tcp://h:514?spool=1MiB&spool=2MiB", "spool needs one value"),
        ("syslog+tcp://h:514?spool", "not NAME=VALUE"),
        ("syslog+tcp://h:514?spool=", "spool needs one value"),
        ("syslog+tcp://h:514/path", "no path"),
        ("syslog+tcp://h:99999", "not a valid URL"),
        ("otlp://h:4317#x", "no #fragment"),
    ],
)
def test_a_bad_sink_url_is_refused_with_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        parse_sink(url)
    assert "hunter2" not in str(e.value)


def test_good_sink_urls_their_labels_and_spool_names(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = parse_sink(f"syslog+tls://siem.example:6514?ca={ca}&spool=64MiB")
    assert (s.scheme, s.host, s.port, s.ca, s.spool_bytes) == ("syslog+tls", "siem.example", 6514, str(ca), 64 << 20)
    assert s.label == "syslog+tls://siem.example:6514" and re.fullmatch(r"syslog_tls-siem.example-6514-[0-9a-f]{8}",
                                                                        s.sink_id)  # fmt: skip
    assert parse_sink("otlp+http://[::1]:4318").path == "/v1/logs"
    assert parse_sink("otlp+http://[::1]:4318").label == "otlp+http://[::1]:4318"
    assert parse_sink("otlp://127.0.0.1:4317").spool_bytes == 256 << 20
    with pytest.raises(ValueError, match="given twice"):
        SinkSet.build(["otlp://h:1", "otlp://h:1?spool=1MiB"], tmp_path)


def test_an_otlp_log_record_carries_the_line_and_the_record_s_facts() -> None:
    decision, alert = chained(
        {"type": "decision", "time": "2026-01-02T03:04:05.678Z", "decision_id": "d1", "service": "orders",
         "trace_id": "0af7651916cd43dd8448eb211c80319c"},
        {"type": "alert", "time": "2026-01-02T03:04:06.000Z", "alert": "audit_sink_dropped"},
    )  # fmt: skip
    req = export_request([decision, alert], "pod-1")
    res = req.resource_logs[0]
    assert {a.key: a.value.string_value for a in res.resource.attributes} == {"service.name": "authz-agent",
                                                                              "host.name": "pod-1"}  # fmt: skip
    d, a = res.scope_logs[0].log_records
    assert d.body.string_value.encode() == decision and d.severity_text == "INFO" and d.severity_number == 9
    attrs = {kv.key: kv.value for kv in d.attributes}
    assert attrs["authz.seq"].int_value == 1 and attrs["authz.decision_id"].string_value == "d1"
    assert attrs["authz.service"].string_value == "orders"
    assert d.time_unix_nano == 1767323045678000000 and d.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert a.severity_text == "WARN" and a.severity_number == 13
    assert {kv.key: kv.value.string_value for kv in a.attributes}["authz.alert"] == "audit_sink_dropped"


# ---- the spool directory is the agent's own ------------------------------------------------------------------


def test_a_spool_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root").mkdir(mode=0o700)
    (tmp_path / "root" / "sink").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="not a directory"):
        Spool(tmp_path / "root" / "sink", 1 << 20)
    assert list(elsewhere.iterdir()) == []


def test_a_parent_anyone_may_write_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(ValueError, match="writable by anyone"):
        Spool(root / "sink", 1 << 20)
    root.chmod(0o1777)  # /tmp's mode: others cannot rename or remove what is ours
    Spool(root / "sink", 1 << 20).close()


def test_a_spool_directory_of_another_user_is_refused_and_ours_is_made_private(tmp_path: Path) -> None:
    import os

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o775)
    Spool(mine, 1 << 20).close()
    assert mine.stat().st_mode & 0o777 == 0o700
    if os.geteuid() != 0:
        pytest.skip("making a directory another user's needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ValueError, match="owned by uid 65534"):
        Spool(theirs, 1 << 20)


def test_a_segment_planted_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me\nand this partial line")
    spool_dir = tmp_path / "sink"
    spool_dir.mkdir(mode=0o700)
    (spool_dir / "seg-000000000001.log").symlink_to(target)
    with pytest.raises(OSError):  # ELOOP: not opened, so neither truncated nor shipped
        Spool(spool_dir, 1 << 20)
    assert target.read_bytes() == b"keep me\nand this partial line"


def test_the_cursor_file_is_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "sink", 1 << 20)
    spool.append(b"a\nb\n")
    lines, after = spool.read(spool.cursor, 1 << 20)
    spool.commit(after)
    spool.close()
    assert lines == [b"a", b"b"] and (tmp_path / "sink" / "cursor").stat().st_mode & 0o777 == 0o600


def test_a_sink_that_fails_to_spool_loses_only_its_own_batch_counted_and_alerted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sinks = SinkSet.build(["syslog+tcp://127.0.0.1:1", "syslog+tcp://127.0.0.1:2"], tmp_path)
    alerts: list[dict[str, object]] = []
    sinks.on_drop = alerts.append
    broken, fine = sinks.sinks

    def fail(data: bytes | bytearray) -> tuple[int, int]:
        raise RuntimeError("a fault no check foresaw")

    monkeypatch.setattr(broken.spool, "append", fail)
    sinks.offer(b'{"seq":1}\n{"seq":2}\n')  # never raises into the audit writer
    sinks.offer(b'{"seq":3}\n')
    assert broken.dropped == 3 and fine.dropped == 0 and fine.spool.appended == 3
    assert alerts == [{"sink": "syslog+tcp://127.0.0.1:1", "count": 2, "total": 2}]  # once per cooldown
    for sink in sinks.sinks:
        sink.spool.close()

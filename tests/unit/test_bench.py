"""The parts of `authz-agent bench` that need no agent: --fail-if, the exact statistics, the traffic mix and the
requests made from cases, the Envoy config, the table, the JSON writer. End to end: tests/integration/test_bench.py."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.bench import stats
from agent.bench.envoy import BUFFER, EXT_AUTHZ, ROUTER, bench_bootstrap
from agent.bench.failif import parse
from agent.bench.run import Progress, compare, judge, run_labels
from agent.bench.table import lines
from agent.bench.traffic import CHECK_PATH, Traffic, check_request, mix, secrets_of, with_secrets
from agent.config import load_policy
from agent.decision import RequestView
from agent.files import plain_mode, write_atomically
from agent.policytest.cases import read_test_file
from agent.server.envoy_wire import decode

DEMO = Path(__file__).parent.parent.parent / "agent" / "demo"


# -- --fail-if ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "metric", "op", "limit"),
    [
        ("p99 > 2ms", "p99", ">", 2.0),
        ("p50>250us", "p50", ">", 0.25),
        ("  max >= 1.5s ", "max", ">=", 1500.0),
        ("p999 > 3ms", "p999", ">", 3.0),
        ("p99.9 > 3ms", "p999", ">", 3.0),
        ("mean > 1ms", "mean", ">", 1.0),
        ("rps < 5000", "rps", "<", 5000.0),
        ("rps <= 10.5", "rps", "<=", 10.5),
        ("rps < 5000/s", "rps", "<", 5000.0),
        ("rps < 5000 rps", "rps", "<", 5000.0),
        ("p99 > 250\u00b5s", "p99", ">", 0.25),  # the micro sign
        ("p99 > 250\u03bcs", "p99", ">", 0.25),  # the Greek mu, which looks the same
    ],
)
def test_fail_if_reads_what_ci_writes(expr: str, metric: str, op: str, limit: float) -> None:
    rule = parse(expr)
    assert (rule.expr, rule.metric, rule.op, rule.limit) == (expr, metric, op, pytest.approx(limit))


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("p99 >> 2ms", "not an expression"),
        ("p99 > 2", "give the latency a unit"),
        ("p99 > 2min", "give the latency a unit"),
        ("p99 < 2ms", "a latency fails when it is too high"),
        ("rps > 100", "rps fails when it is too low"),
        ("rps < 100ms", "write the number alone"),
        ("rps < 5k", "write the number alone, 'rps < 5000'"),
        ("p99 > 2ms/s", "give the latency a unit"),
        ("p95 > 2ms", "unknown measure 'p95'"),
        ("p99 > -2ms", "not an expression"),
        ("", "not an expression"),
    ],
)
def test_fail_if_refuses_what_it_cannot_judge_naming_it(expr: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"^--fail-if ") as e:
        parse(expr)
    assert str(e.value).startswith(f"--fail-if {expr!r}: ")
    assert says in str(e.value)


def test_fail_if_is_judged_on_the_first_runs_fixed_latencies_and_saturation_rps() -> None:
    run = {"phases": {"fixed": {"latency_ms": {"p99": 1.5, "p50": None}}, "saturation": {"rps": 900.0}}}
    got = judge([parse("p99 > 1ms"), parse("p99 > 2ms"), parse("rps < 1000"), parse("p50 > 1s")], run)
    assert [(g["measured"], g["violated"]) for g in got] == [(1.5, True), (1.5, False), (900.0, True), (None, True)]
    assert judge([parse("rps < 1")], {"phases": {"fixed": {"latency_ms": {}}}})[0]["violated"] is True


# -- statistics ---------------------------------------------------------------------------------------------------


def test_percentiles_are_exact_nearest_rank_from_every_latency() -> None:
    values = [i * 1000 for i in range(1, 1001)]  # 1 us .. 1000 us
    s = stats.summary(values)
    assert s == {"count": 1000, "mean": 0.5005, "p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999, "max": 1.0}
    assert stats.summary([7_000_000]) == {"count": 1, **dict.fromkeys(stats.KEYS[1:], 7.0)}
    assert stats.summary([]) == {"count": 0, **dict.fromkeys(stats.KEYS[1:])}


def test_the_histogram_buckets_are_log_spaced_and_hold_every_latency() -> None:
    rng = random.Random(5)
    values = sorted(int(rng.lognormvariate(12, 1.5)) for _ in range(5000))
    h = stats.histogram(values)
    assert sum(c for _, c in h) == 5000
    bounds = [b for b, _ in h]
    assert bounds == sorted(bounds) and all(c > 0 for _, c in h)
    for (a, _), (b, _) in itertools.pairwise(h):
        assert b / a == pytest.approx(10 ** (1 / 20), rel=1e-3) or b / a > 1.12  # adjacent or with empty ones between
    assert stats.histogram([1_000_000]) == [[1.0, 1]]  # 1 ms is the upper bound of its own bucket


def test_a_phase_keeps_errors_out_of_latencies_and_counts_mismatches_per_case() -> None:
    classes = [stats.ClassInfo("a", 3, 1.0, 200), stats.ClassInfo("b", 9, 2.0, 401)]
    position_class = [0, 1, 1, 0, 1, 1]
    outcomes = [200, 401, 200, -3, -1, 0]
    latencies = [1_000_000, 2_000_000, 3_000_000, -1, -1, -1]
    intended = [0, 500_000_000, 1_200_000_000, 1_300_000_000, 1_400_000_000, -1]  # the last was never sent
    p = stats.phase("agent", 5.0, 2_000_000_000, latencies, outcomes, intended, position_class, classes)
    assert (p["sent"], p["completed"], p["errors"], p["mismatches"], p["rps"]) == (5, 3, 2, 1, 1.5)
    assert p["latency_ms"]["count"] == 3 and p["latency_ms"]["max"] == 3.0
    a, b = p["cases"]
    assert (a["count"], a["errors"], a["mismatches"], a["outcomes"]) == (2, 1, 0, {"-3": 1, "200": 1})
    assert (b["count"], b["errors"], b["mismatches"], b["outcomes"]) == (3, 1, 1, {"-1": 1, "200": 1, "401": 1})
    assert p["timeline"] == [[0, 2, 2.0], [1, 1, 3.0]]  # by completion: 0.001 s, 0.502 s | 1.203 s


# -- traffic ------------------------------------------------------------------------------------------------------


def test_the_mix_is_exact_by_weight_and_the_seed_fixes_its_order() -> None:
    order = mix([1.0, 3.0, 0.5], 9000, random.Random(1))
    assert [order.count(i) for i in range(3)] == [2000, 6000, 1000]
    assert order == mix([1.0, 3.0, 0.5], 9000, random.Random(1))
    assert order != mix([1.0, 3.0, 0.5], 9000, random.Random(2))
    long = mix([1.0, 1.0], 20_000, random.Random(1))  # two blocks of 10 000, each exact
    assert len(long) == 20_000 and long.count(0) == long.count(1)


def test_the_check_request_is_what_the_agent_reads_from_envoy() -> None:
    view = RequestView(
        "POST", "/v1/orders?x=1", "orders", {":method": "POST", "authorization": "Bearer t", "x-a": "b"},
        "198.51.100.7", "https", b'{"a": 1}', "-----BEGIN%20CERTIFICATE-----",
    )  # fmt: skip
    req = ext.CheckRequest()
    req.ParseFromString(check_request(view))
    assert decode(req) == view


def test_the_agent_gets_the_keys_and_nonce_secret_the_bench_signs_with(tmp_path: Path) -> None:
    shutil.copy(DEMO / "policy.yaml", tmp_path / "policy.yaml")
    first = load_policy(tmp_path / "policy.yaml", stand_ins=True)  # no key file: a random stand-in
    second = load_policy(tmp_path / "policy.yaml", stand_ins=True)
    assert first.hmac_clients[0].keys != second.hmac_clients[0].keys
    shared = json.loads(json.dumps(secrets_of(first)))  # as it crosses the pipe
    assert with_secrets(second, shared).hmac_clients == first.hmac_clients
    assert with_secrets(second, shared).version == second.version == first.version


def _demo_traffic(tmp_path: Path, text: str | None = None, through_envoy: bool = False) -> Traffic:
    shutil.copy(DEMO / "policy.yaml", tmp_path / "policy.yaml")
    (tmp_path / "policy.test.yaml").write_text(text or (DEMO / "policy.test.yaml").read_text())
    tests = read_test_file(tmp_path / "policy.test.yaml")
    t = Traffic(tests, load_policy(tmp_path / "policy.yaml", stand_ins=True), through_envoy)
    t.prepare()
    return t


def test_fresh_requests_are_made_in_order_each_with_its_own_proof(tmp_path: Path) -> None:
    t = _demo_traffic(tmp_path)
    fresh = {c.name for c in t.classes if c.fresh}
    assert fresh == {"carol creates an order with a key-bound token and a fresh proof",
                     "the bound token stolen and sent as Bearer", "a reader cannot create orders",
                     "billing-batch signs a webhook"}  # fmt: skip
    made = t.make(2000, 3, when=lambda k: 1_000_000.0 + k)
    assert len(made.order) == len(made.classes) == 2000 and made.ran_out is None
    bodies = [made.items[i][3] for i, ci in zip(made.order, made.classes, strict=True) if t.classes[ci].fresh]
    assert len(bodies) == len(set(bodies)) > 400  # every fresh request is its own
    assert all(made.items[i][1] == CHECK_PATH for i in made.order)
    # A proof is made for the time its request is due (`when`): the first fresh position's iat is its own k.
    k, i = next((k, i) for k, (i, ci) in enumerate(zip(made.order, made.classes, strict=True))
                if t.classes[ci].name.startswith("carol"))  # fmt: skip
    req = ext.CheckRequest()
    req.ParseFromString(made.items[i][3])
    proof = req.attributes.request.http.headers["dpop"]
    claims = json.loads(base64.urlsafe_b64decode(proof.split(".")[1] + "=="))
    assert claims["iat"] == 1_000_000 + k


def test_a_saturation_pool_that_runs_out_ends_the_order_where_it_did(tmp_path: Path) -> None:
    t = _demo_traffic(tmp_path)
    made = t.make(5000, 3, budget=(100, 30.0))
    assert made.ran_out is not None and "ran out of pre-made proofs/signatures (100 requests)" in made.ran_out
    fresh_positions = [k for k, ci in enumerate(made.classes) if t.classes[ci].fresh]
    assert len(fresh_positions) == 100 and len(made.order) < 5000
    nxt = mix([c.case.weight for c in t.classes], 5000, random.Random(3))[len(made.order)]
    assert t.classes[nxt].fresh  # the order ends before the first fresh request not made


def test_what_will_show_as_mismatches_is_said_before_the_run(tmp_path: Path) -> None:
    text = (DEMO / "policy.test.yaml").read_text() + (
        "  - name: a token that ended after the file time\n"
        "    request: {method: GET, path: /v1/orders}\n"
        "    token: {claims: {sub: alice, scope: 'orders:read', exp: 2026-12-01T10:05:00Z}}\n"
        "    expect: {status: 200}\n"
        "  - name: three calls\n"
        "    request: {method: GET, path: /healthz}\n"
        "    repeat: 3\n"
        "    expect: {route: health}\n"
    )
    t = _demo_traffic(tmp_path, text)
    notes = "\n".join(t.notes)
    ended, three = (text.splitlines().index(f"  - name: {n}") + 1 for n in ("a token that ended after the file time",
                                                                           "three calls"))  # fmt: skip
    assert (f"case 'a token that ended after the file time' (line {ended}) depends on the time: at the file's at: "
            "(2026-12-01T10:00:00+00:00) the engine answers 200, at the real time 401") in notes  # fmt: skip
    assert f"case 'three calls' (line {three}) expects no status: under load its answers are checked against" in notes
    assert f"case 'three calls' (line {three}) has repeat: 3" in notes
    assert next(c for c in t.classes if c.name == "three calls").expect_status == 200


def test_through_envoy_the_cases_answered_otherwise_from_the_generator_are_left_out(tmp_path: Path) -> None:
    t = _demo_traffic(tmp_path, through_envoy=True)
    assert [c.name for c in t.left_out] == ["support from another network is refused"]
    assert t.authority == "orders"
    assert all(c.case.scheme == "http" and c.case.source == "127.0.0.1" for c in t.classes)
    _, path, headers, _ = t.make(10, 1).items[0]
    assert not any(name.startswith(b":") for name, _ in headers) and path.startswith(b"/")


# -- Envoy, the table, the JSON ----------------------------------------------------------------------------------


def test_the_bench_envoy_has_envoy_alone_beside_the_agent_and_answers_200_itself() -> None:
    policy = load_policy(DEMO / "policy.yaml", stand_ins=True)
    config, with_agent, alone = bench_bootstrap(policy, 9191)
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    assert set(listeners) == {"inbound", "alone", "upstream"}

    def filters(name: str) -> list[str]:
        hcm = listeners[name]["filter_chains"][0]["filters"][0]["typed_config"]
        return [f["name"] for f in hcm["http_filters"]]

    assert EXT_AUTHZ in filters("inbound") and EXT_AUTHZ not in filters("alone")
    assert filters("upstream") == [BUFFER, ROUTER]  # the request whole before the answer: connections are kept
    assert listeners["inbound"]["address"]["socket_address"]["port_value"] == with_agent
    assert listeners["alone"]["address"]["socket_address"]["port_value"] == alone
    upstream = listeners["upstream"]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    assert upstream["virtual_hosts"][0]["routes"][0]["direct_response"]["status"] == 200
    app = next(c for c in config["static_resources"]["clusters"] if c["name"] == "app")
    port = app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert port["port_value"] == listeners["upstream"]["address"]["socket_address"]["port_value"]


def _result(name: str) -> dict[str, Any]:
    lat = {"count": 1, "mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0, "p999": 1.0, "max": 1.0}
    case = {"name": name, "line": 3, "weight": 1.0, "expect_status": 200, "count": 1, "mismatches": 1, "errors": 0,
            "outcomes": {"403": 1}, "latency_ms": lat, "histogram": []}  # fmt: skip
    fixed = {"target": "agent", "rate": 10.0, "seconds": 1.0, "sent": 1, "completed": 1, "rps": 1.0, "errors": 0,
             "mismatches": 1, "latency_ms": lat, "histogram": [], "timeline": [], "cases": [case]}  # fmt: skip
    return {
        "agent_version": "0.1.0",
        "settings": {"transport": "native", "generator": "native", "connections": 4, "streams": 16},
        "machine": {"cpus": 2, "cpu": "x", "pinning": "not pinned"},
        "runs": [{"label": "p.yaml", "policy_version": "v", "cases_file": "c", "phases": {"fixed": fixed}}],
        "fail_if": [],
        "notes": [],
        "ok": False,
    }


def test_the_table_shows_a_hostile_case_name_as_text_and_the_wrong_answers() -> None:
    out = "\n".join(lines(_result("evil\x1b[2J\rname\n")))
    assert "\x1b" not in out and "\r" not in out
    assert "evil?[2J?name?" in out
    assert "!! p.yaml fixed: case 'evil?[2J?name?' (line 3) expected 200, got 403 x1" in out
    assert out.splitlines()[-1] == "FAILED"
    # A row starts with the case's name: in a GitHub Actions log, a line starting "::" is a command to the runner.
    rows = lines(_result(" ::add-mask::the-p99"))
    assert not any(row.lstrip().startswith("::") for row in rows)
    assert any(row.startswith(" \\x3a:add-mask::the-p99 ") for row in rows)


def test_the_table_shows_hostile_labels_versions_paths_and_notes_as_text() -> None:
    """Not only case names: the policy's version holds its own `service:`, labels and paths are file names, notes
    quote the policy; a CI log or a terminal must not act on any of them."""
    result = _result("ok")
    run = result["runs"][0]
    run["label"] = "p\x1b[2J.yaml"
    run["policy_version"] = "orders\x1b[31m\rEVIL@3f9a"
    run["cases_file"] = "/tmp/c\x1b]0;title\x07.yaml"
    result["notes"] = ["the agent exited with status 1 when stopped:\n  | \x1b[31mred\x1b[0m"]
    out = lines(result)
    text = "\n".join(out)
    assert not any(c in text for c in "\x1b\r\x07"), text
    assert "== p\\x1b[2J.yaml (orders\\x1b[31m\\rEVIL@3f9a), cases /tmp/c\\x1b]0;title\\x07.yaml" in out
    assert "note: the agent exited with status 1 when stopped:" in out and "  | \\x1b[31mred\\x1b[0m" in out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows for `text`: `\\r` returns to the start of the line, later characters overwrite."""
    rows, col = [""], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            rows, col = [*rows, ""], 0
        else:
            rows[-1] = rows[-1][:col] + ch + rows[-1][col + 1 :]
            col += 1
    return [row.rstrip() for row in rows]


def test_the_progress_line_is_a_bar_cleared_before_anything_else_is_said() -> None:
    err = Terminal()
    progress = Progress(err)
    progress.update("p\x1b[2J.yaml: agent: warm-up", 500, 480, 0.5, 1.0)
    assert screen(err.getvalue()) == [
        "[##########..........] p\\x1b[2J.yaml: agent: warm-up: sent 500, completed 480, 0.5/1 s"
    ]
    progress.say("made 236 requests")  # the warm-up has no end line: its bar must not run into this one
    progress.update("p.yaml: agent: fixed rate 1000/s", 2500, 2500, 2.5, 10.0)
    assert screen(err.getvalue()) == [
        "bench: made 236 requests",
        "[#####...............] p.yaml: agent: fixed rate 1000/s: sent 2500, completed 2500, 2.5/10 s",
    ]
    progress.end("p.yaml: agent: fixed rate 1000/s", "10000 answered")
    assert screen(err.getvalue()) == ["bench: made 236 requests", "bench: p.yaml: agent: fixed rate 1000/s: 10000 "
                                      "answered", ""]  # fmt: skip
    plain = io.StringIO()
    Progress(plain).update("p.yaml: agent: warm-up", 1, 1, 0.1, 1.0)  # CI logs: no redrawn line at all
    assert plain.getvalue() == ""


def test_two_runs_never_share_a_label(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "policy.yaml", tmp_path / "b" / "policy.yaml"
    assert run_labels([a, tmp_path / "v2.yaml"]) == ["policy.yaml", "v2.yaml"]
    assert run_labels([a, b]) == ["a/policy.yaml", "b/policy.yaml"]
    assert run_labels([a, tmp_path / "x" / "a" / "policy.yaml"]) == [str(a), str(tmp_path / "x" / "a" / "policy.yaml")]
    assert run_labels([a, a]) == [f"{a} (#1)", f"{a} (#2)"]  # a policy against itself: the machine's noise


def test_compare_is_the_change_of_the_second_run_in_percent() -> None:
    def run(p99: float, rps: float) -> dict[str, Any]:
        lat = dict.fromkeys(stats.KEYS[1:], 1.0) | {"p99": p99}
        return {"phases": {"fixed": {"latency_ms": lat}, "saturation": {"rps": rps}}}

    got = compare(run(2.0, 1000.0), run(3.0, 900.0))
    assert got["latency_pct"]["p99"] == 50.0 and got["latency_pct"]["p50"] == 0.0 and got["rps_pct"] == -10.0


def test_json_and_report_files_are_written_whole_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    write_atomically(target, b"{}", plain_mode())  # as bench writes --json and --report
    write_atomically(target, b'{"a": 1}', plain_mode())
    assert target.read_bytes() == b'{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_the_docs_name_every_option_and_every_key_and_show_a_real_run(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/benchmarking.md is what users read: every option `bench --help` lists, the keys the JSON adds beyond the
    sketch, and an example run's numbers (not a placeholder)."""
    from agent.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    options = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}
    docs = (DEMO.parent.parent / "docs" / "benchmarking.md").read_text()
    assert len(options) >= 15
    assert [o for o in sorted(options) if f"`{o}" not in docs] == []
    assert [k for k in ("due", "ran_out", "left_out", "pinning", "seed") if f"{k}`" not in docs] == []
    example = docs[docs.index("## Example run") :]
    assert "Placeholder" not in example and "req/s" in example and "added by the agent" in example

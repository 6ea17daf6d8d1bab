"""The `qfl` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn


def _cmd_run(args: argparse.Namespace) -> int:
    from qfl.config import build_config, resolve_config
    from qfl.server.app import default_run_dir
    from qfl.server.federation import load_run_config
    from qfl.simulations.runner import run_simulation_job

    if args.resume:
        if args.config or args.set:
            raise SystemExit(
                "qfl run: --resume continues a run with its own saved config.toml; drop --config/--set"
            )
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
        if args.ray_address is not None:  # where the clients run is not part of the run's semantics
            cfg = resolve_config({**cfg.to_flat(), "ray_address": args.ray_address})
    else:
        ray = [f"ray_address={args.ray_address}"] if args.ray_address is not None else []
        cfg = build_config(args.config, [*args.set, *ray])
        run_dir = Path(args.out) if args.out else default_run_dir()
    from qfl.errors import RunInterrupted
    from qfl.simulations.interrupt import EXIT_INTERRUPTED
    from qfl.simulations.runner import resume_hint

    try:
        run_simulation_job(cfg, run_dir, resume=bool(args.resume), verbose=args.verbose, quiet=args.quiet)
    except RunInterrupted as err:
        print(f"qfl run: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before the first round: nothing was running that needs to finish
        print(f"qfl run: interrupted; {resume_hint(run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _cmd_bench_codecs(args: argparse.Namespace) -> int:
    import json

    from qfl.benchmarks.codecs import bench_codecs, bench_codecs_torch, format_table

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("qfl bench codecs: --device cuda, but torch sees no CUDA device here; use --device cpu")
        rows = bench_codecs_torch("cuda", size=args.size, repeats=max(args.repeats, 5))
    else:
        rows = bench_codecs(size=args.size, repeats=args.repeats, only=args.codec or None)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _cmd_bench_secagg(args: argparse.Namespace) -> int:
    import json

    from qfl.benchmarks.secagg import bench_masking, bench_round_overhead

    rows = bench_masking(d=args.size)
    result: dict = {"masking": rows}
    if args.rounds:
        result["round_overhead"] = [
            bench_round_overhead("fp32", clients=args.clients, rounds=args.rounds),
            bench_round_overhead("qsgd", clients=args.clients, rounds=args.rounds, bits=4),
        ]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("| B (bits) | mask / copy | unmask / copy | mask+unmask / copy | mask GB/s | unmask GB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ring_bits']} | {r['mask_ratio']:.2f} | {r['unmask_ratio']:.2f} | "
              f"{r['mask_plus_unmask_ratio']:.2f} | {r['mask_gbps']:.2f} | {r['unmask_gbps']:.2f} |")
    for r in result.get("round_overhead", []):
        print(f"round time, {r['clients']} clients, codec {r['codec']}: none {r['none_round_s']:.2f} s, "
              f"masked-sum {r['masked-sum_round_s']:.2f} s, overhead {r['overhead_ratio']:.2f}x")
    return 0


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    import json

    from qfl.benchmarks.scale import bench_scale, format_rows, plot_rows

    rows = bench_scale(ns=args.n or (10, 100, 1000), params=args.params, dropout=args.dropout,
                       max_key_gb=args.max_key_gb)
    if args.plot:
        plot_rows(rows, Path(args.plot))
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def _cmd_bench_quantum(args: argparse.Namespace) -> int:
    import json

    from qfl.benchmarks.quantum import bench_client_round, bench_quantum, format_rows

    qubits = tuple(args.qubits or (4, 6, 8))
    rows = bench_quantum(qubits=qubits, backends=tuple(args.backend or ("lightning", "default", "qiskit")))
    # Shot-based estimation: PennyLane's sampled broadcast tapes vs Aer's batched EstimatorV2.
    rows += bench_quantum(qubits=qubits, backends=tuple(b for b in args.backend or ("default", "qiskit") if b != "lightning"),
                          shots=args.shots)
    rounds = [bench_client_round(qubits=8, train_states=200, backend="default", copies=m) for m in (0, args.shots)]
    if args.json:
        print(json.dumps({"circuits": rows, "client_round": rounds}, indent=2, default=float))
    else:
        print(format_rows(rows))
        for r in rounds:
            shots = f"{r['copies']:,} shots" if r["copies"] else "exact"
            print(f"one client round, 8 qubits, 200 training states, default.qubit, {shots}: {r['round_s']:.2f} s "
                  f"(first round in a process {r['first_round_s']:.2f} s, dataset {r['dataset_s']:.2f} s once)")
    return 0


def _cmd_bench_qkd(args: argparse.Namespace) -> int:
    import json

    from qfl.quantum.qkd.bb84 import bench_bb84

    result = bench_bb84(args.pulses, distance_km=args.distance_km)
    figures = {k: result[k] for k in ("pulses_per_s", "cascade_bits_per_s", "toeplitz_bits_per_s")}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"BB84 Monte-Carlo, steps 1-4 (source to estimation): {figures['pulses_per_s']:.3g} pulses/s")
        print(f"Cascade error correction: {figures['cascade_bits_per_s']:.3g} corrected bits/s")
        print(f"Toeplitz privacy amplification: {figures['toeplitz_bits_per_s']:.3g} input bits/s")
    return 0


def _cmd_bench_kms(args: argparse.Namespace) -> int:
    from qfl.benchmarks.kms import bench_kms

    for op in args.op or ["enc_keys", "pair", "status"]:
        rps = bench_kms(args.clients, args.requests, op=op)
        print(f"KMS {op}: {rps:.0f} requests/s with {args.clients} concurrent mTLS clients on loopback")
    return 0


def _cmd_experiment_compression(args: argparse.Namespace) -> int:
    from qfl.simulations.experiments import format_rows, run_compression_experiment

    out = Path(args.out) if args.out else Path("runs") / "experiment-compression"
    rows = run_compression_experiment(out, rounds=args.rounds, arms=args.arm or None, seeds=range(args.seeds))
    print(format_rows(rows))
    print(f"table, rows and plot in {out}")
    return 0


def _cmd_experiment_key_budget(args: argparse.Namespace) -> int:
    from qfl.simulations.keybudget import (
        format_key_rows,
        format_topology_rows,
        run_key_budget_experiment,
        topology_rows,
    )

    if args.topologies_only:
        print(format_topology_rows(topology_rows(ns=tuple(args.clients or (10, 100, 1000)), relays=args.relays,
                                                 distance_km=args.distance_km)))
        return 0
    out = Path(args.out) if args.out else Path("runs") / "experiment-key-budget"
    rows = run_key_budget_experiment(
        out, rounds=args.rounds, client_counts=tuple(args.clients or (4, 20)), distance_km=args.distance_km,
        links=args.links, arms=args.arm or None,
    )
    print(format_key_rows(rows))
    print(f"table, rows and plots in {out}")
    return 0


def _cmd_experiment_quantum_mixed(args: argparse.Namespace) -> int:
    from qfl.simulations.quantum_experiment import format_result, mixed_federation_experiment

    out = Path(args.out) if args.out else Path("runs") / "experiment-quantum-mixed"
    overrides = {k: v for k, v in (("dataset", args.dataset), ("copies", args.copies)) if v is not None}
    result = mixed_federation_experiment(out, seeds=args.seeds, quick=args.quick, overrides=overrides, processes=args.processes,
                                         quantum_kinds=tuple(args.quantum_kinds.split(",")))
    print(format_result(result))
    print(f"quantum_mixed.json, quantum_mixed.md, accuracy_vs_copies.png, accuracy_per_round.png in {out}")
    return 0


def _cmd_experiment_streamsplit(args: argparse.Namespace) -> int:
    from qfl.simulations.streamsplit import format_rows, run_streamsplit_experiment

    out = Path(args.out) if args.out else Path("runs") / "experiment-streamsplit"
    rows = run_streamsplit_experiment(out, seeds=range(args.seeds), quick=args.quick)
    print(format_rows(rows))
    print(f"tables (streamsplit.md), rows (streamsplit.json) and plots in {out}")
    return 0


def _cmd_qkd_rate(args: argparse.Namespace) -> int:
    import json

    from qfl.quantum.qkd.keyrate import LinkParams, format_report, link_report

    try:
        params = LinkParams(
            distance_km=args.distance_km,
            mu=args.mu,
            fiber_loss_db_per_km=args.loss_db_per_km,
            detector_efficiency=args.detector_efficiency,
            dark_count_yield=args.dark_count_yield,
            misalignment=args.misalignment,
            ec_efficiency=args.ec_efficiency,
            pulse_rate_hz=args.pulse_rate_hz,
        )
        report = link_report(params, method=args.method, block_pulses=args.block_pulses, eps_sec=args.eps_sec)
    except ValueError as err:
        raise SystemExit(f"qfl qkd rate: {err}") from None
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_qkd_simulate(args: argparse.Namespace) -> int:
    import json

    from qfl.quantum.qkd.bb84 import format_result, result_json, simulate_bb84

    try:
        result = simulate_bb84(
            args.pulses, args.distance_km, eve_fraction=args.eve, seed=args.seed, mu=args.mu,
            qber_threshold=args.qber_threshold, eps_sec=args.eps_sec, eps_cor=args.eps_cor,
            asymptotic=args.asymptotic,
        )
    except ValueError as err:
        raise SystemExit(f"qfl qkd simulate: {err}") from None
    print(json.dumps(result_json(result), indent=2) if args.json else format_result(result))
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from qfl.security.keys.certs import make_pki

    try:  # the CA key is never written to disk
        pki = make_pki(args.out, args.sae, kme_host=args.host, superlink_host=args.superlink_host, nodes=args.node)
    except ValueError as err:
        raise SystemExit(f"qfl certs: {err}") from None
    print(f"CA, KME certificate and {len(args.sae)} SAE certificates in {args.out}")
    if pki.superlink is not None:
        print(f"SuperLink server certificate: {pki.superlink[0]} (key {pki.superlink[1]})")
    for node, bundle in pki.nodes.items():
        print(f"SuperNode {node}: bundle {bundle} (enrol {bundle / 'node.pub'} with `flwr supernode register`)")
    return 0


def _cmd_edge_run(args: argparse.Namespace) -> int:
    from qfl.clients.daemon import EdgeConfig, EdgeDaemon

    try:
        cfg = EdgeConfig(
            superlink=args.superlink, state_dir=Path(args.state), certs=Path(args.certs) if args.certs else None,
            insecure=args.insecure,
            partition_id=args.partition, num_partitions=args.partitions, sae=args.sae or "", kms_url=args.kms_url or "",
            flower_retries=args.flower_retries, backoff_base_s=args.backoff_base, backoff_cap_s=args.backoff_cap,
            stall_s=args.stall_timeout, data=args.data, buffer_s=args.buffer, seed=args.seed, pins=tuple(args.pin),
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"qfl edge run: {err}") from None
    return EdgeDaemon(cfg).run_forever()


def _cmd_edge_status(args: argparse.Namespace) -> int:
    import json
    import time

    from qfl.clients.daemon import key_left, read_status

    try:
        status = read_status(args.state)
    except FileNotFoundError as err:
        raise SystemExit(f"qfl edge status: {err}") from None
    status["key_left_bits"] = key_left(status)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    ago = f" ({time.time() - status['updated_at']:.0f} s ago)" if "updated_at" in status else ""
    print(f"daemon {'running' if status['daemon_alive'] else 'not running'} (pid {status.get('daemon_pid')}), "
          f"SuperLink {status.get('superlink')}: {status.get('connection', 'unknown')}{ago}")
    print(f"node {status.get('node_id', '-')}, partition {status.get('partition_id')} of {status.get('num_partitions')}, "
          f"tls {status.get('tls')}, node auth {status.get('node_auth')}")
    print(f"last round {status.get('last_round', '-')} ({status.get('last_message', '-')}), "
          f"reconnects {status.get('reconnects', 0)}, SuperNode restarts {status.get('restarts', 0)}")
    if status.get("last_sit_out"):
        print(f"last sat out: round {status['last_sit_out']['round']}: {status['last_sit_out']['reason']}")
    stream = status["stream"]
    lease = stream["open_lease"]
    print(f"stream {stream['source'] or '-'}: {stream['ingested_s']:.1f} s read, {stream['consumed_s']:.1f} s consumed "
          f"in {stream['rounds_committed']} rounds, {stream['buffered_s']:.1f} s buffered"
          + (f" (round {lease['round']} holds {lease['seconds']:.1f} s)" if lease else ""))
    keys = status.get("keys") or {}
    print(f"keys: SAE {keys.get('sae')} at {keys.get('kms_url') or '-'} (cert sha256 {keys.get('sae_cert_sha256') or '-'}), "
          f"key left on the link to the server: {status['key_left_bits']}")
    return 0


def _cmd_deploy_local(args: argparse.Namespace) -> int:
    import json

    from qfl.server.deployment import DEPLOYMENT_JSON, deploy_local

    summary = deploy_local(Path(args.out), nodes=args.nodes, rounds=args.rounds, tls=args.tls,
                           run_timeout_s=args.timeout)
    print(json.dumps({k: summary[k] for k in ("tls", "node_auth", "key_source", "nodes", "rounds_completed",
                                              "reconnects", "status")}, indent=2))
    print(f"run outputs in {summary['run_dir']}, logs in {Path(args.out) / 'logs'}, summary {Path(args.out) / DEPLOYMENT_JSON}")
    return 0 if summary["status"] == "finished:completed" else 1


def _audit_error(message: str) -> NoReturn:
    """`qfl keys audit` could not audit: the message on stderr, exit status 2 (1 means: problems found)."""
    print(f"qfl keys audit: {message}", file=sys.stderr)
    raise SystemExit(2)


def _key_store_of(run_dir: Path) -> Path:
    """The key store of a run directory: config.toml's key_store, else RUN_DIR/keys.db (or RUN_DIR, a file)."""
    from qfl.config import ConfigError, load_config_file

    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        _audit_error(f"{run_dir} does not exist; pass the directory a `qfl run` wrote")
    path = run_dir / "keys.db"
    if (run_dir / "config.toml").exists():
        try:
            configured = load_config_file(run_dir / "config.toml").get("key_store") or ""
        except ConfigError as err:
            _audit_error(str(err))
        path = Path(configured) if configured else path
    if not path.is_file():
        _audit_error(
            f"{run_dir} has no key store ({path} does not exist); pass the directory of a "
            "`qfl run` with a secure mode (security != none) and key_source = store, or the .db file itself"
        )
    return path


def _cmd_keys_audit(args: argparse.Namespace) -> int:
    import json

    from qfl.security.keys.store import KeyStore, StoreCorrupt

    path = _key_store_of(Path(args.run_dir))
    try:
        with KeyStore(path) as store:
            report: dict[str, Any] = store.audit()
    except StoreCorrupt as err:
        _audit_error(str(err))
    ok = report["ledger_ok"] and report["duplicate_blocks"] == 0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    print(f"key store {report['path']} (schema {report['schema_version']}): {report['links']} links, "
          f"simulated QKD clock {report['clock_s']:.6g} s")
    print(f"bits made {report['bits_made']:,}, deposited {report['bits_deposited']:,} "
          f"(in {report['blocks']:,} blocks), used {report['bits_used']:,}, left {report['bits_left']:,}")
    print(f"duplicate blocks (key made twice): {report['duplicate_blocks']}")
    print("ledger: OK" if report["ledger_ok"] else f"ledger: {len(report['problems'])} problem(s)")
    for problem in report["problems"]:
        print(f"  - {problem}")
    print("fingerprints (SHA-256 of each link's first deposited block):")
    for link, digest in report["fingerprints"].items():
        print(f"  {link:<24} {digest or '-'}")
    print("OK" if ok else "FAILED: the key store does not prove that no key was made or handed out twice")
    return 0 if ok else 1


def _pulse_count(text: str) -> int:
    """A whole number of pulses, also written as 1e8."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pulses such as 100000000 or 1e8, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"a number of pulses is a whole number, got {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_link(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b or a == b:
        raise SystemExit(f"qfl kms serve: --link expects SAE_A:SAE_B, got {text!r}")
    return a, b


def _cmd_kms_serve(args: argparse.Namespace) -> int:
    import threading
    import time

    from qfl.quantum.qkd.network import QuantumNetwork
    from qfl.security.keys.kms import serve
    from qfl.security.keys.store import KeyStore

    stop = threading.Event()
    feeder_store = KeyStore(args.store)
    network = QuantumNetwork(feeder_store)
    for a, b in map(_parse_link, args.link):
        network.add_link(a, b, distance_km=args.distance_km, bits_per_s=args.bits_per_s)

    def feed() -> None:  # links make key in real time at their rate
        last = time.monotonic()
        while not stop.wait(args.tick):
            now = time.monotonic()
            network.advance(now - last)
            last = now

    def ready(server) -> None:
        print(f"KME listening on {server.url}", flush=True)
        if network.direct:
            threading.Thread(target=feed, name="qkd-links", daemon=True).start()

    try:
        serve(args.store, args.certs, host=args.host, port=args.port, ready_callback=ready)
    finally:
        stop.set()
        feeder_store.close()
    return 0


def _config_keys_help() -> str:
    """Every config key with its default and meaning, from the schema (qfl.config.describe_keys)."""
    from qfl.config import describe_keys

    lines = ["config keys (--set KEY=VALUE, or KEY = VALUE in a --config TOML file; `qfl config show` prints them resolved):"]
    concern = ""
    for info in describe_keys():
        if info.concern != concern:
            concern = info.concern
            lines += ["", f"  {concern}"]
        choices = f" [{' | '.join(info.choices)}]" if info.choices else ""
        lines.append(f"    {info.key} = {info.default}{choices}: {info.meaning}")
    return "\n".join(lines)


def _cmd_report(args: argparse.Namespace) -> int:
    from qfl.server.app import default_run_dir
    from qfl.simulations.run_report import compare_runs, write_run_report

    if len(args.run_dir) == 1 and not args.out:
        print(f"report: {write_run_report(Path(args.run_dir[0]))}")
        return 0
    out = Path(args.out) if args.out else default_run_dir().with_name("compare-" + default_run_dir().name)
    print(f"comparison: {compare_runs([Path(d) for d in args.run_dir], out)} (and its plots)")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from qfl.config import build_config
    from qfl.server.preflight import check_components

    cfg = check_components(build_config(args.config, args.set))
    print(cfg.to_toml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated simulation (Flower simulation engine)",
                         epilog=_config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", metavar="FILE", help="TOML config file (keys: below)")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one config key (below)")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>)")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted or killed run from its last complete round")
    loud = run.add_mutually_exclusive_group()
    loud.add_argument("--verbose", action="store_true", help="also show Flower's and Ray's logs (run.log gets DEBUG records)")
    loud.add_argument("--quiet", action="store_true", help="show only errors and the final result line")
    run.add_argument(
        "--ray-address", metavar="HOST:PORT",
        help="run the clients on a running Ray cluster (its head's address; same as --set ray_address=...)",
    )
    run.set_defaults(func=_cmd_run)

    report = sub.add_parser("report", help="rewrite a run's report.md, metrics.csv and plots, or overlay "
                                           "several runs on the same axes")
    report.add_argument("run_dir", metavar="RUN_DIR", nargs="+", help="directories written by `qfl run`")
    report.add_argument("--out", metavar="DIR", help="where the comparison goes (default runs/compare-<timestamp>); "
                                                     "with one RUN_DIR and no --out, its own report is rewritten")
    report.set_defaults(func=_cmd_report)

    config = sub.add_parser("config", help="the run configuration").add_subparsers(dest="config_command", required=True)
    cshow = config.add_parser("show", help="print the resolved, checked config (defaults, then --config, then --set) "
                                           "as TOML", epilog=_config_keys_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    cshow.add_argument("--config", metavar="FILE", help="TOML config file")
    cshow.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one config key")
    cshow.set_defaults(func=_cmd_config_show)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    codecs = bench.add_parser("codecs", help="encode/decode time of every codec, as ratios to numpy.copyto")
    codecs.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    codecs.add_argument("--size", type=int, default=1 << 24, help="float32 values (default 2^24)")
    codecs.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    codecs.add_argument("--codec", action="append", help="only this codec (label or name); repeatable")
    codecs.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    codecs.set_defaults(func=_cmd_bench_codecs)
    qb = bench.add_parser("quantum", help="circuits and gradients per second per backend; one client round")
    qb.add_argument("--qubits", type=int, action="append", help="repeatable (default 4, 6, 8)")
    qb.add_argument("--backend", action="append", help="lightning | default | qiskit; repeatable (default all)")
    qb.add_argument("--shots", type=int, default=1000, help="shots per circuit of the shot-based rows and round (default 1000)")
    qb.add_argument("--json", action="store_true")
    qb.set_defaults(func=_cmd_bench_quantum)
    secb = bench.add_parser("secagg", help="masking/unmasking throughput (ratio to numpy.copyto); round overhead")
    secb.add_argument("--size", type=int, default=1 << 24, help="ring elements per upload (default 2^24)")
    secb.add_argument("--rounds", type=int, default=4, help="rounds of the overhead runs (0: skip them)")
    secb.add_argument("--clients", type=int, default=4)
    secb.add_argument("--json", action="store_true")
    secb.set_defaults(func=_cmd_bench_secagg)
    bscale = bench.add_parser("scale", help="one aggregation round at n = 10, 100, 1000: none, full and sparse masking")
    bscale.add_argument("--n", type=int, action="append", help="clients per round (repeatable; default 10, 100, 1000)")
    bscale.add_argument("--params", type=int, default=2_000, help="floats per update (default 2,000)")
    bscale.add_argument("--dropout", type=float, default=0.05, help="share of clients that never upload")
    bscale.add_argument("--max-key-gb", type=float, default=1.0, help="arms needing more pair key are planned, not run")
    bscale.add_argument("--plot", metavar="PNG", help="also plot key bits and uplink per client against n")
    bscale.add_argument("--json", action="store_true")
    bscale.set_defaults(func=_cmd_bench_scale)
    bqkd = bench.add_parser("qkd", help="BB84 Monte-Carlo, Cascade and Toeplitz throughput (one core)")
    bqkd.add_argument("--pulses", type=int, default=10**7)
    bqkd.add_argument("--distance-km", type=float, default=10.0)
    bqkd.add_argument("--json", action="store_true")
    bqkd.set_defaults(func=_cmd_bench_qkd)
    bkms = bench.add_parser("kms", help="KMS requests/s with concurrent mTLS clients on loopback")
    bkms.add_argument("--clients", type=int, default=8)
    bkms.add_argument("--requests", type=int, default=500, help="per client")
    bkms.add_argument("--op", action="append", choices=("enc_keys", "pair", "status"))
    bkms.set_defaults(func=_cmd_bench_kms)

    qkd = sub.add_parser("qkd", help="QKD link models").add_subparsers(dest="qkd", required=True)
    rate = qkd.add_parser("rate", help="decoy-state BB84 key rate of one fiber link: asymptotic "
                          "(GLLP, Ma et al. 2005) and finite-key (Lim et al. 2014)")
    rate.add_argument("--distance-km", type=float, required=True)
    rate.add_argument("--mu", type=float, default=None, help="signal intensity (default: optimised)")
    rate.add_argument("--method", choices=("vacuum_weak", "infinite"), default="vacuum_weak",
                      help="decoy estimate: vacuum + weak decoy, or the infinite-decoy limit")
    rate.add_argument("--loss-db-per-km", type=float, default=0.21)
    rate.add_argument("--detector-efficiency", type=float, default=0.045)
    rate.add_argument("--dark-count-yield", type=float, default=1.7e-6)
    rate.add_argument("--misalignment", type=float, default=0.033)
    rate.add_argument("--ec-efficiency", type=float, default=1.22)
    rate.add_argument("--pulse-rate-hz", type=float, default=1e9)
    rate.add_argument("--block-pulses", type=_pulse_count, default=10**10,
                      help="block of the finite-key rate (default 1e10, the simulated network's)")
    rate.add_argument("--eps-sec", type=float, default=1e-10, help="finite-key security parameter (default 1e-10)")
    rate.add_argument("--json", action="store_true")
    rate.set_defaults(func=_cmd_qkd_rate)
    sim = qkd.add_parser("simulate", help="Monte-Carlo of decoy BB84: sifting, QBER, Cascade, privacy amplification")
    sim.add_argument("--distance-km", type=float, default=10.0, help="fiber length (default 10 km)")
    sim.add_argument("--pulses", type=_pulse_count, default=10**8,
                     help="block size (default 1e8: finite-key secure key at 10 km in a few seconds)")
    sim.add_argument("--eve", type=float, default=0.0, metavar="P", help="intercept-resend on a fraction P of pulses")
    sim.add_argument("--mu", type=float, default=0.5, help="signal intensity")
    sim.add_argument("--qber-threshold", type=float, default=0.11)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--eps-sec", type=float, default=1e-10,
                     help="finite-key security parameter of privacy amplification (default 1e-10)")
    sim.add_argument("--eps-cor", type=float, default=2.0**-64,
                     help="correctness parameter; sets the verification tag to log2(1/eps_cor) bits (default 2^-64)")
    sim.add_argument("--asymptotic", action="store_true",
                     help="size privacy amplification with the asymptotic GLLP bound (NOT finite-size secure)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=_cmd_qkd_simulate)

    certs = sub.add_parser("certs", help="make a CA, the KME certificate and one client certificate per SAE")
    certs.add_argument("--out", required=True, metavar="DIR")
    certs.add_argument("--sae", action="append", required=True, metavar="ID", help="an SAE ID; repeatable")
    certs.add_argument("--host", default="127.0.0.1", help="the KME's address, put in its certificate")
    certs.add_argument("--superlink-host", metavar="HOST",
                       help="also issue the SuperLink's TLS server certificate for this address (superlink.pem/.key)")
    certs.add_argument("--node", action="append", default=[], metavar="NAME",
                       help="a SuperNode: its authentication key pair and a bundle in nodes/NAME/; repeatable "
                            "(NAME = an SAE ID puts that SAE's KMS certificate in the bundle too)")
    certs.set_defaults(func=_cmd_certs)

    edge = sub.add_parser("edge", help="edge client daemons").add_subparsers(dest="edge", required=True)
    erun = edge.add_parser("run", help="run a supervised Flower SuperNode with qfl's ClientApp until SIGTERM")
    erun.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API")
    erun.add_argument("--certs", metavar="DIR", help="this node's bundle from `qfl certs --node NAME` (DIR/nodes/NAME)")
    erun.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperLink, no node authentication (loopback tests only)")
    erun.add_argument("--state", default="edge-state", metavar="DIR", help="durable state, logs (default ./edge-state)")
    erun.add_argument("--partition", type=int, default=0, help="this node's data partition (partition-id)")
    erun.add_argument("--partitions", type=_positive_int, default=1, help="number of partitions (num-partitions)")
    erun.add_argument("--sae", help="this node's SAE ID at the KMS (default client-<partition>)")
    erun.add_argument("--kms-url", metavar="URL", help="this node's KMS (https://host:port); overrides the run's kms_url")
    erun.add_argument("--flower-retries", type=int, default=5, help="Flower's own reconnect tries before a restart")
    erun.add_argument("--backoff-base", type=float, default=1.0, help="seconds; restart waits U(0, min(cap, base*2^a))")
    erun.add_argument("--backoff-cap", type=float, default=30.0, help="seconds")
    erun.add_argument("--stall-timeout", type=float, default=60.0,
                      help="seconds a SuperNode may stay unconnected without exiting before it is restarted")
    erun.add_argument("--data", default="generated", metavar="SOURCE",
                      help="what the node trains on: 'generated' (the synthetic stream, default), a folder watched "
                           "for new .wav/.flac/.ogg files, a named pipe or '-' (stdin) of raw 16 kHz mono s16le PCM")
    erun.add_argument("--buffer", type=float, default=300.0, metavar="SECONDS",
                      help="stop reading the source while this much audio waits to be trained on (default 300)")
    erun.add_argument("--seed", type=int, default=0, help="seed of the generated stream")
    erun.add_argument("--pin", action="append", default=[], metavar="KEY=VALUE",
                      help="refuse rounds weaker than this, whatever the server asks (repeatable): "
                           "secure-masking=double, secure-self-mask=vector, secure-corrupt=γ, secure-dropout=δ "
                           "(docs/threat-model.md)")
    erun.set_defaults(func=_cmd_edge_run)
    estatus = edge.add_parser("status", help="what a daemon is doing: connection, last round, reconnects, keys")
    estatus.add_argument("--state", default="edge-state", metavar="DIR")
    estatus.add_argument("--json", action="store_true")
    estatus.set_defaults(func=_cmd_edge_status)

    deploy = sub.add_parser("deploy", help="deployments").add_subparsers(dest="deploy", required=True)
    dlocal = deploy.add_parser("local", help="SuperLink, KMS and N edge daemons on 127.0.0.1; one `flwr run`; "
                                             "writes DIR/deployment.json and stops every process")
    dlocal.add_argument("--nodes", type=int, default=3)
    dlocal.add_argument("--rounds", type=_positive_int, default=3)
    dlocal.add_argument("--tls", action="store_true", help="TLS to the SuperLink and SuperNode authentication")
    dlocal.add_argument("--out", required=True, metavar="DIR")
    dlocal.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take")
    dlocal.set_defaults(func=_cmd_deploy_local)

    kms = sub.add_parser("kms", help="key management service").add_subparsers(dest="kms", required=True)
    kserve = kms.add_parser("serve", help="ETSI GS QKD 014 KME over HTTPS with mutual TLS")
    kserve.add_argument("--store", required=True, metavar="FILE", help="SQLite key store")
    kserve.add_argument("--certs", required=True, metavar="DIR", help="made by `qfl certs`")
    kserve.add_argument("--host", default="127.0.0.1")
    kserve.add_argument("--port", type=int, default=8443, help="0 picks a free port (printed)")
    kserve.add_argument("--link", action="append", default=[], metavar="A:B",
                        help="a simulated QKD link feeding the store in real time; repeatable")
    kserve.add_argument("--distance-km", type=float, default=10.0, help="fibre length of every --link")
    kserve.add_argument("--bits-per-s", type=float, default=None,
                        help="key rate of every --link (default: the decoy-BB84 model at --distance-km)")
    kserve.add_argument("--tick", type=float, default=0.5, help="seconds between deposits")
    kserve.set_defaults(func=_cmd_kms_serve)

    keys = sub.add_parser("keys", help="the key store of a run").add_subparsers(dest="keys", required=True)
    kaudit = keys.add_parser("audit", help="check a run's key store: ledger, duplicate key blocks, fingerprints; "
                                           "exit 1 on a problem")
    kaudit.add_argument("run_dir", metavar="RUN_DIR", help="a `qfl run` directory (or a key store .db file)")
    kaudit.add_argument("--json", action="store_true", help="print a JSON object instead of a summary")
    kaudit.set_defaults(func=_cmd_keys_audit)

    experiment = sub.add_parser("experiment", help="experiments").add_subparsers(dest="experiment", required=True)
    comp = experiment.add_parser("compression", help="digits, 20 clients, α=0.5: every codec against fp32")
    comp.add_argument("--rounds", type=int, default=30)
    comp.add_argument("--out", metavar="DIR", help="default runs/experiment-compression")
    comp.add_argument("--arm", action="append", help="only this arm (e.g. topk-1%%+ef); repeatable")
    comp.add_argument("--seeds", type=_positive_int, default=1, help="seeds 0..N-1 per arm; Δ is the paired mean")
    comp.set_defaults(func=_cmd_experiment_compression)
    kb = experiment.add_parser("key-budget", help="masked sums over a QKD mesh: key bits and accuracy per codec")
    kb.add_argument("--rounds", type=int, default=20)
    kb.add_argument("--clients", type=int, action="append", help="federation size; repeatable (default 4 and 20)")
    kb.add_argument("--distance-km", type=float, default=10.0, help="fibre length of every QKD link")
    kb.add_argument("--links", default="", help='per-link lengths, e.g. "client-0~client-1=50, client-2~server=80"')
    kb.add_argument("--out", metavar="DIR", help="default runs/experiment-key-budget")
    kb.add_argument("--arm", action="append", help="only this arm (e.g. qsgd-4bit); repeatable")
    kb.add_argument("--topologies-only", action="store_true",
                    help="only the rounds/hour of mesh, star and trusted relays at n = 10, 100, 1000 (no training)")
    kb.add_argument("--relays", type=int, default=4, help="trusted relay nodes of the trusted topology")
    kb.set_defaults(func=_cmd_experiment_key_budget)
    qm = experiment.add_parser(
        "quantum-mixed", help="federations of 0..K quantum (VQC or Bell-sampling) clients and classical-shadow clients "
        "at equal copy budgets M"
    )
    qm.add_argument("--quantum-kinds", default="quantum,bell", choices=("quantum,bell", "quantum", "bell"),
                    help="which quantum clients get arms: quantum (single-copy VQC), bell (two-copy Bell sampling)")
    qm.add_argument("--seeds", type=int, help="seeds 0..N-1 at the main M (default 8; 2 with --quick)")
    qm.add_argument("--quick", action="store_true", help="2 seeds, 5 rounds, M in {32, 1000} (under 10 minutes)")
    qm.add_argument("--copies", type=int, help="the main M (default 1000)")
    qm.add_argument("--dataset", choices=("ntangled", "magic"), help="the federated dataset (default ntangled)")
    qm.add_argument("--processes", type=int, default=1, help="worker processes for the runs (default 1)")
    qm.add_argument("--out", metavar="DIR", help="default runs/experiment-quantum-mixed")
    qm.set_defaults(func=_cmd_experiment_quantum_mixed)
    ss = experiment.add_parser("streamsplit", help="edge clients: split strategies, negatives, loss ablation on audio streams")
    ss.add_argument("--seeds", type=_positive_int, default=1, help="seeds 0..N-1 per method")
    ss.add_argument("--quick", action="store_true", help="fewer devices, rounds and windows (under 10 minutes)")
    ss.add_argument("--out", metavar="DIR", help="default runs/experiment-streamsplit")
    ss.set_defaults(func=_cmd_experiment_streamsplit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``qfl`` command; a :class:`~qfl.errors.QflError` ends it with one line on stderr and status 2."""
    from qfl.errors import QflError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QflError as err:
        print(f"qfl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

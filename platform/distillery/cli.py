"""`distillery` command line. Every subcommand and option is described by --help."""
from __future__ import annotations

import argparse
import sys

from . import __version__, runner
from .config import SyntheticConfig
from .errors import DistilleryError
from .serving.api import API_KEY_ENV

_OVERRIDES = "overrides are key.sub=value pairs applied on top of CONFIG, values parsed as YAML:\n"
_MANIFESTS = "Each stage writes RUN_DIR/<stage>/manifest.json; a stage whose manifest matches is skipped.\n"
RUN_EPILOG = _OVERRIDES + """\
  distillery run configs/demo.yaml data.synthetic.users=300 run_dir=/tmp/small
  distillery run configs/amazon.yaml --stages prepare \\
      data.interactions=../shared/data/amazon14_office_products_lcrec/interactions.parquet \\
      data.items=../shared/data/amazon14_office_products_lcrec/items.parquet run_dir=/tmp/office
  distillery run configs/demo.yaml --warm-start runs/demo/bundle \\
      data.format=native data.items=ITEMS data.interactions=NEW_WINDOW run_dir=runs/demo-next
""" + _MANIFESTS


JOB_EPILOG = _OVERRIDES + """\
  ray job submit --working-dir . -- python jobs/pipeline.py --config configs/amazon.yaml \\
      data.interactions=s3://bucket/office/interactions.parquet data.items=s3://bucket/office/items.parquet \\
      run_dir=s3://bucket/runs/office
  python jobs/distill.py --config configs/demo.yaml distill.epochs=4
""" + _MANIFESTS


def _add_run_args(p: argparse.ArgumentParser, positional_config: bool, default_stages: str | None = None) -> None:
    if positional_config:
        p.add_argument("config", help="run config YAML (see configs/)")
    else:
        p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="config overrides, e.g. data.synthetic.users=500 run_dir=/tmp/run")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated stages to run, in pipeline order: {','.join(runner.STAGES)} "
                        f"(default: {default_stages or 'every available stage'}; available now: "
                        f"{','.join(runner.AVAILABLE)})")
    p.add_argument("--force", action="store_true",
                   help="redo the stages even when their manifest matches the config and inputs")
    p.add_argument("--warm-start", metavar="BUNDLE", default=None,
                   help="continue from an earlier run's bundle on a new window of data (same catalogue): reuse "
                        "its teacher, label only examples it has no label for, start the student from it, and "
                        "compare old and new student on the new window. Needs a new run_dir; skips tune. "
                        "Same as the override warm_start=BUNDLE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Distil a large text model into a small multi-task e-commerce student on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"distillery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run pipeline stages into run_dir", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run pipeline stages of CONFIG into its run_dir.")
    _add_run_args(run, positional_config=True)

    gen = sub.add_parser("generate-data", help="write the synthetic shop (items, impressions, reviews)",
                         description="Write items.parquet, interactions.parquet and reviews.parquet in the "
                                     "native input contract. Deterministic for a given seed.")
    gen.add_argument("out", help="output folder")
    for name, field in SyntheticConfig.model_fields.items():  # the options are the config's fields
        gen.add_argument(f"--{name.replace('_', '-')}", type=field.annotation, default=field.default,
                         help=f"{field.description}{_limits(field)} (default {field.default:g})")

    ver = sub.add_parser("verify", help="check a model bundle against its manifest",
                         description="Recompute the sha256 of every file of BUNDLE and compare it with its "
                                     "manifest.json. Exits 0 for a good bundle; otherwise 1, naming each file "
                                     "that is missing, altered or not in the manifest.")
    ver.add_argument("bundle", help="bundle folder (path or URI), e.g. runs/demo/bundle")

    exp = sub.add_parser("export", help="copy a run's verified bundle out of it",
                         description="Copy RUN_DIR/bundle to OUT (path or URI), verifying it before and after.")
    exp.add_argument("run_dir", help="a run directory whose compress stage wrote RUN_DIR/bundle")
    exp.add_argument("out", help="destination folder, replaced: a new or empty folder, or an earlier bundle")

    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="serve a model bundle over HTTP on a local Ray (foreground)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Verify BUNDLE, start a local Ray and Serve, and answer the HTTP API\n"
                                     "(/healthz, /v1/recommend, /v1/ctr, one route per text task the bundle was\n"
                                     "trained for: /v1/intent, /v1/sentiment; /v1/items, /v1/model;\n"
                                     "OpenAPI docs at /docs) until Ctrl-C or SIGTERM.\n"
                                     "On a cluster use `serve deploy serve/config.yaml` instead.",
                         epilog=f"Set ${API_KEY_ENV} to require 'Authorization: Bearer <key>' on every /v1 call.\n"
                                "Defaults are those of distillery.config.ServeConfig (serve/config.yaml's args take the\n"
                                "same fields, for `serve deploy` on a cluster).")
    defaults = _serve_defaults()
    srv.add_argument("bundle", help="bundle folder (path or URI), e.g. runs/demo/bundle")
    srv.add_argument("--host", default=defaults.host,
                     help=f"interface to bind (default {defaults.host}; 0.0.0.0 exposes it to the network)")
    srv.add_argument("--port", type=int, default=defaults.port, help=f"HTTP port (default {defaults.port})")
    srv.add_argument("--replicas", type=int, default=defaults.replicas,
                     help=f"model replicas, each {defaults.model_cpus:g} CPU (default {defaults.replicas})")
    srv.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                     help=f"requests per batched model call (default {defaults.max_batch_size})")
    srv.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_timeout_s * 1000,
                     help=f"longest wait to fill a batch, ms (default {defaults.batch_wait_timeout_s * 1000:g})")
    srv.add_argument("--threads", type=int, default=defaults.threads,
                     help=f"torch threads per model replica (default {defaults.threads})")
    srv.add_argument("--model-cpus", type=float, default=defaults.model_cpus,
                     help=f"CPUs Ray reserves per model replica (default {defaults.model_cpus:g})")
    srv.add_argument("--ingress-cpus", type=float, default=defaults.ingress_cpus,
                     help=f"CPUs Ray reserves for the HTTP deployment with --split (default {defaults.ingress_cpus:g})")
    srv.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                     help=f"larger request bodies are answered 413 (default {defaults.max_body_bytes})")
    srv.add_argument("--split", action="store_true",
                     help="run the model in its own deployment behind the HTTP one (one more process hop "
                          "a request; the two then scale apart)")
    srv.add_argument("--ingress", choices=("auto", "direct", "haproxy", "proxy"), default=defaults.ingress,
                     help="how HTTP reaches the replicas: direct (the one replica answers on --port itself), "
                          "haproxy (HAProxy on --port before the replicas), proxy (Ray Serve's Python proxy, "
                          f"Ray's default: ~4x less throughput on 2 cores); auto = direct for one replica, haproxy "
                          f"for more (default {defaults.ingress})")
    srv.add_argument("--access-log", action="store_true",
                     help="Serve's per-request access log and INFO logs (off by default: WARNING and above)")
    srv.add_argument("--demo", action="store_true",
                     help="send one request of each kind over HTTP, print the answers, and stop")


def _serve_defaults():
    from .config import ServeConfig

    return ServeConfig()


def _serve_flag_error(e: dict) -> str:
    """A ServeConfig error in the words of the option that set the field."""
    field = str(e["loc"][0])
    if field == "batch_wait_timeout_s":  # the option is in ms, the field in seconds
        return f"--batch-wait-ms: {e['msg']} seconds (got {e['input'] * 1000:g} ms)"
    return f"--{field.replace('_', '-')}: {e['msg']}"


def cmd_serve(args) -> int:
    from pydantic import ValidationError

    from .config import ServeConfig
    from .serving import app as serving

    try:
        cfg = ServeConfig(host=args.host, port=args.port, replicas=args.replicas, max_batch_size=args.max_batch_size,
                          batch_wait_timeout_s=args.batch_wait_ms / 1000, threads=args.threads, split=args.split,
                          ingress=args.ingress, access_log=args.access_log, model_cpus=args.model_cpus,
                          ingress_cpus=args.ingress_cpus, max_body_bytes=args.max_body_bytes)
    except ValidationError as err:
        raise DistilleryError("; ".join(_serve_flag_error(e) for e in err.errors())) from None
    return serving.run(args.bundle, cfg, demo=args.demo)


def cmd_verify(args) -> int:
    from .serving import bundle

    try:
        manifest = bundle.verify(args.bundle)
    except bundle.BundleError as err:
        print(f"distillery: {err}", file=sys.stderr)
        return 1
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"{args.bundle}: OK, {len(manifest['files'])} files ({total / 1e6:.2f} MB) match manifest.json "
          f"(created {manifest['created']}, distillery {manifest['distillery_version']})")
    return 0


def cmd_export(args) -> int:
    from .serving import bundle

    manifest = bundle.export(args.run_dir, args.out)
    print(f"{args.out}: bundle exported and verified ({len(manifest['files'])} files)")
    return 0


def cmd_run(args) -> int:
    from .config import load_config

    overrides = list(args.overrides) + ([f"warm_start={args.warm_start}"] if args.warm_start else [])
    cfg = load_config(args.config, overrides)
    stages = runner.parse_stages(args.stages, warm_start=bool(cfg.warm_start))
    if cfg.warm_start and not args.stages:
        print("warm start: running " + ",".join(stages) + " (no tune: its trials would train from scratch)")
    runner.run(cfg, stages, force=args.force)
    return 0


def _limits(field) -> str:
    """A config field's bounds in words: ", at least 10", ", 2-50", ", above 1" (none: "")."""
    def bound(kind: str):
        return next((getattr(m, kind) for m in field.metadata if hasattr(m, kind)), None)

    low, high, above = bound("ge"), bound("le"), bound("gt")
    if low is not None and high is not None:
        return f", {low:g}-{high:g}"
    if low is not None:
        return f", at least {low:g}"
    return f", above {above:g}" if above is not None else ""


def cmd_generate(args) -> int:
    from pydantic import ValidationError

    from .data import synthetic
    from .stages.prepare import write_tables

    try:
        cfg = SyntheticConfig(**{name: getattr(args, name) for name in SyntheticConfig.model_fields})
    except ValidationError as err:
        raise DistilleryError("; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in err.errors())) from None
    tables = synthetic.generate(cfg)
    paths = write_tables(tables, args.out)
    for name, path in paths.items():
        print(f"{path}: {tables[name].num_rows} rows")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may come before or after options."""
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)} (config overrides are key.sub=value pairs)")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _reported(command, args) -> int:
    """`command(args)`, with a user's error printed as one line and exit code 2, no traceback."""
    try:
        return command(args)
    except DistilleryError as err:
        print(f"distillery: error: {err}", file=sys.stderr)
    except OSError as err:  # a path that cannot be read or written: the user's to fix, not a bug to trace
        print(f"distillery: error: {err}: check that the path exists and that you may write there", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    return _reported({"run": cmd_run, "generate-data": cmd_generate, "verify": cmd_verify,
                      "export": cmd_export, "serve": cmd_serve}[args.command], args)


def job_main(stages: str | None, argv: list[str] | None = None) -> int:
    """Entry point of the thin scripts in jobs/: `--config CONFIG [key=value ...] [--force]`."""
    parser = argparse.ArgumentParser(description=f"Ray job: distillery stages {stages or 'all'}", epilog=JOB_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(parser, positional_config=False, default_stages=stages)
    args = _parse(parser, argv)
    if stages is not None and args.stages is None:
        args.stages = stages
    return _reported(cmd_run, args)


if __name__ == "__main__":
    sys.exit(main())

"""The one entry point: ``relaylearn <command>`` (also ``python -m relaylearn``). See docs/design.md#command-line.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback); 3 a bundle failed
verification; 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from relaylearn import __version__
from relaylearn.errors import Interrupted, RelayError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse with whole option names only, and errors as one line naming the subcommand (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --overwrit is a typo, not --overwrite
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # a subcommand reports its own unknown options (argparse leaves them to the top level)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        command = self.prog.removeprefix("relaylearn").strip()
        raise UserError(f"{command}: {message} (see 'relaylearn {command} --help')" if command else message)


CONFIG_HELP = "config path, or name under configs/ without .yaml (e.g. fundus/relay)"
GPUS_HELP = "GPU ids (0 or 0,1) or 'cpu' (default: GPU 0 if present, else CPU)"
DATA_ROOT_HELP = "replace the dataset root folder of every site"
SET_HELP = "override a key of the config's common section, e.g. train.batch_size=4 (repeatable)"
QUIET_HELP = "no progress bars or status lines (warnings and errors are still printed)"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help=CONFIG_HELP)
    p.add_argument("-n", "--name", "--note", dest="name", required=True, help="run name (folder under exps/<config>/)")
    _add_where_args(p)


def _add_where_args(p: argparse.ArgumentParser) -> None:
    """-g, --data-root and --set: where the runs of a command train, and on which data."""
    p.add_argument("-g", "--gpus", default=None, help=GPUS_HELP)
    p.add_argument("--data-root", default=None, metavar="DIR", help=DATA_ROOT_HELP)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def _add_sweep_args(p: argparse.ArgumentParser, output: str, orders: int) -> None:
    """The options compare and tune share; ``output``: what -n names; ``orders``: the --orders default."""
    p.add_argument("-c", "--configs", nargs="+", required=True, metavar="CONFIG", help=f"the configs to run, one per strategy; each a {CONFIG_HELP}")
    p.add_argument("-n", "--name", required=True, help=output)
    p.add_argument("--orders", type=int, default=orders, help=f"site orders per config: as configured, reversed, then seeded shuffles (default {orders})")
    p.add_argument("--seeds", type=int, default=1, help="seeds per site order; seed s adds s to the config's random_seed (default 1)")
    _add_where_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)


def _seed(text: str) -> int:
    """A --seed value: a whole number from 0 to 2^31-1 (argparse error, exit 2, otherwise)."""
    from relaylearn.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (a whole number from 0 to {MAX_SEED})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relaylearn", description="Relay Learning: train one model across hospitals that never connect.")
    parser.add_argument("--version", action="version", version=f"relaylearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True, parser_class=_Parser)
    synth = data_sub.add_parser("synth", help="write a synthetic multi-site benchmark: fundus (DoFE layout, default) or CT (--kind ct)")
    synth.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the site folders into (created if missing)")
    synth.add_argument("--size", type=int, default=None, help="image side in pixels (default 128; --kind ct: 64)")
    synth.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed writes the same images (default 0)")
    synth.add_argument("--overwrite", action="store_true", help="replace site folders that already exist and are not empty")
    synth.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    synth.add_argument(
        "--kind", choices=["fundus", "ct"], default="fundus", help="fundus (default: DoFE layout, 5 sites) or ct (4 CT scanners, ct_nifti layout)"
    )
    synth.add_argument("--studies", type=int, default=None, help="--kind ct: studies per site (2..10000, default 10)")
    synth.add_argument(
        "--layout",
        choices=["nifti", "slices"],
        default=None,
        help="--kind ct: nifti (default: NIfTI volumes) or slices (study folders of 16-bit PNG slices)",
    )

    train = sub.add_parser("train", help="train the config's tasks in order (the whole relay, or one hospital's step)")
    _add_run_args(train)
    train.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    train.add_argument("--in", dest="in_bundle", default=None, help="bundle that arrived from the previous site")
    train.add_argument("--out", dest="out_bundle", default=None, help="where to write the outgoing bundle")
    train.add_argument("--key", default=None, help="this site's private key (signs the outgoing bundle)")
    train.add_argument("--trust", default=None, help="folder of trusted public keys (*.pub)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its last local checkpoint")
    train.add_argument("--insecure-unsigned", action="store_true", help="accept an unsigned incoming bundle (testing only; prints a warning)")
    train.add_argument("--relay-id", default=None, help="the relay this site belongs to (default: the file relay-id in the --trust folder)")
    train.add_argument("--hop", type=int, default=None, help="the hop this site writes; --in must have one hop less (default: the task_id)")
    train.add_argument("--ledger", default=None, help="site ledger folder (default: ledger/ beside --key, else in the --trust folder)")
    train.add_argument(
        "--recipe",
        choices=["bundle", "local"],
        default="bundle",
        help="with --in: 'bundle' (default) adopts the bundle's recipe where the local config leaves keys unset and refuses keys it sets otherwise; 'local' trains with the local recipe (recorded in run.json)",
    )

    test = sub.add_parser("test", help="evaluate saved weights on the configured test sites")
    _add_run_args(test)
    test.add_argument("-q", "--quiet", action="store_true", help="print only the results file, not each site's Dice")
    test.add_argument("--bundle", default=None, help="bundle to evaluate (default: the run's bundle of each task)")
    test.add_argument("--trust", default=None, help="verify the bundle's signature against these public keys")
    test.add_argument("--no-verify", action="store_true", help="evaluate --bundle without checking its signature (recorded in the results)")

    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for a site")
    keygen.add_argument("out_dir", metavar="OUT_DIR", help="folder for <site>.key (private) and <site>.pub (public)")
    keygen.add_argument("--site", required=True, help="this site's name, as the relay's configs name it")

    verify = sub.add_parser("verify", help="verify a bundle (exit 0, or 3 with the reason)")
    verify.add_argument("bundle", metavar="BUNDLE", help="the .relay bundle file")
    verify.add_argument("--trust", required=True, metavar="DIR", help="folder of trusted public keys (*.pub) and the file relay-id")

    inspect = sub.add_parser("inspect", help="show a bundle's hop chain, strategy, config and sizes (no trust needed)")
    inspect.add_argument("bundle", metavar="BUNDLE", help="the .relay bundle file")
    inspect.add_argument("--json", action="store_true", help="print everything as JSON")

    predict = sub.add_parser("predict", help="segment new images with a bundle's model")
    predict.add_argument("--bundle", required=True, help="the .relay bundle whose model segments")
    predict.add_argument("--out", required=True, metavar="DIR", help="folder for masks/, overlays/ and the predictions tables (created if missing)")
    predict.add_argument("--trust", default=None, help="folder of trusted public keys: verify the bundle")
    predict.add_argument("--no-verify", action="store_true", help="use the bundle without checking its signature (recorded in predictions.json)")
    predict.add_argument(
        "-c", "--config", default=None, help="local config: its plug-in model/strategy the bundle may use, and its dataset.kwargs.hu_min (16-bit CT slices)"
    )
    predict.add_argument("-g", "--gpus", default=None, help=GPUS_HELP)
    predict.add_argument("--overwrite", action="store_true", help="replace the predictions already in --out (masks/, overlays/ and the tables as a whole)")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images, NIfTI volumes, or folders of them (not read recursively)")

    export = sub.add_parser("export", help="export the segmentation model (never the generators)")
    export.add_argument("--bundle", required=True, help="the .relay bundle whose model to export")
    export.add_argument("--format", choices=["onnx", "torchscript"], required=True, help="onnx or torchscript")
    export.add_argument("--out", required=True, metavar="FILE", help="the model file to write (a sidecar <out>.json is written beside it)")
    export.add_argument("--trust", default=None, help="folder of trusted public keys: verify the bundle")
    export.add_argument("--no-verify", action="store_true", help="use the bundle without checking its signature (recorded in the metadata)")
    export.add_argument("-c", "--config", default=None, help="local config whose plug-in model/strategy the bundle may use")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out and its sidecar <out>.json")

    report = sub.add_parser("report", help="write report.html for a run folder")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder under exps/ (holds run.json)")

    audit = sub.add_parser("audit", help="privacy audit: what a relay bundle's generators and discriminators reveal about this site's training images")
    audit.add_argument("bundle", metavar="BUNDLE", help="the .relay bundle to audit")
    audit.add_argument("--site", required=True, help="this hospital's site name in the bundle's registry")
    audit.add_argument("--data-root", required=True, help="data root holding this site's train and test splits")
    audit.add_argument("-c", "--config", default=None, help="config that locates the site's folder (default: the folder named like the site)")
    audit.add_argument("--trust", default=None, help="verify the bundle's signature against these public keys")
    audit.add_argument("--no-verify", action="store_true", help="audit the bundle without checking its signature (recorded in the report)")
    audit.add_argument("--n-generated", type=int, default=1000, help="generated pairs (default 1000)")
    audit.add_argument("--threshold", type=float, default=0.6, help="membership-inference AUC above which a check is flagged (default 0.6)")
    audit.add_argument("--seed", type=_seed, default=0, help="random seed of the generated pairs (default 0)")
    audit.add_argument("--out", default=None, help="folder for <site>.json and <site>_closest_pairs.png (default exps/audit/<bundle name>)")
    audit.add_argument("--json", action="store_true", help="print the figures as JSON")
    audit.add_argument("--overwrite", action="store_true", help="replace <site>.json and <site>_closest_pairs.png of an earlier audit in --out")

    compare = sub.add_parser("compare", help="run several strategies over site orders and seeds; one table")
    _add_sweep_args(compare, "output folder exps/compare/<NAME> (re-run to resume)", orders=2)
    imp = sub.add_parser("import-original", help="turn a checkpoint of the original Relay Learning code (.ckpt) into a bundle")
    imp.add_argument("ckpt", help="Lightning .ckpt written by the original code (read with a weights-only loader)")
    imp.add_argument("-c", "--config", required=True, help="config whose model matches the checkpoint (e.g. fundus/relay_test)")
    imp.add_argument("--out", required=True, help="bundle to write")
    imp.add_argument("--key", default=None, help="private key that signs the bundle (default: unsigned)")
    imp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a key of the config's common section")
    compare.add_argument("--tuned", default=None, metavar="DIR", help="train each strategy at its pick from 'relaylearn tune' (exps/tune/<NAME>)")

    tune = sub.add_parser("tune", help="pick each strategy's strength (EWC λ, SI c/ξ, LwF α/τ, OWM α, relay distillation) by ACC on validation parts")
    _add_sweep_args(tune, "output folder exps/tune/<NAME> (re-run to resume)", orders=1)
    tune.add_argument("--grid", default=None, metavar="FILE", help="YAML {strategy: {option: [values]}} replacing the built-in grid of the strategies it names")
    tune.add_argument(
        "--select-on",
        choices=["val", "test"],
        default="val",
        help="val (default): the validation parts; test: the test split (optimistic, the original's protocol)",
    )
    for command in (compare, tune):
        command.add_argument(
            "--workers", type=int, default=1, help="processes that share the runs (CPU: up to the number of cores; each gets cores/N threads; default 1)"
        )
        command.add_argument("--claim-only", action="store_true", help=argparse.SUPPRESS)  # a --workers helper
    return parser


# ----- commands ----------------------------------------------------------------------------------
def cmd_data(args) -> int:
    from relaylearn.data import write_synthetic_benchmark

    if args.kind == "ct":
        from relaylearn.data.synth_ct import STUDIES_PER_SITE, write_synthetic_ct

        args.studies = STUDIES_PER_SITE if args.studies is None else args.studies
        args.layout = args.layout or "nifti"
        t0 = time.time()
        summary = write_synthetic_ct(
            Path(args.out_dir), size=64 if args.size is None else args.size, seed=args.seed, studies=args.studies, layout=args.layout, overwrite=args.overwrite
        )
        print(f"wrote synthetic CT ({args.layout}) to {args.out_dir} in {time.time() - t0:.1f} s:")
        _print_summary(summary)
        return 0
    given = [option for option, value in (("--studies", args.studies), ("--layout", args.layout)) if value is not None]
    if given:
        raise UserError(f"{' and '.join(given)}: only for --kind ct (the fundus benchmark has fixed DoFE counts and layout)")
    args.size = 128 if args.size is None else args.size
    if args.size < 32 or args.size > 2048:
        raise UserError(f"--size {args.size}: expected 32..2048 pixels")
    t0 = time.time()
    summary = write_synthetic_benchmark(Path(args.out_dir), size=args.size, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote the synthetic fundus benchmark to {args.out_dir} in {time.time() - t0:.1f} s:")
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, dict[str, int]]) -> None:
    """One line per site, e.g. ``  site1: train 50, test 20``."""
    for site, counts in summary.items():
        print(f"  {site}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counts.items()))


def _name(value: str) -> str:
    return value.lstrip("=")


def cmd_train(args) -> int:
    from relaylearn.bundle import escape_text
    from relaylearn.config import load_config
    from relaylearn.runner import TrainOptions, run_training

    cfg = load_config(_name(args.config), args.sets, args.data_root)
    opts = TrainOptions(
        devices=args.gpus,
        in_bundle=args.in_bundle,
        out_bundle=args.out_bundle,
        key=args.key,
        trust=args.trust,
        resume=args.resume,
        quiet=args.quiet,
        insecure_unsigned=args.insecure_unsigned,
        relay_id=args.relay_id,
        hop=args.hop,
        ledger=args.ledger,
        recipe=args.recipe,
    )
    result = run_training(cfg, _name(args.name), opts)
    print_matrix(result.matrix)
    print(f"run folder: {result.run_dir}  ({result.wall_seconds:.0f} s)")
    if result.privacy_flagged:
        print(f"privacy: {result.privacy_flagged} check(s) flagged ({result.run_dir / 'metrics' / 'privacy.json'})")
    if result.bundles:
        print(f"bundle: {escape_text(args.out_bundle or result.bundles[-1])}")
    _auto_report(result.run_dir, args.quiet)
    return 0


def _auto_report(run_dir: Path, quiet: bool) -> None:
    try:
        from relaylearn.report import write_report
    except ImportError:
        return
    path = write_report(run_dir)
    print(f"report: {path}")


def print_matrix(matrix: dict) -> None:
    from relaylearn.results import format_matrix

    print(format_matrix(matrix))


def cmd_test(args) -> int:
    from relaylearn.config import load_config
    from relaylearn.evaluate import run_test

    cfg = load_config(_name(args.config), args.sets, args.data_root)
    out = run_test(cfg, _name(args.name), bundle=args.bundle, trust=args.trust, devices=args.gpus, no_verify=args.no_verify, quiet=args.quiet)
    print(f"test results: {out}")
    return 0


def cmd_keygen(args) -> int:
    from relaylearn.keys import generate_keypair, load_private_key

    priv, pub = generate_keypair(Path(args.out_dir), args.site)
    print(f"private key (keep at this site, never share): {priv}\npublic key (give to every other site's trust folder): {pub}")
    print(f"fingerprint (read it out to the other sites to confirm the .pub they received): {load_private_key(priv).fingerprint}")
    return 0


def cmd_verify(args) -> int:
    from relaylearn.bundle import escape_text, existing_bundle, verify_bundle
    from relaylearn.keys import load_trust_dir, read_relay_id

    relay_id = read_relay_id(args.trust)
    trust = load_trust_dir(args.trust)
    bundle = verify_bundle(existing_bundle(args.bundle), trust, expect_relay_id=relay_id)
    hops = bundle.manifest.get("hops", [])
    print(
        escape_text(f"OK: {args.bundle} signed by {bundle.signed_by}; relay {bundle.manifest['relay_id']}; {len(hops)} hop(s): ")
        + " -> ".join(escape_text(h["site"]) for h in hops)
    )
    if relay_id is None:
        print(
            f"note: {args.trust} states no relay id (file relay-id), so which relay this bundle belongs to was not checked; train refuses until it does",
            file=sys.stderr,
        )
    return 0


def cmd_inspect(args) -> int:
    from relaylearn.bundle import existing_bundle, format_inspect, inspect_bundle

    info = inspect_bundle(existing_bundle(args.bundle))
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
    return 0


def cmd_predict(args) -> int:
    from relaylearn.predict import run_predict

    local = _local_config(args.config)
    run_predict(
        args.bundle,
        args.out,
        args.inputs,
        trust=args.trust,
        devices=args.gpus,
        no_verify=args.no_verify,
        plugins=_plugins(local),
        overwrite=args.overwrite,
        hu_min=None if local is None else local.common.dataset.kwargs.hu_min,
    )
    return 0


def cmd_export(args) -> int:
    from relaylearn.bundle import escape_text
    from relaylearn.export import run_export

    run_export(args.bundle, args.format, args.out, trust=args.trust, no_verify=args.no_verify, plugins=_plugins(args.config), overwrite=args.overwrite)
    print(f"exported {args.format}: {escape_text(args.out)}")
    return 0


def _local_config(config: str | None):
    """The local config named by -c (None without -c)."""
    if not config:
        return None
    from relaylearn.config import load_config

    return load_config(_name(config))


def _plugins(config) -> set[str]:
    """The plug-in names a local config (-c: a name, or one already loaded) allows a bundle to use
    (none without -c)."""
    if not config:
        return set()
    from relaylearn.assembly import local_plugins

    return local_plugins(_local_config(config) if isinstance(config, str) else config)


def cmd_report(args) -> int:
    from relaylearn.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError("run folder not found", run_dir)
    print(f"report: {write_report(run_dir)}")
    return 0


def cmd_audit(args) -> int:
    from relaylearn.audit import AuditOptions, format_report, run_audit
    from relaylearn.files import json_text

    options = AuditOptions(n_generated=args.n_generated, threshold=args.threshold, seed=args.seed)
    report, path = run_audit(
        args.bundle,
        args.site,
        args.data_root,
        config=args.config,
        trust=args.trust,
        options=options,
        out_dir=args.out,
        no_verify=args.no_verify,
        overwrite=args.overwrite,
    )
    print(json_text(report) if args.json else f"{format_report(report)}\nwritten: {path}, {report['closest_pairs_png']}")
    return 0


def cmd_compare(args) -> int:
    from relaylearn.compare import run_compare

    out = run_compare(args)
    print(f"comparison: {out}")
    return 0


def cmd_import_original(args) -> int:
    from relaylearn.bundle import escape_text
    from relaylearn.import_original import describe, import_original

    path, imported = import_original(args.ckpt, _name(args.config), args.out, key=args.key, sets=args.sets)
    print(describe(imported))
    print(f"bundle: {escape_text(path)} ({'signed' if args.key else 'unsigned'})")
    return 0


def cmd_tune(args) -> int:
    from relaylearn.tune import run_tune

    out = run_tune(args)
    print(f"tuning: {out}")
    return 0


COMMANDS = {
    "data": cmd_data,
    "train": cmd_train,
    "test": cmd_test,
    "keygen": cmd_keygen,
    "verify": cmd_verify,
    "inspect": cmd_inspect,
    "predict": cmd_predict,
    "export": cmd_export,
    "report": cmd_report,
    "compare": cmd_compare,
    "import-original": cmd_import_original,
    "tune": cmd_tune,
    "audit": cmd_audit,
}


class _OutputError(Exception):
    """Writing standard output or standard error failed (a closed pipe, a full disk)."""

    def __init__(self, stream: str, error: OSError):
        super().__init__(f"cannot write to {stream}: {error.strerror or error}")
        self.error = error


class _Guarded:
    """A text stream whose write errors raise :class:`_OutputError` (told apart from file errors)."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise _OutputError(self._name, exc) from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _OutputError(self._name, exc) from exc

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _discard_stdout() -> None:
    """Point standard output at os.devnull, so that Python's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests): nothing is flushed at exit
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command. A closed standard output (``relaylearn inspect --json B | head -1``) ends it
    quietly with exit code 1, as https://docs.python.org/3/library/signal.html#note-on-sigpipe does;
    any other failure to write standard output or error (a full disk) is exit 2 with one line."""
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Guarded(stdout, "standard output"), _Guarded(stderr, "standard error")
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except _OutputError as exc:
        sys.stdout, sys.stderr = stdout, stderr
        _discard_stdout()
        if isinstance(exc.error, BrokenPipeError):
            return 1
        try:
            print(f"relaylearn: error: {exc}", file=sys.stderr)
        except OSError:
            pass
        return 2
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # a --workers helper re-runs the same command
        if getattr(args, "trust", None) and getattr(args, "no_verify", False):
            raise UserError(
                f"relaylearn {args.command}: --trust and --no-verify exclude each other: give --trust DIR to verify the bundle, or --no-verify not to"
            )
        return COMMANDS[args.command](args)
    except _OutputError:
        raise
    except RelayError as exc:
        from relaylearn.bundle import escape_text

        print(f"relaylearn: {'' if isinstance(exc, Interrupted) else 'error: '}{escape_text(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("relaylearn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless debugging
        if os.environ.get("RELAYLEARN_DEBUG"):
            raise
        from relaylearn.bundle import escape_text

        if isinstance(exc, OSError) and exc.filename is not None:  # a file-system problem at a path the user chose: bad input
            print(f"relaylearn: error: {escape_text(exc.filename)}: {escape_text(exc.strerror or exc)}", file=sys.stderr)
            return 2
        print(f"relaylearn: internal error: {type(exc).__name__}: {escape_text(exc)} (set RELAYLEARN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""What runs: the relay of a config's tasks, site after site (simulation on one machine, or one
hospital's step in deployment): verify → restore → fit → evaluate → write, per site."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from relaylearn.assembly import (
    check_bundle_fits,
    check_task_builds,
    first_scored_class,
    load_split,
    load_training_folder,
    local_plugins,
    part_of,
    restore_strategy,
    shipped_config,
)
from relaylearn.bundle import escape_text
from relaylearn.config import DatasetConfig, RunConfig, TaskConfig, dump_yaml
from relaylearn.devices import inference_device, parse_devices, resolve_precision
from relaylearn.engine import evaluate_site, fit_site, is_main_process, quiet_lightning, real_data_augmentation, require_training_images, seed_site
from relaylearn.errors import ConfigError, DataError, UserError, VerificationError
from relaylearn.files import EXPS_ROOT, atomic_write, check_new_bundle_path, check_output_name, check_writable_folder, local_stamp, software_versions, utc_now
from relaylearn.memory import out_of_memory_as_error
from relaylearn.results import class_dice, final_dice, matrix_json, per_image_rows, summary_row, write_results_csv
from relaylearn.strategies import get_strategy_class
from relaylearn.strategies.base import Strategy, parse_options


@dataclass
class TrainOptions:
    devices: str | None = None
    in_bundle: str | None = None
    out_bundle: str | None = None
    key: str | None = None
    trust: str | None = None
    resume: bool = False
    quiet: bool = False
    insecure_unsigned: bool = False
    exps_root: Path = EXPS_ROOT
    relay_id: str | None = None  # the relay this site belongs to (else <trust>/relay-id)
    hop: int | None = None  # the hop this site writes (default: the first task's task_id)
    ledger: str | None = None  # site ledger folder (default: <key folder>/ledger, else <trust>/ledger)
    recipe: str = "bundle"  # with --in: adopt the bundle's recipe ("bundle") or keep the local one ("local")


@dataclass
class RunResult:
    run_dir: Path
    matrix: dict[str, Any]
    bundles: list[Path] = field(default_factory=list)
    wall_seconds: float = 0.0
    is_main: bool = True  # False in a DDP worker rank: rank 0 writes every file and prints
    privacy_flagged: int = 0  # checks flagged by the per-hop privacy audits (metrics/privacy.json), every hop counted


@dataclass
class HopOutcome:
    """One trained site: the strategy (on the CPU) and how it scored."""

    strategy: Strategy
    row: list[float]  # a row of R: mean Dice on each test site
    results: dict[str, dict]  # test site → evaluate_site(...)
    validation: list[float] | None  # mean Dice on each relay site's validation part (None: a site has none)
    started_utc: str
    num_images: int  # training images of the site


# ----- training ----------------------------------------------------------------------------------
class RelayRun:
    """Trains the tasks of a config in order, writing everything under ``exps/<config>/<name>/``."""

    def __init__(self, cfg: RunConfig, name: str, opts: TrainOptions):
        check_output_name(name, "run")
        self.cfg, self.name, self.opts = cfg, name, opts
        self.run_dir = Path(opts.exps_root) / cfg.name / name
        self.stamp = local_stamp()
        self.signing_key = None
        self.trust = None
        self.signed = opts.key is not None
        self.relay_id: str | None = None  # the relay this site states it belongs to
        self.incoming = None  # the verified bundle that arrived with --in
        self.recipe_record: dict | None = None  # with --in: how the local recipe met the bundle's (run.json)
        self._barrier = None  # DDP barrier of the latest site's Trainer
        self._fidelity = None  # replay fidelity recorder (single-machine simulation)
        self._val_cache: dict[str, Any] | None = None
        self._test_cache: dict[str, Any] = {}
        self._lock = None  # the open lock file of the run folder (main process)

    # -- set-up --
    def _prepare(self) -> None:
        from relaylearn.keys import load_private_key, load_trust_dir

        if self.opts.key:
            self.signing_key = load_private_key(self.opts.key)
        if self.opts.trust:
            self.trust = load_trust_dir(self.opts.trust)
        if self.opts.in_bundle and self.trust is None and not self.opts.insecure_unsigned:
            raise UserError("--in needs --trust DIR (the consortium's public keys), or --insecure-unsigned for testing")
        if self.opts.hop is not None and self.opts.hop < 1:
            raise UserError(f"--hop {self.opts.hop}: hops are numbered from 1")
        self.relay_id = self._stated_relay_id()
        if self.opts.in_bundle and self.relay_id is None and not self.opts.insecure_unsigned:
            raise UserError(
                "this site does not state which relay it belongs to: put the relay id into the file relay-id of the trust folder, or pass --relay-id ID"
            )
        if self.opts.in_bundle and self.opts.out_bundle and _same_file(self.opts.in_bundle, self.opts.out_bundle):
            raise UserError("--out is the same file as --in; write the outgoing bundle to a new name", self.opts.out_bundle)
        for task in self.cfg.tasks:  # a bad -g or augmentation fails before anything is written
            parse_devices(self.opts.devices, task.train.lightning)
            self._check_augmentation(task)
        ledger_folder = self._ledger_folder() if (self.opts.in_bundle or self.signing_key) and is_main_process() else None
        if ledger_folder is not None:  # checked now: the ledger records this site's bundle after training
            try:
                check_writable_folder(ledger_folder)
            except UserError as exc:
                raise UserError(f"site ledger: {exc.message} (--ledger DIR puts it elsewhere)", exc.path) from None
        if self.opts.out_bundle:
            check_new_bundle_path(Path(self.opts.out_bundle))
            if self.signing_key is None and (self.opts.in_bundle or self.opts.trust) and not self.opts.insecure_unsigned and is_main_process():
                print(
                    f"WARNING: no --key: {escape_text(self.opts.out_bundle)} will be UNSIGNED, and the next hospital will refuse it; pass --key keys/<site>.key",
                    file=sys.stderr,
                )
        bundles = self.run_dir / "bundles"
        if bundles.is_dir() and any(bundles.glob("*.relay")) and not self.opts.resume:
            finished = max(bundles.glob("*.relay"), key=lambda p: p.stat().st_mtime)
            raise UserError(
                f"run folder already has results (its last bundle: {escape_text(finished)}; if a copy was lost, copy that file again); "
                "use --resume to continue an unfinished run, or another -n",
                self.run_dir,
            )
        self._check_sites_agree()
        self._check_strategy_options()
        strategy = self._check_networks()
        if self.opts.in_bundle:  # verify what arrived, and that it fits, before anything is written
            self.incoming = self._read_bundle(Path(self.opts.in_bundle), allow_unsigned=self.opts.insecure_unsigned, warn=True)
            from relaylearn.bundle import check_room_for_next_hop

            check_room_for_next_hop(self.incoming)
            self._check_position(self.incoming)
            from relaylearn.recipe import reconcile

            self.cfg, self.recipe_record = reconcile(self.cfg, self.incoming, self.opts.recipe, local_plugins(self.cfg))
            strategy = check_bundle_fits(self.incoming, self.cfg.tasks[0])
            if {"dataset.kwargs.img_size", "train.batch_size"} & set(self.recipe_record["adopted"]):  # local sizes: checked with the networks
                self._check_memory(self.cfg.tasks[0], self.incoming.path)
            try:  # the local recipe passed above: what fails now came with the bundle
                self._check_augmentation(self.cfg.tasks[0])
            except UserError as exc:
                raise VerificationError(f"the bundle's recipe does not build here: {exc.message}", self.incoming.path) from None
            ledger = self._ledger(self.cfg.tasks[0].dataset.site, self.incoming.manifest["relay_id"])
            if is_main_process() and ledger is not None and not self._resumed_past(ledger):
                ledger.check(self.incoming)
            self._check_strategy_options()  # again: the bundle's recipe may have changed them
        with self._naming_the_config():  # the sites the run adds fit the strategy (the relay's site capacity)
            strategy.check_sites(["+".join(t.dataset.site for t in group) for group in self._groups()])
        del strategy
        resolved = resolved_config(self.cfg)
        if self.opts.resume:
            self._check_same_config(resolved)
        self._check_data()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not is_main_process():
            return  # a DDP worker that Lightning re-executed: rank 0 writes the run's files
        self._lock_run_dir()
        atomic_write(self.run_dir / "config.yaml", dump_yaml(self.cfg.raw))
        atomic_write(self.run_dir / "resolved_config.yaml", dump_yaml(resolved))
        earlier = self._earlier_run_info()
        info = {
            "config": self.cfg.name,
            "config_path": str(self.cfg.path),
            "name": self.name,
            "seed": self.cfg.tasks[0].random_seed,
            "task_seeds": {t.dataset.kwargs.task_id: t.site_seed for t in self.cfg.tasks},
            "started_utc": utc_now(),
            "argv": sys.argv,
            "versions": software_versions(detailed=True),
            "precision": self._precisions(),
            "threads": torch.get_num_threads(),  # a seeded run repeats exactly for a given thread count
            "recipe": self.recipe_record,
            "results_stamp": self.stamp,
        }
        if earlier is not None:  # --resume: the run keeps its start, its first command and its results files
            this_start = ("started_utc", "argv", "versions", "precision", "threads")
            resumed = [*earlier.get("resumed", []), {"utc" if k == "started_utc" else k: info[k] for k in this_start}]
            info = {**info, **{k: earlier[k] for k in (*this_start, "results_stamp") if k in earlier}, "resumed": resumed}
            self.stamp = info["results_stamp"]
        atomic_write(self.run_dir / "run.json", json.dumps(info, indent=2))
        if any(t.train.precision == "auto" for t in self.cfg.tasks):
            chosen = sorted(set(info["precision"].values()))
            why = "native bf16 kernels here" if "bf16-mixed" in chosen else "no native bf16 kernels here"
            self._log(f"precision: {', '.join(chosen)} (train.precision auto: {why})")

    def _check_sites_agree(self) -> None:
        """One model for the whole run: every site that trains has the first one's ``channels`` and
        ``num_classes``, and so does every test site (where a class the model cannot predict would
        count as a perfect Dice)."""
        first = self.cfg.tasks[0]
        others = [(t.dataset, False) for t in self.cfg.tasks[1:]] + [(ds, True) for ds in self.cfg.test_datasets]
        for name in ("num_classes", "channels"):
            want = getattr(first.dataset.kwargs, name)
            for ds, test in others:
                got = getattr(ds.kwargs, name)
                if got == want:
                    continue
                problem = (
                    f"test site {ds.site} has {got} but the model is trained with {want} (the training sites' {name}); a test site needs the same"
                    if test
                    else f"site {ds.site} has {got} but site {first.dataset.site} has {want}; every site of a run trains one model, with the same {name}"
                )
                raise ConfigError(f"{self._dataset_key(ds, name, test=test)}: {problem}", self.cfg.path)

    def _dataset_key(self, ds: DatasetConfig, name: str, test: bool = False) -> str:
        """The config key that sets ``dataset.kwargs.<name>`` for site ``ds`` (for a site that
        trains, its ``current_tasks.task_confs`` entry first; with ``test``, what it is tested with)."""
        raw = self.cfg.raw if isinstance(self.cfg.raw, dict) else {}
        confs = (raw.get("current_tasks") or {}).get("task_confs") or {}
        task_id = ds.kwargs.task_id
        own = confs.get(task_id, confs.get(str(task_id))) if task_id is not None and not test else None
        if name in (((own or {}).get("dataset") or {}).get("kwargs") or {}):
            return f"current_tasks.task_confs.{task_id}.dataset.kwargs.{name}"
        for i, test_site in enumerate(self.cfg.test_datasets):
            entries = raw.get("all_tasks_datasets") or []
            if test_site.site == ds.site and i < len(entries) and name in ((entries[i] or {}).get("kwargs") or {}):
                return f"all_tasks_datasets[{i}].kwargs.{name}"
        return f"common.dataset.kwargs.{name}"

    def _check_networks(self) -> Strategy:
        """Build every distinct site config's solver, strategy and loss once and run a batch of
        zeros through them (:func:`relaylearn.assembly.check_task_builds`), so that a bad model,
        strategy or loss option, an image size or a batch size the networks cannot take stops the
        run in seconds, naming the config. The first site's configured pretrained weights are
        read where it starts from them. Returns the first site's strategy (fresh)."""
        started = time.time()
        first = self.cfg.tasks[0]
        own_first_bundle = self.run_dir / "bundles" / f"task_{first.dataset.kwargs.task_id}.relay"
        pretrained = not (self.opts.in_bundle or first.checkpoint.load or (self.opts.resume and own_first_bundle.is_file()))
        checked: set[str] = set()
        strategy = None
        for task in self.cfg.tasks:
            recipe = task.model_dump(mode="json", include={"dataset", "model", "strategy", "train"})
            for site_key in ("root_path", "img_folder", "task_id", "task_name"):
                recipe["dataset"]["kwargs"].pop(site_key, None)
            reads_weights = pretrained and task is first and task.model.kwargs.get("pretrained_path") is not None
            key = json.dumps([recipe, reads_weights], sort_keys=True, default=str)
            if key not in checked:
                checked.add(key)
                with self._naming_the_config():
                    built = check_task_builds(task, load_pretrained=reads_weights)
                self._check_memory(task)
                if strategy is None:
                    strategy = built
        self._log(f"networks: {len(checked)} site config(s) built and checked ({time.time() - started:.1f} s)")
        return strategy

    def _check_strategy_options(self) -> None:
        """A bad strategy option fails before anything is written, naming the config file or the
        ``--set`` item that gave it."""
        for task in self.cfg.tasks:
            parse_options(get_strategy_class(task.strategy.name), task.strategy.kwargs, path=self.cfg.path, sets=self.cfg.sets)

    def _check_memory(self, task: TaskConfig, bundle: Path | None = None) -> None:
        """Before training: when ``task``'s batches at its ``img_size`` would not fit on its device,
        refuse (exit 3 naming ``bundle``) if that size or batch size came from it; for the local
        config's own sizes only warn, since the estimate (fp32, the built-in U-Net) can be too high
        for mixed precision on a GPU, and an allocation that fails is one line anyway."""
        from relaylearn.memory import require_memory

        device = inference_device(self.opts.devices, task.train.lightning)  # training's first device
        try:
            require_memory(task.dataset.kwargs.img_size, task.train.batch_size, device, training=True, bundle=bundle, path=self.cfg.path)
        except ConfigError as exc:
            if is_main_process():
                print(f"WARNING: {exc.message}; training may run out of memory", file=sys.stderr)

    @contextlib.contextmanager
    def _naming_the_config(self):
        """A ConfigError raised inside names the config file (when it names no file itself)."""
        try:
            yield
        except ConfigError as exc:
            raise ConfigError(exc.message, exc.path or self.cfg.path) from None

    def _check_data(self) -> None:
        """Decode every file this run reads before anything is written or trained, so that a bad
        file at the last site or in a test folder stops the run in seconds, not after hours. The
        test sets and validation parts are kept (every site is evaluated on them); the training
        folders are decoded and dropped (each site decodes its own again). A site that trains with
        ``neg_pos_ratio`` needs a slice with foreground in what it trains on (after the hold-out)."""
        from relaylearn.data.ct import positive_slices, require_positive_slices

        started = time.time()
        for ds in self.cfg.test_datasets:
            self._test_data(ds)
        validation = {} if self._has_validation() else None
        for group in self._groups():
            k = group[0].dataset.kwargs  # a group trains with its first site's options (fit_site)
            positive = []
            count = 0
            for task in group:
                data, parts = load_training_folder(task.dataset)
                count += len(data) if parts is None else len(parts[0])
                if validation is not None:
                    validation[task.dataset.site] = part_of(data, parts[1])
                if k.neg_pos_ratio:
                    slices = positive_slices(data.labels, k)
                    positive.append(slices if parts is None else slices[parts[0]])
            site_name = "+".join(t.dataset.site for t in group)
            require_training_images(count, group[0], site_name)
            if k.neg_pos_ratio:
                require_positive_slices(torch.cat(positive), k, site_name)
        if validation is not None:
            self._val_cache = validation
        self._log(f"data: {len(self.cfg.test_datasets)} test set(s) and {len(self.cfg.tasks)} training folder(s) read ({time.time() - started:.0f} s)")

    def _check_same_config(self, resolved: list[dict]) -> None:
        """``--resume`` continues the run with the config it started with."""
        changes = config_changes(self.run_dir, resolved, [d.site for d in self.cfg.test_datasets])
        if changes:
            raise ConfigError(
                f"--resume with another config than the run started with ({changes}); resume with the same config and --set, or start a new run with another -n",
                self.cfg.path,
            )

    def _earlier_run_info(self) -> dict | None:
        """The ``run.json`` of the run being resumed (None when not resuming, or none readable)."""
        path = self.run_dir / "run.json"
        if not (self.opts.resume and path.is_file()):
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _lock_run_dir(self) -> None:
        """Hold an exclusive lock on the run folder while this process trains in it: a second
        ``train`` with the same ``-n`` is refused instead of overwriting this one's bundles."""
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            return
        handle = open(self.run_dir / ".lock", "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError("another relaylearn process is training in this run folder; wait for it, or use another -n", self.run_dir) from None
        self._lock = handle

    def _resumed_past(self, ledger) -> bool:
        """``--resume`` of a hop whose bundle this run already wrote and recorded: the incoming
        bundle is that bundle's parent, so the ledger (which moved past it) is not asked again."""
        task_id = self.cfg.tasks[-1].dataset.kwargs.task_id
        own = self.run_dir / "bundles" / f"task_{task_id}.relay"
        if not (self.opts.resume and own.is_file()):
            return False
        mine = self._read_bundle(own, allow_unsigned=not self.signed, own=True)
        return ledger.lineage() == mine.lineage and mine.lineage[:-1] == self.incoming.lineage

    def _groups(self) -> list[list[TaskConfig]]:
        """The sites in the order they train: one each, or all at once for a pooled strategy."""
        pooled = get_strategy_class(self.cfg.tasks[0].strategy.name).pooled_training
        return [self.cfg.tasks] if pooled else [[t] for t in self.cfg.tasks]

    def _check_augmentation(self, task: TaskConfig) -> None:
        """``dataset.kwargs.augment`` builds (ConfigError naming the config otherwise)."""
        with self._naming_the_config():
            real_data_augmentation(task.dataset.kwargs)

    def _read_bundle(self, path: Path, allow_unsigned: bool, warn: bool = False, own: bool = False):
        """Verify and read a bundle. Unsigned ones are accepted silently only for bundles this
        process wrote itself (single-machine simulation); ``--insecure-unsigned`` warns. ``own``: a
        bundle this site wrote, which also verifies with the site's own key (a trust folder need
        not hold it; the first site may have none)."""
        from relaylearn.bundle import existing_bundle, read_bundle
        from relaylearn.keys import TrustStore

        existing_bundle(path)
        if warn and allow_unsigned:
            print(f"WARNING: --insecure-unsigned: {escape_text(path)} is accepted without a signature check", file=sys.stderr)
        trust = self.trust
        if own and self.signing_key is not None:
            keys = dict(trust.keys) if trust is not None else {}
            keys.update(TrustStore.of((self.signing_key.site, self.signing_key.public_key)).keys)
            trust = TrustStore(keys)
        return read_bundle(path, trust=trust, allow_unsigned=allow_unsigned, expect_relay_id=self.relay_id, bind_sites=True)

    def _precisions(self) -> dict[str, str]:
        """Task id → the precision each site trains in on this machine (``auto`` resolved)."""
        out = {}
        for task in self.cfg.tasks:
            accelerator, _ = parse_devices(self.opts.devices, task.train.lightning)
            out[str(task.dataset.kwargs.task_id)] = resolve_precision(task.train.precision, accelerator, warn=False)
        return out

    def _stated_relay_id(self) -> str | None:
        """``--relay-id``, else the ``relay-id`` file of the trust folder; both must agree."""
        from relaylearn.keys import read_relay_id, validate_relay_id

        flag = validate_relay_id(self.opts.relay_id, "--relay-id") if self.opts.relay_id else None
        folder = read_relay_id(self.opts.trust) if self.opts.trust else None
        if flag and folder and flag != folder:
            raise UserError(f"--relay-id {flag} disagrees with the trust folder's relay id {folder}", self.opts.trust)
        return flag or folder

    def _check_position(self, bundle) -> None:
        """The chain grows by exactly one hop per site: a site writing hop N (``--hop``, default its
        task_id) accepts only a bundle with N-1 hops."""
        hop = self.opts.hop or self.cfg.tasks[0].dataset.kwargs.task_id
        if hop is None:
            return
        arrived = len(bundle.hops)
        if arrived != hop - 1:
            raise VerificationError(
                f"this site writes hop {hop} (--hop, default its task_id) so it expects a bundle with {hop - 1} hop(s), "
                f"but this one has {arrived} (last: {bundle.hops[-1]['site']})",
                bundle.path,
            )

    def _ledger(self, site: str, relay_id: str):
        """What this site last received or wrote in relay ``relay_id``: refuses rollbacks and forks.

        Kept at one fixed place per site, whatever the working directory: ``--ledger DIR``, else
        ``ledger/`` beside the site's key, else ``ledger/`` in the trust folder; the file is
        ``<relay_id>.<site>.json``, with the site its key was made for (else the config's site name).
        None (no ledger) when the site has neither key nor trust folder."""
        from relaylearn.bundle import SiteLedger

        folder = self._ledger_folder()
        if folder is None:
            return None
        owner = self.signing_key.site if self.signing_key is not None else site  # a hospital is its key, whatever its config calls the site
        return SiteLedger(folder / f"{relay_id}.{owner}.json")

    def _ledger_folder(self) -> Path | None:
        """The folder of the site ledger (see :meth:`_ledger`); None without key and trust folder."""
        if self.opts.ledger:
            return Path(self.opts.ledger)
        if self.opts.key:
            return Path(self.opts.key).resolve().parent / "ledger"
        if self.opts.trust:
            return Path(self.opts.trust).resolve() / "ledger"
        return None

    # -- main loop --
    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if self._lock is not None:  # the run folder is free again, also after an error
                self._lock.close()
                self._lock = None

    def _run(self) -> RunResult:
        started = time.time()
        self._prepare()
        sites = [d.site for d in self.cfg.test_datasets]
        strategy_cls = get_strategy_class(self.cfg.tasks[0].strategy.name)
        groups = self._groups()

        matrix_path = self.run_dir / "metrics" / "matrix.json"
        previous = json.loads(matrix_path.read_text()) if (self.opts.resume and matrix_path.is_file()) else None
        rows: list[list[float]] = []
        trained: list[str] = []
        trained_cols: list[list[int]] = []
        per_class: dict[str, Any] = {}
        val_rows: list[list[float] | None] = []  # Dice on each relay site's validation part, per hop
        summary: list[dict] = []
        per_image: list[dict] = []
        bundles: list[Path] = []

        parent = self.incoming  # the bundle this site starts from
        from_outside = True  # parent came from another site (or --in / checkpoint.load), not from this run
        earlier_rows = self._earlier_results() if self.opts.resume else {}
        deployed = self.opts.in_bundle is not None or self.signing_key is not None
        self._fidelity = self._fidelity_recorder(strategy_cls)

        def add_results(task_id: int, site_name: str, results: dict) -> None:
            for test_site, res in results.items():
                summary.append(summary_row(task_id, site_name, test_site, res))
                per_image.extend(per_image_rows(task_id, site_name, test_site, res))
                per_class.setdefault(site_name, {})[test_site] = class_dice(res)

        def write_metrics() -> None:  # before the site's bundle: a bundle on disk always has its row
            matrix = self._add_validation(matrix_json(sites, trained, rows, trained_cols, per_class), groups[: len(rows)], val_rows)
            atomic_write(matrix_path, json.dumps(matrix, indent=2))
            write_results_csv(self.run_dir / "test_results" / f"results_{self.stamp}.csv", summary)
            write_results_csv(self.run_dir / "test_results" / f"per_image_{self.stamp}.csv", per_image)

        for position, group in enumerate(groups):
            task = group[0]
            task_id = task.dataset.kwargs.task_id
            site_name = "+".join(t.dataset.site for t in group)
            bundle_path = self.run_dir / "bundles" / f"task_{task_id}.relay"
            if task.checkpoint.load and position == 0 and parent is None:
                load = Path(task.checkpoint.load)
                parent = self._read_bundle(load if load.is_absolute() else self.run_dir / load, allow_unsigned=not self.signed and self.trust is None)
                check_bundle_fits(parent, task)
            columns = [sites.index(t.dataset.site) for t in group if t.dataset.site in sites]
            if self.opts.resume and bundle_path.is_file():
                parent, from_outside = self._read_bundle(bundle_path, allow_unsigned=not self.signed, own=True), False
                kept = _previous_hop(previous, position, site_name, sites)
                if kept is not None and task_id in earlier_rows:
                    row, val_row, site_class = kept
                    summary.extend(earlier_rows[task_id][0])
                    per_image.extend(earlier_rows[task_id][1])
                    if site_class is not None:
                        per_class[site_name] = site_class
                else:  # a bundle without its metrics (a run stopped between the two, by an older relaylearn): evaluate it again
                    self._log(f"[{site_name}] the run's metrics lack this site: evaluating its bundle again")
                    row, results, val_row = self._evaluate(restore_strategy(task, parent).solver, task, inference_device(self.opts.devices), site_name)
                    add_results(task_id, site_name, results)
                rows.append(row)
                val_rows.append(val_row)
                trained.append(site_name)
                trained_cols.append(columns)
                ledger = self._ledger(task.dataset.site, parent.manifest["relay_id"]) if deployed and is_main_process() else None
                if ledger is not None and not ledger.knows(parent.lineage):  # the run stopped before it recorded its own bundle
                    ledger.record(parent, written=True)
                self._log(f"[{site_name}] already trained (bundle {bundle_path}), skipping")
                bundles.append(bundle_path)
                if is_main_process():  # a run stopped after this bundle, before the site's last steps
                    hop_number = _hop_number(parent, position)
                    if task.audit.after_each_hop and strategy_cls.replays() and not _audited(self.run_dir, hop_number):
                        self._privacy_audit(restore_strategy(task, parent), hop_number, site_name)
                    self._remove_resume_point(task)
                continue
            if parent is not None and from_outside and deployed and is_main_process():
                ledger = self._ledger(task.dataset.site, parent.manifest["relay_id"])
                if ledger is not None:
                    ledger.check(parent)
                    ledger.record(parent)
            hop = self._train_site(group, parent, position)
            strategy = hop.strategy
            rows.append(hop.row)
            val_rows.append(hop.validation)
            trained.append(site_name)
            trained_cols.append(columns)
            add_results(task_id, site_name, hop.results)
            bundles.append(bundle_path)
            if not is_main_process():  # DDP worker: wait for rank 0's bundle and start the next site from it
                self._sync()
                parent, from_outside = self._read_bundle(bundle_path, allow_unsigned=self.signing_key is None, own=True), False
                continue
            write_metrics()
            parent, from_outside = self._write_bundle(bundle_path, hop, task, parent, site_name), False
            ledger = self._ledger(task.dataset.site, parent.manifest["relay_id"]) if deployed else None
            if ledger is not None:
                try:
                    ledger.record(parent, written=True)
                except UserError as exc:  # checked before training; the disk may still fill up or go away
                    raise UserError(
                        f"{exc.message}; this site's bundle {bundle_path} is kept: fix that, then run the same command again with --resume to record it and finish",
                        exc.path,
                    ) from None
            self._privacy_audit(strategy, _hop_number(parent, position), site_name)
            self._sync()
            self._remove_resume_point(task)
        matrix = self._add_validation(matrix_json(sites, trained, rows, trained_cols, per_class), groups[: len(rows)], val_rows)
        self._sync()  # DDP: every rank has finished training before rank 0 reports
        if not is_main_process():
            return RunResult(self.run_dir, matrix, bundles, time.time() - started, is_main=False)
        write_metrics()
        if self.opts.out_bundle and bundles:
            try:
                atomic_write(Path(self.opts.out_bundle), bundles[-1].read_bytes())
            except UserError as exc:  # checked before training; the disk may still fill up or go away
                raise UserError(f"{exc.message}; the bundle this site wrote is {bundles[-1]}: copy that file instead", exc.path) from None
        return RunResult(self.run_dir, matrix, bundles, time.time() - started, privacy_flagged=self._privacy_flagged())

    def _remove_resume_point(self, task: TaskConfig) -> None:
        """The site is done: its resume point is its bundle now."""
        stale = self._checkpoint_dir(task) / "last.ckpt"
        stale.unlink(missing_ok=True)
        stale.with_suffix(".tmp").unlink(missing_ok=True)  # a checkpoint half-written when a run was killed
        stale.with_name(DATA_RECORD).unlink(missing_ok=True)

    def _log(self, msg: str) -> None:
        if not self.opts.quiet and is_main_process():
            print(msg, file=sys.stderr, flush=True)

    def _sync(self) -> None:
        """DDP: wait until every rank got here (no-op in a single process)."""
        if self._barrier is not None:
            self._barrier()

    def _train_site(self, group: list[TaskConfig], parent, position: int) -> HopOutcome:
        """Restore → fit → evaluate one site (a group of several for pooled training)."""
        task = group[0]
        seed = task.site_seed
        seed_site(seed)
        started = utc_now()
        datas = [load_split(t.dataset, "train") for t in group]
        images = torch.cat([d.images for d in datas])
        labels = torch.cat([d.labels for d in datas])
        site_name = "+".join(t.dataset.site for t in group)
        if is_main_process():
            self._check_same_data(task, site_name, images, labels)
        strategy = restore_strategy(task, parent)
        with out_of_memory_as_error("training", task.dataset.kwargs.img_size, task.train.batch_size):
            fit = fit_site(
                strategy,
                images,
                labels,
                task,
                site_name=site_name,
                seed=seed,
                run_dir=self.run_dir,
                checkpoint_dir=self._checkpoint_dir(task),
                devices=self.opts.devices,
                resume=self.opts.resume,
                log=self._log,
                progress=None if self.opts.quiet else f"site {position + 1}/{len(self.cfg.tasks)} {site_name}",
            )
        self._barrier = fit.barrier
        with out_of_memory_as_error("testing the model", task.dataset.kwargs.img_size, task.test.batch_size):
            row, results, validation = self._evaluate(strategy.solver, task, fit.device, site_name)
        tb = fit.tensorboard
        if tb is not None:
            for s, v in zip(results, row):
                tb.add_scalar(f"test/dice_sample/{s}", v, position + 1)
            tb.flush()
        strategy.to("cpu")
        if self._fidelity is not None and len(group) == 1:  # replay fidelity of every earlier site
            log = (lambda tag, value, step: tb.add_scalar(tag, value, step)) if tb is not None else None
            self._fidelity.record(position, site_name, strategy, final_dice(results[site_name]) if site_name in results else None, labels, log)
            if tb is not None:
                tb.flush()
        return HopOutcome(strategy, row, results, validation, started, len(images))

    def _evaluate(self, solver, task: TaskConfig, device, site_name: str) -> tuple[list[float], dict[str, dict], list[float] | None]:
        """(row of R, test site → evaluation, validation row) of ``solver`` after ``site_name``."""
        results = {
            ds.site: evaluate_site(
                solver, self._test_data(ds), ds.kwargs.num_classes, task.test.batch_size, device, task.test.bootstrap, first_scored_class(ds)
            )
            for ds in self.cfg.test_datasets
        }
        row = [final_dice(results[ds.site]) for ds in self.cfg.test_datasets]
        self._log(f"[{site_name}] Dice on " + ", ".join(f"{s}={v:.3f}" for s, v in zip(results, row)))
        return row, results, self._validation_row(solver, device, task.test.batch_size)

    def _earlier_results(self) -> dict[int, tuple[list[dict], list[dict]]]:
        """task id → (its rows of results_*.csv, of per_image_*.csv) written by this run before it
        was stopped (the latest file holding the task wins), to carry into the resumed run's files."""
        import csv

        found: dict[int, tuple[list[dict], list[dict]]] = {}
        folder = self.run_dir / "test_results"
        for results in sorted(folder.glob("results_*.csv"), key=lambda p: p.stat().st_mtime):
            per_image = folder / f"per_image_{results.name.removeprefix('results_')}"
            try:
                summary_rows = list(csv.DictReader(results.open(newline="", encoding="utf-8")))
                image_rows = list(csv.DictReader(per_image.open(newline="", encoding="utf-8"))) if per_image.is_file() else []
            except (OSError, UnicodeDecodeError, csv.Error):
                continue
            for task_id in {row.get("task_id") for row in summary_rows}:
                if task_id and task_id.isdigit():
                    found[int(task_id)] = ([r for r in summary_rows if r["task_id"] == task_id], [r for r in image_rows if r.get("task_id") == task_id])
        return found

    def _check_same_data(self, task: TaskConfig, site_name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Beside a site's resume checkpoint, a record of the data it trains on (count and SHA-256
        of the decoded tensors): a resume on other data is refused (it would neither continue the
        same data order nor equal an uninterrupted run); a fresh start writes the record."""
        import hashlib

        digest = hashlib.sha256()
        for tensor in (images, labels):
            digest.update(tensor.contiguous().numpy().tobytes())
        record = {"images": len(images), "sha256": digest.hexdigest()}
        folder = self._checkpoint_dir(task)
        earlier = folder / DATA_RECORD
        if self.opts.resume and (folder / "last.ckpt").is_file() and earlier.is_file():
            before = json.loads(earlier.read_text())
            if before != record:
                raise DataError(
                    f"the training data of site {site_name} changed since the run stopped ({record['images']} image(s) now, {before.get('images')} before, "
                    "or their pixels differ): restore it to resume, or start a new run with another -n",
                    earlier,
                )
            return
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(earlier, json.dumps(record))

    def _checkpoint_dir(self, task: TaskConfig) -> Path:
        """Where a site's local resume checkpoint ``last.ckpt`` lives (never shipped)."""
        return self.run_dir / "checkpoints" / (task.checkpoint.save.dir if task.checkpoint.save else f"task_{task.dataset.kwargs.task_id}")

    def _validation_row(self, solver, device, batch_size: int) -> list[float] | None:
        """Mean Dice of ``solver`` on the validation part of every relay site (None if a site has none)."""
        from relaylearn.engine import predict_logits
        from relaylearn.metrics import dice_per_image

        if not self._has_validation():
            return None
        row = []
        for task in self.cfg.tasks:
            data = self._validation_data()[task.dataset.site]
            predicted = predict_logits(solver, data.images, batch_size, device).argmax(1)
            row.append(float(dice_per_image(predicted, data.labels, task.dataset.kwargs.num_classes, first_scored_class(task.dataset)).mean()))
        return row

    def _has_validation(self) -> bool:
        return all(t.dataset.kwargs.val_fraction > 0 for t in self.cfg.tasks)

    def _validation_data(self) -> dict[str, Any]:
        """Validation part of every relay site, by site name (decoded once)."""
        if self._val_cache is None:
            self._val_cache = {t.dataset.site: load_split(t.dataset, "val") for t in self.cfg.tasks}
        return self._val_cache

    def _add_validation(self, matrix: dict[str, Any], groups: list[list[TaskConfig]], val_rows: list) -> dict[str, Any]:
        """``matrix`` with ``"validation"``: the same matrix (R, ACC, BWT, forgetting) on the relay
        sites' validation parts, or None when a site has no validation part."""
        if not val_rows or any(r is None for r in val_rows):
            return {**matrix, "validation": None}
        val_sites = [t.dataset.site for t in self.cfg.tasks]
        columns = [[val_sites.index(t.dataset.site) for t in group] for group in groups]
        validation = matrix_json(val_sites, matrix["trained"], val_rows, columns, {})
        validation.pop("per_class")
        return {**matrix, "validation": validation}

    def _privacy_audit(self, strategy: Strategy, hop: int, site_name: str) -> None:
        """What the generators written after this hop reveal about every site so far (metrics/privacy.json)."""
        from relaylearn.audit import audit_after_hop, flagged_checks

        entry = audit_after_hop(strategy, self.cfg.tasks, hop, site_name, self.run_dir)
        if entry is None:
            return
        flagged = flagged_checks({"hops": [entry]})
        message = f"[{site_name}] privacy audit of {len(entry['sites'])} site(s): {flagged} check(s) flagged ({entry['seconds']:.0f} s)"
        if flagged:  # a warning: printed with -q too
            print(f"WARNING: {message}; see {self.run_dir / 'metrics' / 'privacy.json'}", file=sys.stderr, flush=True)
        else:
            self._log(message)

    def _privacy_flagged(self) -> int:
        """Checks flagged in metrics/privacy.json (also by hops of an earlier, resumed part of the run)."""
        from relaylearn.audit import flagged_checks

        path = self.run_dir / "metrics" / "privacy.json"
        return flagged_checks(json.loads(path.read_text())) if path.is_file() else 0

    def _fidelity_recorder(self, strategy_cls):
        """Replay fidelity needs every site on this machine (its oracles) and a replaying strategy."""
        first = self.cfg.tasks[0]
        n = first.test.replay_fidelity_samples
        if (
            n <= 0
            or len(self.cfg.tasks) < 2
            or strategy_cls.pooled_training
            or not strategy_cls.replays()
            or self.opts.in_bundle
            or first.checkpoint.load
            or not is_main_process()
        ):
            return None
        from relaylearn.replay_fidelity import FidelityRecorder

        k = first.dataset.kwargs
        return FidelityRecorder(
            self.run_dir,
            k.num_classes,
            n,
            seed=first.random_seed,
            resume=self.opts.resume,
            out_range=tuple(k.out_range),
            first_class=first_scored_class(first.dataset),
        )

    def _test_data(self, ds: DatasetConfig):
        if ds.site not in self._test_cache:
            self._test_cache[ds.site] = load_split(ds, "test")
        return self._test_cache[ds.site]

    def _write_bundle(self, path: Path, hop: HopOutcome, task: TaskConfig, parent, site_name: str):
        from relaylearn.bundle import write_bundle

        state = hop.strategy.state_to_bundle()
        extra: dict[str, Any] = {}
        if task.bundle.include_metrics:
            extra["metrics"] = {s: r["summary"]["dice_sample"]["mean"] for s, r in hop.results.items()}
        if task.bundle.include_counts:
            extra["num_images"] = hop.num_images
        write_bundle(
            path,
            state.tensors,
            strategy=task.strategy.name,
            config=shipped_config(task),
            registry=state.meta,
            site=self._hop_site(task, site_name),
            hop_started_utc=hop.started_utc,
            parent=parent,
            signing_key=self.signing_key,
            extra=extra or None,
            relay_id=self.relay_id if parent is None else None,
        )
        return self._read_bundle(path, allow_unsigned=self.signing_key is None, own=True)

    def _hop_site(self, task: TaskConfig, site_name: str) -> str:
        """The site a hop names: the signing key's site when signed (a hop is bound to its signer),
        else the dataset's site (``A+B`` for a pooled hop)."""
        if self.signing_key is not None:
            return self.signing_key.site
        return task.dataset.site if "+" not in site_name else site_name


#: beside a site's resume checkpoint: what it trains on (``_check_same_data``)
DATA_RECORD = "data.json"

#: keys a resumed run may change: where the data is, which devices, how often it logs
MAY_CHANGE_ON_RESUME = (
    "dataset.kwargs.root_path",
    "dataset.kwargs.img_folder",
    "train.lightning.",
    "train.log_every_n_steps",
    "train.checkpoint_every_n_steps",
)


def resolved_config(cfg: RunConfig) -> list[dict]:
    """The per-site config a run records in ``resolved_config.yaml``."""
    return [t.model_dump(mode="json") for t in cfg.tasks]


#: option mappings whose keys a config chooses (a key set now and not before is a change)
FREE_FORM_OPTIONS = ("strategy.kwargs.", "model.kwargs.", "train.loss.kwargs.")


def config_changes(run_dir: Path, resolved: list[dict], test_sites: list[str]) -> str:
    """How ``resolved`` (see :func:`resolved_config`) and the ``test_sites`` (the columns of R)
    differ from what the run in ``run_dir`` recorded ("" when they do not, or nothing was
    recorded): up to five ``key: now, before`` items. Keys in :data:`MAY_CHANGE_ON_RESUME` are not
    compared, nor schema fields the earlier run did not have (an older relaylearn)."""
    import yaml

    from relaylearn.recipe import flatten

    changed = []
    try:
        columns = json.loads((run_dir / "metrics" / "matrix.json").read_text())["sites"]
    except (OSError, ValueError, KeyError, TypeError):
        columns = None
    if columns is not None and columns != test_sites:
        changed.append(f"test sites: {', '.join(test_sites)} now, {', '.join(map(str, columns))} before")
    path = run_dir / "resolved_config.yaml"
    if not path.is_file():
        return "; ".join(changed)
    before = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(before, list) or len(before) != len(resolved):
        return f"{len(resolved)} site(s) now, {len(before) if isinstance(before, list) else '?'} before"
    unset = object()
    for old_task, new_task in zip(before, resolved):
        old_flat, new_flat = flatten(old_task), flatten(new_task)
        for key in dict.fromkeys([*new_flat, *old_flat]):
            old, new = old_flat.get(key, unset), new_flat.get(key, unset)
            if old == new or key.startswith(MAY_CHANGE_ON_RESUME):
                continue
            if old is unset and not (key + ".").startswith(FREE_FORM_OPTIONS):
                continue  # a field an older relaylearn did not have
            if {} in (old, new) and unset in (old, new):
                continue  # an empty option mapping: its keys on the other side are the change
            changed.append(f"{key}: {'unset' if new is unset else repr(new)} now, {'unset' if old is unset else repr(old)} before")
    return "; ".join(list(dict.fromkeys(changed))[:5])


def _previous_hop(previous: dict | None, position: int, site_name: str, sites: list[str]) -> tuple[list[float], list[float] | None, dict | None] | None:
    """(row of R, validation row, per-class Dice) of the hop at ``position`` from the matrix.json of
    the run being resumed, if it holds that hop for ``site_name`` with the test sites ``sites`` as
    its columns (None otherwise)."""
    if (
        not previous
        or previous.get("sites") != sites
        or position >= len(previous.get("R") or [])
        or (previous.get("trained") or [])[position : position + 1] != [site_name]
    ):
        return None
    validation = (previous.get("validation") or {}).get("R") or []
    return previous["R"][position], validation[position] if position < len(validation) else None, (previous.get("per_class") or {}).get(site_name)


def _hop_number(bundle, position: int) -> int:
    """The relay hop (from 1) of the bundle this run wrote at ``position`` (0-based) of its sites."""
    return len(bundle.manifest.get("hops", [])) or position + 1


def _audited(run_dir: Path, hop: int) -> bool:
    """Whether ``metrics/privacy.json`` holds the privacy audit after ``hop``."""
    try:
        return any(h.get("hop") == hop for h in json.loads((run_dir / "metrics" / "privacy.json").read_text())["hops"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def run_training(cfg: RunConfig, name: str, opts: TrainOptions) -> RunResult:
    quiet_lightning()
    result = RelayRun(cfg, name, opts).run()
    if not result.is_main:
        raise SystemExit(0)  # a DDP worker that Lightning re-executed: rank 0 prints and writes the report
    return result

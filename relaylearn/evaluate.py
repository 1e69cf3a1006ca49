"""``relaylearn test``: evaluate the solver of a saved bundle on the configured test sites."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from relaylearn.assembly import first_scored_class, load_split, local_plugins, provenance, read_any_bundle, strategy_from_bundle
from relaylearn.config import RunConfig
from relaylearn.devices import inference_device
from relaylearn.errors import UserError
from relaylearn.files import EXPS_ROOT, atomic_write, check_output_name, local_stamp, software_versions, utc_now
from relaylearn.results import per_image_rows, summary_row, write_results_csv


def run_test(
    cfg: RunConfig,
    name: str,
    bundle: str | None = None,
    trust: str | None = None,
    devices: str | None = None,
    exps_root: Path = EXPS_ROOT,
    no_verify: bool = False,
) -> Path:
    """Evaluate each task's bundle (or ``bundle``) on every test site; returns the results CSV.

    A ``bundle`` from elsewhere needs ``trust`` (or ``no_verify``); the run's own bundles are read
    unverified when no ``trust`` is given. ``results_<stamp>.json`` records which were verified,
    the config, test sites, bootstrap size, command and software versions."""
    from relaylearn.engine import evaluate_site
    from relaylearn.strategies import get_strategy_class

    name = name.lstrip("=")
    check_output_name(name, "run")
    run_dir = Path(exps_root) / cfg.name / name
    task_ids = [t.dataset.kwargs.task_id for t in cfg.tasks]
    if get_strategy_class(cfg.tasks[0].strategy.name).pooled_training:
        task_ids = task_ids[:1]  # one model for all sites, written as the first task's bundle
    paths = [Path(bundle)] if bundle else [run_dir / "bundles" / f"task_{tid}.relay" for tid in task_ids]
    device = inference_device(devices, cfg.tasks[0].train.lightning)
    summary, per_image = [], []
    test_data = {ds.site: load_split(ds, "test") for ds in cfg.test_datasets}
    sources = []
    for task_id, path in zip(task_ids, paths):
        b = read_any_bundle(path, trust, no_verify=no_verify or bundle is None)
        sources.append(provenance(b))
        if bundle:  # a given bundle: its rows are numbered by the hops it has been through
            task_id = len(b.manifest.get("hops", [])) or task_id
        strategy, task = strategy_from_bundle(b, local_plugins(cfg))
        solver = strategy.solver.to(device)
        trained = "+".join(h["site"] for h in b.manifest.get("hops", [])[-1:]) or f"task_{task_id}"
        for ds in cfg.test_datasets:
            if ds.kwargs.num_classes != task.dataset.kwargs.num_classes:
                raise UserError(f"test site {ds.site} has {ds.kwargs.num_classes} classes but the model predicts {task.dataset.kwargs.num_classes}", cfg.path)
            res = evaluate_site(
                solver, test_data[ds.site], ds.kwargs.num_classes, cfg.tasks[0].test.batch_size, device, cfg.tasks[0].test.bootstrap, first_scored_class(ds)
            )
            summary.append(summary_row(task_id, trained, ds.site, res))
            per_image.extend(per_image_rows(task_id, trained, ds.site, res))
            d = res["summary"]["dice_sample"]
            print(f"{trained} on {ds.site}: Dice {d['mean']:.4f} [{d['low']:.4f}, {d['high']:.4f}] (n={len(res['per_image'])})")
    stamp = local_stamp()
    out = run_dir / "test_results" / f"results_{stamp}.csv"
    write_results_csv(out, summary)
    record = {
        "bundles": sources,
        "config": cfg.name,
        "config_path": str(cfg.path),
        "test_sites": [ds.site for ds in cfg.test_datasets],
        "bootstrap": cfg.tasks[0].test.bootstrap,
        "utc": utc_now(),
        "argv": sys.argv,
        "versions": software_versions(detailed=True),
    }
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_results_csv(run_dir / "test_results" / f"per_image_{stamp}.csv", per_image)
    return out

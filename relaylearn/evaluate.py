"""``relaylearn test``: evaluate the solver of a saved bundle on the configured test sites.

The test sites are prepared as the bundle's model was trained (:func:`relaylearn.recipe.test_sites_for`):
preprocessing keys the local config leaves unset take the bundle's values (a note says which), one
it sets to another value stops the run (exit code 2) naming the key and both values. A model that
would not fit in memory at the bundle's ``img_size`` is refused before any pass (exit code 3, or 2
when the local config sets that size); test batches shrink to what fits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from relaylearn.assembly import first_scored_class, load_split, local_plugins, provenance, read_any_bundle, strategy_from_bundle
from relaylearn.config import RunConfig
from relaylearn.devices import inference_device
from relaylearn.files import EXPS_ROOT, atomic_write, check_output_name, check_writable_folder, local_stamp, software_versions, utc_now
from relaylearn.memory import fitting_batch, out_of_memory_as_error
from relaylearn.results import per_image_rows, summary_row, write_results_csv


def run_test(
    cfg: RunConfig,
    name: str,
    bundle: str | None = None,
    trust: str | None = None,
    devices: str | None = None,
    exps_root: Path = EXPS_ROOT,
    no_verify: bool = False,
    quiet: bool = False,
) -> Path:
    """Evaluate each task's bundle (or ``bundle``) on every test site; returns the results CSV
    (``quiet``: without a line per site).

    A ``bundle`` from elsewhere needs ``trust`` (or ``no_verify``); the run's own bundles are read
    unverified when no ``trust`` is given. ``results_<stamp>.json`` records which were verified,
    the config, test sites, bootstrap size, command and software versions."""
    from relaylearn.engine import evaluate_site
    from relaylearn.recipe import test_sites_for
    from relaylearn.strategies import get_strategy_class

    name = name.lstrip("=")
    check_output_name(name, "run")
    run_dir = Path(exps_root) / cfg.name / name
    check_writable_folder(run_dir / "test_results")  # before any pass: results that cannot be written are lost
    task_ids = [t.dataset.kwargs.task_id for t in cfg.tasks]
    if get_strategy_class(cfg.tasks[0].strategy.name).pooled_training:
        task_ids = task_ids[:1]  # one model for all sites, written as the first task's bundle
    paths = [Path(bundle)] if bundle else [run_dir / "bundles" / f"task_{tid}.relay" for tid in task_ids]
    device = inference_device(devices, cfg.tasks[0].train.lightning)
    summary, per_image = [], []
    test_data: dict[str, tuple] = {}  # site → (its config, its decoded test split)
    sources = []
    for task_id, path in zip(task_ids, paths):
        b = read_any_bundle(path, trust, no_verify=no_verify or bundle is None)
        sources.append(provenance(b))
        if bundle:  # a given bundle: its rows are numbered by the hops it has been through
            task_id = len(b.manifest.get("hops", [])) or task_id
        strategy, task = strategy_from_bundle(b, local_plugins(cfg))
        test_sites, adopted = test_sites_for(cfg, task)
        if adopted:
            print(f"note: testing with the bundle's {', '.join(f'{k} {v}' for k, v in adopted.items())} (the local config leaves them unset)")
        img_size = task.dataset.kwargs.img_size
        size_from = {"bundle": b.path} if "dataset.kwargs.img_size" in adopted else {"path": cfg.path}
        batch = fitting_batch(img_size, cfg.tasks[0].test.batch_size, device, **size_from)
        solver = strategy.solver.to(device)
        trained = "+".join(h["site"] for h in b.manifest.get("hops", [])[-1:]) or f"task_{task_id}"
        for ds in test_sites:
            if test_data.get(ds.site, (None,))[0] != ds:
                test_data[ds.site] = (ds, load_split(ds, "test"))
            with out_of_memory_as_error("testing the model", img_size, batch):
                res = evaluate_site(solver, test_data[ds.site][1], ds.kwargs.num_classes, batch, device, cfg.tasks[0].test.bootstrap, first_scored_class(ds))
            summary.append(summary_row(task_id, trained, ds.site, res))
            per_image.extend(per_image_rows(task_id, trained, ds.site, res))
            d = res["summary"]["dice_sample"]
            if not quiet:
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

"""What the report re-runs of a run folder: the final bundle, the test data, and never a plug-in
named by the folder."""

from __future__ import annotations

import builtins
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from relaylearn.config import load_config
from relaylearn.runner import resolved_config
from tests.conftest import make_bundle
from tests.report.conftest import SITES, fake_split, relayed, section_of, write_run


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[int, Path]:
    """hops → the bundle a run writes after that many sites."""
    first = make_bundle(tmp_path_factory.mktemp("bundle") / "task.relay", img=32, seed=2)
    return {1: first, 4: relayed(first, 4)}


def _rerun_config(run: Path, *changes: str) -> None:
    """resolved_config.yaml as ``train --set CHANGE ...`` writes it (config.yaml stays as given)."""
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config(load_config(str(run / "config.yaml"), list(changes)))))


def _page(run: Path, monkeypatch) -> str:
    from relaylearn.report import build_report, samples

    monkeypatch.setattr(samples, "load_test_split", lambda run, site, task, cache: fake_split(site))
    return build_report(run)


def test_a_plug_in_named_by_the_run_folder_is_never_imported(tmp_path, monkeypatch, bundles):
    (tmp_path / "evil_layout.py").write_text("import builtins\nbuiltins.EVIL_IMPORTED = True\nclass Layout: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = write_run(tmp_path / "seq" / "r", "sequential", SITES[:4], bundle=bundles[4])
    for name in ("config.yaml", "resolved_config.yaml"):
        text = (run / name).read_text()
        (run / name).write_text(text.replace("name: fundus", "name: evil_layout:Layout"))
    from relaylearn.report import build_report

    page = build_report(run)  # the real test data loader: it would import the layout
    assert "evil_layout" not in sys.modules and not hasattr(builtins, "EVIL_IMPORTED")
    assert "plug-in data layout &#x27;evil_layout:Layout&#x27;: the final model needs the plug-in" in section_of(page, "predictions")
    assert "<img" not in section_of(page, "predictions")
    assert "signer key" in section_of(page, "hops"), "the hop chain needs no plug-in"


def test_the_final_model_is_the_last_trained_rows_bundle_or_none(tmp_path, monkeypatch, bundles):
    run = write_run(tmp_path / "seq" / "r", "sequential", SITES[:4], bundle=bundles[4])
    (run / "bundles" / "task_4.relay").rename(run / "bundles" / "task_3.relay")  # the final one is lost
    predictions = section_of(_page(run, monkeypatch), "predictions")
    assert "no bundles/task_4.relay (the bundle of the last trained row, Domain4)" in predictions and "<img" not in predictions
    shutil.copyfile(bundles[1], run / "bundles" / "task_4.relay")  # a stale bundle of one hop
    predictions = section_of(_page(run, monkeypatch), "predictions")
    assert "bundles/task_4.relay has 1 hop(s) but the run trained 4 site(s)" in predictions and "<img" not in predictions


def test_the_report_shows_what_the_run_trained_with_set_overrides_included(tmp_path, monkeypatch):
    from relaylearn.report import _dataset
    from relaylearn.report.runs import load_run
    from relaylearn.report.samples import load_test_split

    path = write_run(tmp_path / "seq" / "r", "sequential", SITES[:4])
    _rerun_config(path, "strategy.name=lwf", "dataset.kwargs.split_seed=7", "dataset.kwargs.num_classes=4")
    run = load_run(path)
    assert run.strategy == "lwf" and _dataset(run) == ("fundus", 4)
    read = []
    monkeypatch.setattr("relaylearn.assembly.load_split", lambda ds, split: read.append(ds) or fake_split(ds.site))
    task = load_config(str(path / "config.yaml")).tasks[0]
    for site in ("Domain1", "Domain5"):  # a trained site and the test-only one
        load_test_split(run, site, task, {})
    assert [(ds.site, ds.kwargs.split_seed) for ds in read] == [("Domain1", 7), ("Domain5", 7)]

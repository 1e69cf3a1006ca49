"""``relaylearn report``: one self-contained HTML page per run folder (or per demo folder of
several strategies), every image embedded, missing pieces shown as notes; rendered in headless
Chromium when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from relaylearn.config import load_config
from relaylearn.errors import UserError
from relaylearn.runner import resolved_config
from tests.conftest import make_bundle
from tests.report.conftest import (
    IMG,
    SITES,
    ReplayStub,
    assert_self_contained,
    fake_split,
    image_sources,
    images_in,
    relayed,
    section_of,
    write_dofe_site,
    write_run,
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The last bundle of a run training four sites."""
    return relayed(make_bundle(tmp_path_factory.mktemp("bundle") / "task.relay", img=IMG, seed=2), 4)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, bundle) -> Path:
    """exps/demo/<strategy>/x for relay, sequential (with bundles) and joint (no bundle), plus a
    run of another name that must not be included; predictions use fake test data."""
    from relaylearn.report import samples, write_report

    demo = tmp_path_factory.mktemp("exps") / "demo"
    write_run(demo / "relay" / "x", "relay", SITES[:4], seed=1, bundle=bundle)
    write_run(demo / "sequential" / "x", "sequential", SITES[:4], seed=2, bundle=bundle)
    write_run(demo / "joint" / "x", "joint", ["+".join(SITES[:4])], seed=3)
    write_run(demo / "sequential" / "other", "sequential", SITES[:2], seed=4)
    real_loader = samples.load_final_model

    def final_model(bundle):
        model = real_loader(bundle)
        if "relay" in str(bundle.path.parent.parent):
            model.strategy = ReplayStub(model.strategy.solver).eval()
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(samples, "load_final_model", final_model)
        mp.setattr(samples, "load_test_split", lambda run, site, task, cache: fake_split(site))
        return write_report(demo, name="x")


# ----- tests -------------------------------------------------------------------------------------
def test_demo_report_shows_every_strategy_side_by_side(demo_report):
    assert demo_report.name == "report.html" and demo_report.parent.name == "demo"
    page = demo_report.read_text()
    for heading in (
        "Summary",
        "Result matrix R",
        "Dice after each hop",
        "Forgetting per site",
        "Final Dice per test site",
        "Predictions of the final model",
        "Replayed image/mask pairs",
        "Hop chain of the last bundle",
        "Run details",
    ):
        assert f"<h2>{heading}</h2>" in page, heading
    summary = section_of(page, "summary")
    assert all(f"<td>{s}</td>" in summary for s in ("relay", "sequential", "joint")) and "other" not in summary
    assert summary.count("<tr>") == 1 + 3
    assert 'class="num best"' in summary, "best values highlighted"
    joint_row = next(row for row in summary.split("<tr>") if "<td>joint</td>" in row)
    assert joint_row.count('<td class="num">–</td>') == 2, "pooled training: BWT and forgetting not measured, never best"
    n_images = assert_self_contained(page)
    assert (images_in(page, "matrix"), images_in(page, "dice"), images_in(page, "forgetting"), images_in(page, "final")) == (3, 3, 1, 1)
    assert images_in(page, "predictions") == 2 * 5 * 9, "relay + sequential: 5 sites x (worst, median, best) x (image, truth, prediction)"
    assert images_in(page, "replay") == 3 * (6 + 6 + 5 + 5), "3 sites: 6 replayed pairs, 5 real pairs"
    assert n_images == 8 + 90 + 66
    assert "joint: no bundles/task_1.relay (the bundle of the last trained row, Domain1+Domain2+Domain3+Domain4)" in page
    assert "joint: no forgetting per site (pooled training)" in page
    assert "Domain1 → Domain2 → Domain3 → Domain4" in page
    assert page.count("signer key") == 2 and "unsigned (single-machine simulation)" in page
    details = section_of(page, "details")
    assert "<td>precision</td><td>32</td>" in details, "one precision for every site: said once"
    assert "site 4: &lt;b&gt;32&lt;/b&gt;" in details and "<b>32</b>" not in details, "per site where they differ, escaped"
    assert not list(demo_report.parent.glob(".report.html*")), "no temporary file left"


def test_single_run_with_real_test_data_and_missing_pieces(tmp_path, bundle):
    from relaylearn.report import write_report

    data = tmp_path / "data"
    for k, site in enumerate(SITES):
        write_dofe_site(data, site, 5, k)
    run = write_run(tmp_path / "exps" / "demo" / "sequential" / "solo", "sequential", SITES[:4], bundle=bundle, data_root=data)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    assert "relaylearn — demo/sequential / solo" in page
    assert assert_self_contained(page) == 4 + 5 * 9, "heat-map, Dice plot, forgetting, final Dice + predictions"
    predictions = section_of(page, "predictions")
    assert 'class="note"' not in predictions, "data found: no notes"
    assert "worst · domain1_" in predictions and "prediction · Dice" in predictions
    # now remove the data, the bundle and the per-image CSV: the report still works, with notes
    shutil.rmtree(data)
    next((run / "test_results").glob("per_image_*.csv")).unlink()
    page = write_report(run).read_text()
    assert "no per_image_2024-05-01_12-00-00.csv" in page
    assert "Domain1: no per-image scores of the final model" in page
    shutil.rmtree(run / "bundles")
    page = write_report(run).read_text()
    assert "no bundles/task_4.relay" in page and assert_self_contained(page) == 4
    assert "Replayed" not in page, "not a relay run"


def test_report_needs_a_result_matrix(tmp_path, capsys):
    from relaylearn.cli import main
    from relaylearn.report import write_report

    with pytest.raises(UserError, match="no run found"):
        write_report(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "matrix.json").write_text(json.dumps({"sites": ["A"], "trained": ["A"], "R": [[0.5, 0.2]]}))
    assert main(["report", str(tmp_path)]) == 2
    assert "R must have 1 rows of 1 values" in capsys.readouterr().err
    (tmp_path / "metrics" / "matrix.json").write_text(json.dumps({"sites": ["A", "B"], "trained": ["A"], "R": [[0.5, 0.2]]}))
    assert main(["report", str(tmp_path)]) == 0, "a bare matrix is enough"
    page = (tmp_path / "report.html").read_text()
    assert "no test_results/results_*.csv" in page and assert_self_contained(page) >= 2


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium): apt-get install -y chromium")
def test_report_renders_in_headless_chromium(demo_report, tmp_path):
    url = demo_report.resolve().as_uri()
    dom = _chromium("--dump-dom", "--virtual-time-budget=5000", url, tmp=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-images-ok="true"' in body, f"not every image decoded: {body}"
    assert f'data-images-count="{len(image_sources(demo_report.read_text()))}"' in body
    page_errors = [line for line in dom.stderr.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "report.html" in line)]
    assert not page_errors, page_errors

    artefacts = ROOT / "test-artifacts"
    artefacts.mkdir(exist_ok=True)
    shot = artefacts / "report.png"
    result = _chromium("--screenshot=" + str(shot), "--window-size=1280,2000", "--hide-scrollbars", url, tmp=tmp_path / "profile2")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert len(set(im.convert("L").resize((64, 100)).getdata())) > 20, "screenshot is not blank"


def test_replay_fidelity_section_shows_the_matrix_grids_and_drift(tmp_path):
    from relaylearn.imaging import png_bytes
    from relaylearn.report import build_report

    run = write_run(tmp_path / "relay" / "r", "relay", SITES[:3])
    replay = {
        "sites": SITES[:3],
        "fidelity": [[None, None, None], [0.8, None, None], [0.6, 0.7, None]],
        "reference": [0.9, 0.85, 0.8],
        "class_fractions": {
            "real": [[0.8, 0.15, 0.05]] * 3,
            "generated": [[None] * 3, [[0.8, 0.15, 0.05], None, None], [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], None]],
        },
    }
    (run / "metrics" / "replay.json").write_text(json.dumps(replay))
    (run / "metrics" / "replay_samples").mkdir()
    for hop, site in ((2, 1), (3, 1), (3, 2)):
        (run / "metrics" / "replay_samples" / f"hop{hop}_site{site}.png").write_bytes(png_bytes(np.zeros((8, 16, 3), np.uint8)))
    page = build_report(run)
    section = section_of(page, "fidelity")
    assert section.count("<img") == 1 + 3  # the matrix and one grid per earlier site and hop
    assert f"replay drift: {SITES[0]} fell by 0.200" in section
    # class fractions: real vs generated per earlier site, one column per hop that replays
    assert "generated after hop 2" in section and "generated after hop 3" in section and "generated after hop 4" not in section
    cup_row = [row for row in section.split("<tr") if f"<td>{SITES[0]}</td>" in row and ">cup<" in row]
    assert len(cup_row) == 1 and ["5.0 %", "5.0 %", "10.0 %"] == re.findall(r">([\d.]+ %)<", cup_row[0])
    disc_row = [row for row in section.split("<tr") if f"<td>{SITES[1]}</td>" in row and ">disc rim<" in row]
    assert len(disc_row) == 1 and ["15.0 %", "20.0 %"] == re.findall(r">([\d.]+ %)<", disc_row[0]) and "–" in disc_row[0]
    assert_self_contained(page)
    # a run without replay.json has no such section
    assert '<section id="fidelity">' not in build_report(write_run(tmp_path / "seq" / "s", "sequential", SITES[:3]))


def test_an_unfinished_run_says_so_is_never_best_and_counts_only_test_only_sites_as_external(tmp_path):
    from relaylearn.report import build_report

    demo = tmp_path / "demo"
    write_run(demo / "relay" / "x", "relay", SITES[:4], seed=1)
    stopped = write_run(demo / "sequential" / "x", "sequential", SITES[:2], seed=0)  # killed while Domain3 trained
    summary = section_of(build_report(demo, name="x"), "summary")
    assert (
        "2 of 4 configured sites trained (Domain3, Domain4 not yet): the run is unfinished; resume it with: relaylearn train -c demo/sequential --resume"
        in summary
    )
    sequential_row = next(row for row in summary.split("<tr>") if "<td>sequential</td>" in row)
    assert "(unfinished: Domain3, Domain4 not yet)" in sequential_row
    assert "best" not in sequential_row, "its ACC over two sites is the highest, but the run is unfinished"
    R = json.loads((stopped / "metrics" / "matrix.json").read_text())["R"]
    assert f'<td class="num">{R[-1][4]:.3f}</td>' in sequential_row, "external Dice: Domain5 only, not the sites still to train"
    page = build_report(stopped)
    assert "strategy sequential · unfinished: 2 hop(s), Domain3, Domain4 not trained yet" in page


def _legend_colours(uri) -> dict[str, tuple]:
    """Legend label → bar colour of a chart (``uri``: the figure itself, see the test below)."""
    legend = uri.axes[0].get_legend()
    return {text.get_text(): tuple(handle.get_facecolor()) for handle, text in zip(legend.legend_handles, legend.get_texts())}


def test_a_run_has_the_same_colour_in_every_chart(tmp_path, monkeypatch):
    from relaylearn.report import plots
    from relaylearn.report.runs import find_runs

    demo = tmp_path / "demo"
    write_run(demo / "joint" / "x", "joint", ["+".join(SITES[:4])], seed=3)  # no forgetting per site: not in that chart
    write_run(demo / "relay" / "x", "relay", SITES[:4], seed=1)
    write_run(demo / "sequential" / "x", "sequential", SITES[:4], seed=2)
    runs = find_runs(demo, "x")
    monkeypatch.setattr(plots, "data_uri", lambda fig: fig)
    forgetting, final = _legend_colours(plots.forgetting_bars(runs)), _legend_colours(plots.final_dice_bars(runs))
    assert set(forgetting) == {"relay", "sequential"} and set(final) == {"joint", "relay", "sequential"}
    assert all(forgetting[label] == final[label] for label in forgetting)
    assert len(set(final.values())) == 3


def _run_with_matrix(path: Path, trained: list[str], R: list[list[float]]) -> Path:
    (path / "metrics").mkdir(parents=True)
    (path / "metrics" / "matrix.json").write_text(json.dumps({"sites": SITES[:3], "trained": trained, "R": R}))
    return path


def test_an_empty_matrix_or_an_undefined_forgetting_is_a_note_not_a_broken_chart(tmp_path):
    from relaylearn.report import build_report

    page = build_report(_run_with_matrix(tmp_path / "empty", [], []))
    assert "Error" not in page and "no heat-map: R is empty (no site has finished training)" in section_of(page, "matrix")
    assert images_in(page, "matrix") == images_in(page, "dice") == images_in(page, "final") == 0
    page = build_report(_run_with_matrix(tmp_path / "nan", SITES[:2], [[0.8, float("nan"), 0.2], [float("nan"), 0.7, 0.1]]))
    assert images_in(page, "forgetting") == 0 and "no forgetting per site (undefined: R holds NaN)" in section_of(page, "forgetting")


def test_a_failure_note_says_what_failed_even_when_the_message_starts_with_a_blank_line():
    from relaylearn.report import _guarded

    def fail(message: str):
        raise ValueError(message)

    notes: list[str] = []
    for message in ("\nWard_$\\1$\n     ^", ""):  # matplotlib's mathtext error starts with a line break
        _guarded(notes, "heat-map", lambda message=message: fail(message))
    assert notes == ["heat-map: ValueError: Ward_$\\1$", "heat-map: ValueError"]


def test_classes_are_in_numeric_order_and_every_class_has_a_colour(tmp_path):
    from relaylearn.report import _colour_legend, build_report
    from relaylearn.report.runs import load_run

    run = write_run(tmp_path / "seq" / "r", "sequential", SITES[:2])
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config(load_config(str(run / "config.yaml"), ["dataset.kwargs.num_classes=12"]))))
    matrix = json.loads((run / "metrics" / "matrix.json").read_text())
    matrix["per_class"] = {SITES[1]: {s: {f"dice_class_{k}": 0.5 for k in range(1, 12)} for s in SITES}}
    (run / "metrics" / "matrix.json").write_text(json.dumps(matrix))
    header = section_of(build_report(run), "final").split("<thead>")[1].split("</thead>")[0]
    assert re.findall(r"<th>class (\d+)</th>", header) == [str(k) for k in range(1, 12)]
    assert [f"class {k}" in _colour_legend(load_run(run)) for k in (1, 9, 10, 11)] == [True] * 4


def test_no_forgetting_says_why(tmp_path):
    from relaylearn.report import build_report

    def why(name: str, sites: list[str], trained: list[str]) -> str:
        (tmp_path / name / "metrics").mkdir(parents=True)
        R = [[0.5] * len(sites) for _ in trained]
        (tmp_path / name / "metrics" / "matrix.json").write_text(json.dumps({"sites": sites, "trained": trained, "R": R}))
        return section_of(build_report(tmp_path / name), "forgetting")

    assert "no forgetting per site (no test sites)" in why("none", [], SITES[:2])
    assert "no forgetting per site (trained site Domain2 is not among the test sites)" in why("other", ["Domain1", "Domain3"], SITES[:2])

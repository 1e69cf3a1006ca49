"""Privacy audit: a memorising generator is flagged, a noise generator is not; the command's
output, bad input and the per-hop audit of a simulated relay."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from relaylearn.assembly import strategy_from_bundle
from relaylearn.audit import (
    SCHEMA,
    AuditOptions,
    SplitData,
    audit_generated,
    audit_site,
    final_mia_auc,
    generate_site_pairs,
)
from relaylearn.config import load_config
from relaylearn.errors import UserError
from relaylearn.metrics import bootstrap_statistic, roc_auc
from relaylearn.runner import TrainOptions, run_training
from tests.conftest import TINY, one_line_error, run_cli, strict_json, tiny_config


def _site_like(n: int, seed: int) -> SplitData:
    """n smooth random images [n,3,16,16] in [-1,1] with blob masks: train and test of one 'site'."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 8 + 4
    radius = torch.rand(n, generator=g) * 3 + 2
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    labels = (dist < radius[:, None, None]).long() + (dist < radius[:, None, None] / 2).long()
    return SplitData(images, labels)


OPTIONS = AuditOptions(n_generated=300, n_bootstrap=300, seed=1)


def _by(checks, check, space):
    return next(c for c in checks if c["check"] == check and c["space"] == space)


def test_auc_and_bootstrap_helpers():
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5  # ties count one half
    assert roc_auc(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == 0.25
    value, low, high = bootstrap_statistic(roc_auc, [np.arange(50.0), np.arange(50.0) + 10], 500, seed=0)
    assert value == pytest.approx((39 * 40 / 2 + 40 / 2) / 2500)  # 780 wins and 40 ties of 2500 pairs
    assert low < value < high and high - low < 0.4


def test_memorising_generator_is_flagged():
    train, test = _site_like(40, 0), _site_like(40, 1)
    pick = torch.randint(0, 40, (OPTIONS.n_generated,), generator=torch.Generator().manual_seed(2))
    copies = SplitData(train.images[pick], train.labels[pick])  # "generates" training pairs
    # a discriminator that memorised: scores = closeness to the training set
    memorising_d = {"image": lambda x, y: -torch.cdist(x.flatten(1), train.images.flatten(1)).min(1).values}
    checks, picture = audit_generated(copies, train, test, 3, OPTIONS, features=lambda x: x.mean(dim=(2, 3)), discriminators=memorising_d)
    for space in ("image pixels", "image features", "label maps"):
        mem = _by(checks, "memorisation", space)
        assert mem["flagged"] and mem["near_copies"]["value"] > 0.9
        assert mem["ratio_of_medians"]["value"] < 0.1
    for space in ("image pixels", "image features"):
        mia = _by(checks, "membership black box", space)
        assert mia["flagged"] and mia["auc"]["value"] > 0.95
    assert _by(checks, "membership white box", "image discriminator")["auc"]["value"] > 0.95
    assert picture.dtype == np.uint8 and picture.shape == (2 * 16 + 2, 8 * 18, 3)
    # the closest pairs are exact copies: top row equals bottom row
    assert np.array_equal(picture[:16, :16], picture[18:, :16])


def test_without_bootstrap_intervals_memorisation_is_decided_by_the_near_copy_share():
    """n_bootstrap 0 gives no interval (null bounds): the point estimate decides, as for the AUCs."""
    from relaylearn.audit import memorisation_check

    train, test, other = (_site_like(40, seed).images.flatten(1) for seed in (0, 1, 2))
    no_intervals = AuditOptions(n_generated=40, n_bootstrap=0, seed=1)
    copied, _, _ = memorisation_check("image pixels", train, train, test, no_intervals, seed=0)
    assert math.isnan(copied["near_copies"]["low"]) and copied["flagged"] and "interval" not in copied["rule"]
    fresh, _, _ = memorisation_check("image pixels", other, train, test, no_intervals, seed=0)
    assert fresh["near_copies"]["value"] <= 0.05 and not fresh["flagged"]


def test_memorisation_is_flagged_on_the_interval_lower_bound_not_the_point_estimate():
    """A few near copies among many fresh images: the near-copy share (4 of 50 = 8 %) is above the
    5 % reference, but with 50 draws its bootstrap interval reaches well below 5 %, so the check
    must not flag it; without intervals the same share decides and is flagged."""
    from relaylearn.audit import memorisation_check

    train = torch.zeros(1, 2)  # one training point at the origin
    test = torch.tensor([[float(d), 0.0] for d in range(1, 101)])  # test→train distances 1..100: 5th percentile 5.95
    generated = torch.tensor([[0.5, 0.0]] * 4 + [[50.0, 0.0]] * 46)  # 4 near copies (0.5 < 5.95), 46 far
    bounded, _, _ = memorisation_check("image pixels", generated, train, test, AuditOptions(n_generated=50, n_bootstrap=500, seed=1), seed=0)
    assert bounded["near_copy_distance"] == pytest.approx(5.95)
    assert bounded["near_copies"]["value"] == pytest.approx(4 / 50)
    assert bounded["near_copies"]["low"] < 0.05 < bounded["near_copies"]["value"]
    assert not bounded["flagged"], "the lower bound, not the point estimate, decides"
    point, _, _ = memorisation_check("image pixels", generated, train, test, AuditOptions(n_generated=50, n_bootstrap=0, seed=1), seed=0)
    assert point["flagged"], "without an interval the share itself decides"


@pytest.mark.parametrize("threshold, flagged", [(0.7, True), (0.8, False)])
def test_membership_verdict_follows_the_threshold(threshold, flagged):
    """Members (2, 4) against non-members (1, 3): 3 of the 4 pairs rank the member higher, AUC 0.75."""
    from relaylearn.audit import membership_check

    options = AuditOptions(n_generated=2, n_bootstrap=0, threshold=threshold)
    check = membership_check("membership black box", "image pixels", np.array([2.0, 4.0]), np.array([1.0, 3.0]), options, seed=0)
    assert check["auc"]["value"] == pytest.approx(0.75)
    assert check["flagged"] is flagged
    assert f"{threshold:.2f}" in check["rule"]


def test_noise_generator_is_not_flagged():
    train, test = _site_like(60, 0), _site_like(60, 1)
    g = torch.Generator().manual_seed(3)
    noise = SplitData(torch.rand(OPTIONS.n_generated, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 3, (OPTIONS.n_generated, 16, 16), generator=g))
    checks, _ = audit_generated(noise, train, test, 3, OPTIONS, features=lambda x: x.mean(dim=(2, 3)))
    assert not any(c["flagged"] for c in checks), [c for c in checks if c["flagged"]]
    for check in checks:
        if "auc" in check:
            assert check["auc"]["low"] < 0.5 < check["auc"]["high"]
        elif check["space"] != "image features":  # (channel means of noise can land near a real image's)
            assert check["near_copies"]["value"] == 0.0 and check["ratio_of_medians"]["value"] > 1


def test_a_zero_median_distance_gives_null_figures_in_strict_json_without_warnings():
    """A test split whose images all equal training images (duplicates across the split, or
    blank CT slices) puts the median test→train distance at 0, so the ratio of medians is
    undefined; the audit writes null for it, not the NaN / Infinity that strict JSON readers
    reject, and numpy does not warn along the way."""
    import warnings

    from relaylearn.audit import memorisation_check
    from relaylearn.files import json_text

    train = torch.eye(12)
    test = train[:8].clone()  # exact copies: every test→train distance is 0
    generated = 2 * torch.eye(12)[torch.arange(20) % 12]  # each at distance 1 from its nearest training row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check, distances, _ = memorisation_check("image pixels", generated, train, test, OPTIONS, seed=0)
    assert torch.all(distances == 1.0)
    assert check["ratio_of_medians"]["value"] == math.inf
    written = strict_json(json_text(check))
    assert written["ratio_of_medians"]["value"] is None and written["near_copy_distance"] == 0.0


# ----- a real (tiny) relay run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relay_run(tmp_path_factory, tiny_fundus):
    """A 2-site tiny relay trained once, with the per-hop audit on (small M)."""
    folder = tmp_path_factory.mktemp("audit_run")
    cfg = load_config(str(tiny_config(folder, tiny_fundus, strategy="relay", steps=2, strategy_kwargs=TINY)), ["audit.n_generated=40", "audit.n_bootstrap=50"])
    result = run_training(cfg, "r", TrainOptions(quiet=True, exps_root=folder / "exps"))
    return result, tiny_fundus, folder


def test_generated_pairs_are_deterministic_and_leave_the_global_rng_alone(relay_run):
    from relaylearn.bundle import read_bundle

    result, _, _ = relay_run
    strategy, _ = strategy_from_bundle(read_bundle(result.bundles[-1], trust=None, allow_unsigned=True))
    state = torch.random.get_rng_state()
    a = generate_site_pairs(strategy, 1, 7, seed=5, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate_site_pairs(strategy, 1, 7, seed=5, batch_size=3)
    assert a[0].shape == (7, 3, 32, 32) and a[1].shape == (7, 32, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], generate_site_pairs(strategy, 0, 7, seed=5)[0])  # the site id conditions them
    with pytest.raises(UserError, match="not in the bundle's site registry"):
        audit_site(strategy, "Elsewhere", SplitData(a[0], a[1]), SplitData(b[0], b[1]), OPTIONS, True)


def test_per_hop_audit_covers_every_site_so_far(relay_run):
    result, _, _ = relay_run
    privacy = json.loads((result.run_dir / "metrics" / "privacy.json").read_text())
    assert privacy["schema"] == SCHEMA
    assert [h["hop"] for h in privacy["hops"]] == [1, 2]
    assert [sorted(h["sites"]) for h in privacy["hops"]] == [["Domain1"], ["Domain1", "Domain2"]]
    site = privacy["hops"][1]["sites"]["Domain1"]
    assert site["n_generated"] == 40 and site["discriminators_audited"] is True
    assert {(c["check"], c["space"]) for c in site["checks"]} >= {("membership white box", "image discriminator"), ("memorisation", "image features")}
    assert (result.run_dir / "metrics" / site["closest_pairs_png"]).is_file()
    assert 0.0 <= final_mia_auc(privacy) <= 1.0


def test_audit_command_json_schema(relay_run, tmp_path):
    result, data, _ = relay_run
    out = run_cli(
        tmp_path, "audit", result.bundles[-1], "--site", "Domain2", "--data-root", data, "--n-generated", "30", "--json", "--no-verify", "--out", tmp_path / "a"
    )
    assert out.code == 0, out.err
    report = json.loads(out.out)
    assert report["schema"] == SCHEMA and report["site"] == "Domain2" and report["site_id"] == 1
    assert (
        report["n_generated"] == 30 and report["threshold"] == 0.6 and report["n_train"] == 5 and report["n_test"] == 4
    )  # 6 training images, 1 held out for validation (val_fraction 0.15)
    spaces = {(c["check"], c["space"]) for c in report["checks"]}
    assert spaces == {
        ("memorisation", "image pixels"),
        ("memorisation", "image features"),
        ("memorisation", "label maps"),
        ("membership black box", "image pixels"),
        ("membership black box", "image features"),
        ("membership black box", "label maps"),
        ("membership white box", "image discriminator"),
        ("membership white box", "label discriminator"),
    }
    for c in report["checks"]:
        figures = [c["auc"]] if "auc" in c else [c["near_copies"], c["ratio_of_medians"]]
        assert all(set(f) == {"value", "low", "high"} for f in figures)
        assert isinstance(c["flagged"], bool) and c["rule"]
        if c["check"] == "memorisation":
            d = c["distributions"]
            assert len(d["quantiles"]) == len(d["generated_to_train"]) == len(d["test_to_train"])
    assert report["bundle"]["hops"] == ["Domain1", "Domain2"]
    assert (tmp_path / "a" / "Domain2.json").is_file() and (tmp_path / "a" / "Domain2_closest_pairs.png").is_file()
    text = run_cli(
        tmp_path, "audit", result.bundles[-1], "--site", "Domain2", "--data-root", data, "--n-generated", "30", "--no-verify", "--out", tmp_path / "b"
    )
    assert text.code == 0 and "membership white box (image discriminator)" in text.out and "verdict:" in text.out


@pytest.mark.parametrize("case", ["unknown site", "missing root", "missing site folder", "missing bundle", "bad threshold"])
def test_audit_bad_input_exits_2_with_one_line(relay_run, tmp_path, case):
    result, data, _ = relay_run
    bundle, site, root, extra = result.bundles[-1], "Domain1", data, []
    if case == "unknown site":
        site = "Domain9"
    elif case == "missing root":
        root = tmp_path / "nowhere"
    elif case == "missing site folder":
        root = tmp_path / "empty"
        root.mkdir()
    elif case == "missing bundle":
        bundle = tmp_path / "none.relay"
    else:
        extra = ["--threshold", "1.5"]
    out = run_cli(tmp_path, "audit", bundle, "--site", site, "--data-root", root, "--no-verify", "--out", tmp_path / "o", *extra)
    assert out.code == 2
    line = one_line_error("\n".join(ln for ln in out.err.splitlines() if "signature not checked" not in ln and "read_any_bundle" not in ln))
    assert {"unknown site": "Domain9", "missing root": "nowhere", "missing site folder": "empty", "missing bundle": "none.relay", "bad threshold": "1.5"}[
        case
    ] in line
    assert not (tmp_path / "o").exists()


def test_audit_checks_its_out_folder_first_and_replaces_an_earlier_audit_only_with_overwrite(relay_run, tmp_path):
    result, data, _ = relay_run
    audit = ["audit", result.bundles[-1], "--site", "Domain1", "--data-root", data, "--no-verify", "--n-generated", "20", "--out"]
    (tmp_path / "r.sh").write_text("echo\n")
    blocked = run_cli(tmp_path, *audit, tmp_path / "r.sh")
    assert blocked.code == 2 and one_line_error(blocked.err).endswith("r.sh: is a file; --out names a folder")
    assert run_cli(tmp_path, *audit, tmp_path / "a").code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    again = run_cli(tmp_path, *audit, tmp_path / "a", "--seed", "3")
    assert again.code == 2 and "Domain1.json: already exists (an earlier audit): pass --overwrite" in one_line_error(again.err)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    replaced = run_cli(tmp_path, *audit, tmp_path / "a", "--seed", "3", "--overwrite")
    assert replaced.code == 0, replaced.err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(before) and (tmp_path / "a" / "Domain1.json").read_bytes() != before["Domain1.json"]


def test_report_has_a_privacy_section_per_site_per_hop(relay_run):
    from relaylearn.report import build_report

    result, _, _ = relay_run
    page = build_report(result.run_dir)
    section = page.split('<section id="privacy">', 1)[1].split("</section>", 1)[0]
    assert section.count("<tr>") == 1 + 3  # header + (hop 1: Domain1) + (hop 2: Domain1, Domain2)
    assert "white-box AUC, image D" in section and section.count("data:image/png;base64,") == 2  # closest pairs, 2 sites


def test_closest_pairs_picture_maps_the_data_range_to_black_and_white():
    from relaylearn.audit import closest_pairs_picture

    black, white = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    picture = closest_pairs_picture(black, white, torch.zeros(1), torch.zeros(1, dtype=torch.long), out_range=(0.0, 1.0))
    assert picture[:2, :2].max() == 0 and picture[4:, :2].min() == 255  # generated above, its nearest training image below


@pytest.mark.parametrize("n", ["1", "99999999999"])
def test_the_number_of_generated_pairs_is_bounded_before_anything_is_read(tmp_path, n):
    """99999999999 pairs ran unbounded (only the lower bound was checked)."""
    result = run_cli(tmp_path, "audit", tmp_path / "no.relay", "--site", "A", "--data-root", tmp_path, "--n-generated", n)
    assert result.code == 2
    assert f"--n-generated {n}: expected 2 to 100000 generated pairs" in one_line_error(result.err)
    with pytest.raises(UserError, match="expected 2 to 100000"):
        AuditOptions(n_generated=100_001)


def test_the_per_hop_audit_says_no_discriminators_were_audited_when_none_travel(relay_run, tmp_path):
    """ship_discriminators: false → no white-box check and ``discriminators_audited`` false."""
    from types import SimpleNamespace

    from relaylearn.audit import audit_after_hop
    from relaylearn.bundle import read_bundle

    result, _, _ = relay_run
    strategy, task = strategy_from_bundle(read_bundle(result.bundles[-1], trust=None, allow_unsigned=True))
    strategy.options = strategy.options.model_copy(update={"ship_discriminators": False})
    pairs = generate_site_pairs(strategy, 0, 8, seed=3)
    tasks = [task.model_copy(update={"dataset": task.dataset.model_copy(update={"kwargs": task.dataset.kwargs.model_copy(update={"task_name": "Domain1"})})})]
    entry = audit_after_hop(strategy, tasks, 2, "Domain2", tmp_path, load_split_fn=lambda ds, split: SimpleNamespace(images=pairs[0], labels=pairs[1]))
    site = entry["sites"]["Domain1"]
    assert site["discriminators_audited"] is False and not any(c["check"] == "membership white box" for c in site["checks"])


def test_a_flagged_privacy_check_is_a_warning_even_with_quiet(tmp_path, tiny_fundus, monkeypatch):
    """-q mutes status lines, never a flagged privacy check: a warning per hop and a summary line."""
    import relaylearn.audit as audit

    def flagging(strategy, tasks, hop, trained, run_dir, load_split_fn=None):
        entry = {"hop": hop, "trained": trained, "seconds": 0.0, "sites": {trained: {"flagged": ["membership black box (image pixels)"]}}}
        path = run_dir / "metrics" / "privacy.json"
        hops = json.loads(path.read_text())["hops"] if path.is_file() else []
        path.write_text(json.dumps({"schema": SCHEMA, "hops": [*hops, entry]}))
        return entry

    monkeypatch.setattr(audit, "audit_after_hop", flagging)
    config = tiny_config(tmp_path, tiny_fundus, steps=1)
    out = run_cli(tmp_path, "train", "-c", config, "-n", "q", "-g", "cpu", "-q")
    assert out.code == 0, out.err
    assert "WARNING: [Domain2] privacy audit of 1 site(s): 1 check(s) flagged" in out.err
    assert "privacy: 2 check(s) flagged (" in out.out and "metrics/privacy.json)" in out.out
    assert "Dice on" not in out.err  # the status lines stay muted

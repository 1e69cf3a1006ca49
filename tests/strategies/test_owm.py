"""Orthogonal weight modification: the transposed-conv phase decomposition, output preservation on
earlier inputs for every supported layer (channel counts in ≠ out), the memory refusal, the α
schedule, the bundle round trip and a 2-site tiny relay."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relaylearn.errors import ConfigError
from relaylearn.strategies.owm import ConvTranspose2dOwm, check_projector_memory, projector_plan, select_layers
from tests.conftest import make_site, make_step, make_strategy, read_bundle_tensors, relay_two_sites


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel, stride", [(2, 2), (4, 2), (3, 3), (6, 3)])
def test_transposed_conv_is_one_linear_map_of_the_input_patch_per_phase(kernel, stride):
    cin, cout, n = 3, 5, 4
    module = nn.ConvTranspose2d(cin, cout, kernel, stride, bias=False)
    layer = ConvTranspose2dOwm("up", module)
    weight, x = randn(cin, cout, kernel, kernel, seed=1), randn(2, cin, n, n, seed=2)
    taps = kernel // stride
    assert layer.projector_shapes()["input"] == (cin * taps * taps,) * 2
    phases = layer.phase_matrices(weight)  # [s², out, in·K'²]
    assert torch.equal(layer.from_phase_matrices(phases), weight)
    patches = F.unfold(x, taps, padding=taps - 1)  # [B, in·K'², windows]
    windows = n + taps - 1
    y = F.conv_transpose2d(x, weight, stride=stride)
    assert y.shape[-1] == windows * stride
    for r_h in range(stride):
        for r_w in range(stride):
            per_window = phases[r_h * stride + r_w] @ patches  # [B, out, windows²]
            assert torch.allclose(y[:, :, r_h::stride, r_w::stride].reshape(2, cout, -1), per_window, atol=1e-5)


def per_phase_mean(out: torch.Tensor, stride: int = 2) -> torch.Tensor:
    return torch.stack([out[:, :, i::stride, j::stride].mean((2, 3)) for i in range(stride) for j in range(stride)])


# (module, input shape, what OWM must preserve of the output on an earlier input)
CASES = {
    "linear": (lambda: nn.Linear(5, 3), (1, 5), lambda y: y),
    "conv-mean": (lambda: nn.Conv2d(3, 5, 3, padding=1, stride=2), (1, 3, 6, 6), lambda y: y.mean((2, 3))),
    "conv-one-patch": (lambda: nn.Conv2d(3, 5, 3), (1, 3, 3, 3), lambda y: y),
    "convT-2x2": (lambda: nn.ConvTranspose2d(3, 5, 2, 2), (1, 3, 4, 4), per_phase_mean),
    "convT-one-pixel": (lambda: nn.ConvTranspose2d(6, 2, 2, 2), (1, 6, 1, 1), lambda y: y),
    "convT-k4s2": (lambda: nn.ConvTranspose2d(3, 5, 4, 2), (1, 3, 4, 4), per_phase_mean),
    "batchnorm": (lambda: nn.BatchNorm2d(4), (2, 4, 3, 3), lambda y: y.mean((0, 2, 3))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_keeps_the_output_on_earlier_inputs(case):
    build, shape, protected = CASES[case]
    torch.manual_seed(0)
    owm = make_strategy("owm", build())
    owm.on_site_start(make_site(torch.zeros(1, 1), torch.zeros(1)))
    owm.train()
    layer = owm.solver

    def sgd_step(x, seed, lr=0.5, alpha=1e-9):
        layer.zero_grad()
        out = layer(x)
        (out * randn(*out.shape, seed=seed)).sum().backward()
        owm.update_and_project(alpha)
        with torch.no_grad():
            for p in layer.parameters():
                p.sub_(lr * p.grad)

    # a batch of 4 new inputs: its gradient spans more than the one (mean) direction OWM protects
    earlier, new, unseen = randn(*shape, seed=10), randn(4, *shape[1:], seed=11), randn(*shape, seed=12)
    sgd_step(earlier, seed=20)
    with torch.no_grad():
        before_earlier, before_unseen = protected(layer(earlier)), protected(layer(unseen))
    sgd_step(new, seed=21)
    with torch.no_grad():
        after_earlier, after_unseen = protected(layer(earlier)), protected(layer(unseen))
    change = (after_earlier - before_earlier).abs().max().item()
    assert change < 1e-5 * max(1.0, before_earlier.abs().max().item())
    if case != "batchnorm":  # in training mode BN's mean output is β, which OWM freezes
        assert (after_unseen - before_unseen).abs().max().item() > 1e-2, "the layer still learns elsewhere"


def test_without_projection_the_output_would_change():
    """Control for the test above: the same two steps with a plain gradient move the output."""
    layer = nn.Linear(5, 3)
    earlier = randn(1, 5, seed=10)
    before = layer(earlier).detach()
    out = layer(randn(1, 5, seed=11))
    (out * randn(*out.shape, seed=21)).sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            p.sub_(0.5 * p.grad)
    assert (layer(earlier).detach() - before).abs().max().item() > 1e-2


def unet_like() -> nn.Module:
    """Conv → BN → transposed conv (in ≠ out) → 1×1 conv head: 3-channel images to 3 logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, 2), nn.Conv2d(4, 3, 1))


IMAGES = randn(4, 3, 8, 8, seed=3)
LABELS = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(4))


def test_training_steps_update_projectors_with_the_decaying_alpha():
    owm = make_strategy("owm", unet_like(), alpha=2.0, a_lambda=0.25)
    site = make_site(IMAGES, LABELS, steps=4)
    owm.on_site_start(site)
    assert owm.current_alpha(make_step(site, 0)) == pytest.approx(2.0)
    assert owm.current_alpha(make_step(site, 2)) == pytest.approx(2.0 * 0.25**0.5)
    eye = {name: t.clone() for name, t in owm.projectors.items()}
    assert set(eye) == {"0.input", "1.channels", "3.input", "3.bias", "4.input"}
    assert eye["0.input"].shape == (3 * 9 + 1,) * 2 and eye["3.input"].shape == (6, 6) and eye["1.channels"].shape == (6, 2, 2)
    for t in range(2):
        logs = owm.training_step((IMAGES, LABELS), make_step(site, t))
        assert torch.isfinite(logs["loss"])
    for name, projector in owm.projectors.items():
        assert not torch.allclose(projector, eye[name]), name
        assert torch.allclose(projector, projector.transpose(-1, -2), atol=1e-6), "P stays symmetric"
    owm.on_site_end(site)
    assert not any(m._forward_hooks for m in owm.solver.modules()), "no hooks left on the solver (export, testing)"
    owm.train()
    owm.solver(IMAGES)
    assert all(layer.recorded is None for layer in owm.layers)


def test_inf_gradients_reach_the_optimizer_when_the_loop_does_not_sanitize():
    """Under 16-mixed the loss scaler must see an overflow to skip the step: OWM projects the
    gradients without replacing their infs (as every strategy does there)."""
    from relaylearn.strategies.base import StepContext

    owm = make_strategy("owm", unet_like())
    site = make_site(IMAGES, LABELS)
    owm.on_site_start(site)
    seen = []
    original_step = owm.optimizers[0].step
    owm.optimizers[0].step = lambda *a, **k: seen.append(all(torch.isfinite(p.grad).all() for p in owm.solver.parameters())) or original_step(*a, **k)

    def overflowing_backward(loss):
        loss.backward()
        owm.solver[0].weight.grad[0, 0, 0, 0] = float("inf")

    for sanitize in (True, False):
        owm.training_step((IMAGES, LABELS), StepContext(step=0, global_step=0, epoch=0, site=site, backward=overflowing_backward, sanitize=sanitize))
    assert seen == [True, False]


def test_projector_memory_is_checked_before_allocation(monkeypatch):
    import relaylearn.strategies.owm as owm_module

    with pytest.raises(ConfigError, match=r"1764 bytes.*max_projector_bytes is 1000.*0\.input 21×21"):
        make_strategy("owm", nn.Sequential(nn.Linear(20, 3)), max_projector_bytes=1000)
    owm = make_strategy("owm", nn.Sequential(nn.Linear(20, 3)))
    monkeypatch.setattr(owm_module, "available_host_memory", lambda: 1500)
    with pytest.raises(ConfigError, match="only 1.5 KB of memory is available"):
        owm.on_site_start(make_site(torch.zeros(1, 20), torch.zeros(1)))
    assert len(owm.projectors) == 0, "nothing allocated"
    plan = projector_plan(select_layers(nn.Linear(20, 3), None)[0])
    with pytest.raises(ConfigError, match="only 1.0 KB of memory is available"):
        check_projector_memory(plan, limit=10**9, available=1000)
    assert check_projector_memory(plan, limit=1764, available=None) == 1764


def test_paper_unet_projector_figures():
    from relaylearn.models.unet import UNetResNet18

    unet = UNetResNet18()
    plan = projector_plan(select_layers(unet, None)[0])
    assert sum(size for _, _, size in plan) == 657_820_704
    assert plan[0][:2] == ("decoder.0.conv.0.input", (6913, 6913))
    assert ("encoder.layer4.1.conv1.input", (4608, 4608), 4608**2 * 4) in plan
    decoder_only = projector_plan(select_layers(unet, ["decoder", "head"])[0])
    assert all(name.startswith(("decoder", "head")) for name, _, _ in decoder_only)
    assert sum(size for _, _, size in decoder_only) == 289_705_596


def test_owm_modules_selects_by_prefix_and_rejects_no_match():
    owm = make_strategy("owm", unet_like(), owm_modules=["3", "4"])
    assert [layer.name for layer in owm.layers] == ["3", "4"]
    with pytest.raises(ConfigError, match="owm_modules"):
        make_strategy("owm", unet_like(), owm_modules=["decoder"])


def test_bundle_round_trip():
    owm = make_strategy("owm", unet_like())
    site = make_site(IMAGES, LABELS, steps=2)
    owm.on_site_start(site)
    owm.training_step((IMAGES, LABELS), make_step(site))
    state = owm.state_to_bundle()
    assert {k for k in state.tensors if k.startswith("owm.")} == {f"owm.{n}" for n in owm.projectors.names}
    again = make_strategy("owm", unet_like())
    again.state_from_bundle(state)
    again.on_site_start(make_site(IMAGES, LABELS, position=1))  # must not reset the loaded projectors
    for name, projector in owm.projectors.items():
        assert torch.equal(again.projectors[name], projector)

    partial = make_strategy("owm", unet_like(), owm_modules=["4"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partial.state_from_bundle(state)
    assert partial.projectors.names == ["4.input"] and any("ignoring 4 projector" in str(w.message) for w in caught)
    bad = dict(state.tensors, **{"owm.4.input": torch.eye(3)})
    with pytest.raises(ValueError, match="owm.4.input"):
        make_strategy("owm", unet_like()).state_from_bundle(type(state)(tensors=bad, meta=state.meta))


def test_unsupported_layers_are_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match="groups=1"):
        make_strategy("owm", nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 3, 1)))
    with pytest.raises(ConfigError, match="multiple of the stride"):
        make_strategy("owm", nn.Sequential(nn.ConvTranspose2d(3, 3, 3, 2)))


@pytest.mark.slow
def test_two_site_relay_ships_the_projectors(tmp_path, tiny_fundus):
    result = relay_two_sites(tmp_path, tiny_fundus, "owm", owm_modules=["decoder.4", "head"])
    first, second = (read_bundle_tensors(p) for p in result.bundles)
    names = sorted(k for k in first if k.startswith("owm."))
    assert names and names == sorted(k for k in second if k.startswith("owm."))
    assert all(not k.startswith("owm.encoder") for k in names)
    head = first["owm.head.input"]
    assert head.shape == (65, 65) and not torch.allclose(head, torch.eye(65))
    assert not torch.equal(second["owm.head.input"], head), "site 2 keeps updating P"


# ----- projection: update (the optimizer's step) vs gradient (the original's) under Adam ---------
class PixelLinear(nn.Module):
    """A per-pixel Linear(6 → 3): images [B, 6, H, W] → logits [B, 3, H, W]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def site_b_change_on_site_a(**options) -> float:
    """Train site A then site B (30 batches each) with the Adam the engine builds; return
    |ΔW x̄_A| / (|ΔW| |x̄_A|) for the change ΔW = [W | b] that site B made (0: site A's mean
    response kept, as OWM promises; ≈ 0.3: a random direction)."""
    owm = make_strategy("owm", PixelLinear(), alpha=1e-3, a_lambda=1.0, **options)
    (optimizer,) = owm.optimizers
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == owm.train_cfg.optimizer.lr
    g = torch.Generator().manual_seed(1)
    xa, ya = torch.randn(16, 6, 4, 4, generator=g), torch.randint(0, 3, (16, 4, 4), generator=g)
    xb, yb = torch.randn(16, 6, 4, 4, generator=g) + 1.5, torch.randint(0, 3, (16, 4, 4), generator=g)
    lin = owm.solver.lin

    def weights():
        return torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()

    for position, (x, y, name) in enumerate([(xa, ya, "A"), (xb, yb, "B")]):
        site = make_site(x, y, position=position, steps=30, name=name)
        owm.on_site_start(site)
        owm.train()
        if position == 1:
            before = weights()
        for t in range(30):
            owm.training_step((x, y), make_step(site, t))
        owm.on_site_end(site)
    change = weights() - before
    mean_input_a = torch.cat([xa.mean((0, 2, 3)), torch.ones(1)])
    assert change.norm() > 1e-3, "site B trained"
    return ((change @ mean_input_a).norm() / (change.norm() * mean_input_a.norm())).item()


def test_default_projection_keeps_the_earlier_site_response_under_adam():
    """OWM's guarantee needs ΔW = (step) Pᵀ; Adam's per-element rescaling of a projected gradient
    breaks it (ratio 0.33 before ``projection: update`` existed), projecting the step keeps it."""
    assert site_b_change_on_site_a() < 1e-3  # the default options
    assert make_strategy("owm", PixelLinear()).options.projection == "update"


def test_gradient_projection_under_adam_does_not_keep_it():
    """``projection: gradient`` (the original code) hands the projected gradient to Adam."""
    assert site_b_change_on_site_a(projection="gradient") > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_update_projection_keeps_the_output_of_every_layer_type_under_adam(case):
    build, shape, protected = CASES[case]
    torch.manual_seed(0)
    owm = make_strategy("owm", build(), alpha=1e-9, a_lambda=1.0)
    site = make_site(torch.zeros(1, 1), torch.zeros(1))
    owm.on_site_start(site)
    owm.train()
    layer, (adam,) = owm.solver, owm.optimizers

    def adam_step(x, seed):
        out = layer(x)
        owm.optimize((out * randn(*out.shape, seed=seed)).sum(), adam, make_step(site))

    earlier, new, unseen = randn(*shape, seed=10), randn(4, *shape[1:], seed=11), randn(*shape, seed=12)
    adam_step(earlier, seed=20)
    with torch.no_grad():
        before_earlier, before_unseen = protected(layer(earlier)), protected(layer(unseen))
    for t in range(3):
        adam_step(new, seed=21 + t)
    with torch.no_grad():
        change_earlier = (protected(layer(earlier)) - before_earlier).abs().max().item()
        change_unseen = (protected(layer(unseen)) - before_unseen).abs().max().item()
    assert change_earlier < 1e-6
    assert owm._weights_before_step is None, "the copies are dropped after the step"
    if case != "batchnorm":  # in training mode BN's mean output is β, which OWM freezes
        assert change_unseen > 1e-3, "the layer still learns elsewhere"


def test_update_projection_of_a_step_the_loss_scaler_skipped_changes_nothing():
    from relaylearn.strategies.base import StepContext

    class SkipsNonFinite(torch.optim.Adam):
        def step(self, closure=None):
            if all(torch.isfinite(p.grad).all() for group in self.param_groups for p in group["params"] if p.grad is not None):
                super().step(closure)

    owm = make_strategy("owm", unet_like())
    site = make_site(IMAGES, LABELS)
    owm.on_site_start(site)
    owm.optimizers = [SkipsNonFinite(owm.solver.parameters(), lr=1e-3)]
    weights = {n: p.detach().clone() for n, p in owm.solver.named_parameters()}

    def overflowing_backward(loss):
        loss.backward()
        owm.solver[0].weight.grad[0, 0, 0, 0] = float("inf")

    owm.training_step((IMAGES, LABELS), StepContext(step=0, global_step=0, epoch=0, site=site, backward=overflowing_backward, sanitize=False))
    assert all(torch.equal(p.detach(), weights[n]) for n, p in owm.solver.named_parameters())
    assert not torch.equal(owm.projectors["0.input"], torch.eye(28)), "the projectors were updated"


def test_projection_option_validates_and_round_trips(tmp_path):
    from relaylearn.config import load_config
    from relaylearn.strategies.base import parse_options
    from relaylearn.strategies.owm import OWM
    from tests.conftest import tiny_config

    for value in ("gradient", "update"):
        cfg = load_config(str(tiny_config(tmp_path / value, tmp_path, strategy="owm", strategy_kwargs={"projection": value})))
        options = parse_options(OWM, cfg.tasks[0].strategy.kwargs)
        assert options.projection == value
        assert parse_options(OWM, options.model_dump()) == options
    assert parse_options(OWM, {}).projection == "update"
    with pytest.raises(ConfigError, match="projection"):
        parse_options(OWM, {"projection": "weights"})


def test_bundle_is_the_same_whatever_the_projection():
    states = {}
    for projection in ("update", "gradient"):
        owm = make_strategy("owm", unet_like(), projection=projection)
        site = make_site(IMAGES, LABELS, steps=2)
        owm.on_site_start(site)
        owm.training_step((IMAGES, LABELS), make_step(site))
        owm.on_site_end(site)
        states[projection] = owm.state_to_bundle()
    update, gradient = states["update"], states["gradient"]
    assert update.meta == gradient.meta
    assert {k: v.shape for k, v in update.tensors.items()} == {k: v.shape for k, v in gradient.tensors.items()}
    for name in (k for k in update.tensors if k.startswith("owm.")):  # the projectors see the same first batch
        assert torch.allclose(update.tensors[name], gradient.tensors[name]), name
    again = make_strategy("owm", unet_like(), projection="gradient")
    again.state_from_bundle(update)  # either loads the other's bundle
    assert all(torch.equal(again.projectors[n], update.tensors[f"owm.{n}"]) for n in again.projectors.names)

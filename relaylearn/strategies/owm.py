"""Orthogonal weight modification (OWM; Zeng, Chen, Cui & Yu 2019), as the original's
``strategies/owm.py`` with its two bugs fixed and the projection applied to the optimizer's step.

Every covered layer keeps a projector P (identity at first). Each training step:

1. forward hooks record the layer's mean input vector x̄ over the batch (and over positions);
2. after the backward, P is updated by recursive least squares with
   ``α = alpha · a_lambda^progress`` (progress = fraction of the site done, so α decays from
   ``alpha`` to ``alpha·a_lambda`` within each site)::

       k = P x̄;   P ← P − k kᵀ / (α + x̄ᵀ k)

3. ``projection: update`` (the default): the optimizer steps on the plain gradient; then the
   change it made, written as a matrix ΔW [outputs, d] acting on the input vector, is replaced by
   ``ΔW Pᵀ``, i.e. W ← W_before + (W_after − W_before) Pᵀ (the protected weights are copied
   before the step; a step the fp16 loss scaler skipped changes nothing). ``projection:
   gradient`` (the original code's): the gradient G [outputs, d] is replaced by ``G Pᵀ`` and
   the optimizer steps on that. P is updated on every step of every site.

P shrinks the directions of the inputs seen so far, so a weight change of the form ΔW = M Pᵀ
satisfies ΔW x̄_old ≈ 0: the layer's (mean) response to earlier inputs is preserved. The paper's
update is a plain SGD step on the projected gradient, ΔW = −lr·G·Pᵀ, which has that form; with
plain SGD both projections give exactly this step. The only optimizer here is Adam, which divides every
element of its input by its own running RMS: Adam(G Pᵀ) is no longer of the form M Pᵀ, and a
site's change moves the earlier sites' mean response about as much as a random direction would
(measured on a per-pixel Linear(6 → 3), site B's ΔW: |ΔW x̄_A| / (|ΔW| |x̄_A|) = 0.33 with
``gradient``, 1.5e-5 with ``update``; ≈ 2e-6 with either under SGD). ``update`` projects whatever the
optimizer did (momentum, weight decay, gradient clipping included); Adam's moments then follow
the unprojected gradient.

Layers, with d the projector size (input dimension):

* ``Linear(in, out)``: x̄ = batch-mean input; the bias is the weight of a constant input 1,
  appended as the last input component (its own slot, d = in + 1). The original wrote the linear
  bias' vector into the weight's slot [bug]. (For convolutions, too, the bias is the weight of
  the constant input 1 in the same projector; the original gave every conv bias a projector of
  its own, out×out, fed with the mean output minus the bias.)
* ``Conv2d`` (groups 1, zero padding): x̄ = mean over batch and output positions of the input
  patches (``F.unfold`` with the layer's kernel/stride/padding/dilation), d = in·kh·kw (+1 bias).
  G = [weight.grad.view(out, −1) | bias.grad]. The mean output of the layer is W x̄ + b, so that is
  what is preserved exactly.
* ``ConvTranspose2d`` with ANY channel counts (groups 1, dilation 1, kernel a multiple of the
  stride). The original used out·k·k as the input dimension [bug], which only matched when
  in = out. Derivation, per spatial axis (s = stride, k = kernel, p = padding, K' = k/s)::

      y[o] = b + Σ_i Σ_t x[i] W[t]   over  o = i·s + t − p
      write o + p = q·s + r (0 ≤ r < s) and t = r + s·m (0 ≤ m < K'); then i = q − m:
      y[o] = b + Σ_{m<K'} x[q − m] · W[r + s·m]

  So every output pixel of *phase* r is an ordinary linear map of the K' consecutive input pixels
  ending at q, i.e. of in·K'² numbers in 2-D: the transposed conv is s² ordinary convolutions
  (one per phase r = (r_h, r_w)) that all read the same input patches, which are
  ``F.unfold(x, K', padding=K'−1)`` (window q, element a ↔ m = K'−1−a). Hence one projector
  with d = in·K'² serves all phases; phase r's matrix is
  ``A_r[o, (c, a_h, a_w)] = W[c, o, r_h + s(K'−1−a_h), r_w + s(K'−1−a_w)]``, and G_r ← G_r Pᵀ
  is applied to each phase. For the U-Net's stride = kernel = 2, K' = 1: d = in_channels, the
  per-position input is the in-vector and W[:, :, r_h, r_w] ([in, out]) acts per kernel offset.
  x̄ is the mean over all windows, which is exact for padding = output_padding = 0 (else border
  windows whose outputs are cropped are counted too). The bias is shared by the s² phases, so it
  cannot join the per-phase input vector; it gets its own 1×1 projector fed with the constant 1.
* ``BatchNorm`` (affine): per channel, y_c = γ_c x̂_c + β_c is a 2-input unit with input
  (x̂_c, 1), so each channel has its own 2×2 projector (stored [C, 2, 2]); x̂_c is recovered from
  the output as (ȳ_c − β_c)/γ_c as in the original. (In training mode the batch mean of x̂ is 0,
  so this protects β — the mean output — and leaves γ free.)

Other modules with trainable parameters are not projected (a warning lists them).

**Memory.** A projector is d² floats. The total is computed before anything is allocated; above
``max_projector_bytes`` (default 2 GiB) or the host's available memory the strategy refuses with a
ConfigError naming the largest layers. For the paper's U-Net (ResNet-18 encoder, 3-channel input,
transposed-conv decoder) the 71 projectors of all layers need 657.8 MB (float32), of which the
decoder and head take 289.7 MB and the encoder 368.1 MB. The largest is the first decoder conv
(768·3·3 + 1 = 6913 → 191.2 MB); a 512-channel 3×3 conv without bias has d = 4608 → 84.9 MB
(three of them in ``encoder.layer4``). ``owm_modules``
(name prefixes, e.g. ``[decoder, head]``) restricts OWM to part of the network. The projectors
travel in the bundle (``owm.<module>.<slot>``), so bundles grow by the same amount.

**Memory of ``update``.** A copy of the protected weights lives from just before each optimizer
step to just after it (the solver's size at most: 63.5 MB for the paper's U-Net).

Options and defaults (the original's): ``alpha`` = 1.0, ``a_lambda`` = 0.1, ``owm_modules`` = all
modules, ``max_projector_bytes`` = 2 GiB; ``projection`` = ``update`` (the original: ``gradient``).
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from relaylearn.errors import ConfigError
from relaylearn.memory import available_host_memory, format_bytes
from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import BundleState, SiteContext, StepContext, StrategyOptions, unprefixed
from relaylearn.strategies.penalties import ParameterTensors
from relaylearn.strategies.sequential import Sequential

BUNDLE_PREFIX = "owm."
FLOAT_BYTES = 4


def rls_update(projector: Tensor, x: Tensor, alpha: float) -> None:
    """In place: P ← P − k kᵀ / (α + xᵀk), k = P x. P [..., d, d] symmetric, x [..., d]."""
    k = (projector @ x.unsqueeze(-1)).squeeze(-1)
    denominator = alpha + (x * k).sum(-1)
    projector.sub_(k.unsqueeze(-1) * k.unsqueeze(-2) / denominator[..., None, None])


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class OwmLayer:
    """Projector bookkeeping of one module: the projector shapes, the forward hook that records
    the mean input vector(s), and the gradient projection. Subclasses per module type."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.recorded: dict[str, Tensor] | None = None

    def projector_shapes(self) -> dict[str, tuple[int, ...]]:
        """{slot: shape} of the projectors (``d×d`` or ``[C, 2, 2]``)."""
        raise NotImplementedError

    def input_vectors(self, inputs: tuple[Tensor, ...], output: Tensor) -> dict[str, Tensor]:
        """{slot: mean input vector} of one forward (detached, float32)."""
        raise NotImplementedError

    def project(self, projectors: dict[str, Tensor]) -> None:
        """Replace the module's parameter gradients by G Pᵀ (``projection: gradient``)."""
        bias = self.module.bias.grad if getattr(self.module, "bias", None) is not None else None
        self.project_tensors(self.module.weight.grad, bias, projectors)

    def project_tensors(self, weight: Tensor | None, bias: Tensor | None, projectors: dict[str, Tensor]) -> None:
        """In place: replace ``weight`` and ``bias`` (shaped like the module's weight and bias:
        their gradients, or the change one optimizer step made to them) by M Pᵀ, M being the
        matrix they form acting on the input vector. None: no gradient / no change (a zero in M)."""
        raise NotImplementedError

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.recorded = self.input_vectors(inputs, output)

    def take_recorded(self) -> dict[str, Tensor] | None:
        recorded, self.recorded = self.recorded, None
        return recorded

    def _with_bias(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_ones(1)]) if self.module.bias is not None else x

    def _project_matrix(self, weight_matrix: Tensor, bias: Tensor | None, projector: Tensor) -> tuple[Tensor, Tensor | None]:
        """[W | b] Pᵀ for a module whose bias is the last input component (W: weight-gradient or
        weight-change matrix [out, d − 1]; b: the bias', None for zeros)."""
        module = self.module
        grad = weight_matrix
        if module.bias is not None:
            bias = bias if bias is not None else torch.zeros_like(module.bias)
            grad = torch.cat([grad, bias.reshape(-1, 1).to(grad.dtype)], 1)
        projected = grad @ projector.T.to(grad.dtype)
        if module.bias is None:
            return projected, None
        return projected[:, :-1], projected[:, -1]


class LinearOwm(OwmLayer):
    def projector_shapes(self):
        d = self.module.in_features + (self.module.bias is not None)
        return {"input": (d, d)}

    def input_vectors(self, inputs, output):
        x = inputs[0].detach().float().reshape(-1, self.module.in_features).mean(0)
        return {"input": self._with_bias(x)}

    def project_tensors(self, weight, bias, projectors):
        if weight is None:
            return
        new_weight, new_bias = self._project_matrix(weight, bias, projectors["input"])
        weight.copy_(new_weight)
        if new_bias is not None and bias is not None:
            bias.copy_(new_bias)


class Conv2dOwm(OwmLayer):
    def __init__(self, name: str, module: nn.Conv2d):
        super().__init__(name, module)
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ConfigError(f"common.strategy.kwargs.owm_modules: OWM supports Conv2d with groups=1 and zero padding only ('{name}'); exclude it")
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            elif all((module.dilation[i] * (module.kernel_size[i] - 1)) % 2 == 0 for i in range(2)):
                padding = tuple(module.dilation[i] * (module.kernel_size[i] - 1) // 2 for i in range(2))
            else:
                raise ConfigError(f"common.strategy.kwargs.owm_modules: asymmetric 'same' padding is not supported ('{name}'); exclude it")
        self.padding = _pair(padding)

    def projector_shapes(self):
        m = self.module
        d = m.in_channels * m.kernel_size[0] * m.kernel_size[1] + (m.bias is not None)
        return {"input": (d, d)}

    def input_vectors(self, inputs, output):
        m = self.module
        mean_input = inputs[0].detach().float().mean(0, keepdim=True)
        patches = F.unfold(mean_input, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        return {"input": self._with_bias(patches[0].mean(-1))}

    def project_tensors(self, weight, bias, projectors):
        if weight is None:
            return
        new_weight, new_bias = self._project_matrix(weight.reshape(weight.shape[0], -1), bias, projectors["input"])
        weight.copy_(new_weight.reshape(weight.shape))
        if new_bias is not None and bias is not None:
            bias.copy_(new_bias)


class ConvTranspose2dOwm(OwmLayer):
    """See the module docstring for the phase decomposition."""

    def __init__(self, name: str, module: nn.ConvTranspose2d):
        super().__init__(name, module)
        k, s = module.kernel_size, module.stride
        if module.groups != 1 or tuple(module.dilation) != (1, 1) or any(k[i] % s[i] for i in range(2)):
            raise ConfigError(
                f"common.strategy.kwargs.owm_modules: OWM supports ConvTranspose2d with groups=1, dilation=1 and a kernel "
                f"that is a multiple of the stride ('{name}': kernel {tuple(k)}, stride {tuple(s)}); exclude it"
            )
        self.taps = (k[0] // s[0], k[1] // s[1])  # K' per axis

    def projector_shapes(self):
        m = self.module
        d = m.in_channels * self.taps[0] * self.taps[1]
        shapes = {"input": (d, d)}
        if m.bias is not None:
            shapes["bias"] = (1, 1)
        return shapes

    def input_vectors(self, inputs, output):
        kh, kw = self.taps
        mean_input = inputs[0].detach().float().mean(0, keepdim=True)
        patches = F.unfold(mean_input, (kh, kw), padding=(kh - 1, kw - 1))
        vectors = {"input": patches[0].mean(-1)}
        if self.module.bias is not None:
            vectors["bias"] = patches.new_ones(1)
        return vectors

    def phase_matrices(self, weight: Tensor) -> Tensor:
        """Weight-shaped [in, out, k, k] → the per-phase matrices A_r, [s_h·s_w, out, in·K'h·K'w]."""
        (kh, kw), (sh, sw) = self.taps, self.module.stride
        cin, cout = weight.shape[:2]
        view = weight.reshape(cin, cout, kh, sh, kw, sw).flip(2, 4)  # [c, o, a_h, r_h, a_w, r_w]
        return view.permute(3, 5, 1, 0, 2, 4).reshape(sh * sw, cout, cin * kh * kw)

    def from_phase_matrices(self, phases: Tensor) -> Tensor:
        """Inverse of :meth:`phase_matrices`."""
        (kh, kw), (sh, sw) = self.taps, self.module.stride
        cin, cout = self.module.in_channels, self.module.out_channels
        view = phases.reshape(sh, sw, cout, cin, kh, kw).permute(3, 2, 4, 0, 5, 1).flip(2, 4)
        return view.reshape(cin, cout, kh * sh, kw * sw)

    def project_tensors(self, weight, bias, projectors):
        if weight is not None:
            phases = self.phase_matrices(weight)
            weight.copy_(self.from_phase_matrices(phases @ projectors["input"].T.to(phases.dtype)))
        if bias is not None:
            bias.mul_(projectors["bias"].reshape(()).to(bias.dtype))


class BatchNormOwm(OwmLayer):
    def projector_shapes(self):
        return {"channels": (self.module.num_features, 2, 2)}

    def input_vectors(self, inputs, output):
        m = self.module
        dims = [d for d in range(output.dim()) if d != 1]
        mean_output = output.detach().float().mean(dims)
        gamma, beta = m.weight.detach().float(), m.bias.detach().float()
        safe_gamma = torch.where(gamma.abs() > 1e-12, gamma, torch.ones_like(gamma))
        normalised = torch.where(gamma.abs() > 1e-12, (mean_output - beta) / safe_gamma, torch.zeros_like(gamma))
        return {"channels": torch.stack([normalised, torch.ones_like(normalised)], -1)}  # [C, 2]

    def project_tensors(self, weight, bias, projectors):
        m = self.module
        if weight is None and bias is None:
            return
        weight_part = weight if weight is not None else torch.zeros_like(m.weight)
        bias_part = bias if bias is not None else torch.zeros_like(m.bias)
        grad = torch.stack([weight_part, bias_part.to(weight_part.dtype)], -1).unsqueeze(1)  # [C, 1, 2]
        projected = (grad @ projectors["channels"].transpose(1, 2).to(grad.dtype)).squeeze(1)
        if weight is not None:
            weight.copy_(projected[:, 0])
        if bias is not None:
            bias.copy_(projected[:, 1])


def owm_layer_for(name: str, module: nn.Module) -> OwmLayer | None:
    """The OWM handler of a module, or None when the module type is not supported."""
    if isinstance(module, nn.Linear):
        return LinearOwm(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dOwm(name, module)
    if isinstance(module, nn.ConvTranspose2d):
        return ConvTranspose2dOwm(name, module)
    if isinstance(module, _BatchNorm) and module.affine:
        return BatchNormOwm(name, module)
    return None


def select_layers(solver: nn.Module, prefixes: list[str] | None) -> tuple[list[OwmLayer], list[str]]:
    """(OWM layers, names of trainable parameters left unprojected) for modules whose name starts
    with one of ``prefixes`` (None: every module)."""
    layers, unprojected = [], []
    for name, module in solver.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own or (prefixes is not None and not any(name.startswith(p) for p in prefixes)):
            continue
        layer = owm_layer_for(name, module)
        if layer is None:
            unprojected.extend(f"{name}.{n}" for n in own)
        else:
            layers.append(layer)
    return layers, unprojected


def projector_plan(layers: list[OwmLayer]) -> list[tuple[str, tuple[int, ...], int]]:
    """[(``module.slot``, shape, bytes)] of every projector, largest first."""
    plan = []
    for layer in layers:
        for slot, shape in layer.projector_shapes().items():
            numel = 1
            for n in shape:
                numel *= n
            plan.append((f"{layer.name}.{slot}", shape, numel * FLOAT_BYTES))
    return sorted(plan, key=lambda row: -row[2])


def check_projector_memory(plan: list[tuple[str, tuple[int, ...], int]], limit: int, available: int | None) -> int:
    """Total bytes of ``plan``; ConfigError naming the largest layers when over a limit."""
    total = sum(row[2] for row in plan)
    problems = []
    if total > limit:
        problems.append(f"max_projector_bytes is {limit} ({format_bytes(limit)})")
    if available is not None and total > available:
        problems.append(f"only {format_bytes(available)} of memory is available")
    if problems:
        largest = ", ".join(f"{name} {'×'.join(map(str, shape))} = {format_bytes(size)}" for name, shape, size in plan[:3])
        raise ConfigError(
            f"common.strategy.kwargs: OWM projectors need {total} bytes ({format_bytes(total)}) but {' and '.join(problems)}; "
            f"largest: {largest}. Restrict owm_modules (e.g. [decoder, head]) or raise max_projector_bytes"
        )
    return total


class OWMOptions(StrategyOptions):
    alpha: float = Field(1.0, gt=0, description="RLS regulariser α at the start of each site.")
    a_lambda: float = Field(0.1, gt=0, description="α decays to alpha·a_lambda over a site: α = alpha·a_lambda^progress.")
    owm_modules: Optional[list[str]] = Field(None, description="Module-name prefixes to protect (None: every module).")
    max_projector_bytes: int = Field(2 * 1024**3, ge=0, description="Refuse when the projectors would need more bytes than this.")
    projection: Literal["update", "gradient"] = Field(
        "update",
        description="update: project each optimizer step's weight change (ΔW ← ΔW Pᵀ; OWM's guarantee under Adam too); gradient: project the gradient Adam is given (the original code; Adam's rescaling breaks the guarantee).",
    )


@register_strategy
class OWM(Sequential):
    """Orthogonal weight modification; see the module docstring."""

    name = "owm"
    Options = OWMOptions

    def __init__(self, options, solver, config):
        super().__init__(options, solver, config)
        self.layers, unprojected = select_layers(solver, options.owm_modules)
        if not self.layers:
            raise ConfigError(f"common.strategy.kwargs.owm_modules: no supported module matches {options.owm_modules}")
        if unprojected:
            warnings.warn(f"OWM does not project {len(unprojected)} parameter(s) of unsupported modules: {', '.join(unprojected[:5])}", stacklevel=2)
        self.plan = projector_plan(self.layers)
        self.projector_bytes = check_projector_memory(self.plan, options.max_projector_bytes, None)
        self.projectors = ParameterTensors()
        self._hook_handles: list = []
        #: ``projection: update``: the protected weights before the optimizer step in flight
        self._weights_before_step: list[tuple[Tensor | None, Tensor | None]] | None = None

    def allocate_projectors(self) -> None:
        """Identity projectors for every slot not loaded from a bundle (memory checked first)."""
        missing = [(name, shape, size) for name, shape, size in self.plan if name not in self.projectors]
        if not missing:
            return
        available = available_host_memory()
        check_projector_memory(self.plan, self.options.max_projector_bytes, None if available is None else available + self.projectors.nbytes())
        for name, shape, _ in missing:
            d = shape[-1]
            self.projectors[name] = torch.eye(d).expand(*shape).clone()

    def on_site_start(self, site: SiteContext) -> None:
        super().on_site_start(site)
        self.allocate_projectors()
        self.attach_hooks()

    def on_site_end(self, site: SiteContext) -> None:
        self.detach_hooks()
        super().on_site_end(site)

    def attach_hooks(self) -> None:
        """Record the layers' inputs during training (hooks exist only while a site trains, so a
        solver taken from a bundle for testing or export carries none)."""
        if not self._hook_handles:
            self._hook_handles = [layer.module.register_forward_hook(layer.hook) for layer in self.layers]

    def detach_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for layer in self.layers:
            layer.recorded = None

    def current_alpha(self, step: StepContext) -> float:
        return self.options.alpha * self.options.a_lambda**step.progress

    def layer_projectors(self, layer: OwmLayer, slots=None) -> dict[str, Tensor]:
        return {slot: self.projectors[f"{layer.name}.{slot}"] for slot in (slots if slots is not None else layer.projector_shapes())}

    @torch.no_grad()
    def update_projectors(self, alpha: float, reduce=lambda t: t) -> list[OwmLayer]:
        """RLS-update every layer's projectors with its recorded inputs; returns the layers that had
        some. ``reduce`` averages the input vectors across DDP ranks so the projectors stay identical."""
        updated = []
        for layer in self.layers:
            recorded = layer.take_recorded()
            if recorded is None:
                continue
            projectors = self.layer_projectors(layer, recorded)
            for slot, x in recorded.items():
                rls_update(projectors[slot], reduce(x).to(projectors[slot]), alpha)
            updated.append(layer)
        return updated

    @torch.no_grad()
    def update_and_project(self, alpha: float, reduce=lambda t: t) -> None:
        """RLS-update the projectors, then project the gradients of the layers that ran
        (``projection: gradient``)."""
        for layer in self.update_projectors(alpha, reduce):
            layer.project(self.layer_projectors(layer))

    @torch.no_grad()
    def protected_weights(self) -> list[tuple[Tensor | None, Tensor | None]]:
        """Copies of every protected layer's (weight, bias); None for a missing or frozen one."""

        def copy(p):
            return p.detach().clone() if p is not None and p.requires_grad else None

        return [(copy(layer.module.weight), copy(getattr(layer.module, "bias", None))) for layer in self.layers]

    @torch.no_grad()
    def project_updates(self, before: list[tuple[Tensor | None, Tensor | None]]) -> None:
        """W ← W_before + (W − W_before) Pᵀ for every protected layer (``projection: update``)."""
        for layer, (weight_before, bias_before) in zip(self.layers, before, strict=True):
            if weight_before is None and bias_before is None:
                continue
            weight, bias = layer.module.weight, getattr(layer.module, "bias", None)
            # a frozen weight did not move: a zero change that still fills its slots of the matrix
            weight_change = weight.detach() - weight_before if weight_before is not None else torch.zeros_like(weight)
            bias_change = bias.detach() - bias_before if bias_before is not None else None
            layer.project_tensors(weight_change, bias_change, self.layer_projectors(layer))
            if weight_before is not None:
                weight.copy_(weight_before.add_(weight_change))
            if bias_before is not None:
                bias.copy_(bias_before.add_(bias_change))

    def adjust_gradients(self, optimizer, step: StepContext) -> None:
        """Update the projectors with the recorded inputs; then ``gradient``: project the gradients;
        ``update``: keep the protected weights for :meth:`after_optimizer_step`."""
        if self.options.projection == "gradient":
            self.update_and_project(self.current_alpha(step), step.all_reduce_mean)
        else:
            self.update_projectors(self.current_alpha(step), step.all_reduce_mean)
            self._weights_before_step = self.protected_weights()

    def after_optimizer_step(self, optimizer, step: StepContext) -> None:
        """``update``: project the change the optimizer step made (none when a loss scaler skipped
        the step: the projection of a zero change is zero)."""
        before, self._weights_before_step = self._weights_before_step, None
        if before is not None:
            self.project_updates(before)

    # ----- bundle ----------------------------------------------------------------------------
    def state_to_bundle(self) -> BundleState:
        state = super().state_to_bundle()
        state.tensors.update(self.projectors.to_bundle(BUNDLE_PREFIX))
        return state

    def state_from_bundle(self, state: BundleState) -> None:
        super().state_from_bundle(state)
        shapes = {name: shape for name, shape, _ in self.plan}
        incoming = unprefixed(state.tensors, BUNDLE_PREFIX)
        for name, tensor in incoming.items():
            if name not in shapes:
                continue  # a module the previous site protected and this config does not
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"{BUNDLE_PREFIX}{name}: shape {tuple(tensor.shape)} != expected {shapes[name]}")
            self.projectors[name] = tensor.detach().float().clone()
        ignored = sorted(set(incoming) - set(shapes))
        if ignored:
            warnings.warn(f"OWM: ignoring {len(ignored)} projector(s) of modules outside owm_modules: {', '.join(ignored[:5])}", stacklevel=2)

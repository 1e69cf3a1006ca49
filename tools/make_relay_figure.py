"""Draw docs/relay.png: the relay of one model across hospitals that never connect."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

fig, ax = plt.subplots(figsize=(11, 3.4), dpi=110)
ax.set_xlim(0, 11)
ax.set_ylim(0, 3.4)
ax.axis("off")
sites = ["Hospital 1", "Hospital 2", "Hospital 3", "Hospital 4"]
for i, name in enumerate(sites):
    x = 0.3 + i * 2.75
    ax.add_patch(FancyBboxPatch((x, 0.5), 2.0, 2.3, boxstyle="round,pad=0.05", fc="#eef4fb", ec="#2c5d8a", lw=1.5))
    ax.text(x + 1.0, 2.55, name, ha="center", va="center", fontsize=11, weight="bold", color="#1d3d5c")
    ax.text(x + 1.0, 2.05, "local images\n(never leave)", ha="center", va="center", fontsize=8.5, color="#444")
    body = ["train on local data", "train on local data\n+ replay of site 1"][i] if i < 2 else f"train on local data\n+ replay of sites 1..{i}"
    ax.text(x + 1.0, 1.35, body, ha="center", va="center", fontsize=8.5)
    ax.text(x + 1.0, 0.8, "verify  →  train  →  sign", ha="center", va="center", fontsize=8, color="#2c5d8a")
    if i < len(sites) - 1:
        arrow = FancyArrowPatch((x + 2.08, 1.65), (x + 2.72, 1.65), arrowstyle="-|>", mutation_scale=16, lw=2, color="#c0392b")
        ax.add_patch(arrow)
        ax.text(x + 2.4, 1.95, "signed\nbundle", ha="center", va="bottom", fontsize=7.5, color="#c0392b")
        ax.text(x + 2.4, 1.3, "USB", ha="center", va="top", fontsize=7.5, color="#c0392b")
ax.text(5.5, 3.2, "Relay Learning: one model, carried from hospital to hospital — no network, no shared data",
        ha="center", fontsize=11.5)
ax.text(5.5, 0.15, "bundle = segmentation net + replay GAN (label-map and image generators) + site registry, signed with Ed25519",
        ha="center", fontsize=8.5, color="#555")
out = Path(__file__).resolve().parent.parent / "docs" / "relay.png"
out.parent.mkdir(exist_ok=True)
fig.savefig(out, bbox_inches="tight")
print(out)

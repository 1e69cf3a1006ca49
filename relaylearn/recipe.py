"""Recipe and site: which config keys say *what is trained* and which say *where*.

A config mixes two things, as NVIDIA FLARE separates a job from its environment:

- the **recipe** — strategy and its options, model, training budget, batch size, loss, optimizer,
  gradient clipping, and the data description the network depends on (image size, intensity
  range, classes, channels, augmentation, ...). It travels in every bundle (its ``config``), and
  every site of a relay should train with the same one;
- the **site** — data root and folders, site name and id, devices and precision, speed switches,
  seeds, logging, local checkpoints, test and audit settings, what the site opts to put in its
  bundle. These never constrain another site.

When a site joins with ``--in BUNDLE`` (:func:`reconcile`), its local recipe is compared with the
bundle's: keys the local config left unset take the bundle's values (the site *adopts* the
recipe); a key the local config sets to another value is an error naming every such key, unless
the site deliberately keeps its own recipe (``--recipe local``, recorded in ``run.json``).

Nothing read from a bundle picks code: its strategy and model names are accepted only when they
are built-in names or the plug-in names the local config itself uses.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from relaylearn.config import IGNORED_KEYS, PARTIAL, UNSUPPORTED_KEYS, DatasetConfig, RunConfig, TaskConfig
from relaylearn.errors import ConfigError, UserError, VerificationError

#: dotted keys of a site's resolved config (``TaskConfig``) that make the recipe; a key belongs to
#: the recipe when it or one of its parents is listed here and neither is in ``SITE_KEYS``
RECIPE_KEYS: tuple[str, ...] = (
    "strategy",
    "model",
    "train.num_epochs",
    "train.num_mimgs",
    "train.num_steps",
    "train.batch_size",
    "train.loss",
    "train.optimizer.name",
    "train.optimizer.lr",
    "train.optimizer.betas",
    "train.optimizer.weight_decay",
    "train.gradient_clip",
    "dataset.kwargs.img_size",
    "dataset.kwargs.out_range",
    "dataset.kwargs.num_classes",
    "dataset.kwargs.channels",
    "dataset.kwargs.use_roi",
    "dataset.kwargs.num_replica",
    "dataset.kwargs.augment",
    "dataset.kwargs.hu_window",
    "dataset.kwargs.neg_pos_ratio",
    "dataset.kwargs.drop_negative",
    "dataset.kwargs.add_bone_label",
    "dataset.kwargs.add_bg_label",
    "dataset.kwargs.score_helper_classes",
)
#: everything about where and how a site runs; listed so that every key is classified on purpose
SITE_KEYS: tuple[str, ...] = (
    "random_seed",
    "dataset.name",
    "dataset.kwargs.root_path",
    "dataset.kwargs.img_folder",
    "dataset.kwargs.task_id",
    "dataset.kwargs.task_name",
    "dataset.kwargs.train_ratio",
    "dataset.kwargs.split_seed",
    "dataset.kwargs.hu_min",
    "dataset.kwargs.val_fraction",
    "dataset.kwargs.val_seed",
    "model.kwargs.pretrained_path",
    "train.precision",
    "train.optimizer.fused",
    "train.channels_last",
    "train.compile",
    "train.checkpoint_every_n_steps",
    "train.log_every_n_steps",
    "train.lightning",
    "test",
    "bundle",
    "audit",
    "checkpoint",
)

#: recipe keys that decide how a test site's images and labels are prepared for the model (the
#: dataset's recipe keys but those that shape training only)
TEST_KEYS: tuple[str, ...] = tuple(
    key
    for key in RECIPE_KEYS
    if key.startswith("dataset.") and key not in ("dataset.kwargs.num_replica", "dataset.kwargs.augment", "dataset.kwargs.neg_pos_ratio")
)

RecipeSource = Literal["bundle", "local"]


def _under(key: str, prefixes: tuple[str, ...]) -> str | None:
    """The longest entry of ``prefixes`` that is ``key`` or one of its parents."""
    hits = [p for p in prefixes if key == p or key.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def is_recipe_key(key: str) -> bool:
    """True for a dotted key of the recipe (``train.optimizer.lr``), False for a site key."""
    recipe, site = _under(key, RECIPE_KEYS), _under(key, SITE_KEYS)
    return recipe is not None and (site is None or len(recipe) > len(site))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Nested mappings → {dotted key: leaf value}; an empty mapping is one leaf."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """A nested mapping → {dotted key: leaf value} (``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``)."""
    return {key.removeprefix("."): value for key, value in _flatten(tree, "").items()}


def _set_keys(model: BaseModel, prefix: str = "") -> set[str]:
    """Dotted keys a config gave explicitly (in its files or ``--set``), defaults excluded."""
    keys: set[str] = set()
    for name in model.model_fields_set:
        value, key = getattr(model, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            keys |= _set_keys(value, key + ".")
        elif isinstance(value, dict):
            keys |= set(_flatten(value, key)) if value else set()  # an empty mapping sets nothing
        else:
            keys.add(key)
    return keys


def _options(task: TaskConfig) -> BaseModel:
    """The site's validated strategy options (its strategy name already trusted)."""
    from relaylearn.strategies import get_strategy_class
    from relaylearn.strategies.base import parse_options

    return parse_options(get_strategy_class(task.strategy.name), task.strategy.kwargs)


def given_keys(task: TaskConfig) -> set[str]:
    """Recipe and site keys a config set explicitly; strategy options by their field names."""
    keys = {k for k in _set_keys(task) if not k.startswith("strategy.kwargs.")}
    return keys | _set_keys(_options(task), "strategy.kwargs.")


def recipe_of(task: TaskConfig) -> dict[str, Any]:
    """The recipe of a resolved site config as {dotted key: value}, strategy options with defaults."""
    dumped = task.model_dump(mode="json")
    dumped["strategy"]["kwargs"] = _options(task).model_dump(mode="json")
    flat = flatten(dumped)
    return {key: value for key, value in flat.items() if is_recipe_key(key)}


def shipped_task_config(config: Any, where: Any = None) -> TaskConfig:
    """A bundle's ``config`` as a ``TaskConfig``; keys older versions wrote and this one no longer
    takes (``IGNORED_KEYS``, ``UNSUPPORTED_KEYS``) are dropped. VerificationError (exit 3) if it
    does not fit this version's schema."""
    from relaylearn.bundle import escape_text

    if not isinstance(config, dict):
        raise VerificationError("bundle config is not a mapping", where)
    config = json.loads(json.dumps(config))  # a private copy
    for keys in (*IGNORED_KEYS, *UNSUPPORTED_KEYS):
        node = config
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    try:
        return TaskConfig.model_validate(config, context=PARTIAL)  # the bundle's site data is not read here
    except Exception as exc:  # noqa: BLE001 - any schema problem of a verified bundle
        from pydantic import ValidationError

        from relaylearn.config import validation_message

        text = validation_message(exc, "config") if isinstance(exc, ValidationError) else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VerificationError(f"bundle config does not match this relaylearn version: {escape_text(text)[:200]}", where) from None


def _check_names(bundle_task: TaskConfig, plugins: set[str], where: Any) -> None:
    """The bundle's strategy and model names must pick no code: built-in names, or plug-ins the
    local config names itself."""
    from relaylearn.bundle import escape_text
    from relaylearn.strategies import available_strategies

    for what, name in (("strategy", bundle_task.strategy.name), ("model", bundle_task.model.name)):
        if ":" in name and name not in plugins:
            raise VerificationError(
                f"bundle names the plug-in {what} '{escape_text(name)}'; code named by a bundle is never imported "
                "(only a plug-in your local config names, with -c, is used)",
                where,
            )
    if ":" not in bundle_task.strategy.name and bundle_task.strategy.name not in available_strategies():
        raise VerificationError(f"bundle names the unknown strategy '{escape_text(bundle_task.strategy.name)}'", where)


def _show(value: Any) -> str:
    from relaylearn.bundle import escape_text

    text = escape_text(json.dumps(value, default=str))
    return text if len(text) <= 60 else text[:59] + "…"


def _assign(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = tree
    for k in parents:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[last] = value


def compare(local: TaskConfig, theirs: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """(differences, adoptable) between a local config and the bundle's recipe ``theirs``
    (:func:`recipe_of`): recipe keys the local config sets to another value {key: (local, bundle)},
    and recipe keys it left unset whose bundle value differs from the local default {key: bundle value}."""
    mine, given = recipe_of(local), given_keys(local)
    differences: dict[str, tuple[Any, Any]] = {}
    adoptable: dict[str, Any] = {}
    for key in sorted(set(mine) | set(theirs)):
        here, there = mine.get(key), theirs.get(key)
        if here == there:
            continue
        parts = key.split(".")
        if any(".".join(parts[:i]) in given for i in range(1, len(parts) + 1)):
            differences[key] = (here, there)
        elif key in theirs:
            adoptable[key] = there
    return differences, adoptable


def _adopt(model: BaseModel, values: dict[str, Any], path: Any, where: str = "common") -> Any:
    """``model`` (a site's config or a test site's dataset) with ``values`` (dotted keys) put in;
    ConfigError if the result is not valid."""
    from relaylearn.config import validate_section

    return validate_section(type(model), _tree_with(model.model_dump(mode="json"), values), f"(bundle recipe adopted) {where}", path)


def reconcile(cfg: RunConfig, bundle, source: RecipeSource = "bundle", plugins: set[str] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """Compare every task of ``cfg`` with the recipe of ``bundle`` (verified, arrived with ``--in``).

    ``source="bundle"``: keys the local config left unset take the bundle's values (the returned
    config has them, test sites included); a recipe key set locally to another value is a
    ConfigError (exit 2) naming every such key with both values. ``source="local"``: the local
    recipe is kept as it is. Returns the config to train with and the record for ``run.json``.
    """
    if source not in ("bundle", "local"):
        raise UserError(f"--recipe {source!r}: expected 'bundle' or 'local'")
    bundle_task = shipped_task_config(bundle.manifest.get("config"), bundle.path)
    _check_names(bundle_task, plugins or set(), bundle.path)  # before any name of it is looked up
    try:
        theirs = recipe_of(bundle_task)
    except UserError as exc:
        raise VerificationError(f"bundle config: {exc.message}", bundle.path) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. a value nested too deep to serialise
        from relaylearn.bundle import escape_text

        raise VerificationError(f"bundle config: {escape_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]}", bundle.path) from None
    record: dict[str, Any] = {"source": source, "adopted": {}, "differs": {}}
    if source == "local":  # kept as it is; what differs is recorded
        for task in cfg.tasks:
            mine = recipe_of(task)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    record["differs"][key] = {"local": _show(mine.get(key)), "bundle": _show(theirs.get(key))}
        return cfg, record
    tasks, adopted = [], {}
    for task in cfg.tasks:
        differences, adoptable = compare(task, theirs)
        if differences:
            listed = "; ".join(f"{k}: {_show(here)} here, {_show(there)} in the bundle" for k, (here, there) in differences.items())
            raise ConfigError(
                f"this site's recipe differs from the incoming bundle's in {len(differences)} key(s): {listed} "
                "(remove them from the local config to adopt the bundle's, or pass --recipe local to train with yours)",
                cfg.path,
            )
        tasks.append(_adopt(task, adoptable, cfg.path) if adoptable else task)
        adopted.update(adoptable)
    dataset_values = {k.removeprefix("dataset."): v for k, v in adopted.items() if k.startswith("dataset.")}
    tests = (
        [_adopt(ds, dataset_values, cfg.path, f"all_tasks_datasets[{i}]") for i, ds in enumerate(cfg.test_datasets)] if dataset_values else cfg.test_datasets
    )
    record["adopted"] = {k: _show(v) for k, v in adopted.items()}
    return cfg.model_copy(update={"tasks": tasks, "test_datasets": tests}), record


def test_sites_for(cfg: RunConfig, bundle_task: TaskConfig) -> tuple[list[DatasetConfig], dict[str, Any]]:
    """``cfg``'s test sites prepared as the model of ``bundle_task`` (a bundle's config) was trained
    (:data:`TEST_KEYS`), as :func:`reconcile` does for ``train --in``: keys a test site leaves unset
    take the bundle's values (returned {key: value} for a note); a key it sets to another value is a
    ConfigError (exit 2) naming every such key with both values."""

    def values(ds: DatasetConfig) -> dict[str, Any]:
        flat = flatten({"dataset": ds.model_dump(mode="json")})
        return {key: flat[key] for key in TEST_KEYS if key in flat}

    theirs = values(bundle_task.dataset)
    sites, adopted, differences = [], {}, []
    for i, ds in enumerate(cfg.test_datasets):
        given = _set_keys(ds, "dataset.")
        changed = {key: there for key, there in theirs.items() if values(ds).get(key) != there}
        differences += [f"test site {ds.site}: {k}: {_show(values(ds).get(k))} here, {_show(v)} in the bundle" for k, v in changed.items() if k in given]
        adopt = {k.removeprefix("dataset."): v for k, v in changed.items() if k not in given}
        sites.append(_adopt(ds, adopt, cfg.path, f"all_tasks_datasets[{i}]") if adopt else ds)
        adopted.update({k: v for k, v in changed.items() if k not in given})
    if differences:
        raise ConfigError(
            f"the test sites would prepare images differently from how the bundle's model was trained, in {len(differences)} key(s): "
            f"{'; '.join(differences)} (remove them from the local config to test with the bundle's values)",
            cfg.path,
        )
    return sites, adopted


def _tree_with(tree: dict, values: dict[str, Any]) -> dict:
    for key, value in values.items():
        _assign(tree, key, value)
    return tree

"""Loading a recipe: a config's detector settings and a bank file, loaded into a ready
processor (an Inspector). `load_processor` is the one way there: `linewatch serve` at start and
at every changeover, `inspect`, `config check` and the demo all load through it.

`RecipeLoader.load` makes the Inspector serve starts with; the loader itself is the daemon's
bank loader (linewatch.runtime.daemon.BankLoader) for `linewatch bank switch` and SIGHUP:

    bank    config   what it loads
    None    None     what a restart would load: serve's config file read again, and serve's
                     --bank if it was started with one, else that config's bank.path (SIGHUP)
    path    None     that bank, under the config in service (not read again)
    None    path     that config file and its bank.path
    path    path     that bank under that config file

The bank must fit the config (Inspector refuses other model settings, `check_calibration`
another false-reject target). The models are built only when the detector's model settings
changed (`model_settings`); otherwise the ones in service judge the new bank too (they hold no
bank's state), and they are warm already. New models are warmed up, on CUDA or compiled,
before the cut. `runtime.*` cannot change without a restart: a re-read config whose runtime
settings differ from the running ones is applied for its detector and bank, and each
difference comes back as a warning.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linewatch.config import Config, ConfigError, DetectorConfig, RuntimeConfig, load_config
from linewatch.detector.bank import BankError, TemplateBank
from linewatch.detector.inspector import InputError, Inspector
from linewatch.detector.models import Models, build_models, select_device
from linewatch.detector.segment import SegmenterError
from linewatch.detector.weights import WeightsError
from linewatch.runtime.changeover import LoadedBank, SwitchRefused

# Errors that say what is wrong with a file or setting, in words for the operator.
_REFUSALS = (ConfigError, BankError, InputError, SegmenterError, WeightsError, OSError)

# Detector settings that change how a frame is judged against the bank, not the models.
_NOT_MODEL_SETTINGS = frozenset({"k_references", "measure", "score"})


def model_settings(detector: DetectorConfig) -> dict[str, Any]:
    """The detector settings the models are built from: two configs that agree on them can
    share one set of models. Every setting not known to leave the models alone counts, so a
    new one can only cost an unneeded rebuild, never a wrong reuse."""
    return detector.model_dump(mode="json", exclude=set(_NOT_MODEL_SETTINGS))


@dataclass(frozen=True)
class Recipe:
    """What a processor was loaded from: the whole config, and the models (before any bank's
    state) on their device, which a processor for another bank under the same model settings
    shares."""

    config: Config
    models: Models
    device: torch.device

    def fits(self, config: Config) -> bool:
        """Whether a processor under `config` can judge with these models."""
        return model_settings(self.config.detector) == model_settings(config.detector)


def load_processor(config: Config, bank: str | Path | TemplateBank, shared: Recipe | None = None,
                   warm_up: Sequence[int] = (), log: Any = None) -> tuple[Inspector, Recipe]:
    """`bank` (a file, or a bank in memory: the demo's, just built) under `config`, as an
    Inspector ready to judge, and the recipe it was made from.

    The bank must fit the config: the Inspector refuses other models or settings,
    `check_calibration` another false-reject target (BankError naming each difference); it is
    read and checked before any model is built. `shared`: a recipe whose models judge this
    bank too when its model settings are the config's (`Recipe.fits`: the processor in
    service, the demo's bank builder); else models are built on detector.device. New models
    are warmed up (compiled, CUDA kernels chosen) on blank frames of each `warm_up` batch size
    when they are compiled or on CUDA (`log` says so). On CUDA the bank's tensors are ready on
    every stream when this returns.
    """
    if isinstance(bank, TemplateBank):
        source = f"bank {bank.bank_id}"
    else:
        source = f"bank {bank}"
        bank = TemplateBank.load(bank)
    bank.check_calibration(config.calibration.target_false_reject_rate, source=source)
    if shared is not None and shared.fits(config):
        recipe, fresh = Recipe(config, shared.models, shared.device), False
    else:
        device = select_device(config.detector.device)
        recipe, fresh = Recipe(config, build_models(config.detector, device), device), True
    inspector = Inspector(config.detector, recipe.models, bank, recipe.device)
    if fresh and warm_up and (config.detector.compile or recipe.device.type == "cuda"):
        sizes = sorted(set(warm_up))
        if log is not None:
            log.info("warming up", batch_sizes=sizes, compile=config.detector.compile, bank_id=inspector.bank_id)
        inspector.warm_up(tuple(sizes))
    if recipe.device.type == "cuda":
        # The bank's tensors were copied and derived on this thread's stream; the stage
        # threads read them on their own streams: all of it must be done before the cut.
        torch.cuda.synchronize(recipe.device)
    return inspector, recipe


class RecipeLoader:
    """serve's recipe loading (see the module docstring).

    config_path: serve's -c. bank_override: serve's --bank (None: the config's bank.path).
    runtime: the runtime settings the daemon runs with. log: a structlog logger.
    """

    def __init__(self, config_path: str, bank_override: str | None, runtime: RuntimeConfig, log: Any) -> None:
        self.config_path = config_path
        self.bank_override = bank_override
        self.runtime = runtime
        self.log = log
        # the recipe of each processor this loader made, for as long as it lives
        self._recipes: weakref.WeakKeyDictionary[Inspector, Recipe] = weakref.WeakKeyDictionary()

    def recipe_of(self, processor: Inspector) -> Recipe:
        """What `processor` (one this loader made) was loaded from."""
        return self._recipes[processor]

    def load(self, config: Config, bank_path: str, in_service: Inspector | None = None) -> Inspector:
        """An Inspector for `bank_path` under `config`, reusing the models of `in_service` when
        the model settings agree; BankError (or ConfigError, ...) naming what does not fit."""
        shared = self._recipes.get(in_service) if in_service is not None else None
        # new models: compiled and kernels picked for a lone frame and a full batch before they serve
        inspector, recipe = load_processor(config, bank_path, shared, warm_up=(1, self.runtime.batch.max_batch),
                                           log=self.log)
        self._recipes[inspector] = recipe
        return inspector

    def __call__(self, bank: str | None, config: str | None, in_service: Inspector) -> LoadedBank:
        """The daemon's bank loader: SwitchRefused says why a recipe cannot go into service."""
        try:
            if bank is None and config is None:  # what a restart would load
                config, bank = self.config_path, self.bank_override
            new_config = load_config(config) if config is not None else self.recipe_of(in_service).config
            bank_path = bank or new_config.bank.path
            inspector = self.load(new_config, bank_path, in_service)
        except _REFUSALS as e:
            raise SwitchRefused(str(e)) from None
        reused = self.recipe_of(inspector).models is self.recipe_of(in_service).models
        self.log.info("recipe_loaded", bank=bank_path, bank_id=inspector.bank_id, models="reused" if reused else "built")
        return LoadedBank(inspector, bank_path, warnings=runtime_differences(self.runtime, new_config.runtime))


def runtime_differences(running: RuntimeConfig, wanted: RuntimeConfig) -> list[str]:
    """One line per runtime setting that differs: those apply only after a restart."""
    have, want = _flat(running.model_dump(mode="json")), _flat(wanted.model_dump(mode="json"))
    return [f"runtime.{key}: running with {have.get(key)!r}, the config says {want.get(key)!r} "
            "(applies after a restart)" for key in sorted(set(have) | set(want)) if have.get(key) != want.get(key)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

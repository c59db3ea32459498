"""The recipe `linewatch serve` inspects with: a config's detector settings and a bank file,
loaded into a ready Inspector, at start and at every changeover.

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

from dataclasses import dataclass
from typing import Any

import torch

from linewatch.config import Config, ConfigError, DetectorConfig, RuntimeConfig, load_config
from linewatch.detector.bank import BankError, TemplateBank
from linewatch.detector.inspector import InputError, Inspector
from linewatch.detector.models import Models, build_models, select_device
from linewatch.detector.segment import SegmenterError
from linewatch.detector.weights import WeightsError
from linewatch.runtime.daemon import LoadedBank, SwitchRefused

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
    """What an Inspector of this loader was made from, so that the next switch can start
    from the one in service: the whole config, and the models before any bank's state."""

    config: Config
    models: Models


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

    def load(self, config: Config, bank_path: str, in_service: Inspector | None = None) -> Inspector:
        """An Inspector for `bank_path` under `config`, reusing the models of `in_service` when
        the model settings agree; BankError (or ConfigError, ...) naming what does not fit."""
        bank = TemplateBank.load(bank_path)
        bank.check_calibration(config.calibration.target_false_reject_rate, source=f"bank {bank_path}")
        previous: Recipe | None = getattr(in_service, "recipe", None)
        reuse = previous is not None and model_settings(previous.config.detector) == model_settings(config.detector)
        if reuse:
            models, device = previous.models, in_service.device
        else:
            device = select_device(config.detector.device)
            models = build_models(config.detector, device)
        inspector = Inspector(config.detector, models, bank, device)
        inspector.bank_images = bank.size  # shown in linewatch_bank_info
        inspector.recipe = Recipe(config, models)
        if not reuse and (config.detector.compile or device.type == "cuda"):
            # compile and pick kernels for a lone frame and a full batch before it serves
            sizes = [1, self.runtime.batch.max_batch]
            self.log.info("warming up", batch_sizes=sizes, compile=config.detector.compile, bank_id=inspector.bank_id)
            inspector.warm_up(tuple(sizes))
        if device.type == "cuda":
            # The bank's tensors were copied and derived on this thread's stream; the stage
            # threads read them on their own streams: all of it must be done before the cut.
            torch.cuda.synchronize(device)
        return inspector

    def __call__(self, bank: str | None, config: str | None, in_service: Inspector) -> LoadedBank:
        """The daemon's bank loader: SwitchRefused says why a recipe cannot go into service."""
        try:
            if bank is None and config is None:  # what a restart would load
                config, bank = self.config_path, self.bank_override
            new_config = load_config(config) if config is not None else in_service.recipe.config
            bank_path = bank or new_config.bank.path
            inspector = self.load(new_config, bank_path, in_service)
        except _REFUSALS as e:
            raise SwitchRefused(str(e)) from None
        self.log.info("recipe_loaded", bank=bank_path, bank_id=inspector.bank_id,
                      models="reused" if inspector.recipe.models is in_service.recipe.models else "built")
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

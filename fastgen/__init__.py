"""fastgen: make diffusers image generators faster in one call, and prove it with numbers.

>>> import fastgen
>>> from fastgen.testing import tiny_pipeline
>>> pipe = tiny_pipeline("sd3")
>>> fastgen.accelerate(pipe, "sampler:dpm++2m@8")      # doctest: +SKIP
>>> fastgen.accelerate(pipe, fastgen.ToMeConfig(ratio=0.5))  # doctest: +SKIP
>>> fastgen.summary(pipe)                              # doctest: +SKIP
>>> fastgen.remove(pipe)                               # doctest: +SKIP

Every technique's config is exported here (:data:`CONFIGS`: ``fastgen.RASConfig``, ``fastgen.QALoRAConfig``, ...).
See README.md and docs/ for every capability, ``fastgen info`` for what is installed, and ``fastgen bench``
for measured speed and quality.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import Adapter, get_adapter, supported_pipelines
from .api import accelerate, apply_technique, remove, remove_technique, summary
from .errors import (
    FastgenError,
    IncompatibleTechniquesError,
    MissingExtraError,
    MissingFileError,
    RecipeError,
    UnsupportedPipelineError,
)
from .models import list_models, load_model
from .registry import Technique, list_techniques, parse_recipe, recipe_string, register_technique
from .steps import StepsConfig
from .utils.logging import get_logger, set_verbosity

#: Every technique's config class, exported here (``fastgen.ToMeConfig(ratio=0.5)``). They are looked up in the
#: registry on first use, so ``import fastgen`` stays light and the core imports none of the optional packages
#: (quant, distill) that define some of them. The benchmark's anchors (other projects' code) are not exported.
CONFIGS = (
    "StepsConfig", "SamplerConfig", "ScheduleConfig", "SkipTuningConfig", "CFGIntervalConfig", "ToMeConfig",
    "DeepCacheConfig", "BlockCacheConfig", "RASConfig", "VARAttnConfig", "FastVARConfig", "CoDeConfig",
    "CFGShareConfig", "GDConfig", "QALoRAConfig", "Int8Config", "ExecuTorchConfig",
)


def __getattr__(name: str):
    if name in CONFIGS:
        from .registry import config_class

        cls = config_class(name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(CONFIGS))



def load_default(name: str = "shapes-mmdit", device=None, dtype=None):
    """Load an embedded default pipeline (see ``fastgen.zoo.list()``); offline, from the package's weights.

    Raises ``fastgen.zoo.WeightsNotFoundError`` (a ``FileNotFoundError``) with the training command when the
    weights are not shipped in this install.
    """
    from .zoo import load_default as _load_default

    return _load_default(name, device=device, dtype=dtype)


__all__ = [
    "__version__", "accelerate", "remove", "summary", "parse_recipe", "recipe_string", "register_technique",
    "list_techniques", "Technique", "Adapter", "get_adapter", "supported_pipelines", "load_model", "list_models", "load_default",
    "StepsConfig", "FastgenError", "RecipeError", "UnsupportedPipelineError", "IncompatibleTechniquesError",
    "MissingExtraError", "MissingFileError", "get_logger", "set_verbosity", "apply_technique", "remove_technique", *CONFIGS,
]

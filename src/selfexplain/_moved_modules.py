"""Old module paths of the flat 0.1 layout keep importing, with a `FutureWarning` naming the new home.

`import selfexplain.shapley` (and `from selfexplain.shapley import ...`) still work: a finder maps each old
name to the module that now holds its code, so old code and pickled references keep running.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module → new module.
MOVED_MODULES: dict[str, str] = {
    "selfexplain.apply": "selfexplain.vectors.apply",
    "selfexplain.explanation_vector": "selfexplain.vectors",
    "selfexplain.checkpoint_keys": "selfexplain.vectors.checkpoint_keys",
    "selfexplain.shapley": "selfexplain.attribution.shapley",
    "selfexplain.masking": "selfexplain.attribution.masking",
    "selfexplain.targets": "selfexplain.attribution.targets",
    "selfexplain.metrics": "selfexplain.evaluation.metrics",
    "selfexplain.explainers": "selfexplain.evaluation.explainers",
    "selfexplain.experiment": "selfexplain.experiments.experiment",
    "selfexplain.report": "selfexplain.experiments.report",
    "selfexplain.cli_training": "selfexplain.cli",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{new}`; the old path will be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # `create_module` returned the real module, already executed


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())

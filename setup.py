"""Build hooks beyond pyproject.toml: install ``looplm-lm-eval.pth`` into site-packages.

That one-line file imports ``_looplm_lm_eval`` at interpreter start-up, which registers
``--model looplm`` with lm-evaluation-harness lazily (see that module).  Regular wheels get the
file from ``build_py``; editable installs (``pip install -e``) from a wrapper around setuptools'
editable strategy, which otherwise ships only its own path hook.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "looplm-lm-eval.pth"
# A .pth line that starts with "import" is executed; find_spec keeps a half-removed install quiet.
PTH_LINE = "import importlib.util as u; u.find_spec('_looplm_lm_eval') and __import__('_looplm_lm_eval')\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as handle:
                handle.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


commands = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable wheels
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):

    class _StrategyWithPth:
        """Setuptools' editable strategy, plus the .pth file written into the editable wheel."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, wheel, files, mapping):
            self.inner(wheel, files, mapping)
            wheel.writestr(PTH_NAME, PTH_LINE)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self.inner.__exit__(*exc_info)

    class EditableWheelWithPth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    commands["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=commands)

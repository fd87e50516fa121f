"""Makes lm-evaluation-harness's own ``lm_eval --model looplm`` find looplm's model.

lm-eval (0.4.x) looks models up only in its own registry and reads no entry points.  looplm's
install therefore adds ``looplm-lm-eval.pth`` to site-packages, which imports this module when
Python starts.  It imports nothing heavy (no torch, no looplm, no lm_eval): it only puts a
one-shot finder on ``sys.meta_path``.  When -- and only when -- a process imports
``lm_eval.models``, the finder lets that module run, then adds the name ``looplm`` to lm-eval's
model registry as a lazy placeholder (``looplm.eval.lm_eval_adapter:LoopLMEval``).  The adapter,
and torch with it, are imported the first time lm-eval asks for that model.

Set ``LOOPLM_LM_EVAL_HOOK=0`` to leave lm-eval untouched.  Nothing here may raise: a failure
only means ``--model looplm`` is not registered (``python -m looplm.eval.lm_eval_adapter`` still
works).
"""

import os
import sys

MODEL_NAME = "looplm"
PLACEHOLDER = "looplm.eval.lm_eval_adapter:LoopLMEval"
TRIGGER = "lm_eval.models"
ENV_SWITCH = "LOOPLM_LM_EVAL_HOOK"


def register(registry) -> bool:
    """Add ``looplm`` to an lm-eval model registry as a lazy placeholder; False if the name is
    already taken (by this placeholder, the class itself, or someone else's model)."""
    if MODEL_NAME in registry:
        return False
    registry.register(MODEL_NAME, target=PLACEHOLDER)
    return True


def _register_quietly() -> None:
    try:
        from lm_eval.api.registry import model_registry

        register(model_registry)
    except Exception:  # an lm-eval without this registry: leave it as it is
        pass


def _register_after(loader) -> None:
    run_module = loader.exec_module

    def exec_module(module) -> None:
        run_module(module)
        _register_quietly()

    loader.exec_module = exec_module


class LmEvalFinder:
    """A ``sys.meta_path`` entry that fires once, for ``lm_eval.models``; it finds the real
    module through the other finders and only wraps its loader's ``exec_module``."""

    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        uninstall()
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            try:
                spec = find_spec(name, path, target)
            except Exception:
                continue
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    try:
                        _register_after(spec.loader)
                    except Exception:
                        pass
                return spec
        return None


_FINDER = LmEvalFinder()


def install() -> bool:
    """Put the finder on ``sys.meta_path`` (first); True if it was added.  Does nothing when
    ``LOOPLM_LM_EVAL_HOOK=0`` or when ``lm_eval.models`` is already imported (then the name is
    registered at once)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if TRIGGER in sys.modules:
        _register_quietly()
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
        return True
    return False


def uninstall() -> None:
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


try:
    install()
except Exception:  # pragma: no cover - start-up must never fail because of this module
    pass

"""An OpenAI-compatible HTTP server for looplm models (``looplm serve``; docs/SERVING.md).

``engine`` batches concurrent requests onto the model in a worker thread; ``protocol`` holds the
request and response shapes; ``app`` is the FastAPI application.  FastAPI and uvicorn are the
optional ``serve`` extra: ``require_serving`` says how to install them when they are missing.
"""

from __future__ import annotations

from looplm.errors import LoopLMError


def require_serving() -> None:
    """Raise a one-line LoopLMError when FastAPI or uvicorn is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise LoopLMError(f"serving needs FastAPI and uvicorn ({error.name} is missing):"
                          " pip install 'looplm[serve]'") from None


def create_app(model, tokenizer, config=None, engine=None):
    """The FastAPI application serving ``model`` (see ``looplm.serve.app.create_app``)."""
    require_serving()
    from looplm.serve.app import ServerConfig
    from looplm.serve.app import create_app as build

    return build(model, tokenizer, config or ServerConfig(), engine)

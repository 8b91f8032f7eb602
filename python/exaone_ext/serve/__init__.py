"""An OpenAI-compatible HTTP server for EXAONE models with continuous batching.

    exaone-ext serve --model DIR --port 8000

    from exaone_ext.serve import create_app
    app = create_app(DIR)             # FastAPI app; run it with uvicorn

Needs the `serve` extra (fastapi, uvicorn).
"""
from .app import create_app
from .metrics import Metrics
from .protocol import APIError
from .scheduler import Scheduler

__all__ = ["create_app", "Metrics", "APIError", "Scheduler"]

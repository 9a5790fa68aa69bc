"""The server process: refuse an exposed address without a key, load the models, run the engine and uvicorn."""

from __future__ import annotations

import socket

import torch
import uvicorn

from ..data.chat import resolve_chat_template
from ..errors import ConfigError
from ..runtime.device import pick_device
from ..runtime.http import listen
from .api import Limits, create_app, guard
from .engine import Engine
from .host import check_host
from .models import load_served

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(models: list[str], *, device: str = "auto", dtype: str = "fp32", max_batch: int = 32,
          limits: Limits | None = None, api_key: str | None = None, chat_template: str | None = None,
          threads: int | None = None):
    """(the ASGI app, the engine): models loaded, the engine's thread started. threads: torch's CPU
    threads (on a shared machine, 1 keeps small matmuls from waiting on busy cores)."""
    if threads:
        torch.set_num_threads(threads)
    if max_batch < 1:
        raise ConfigError("--max-batch must be at least 1")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    template = resolve_chat_template(chat_template) if chat_template else None  # FILE or a shipped NAME
    where = pick_device(device)
    engine = Engine(load_served(models, where, DTYPES[dtype], template), where, max_batch)
    engine.start()
    limits = limits or Limits()
    return guard(create_app(engine, limits, api_key), api_key, limits.max_body_bytes), engine


def serve(models: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log=print, sock: socket.socket | None = None, **options) -> None:
    """Serve until interrupted; `sock`: already bound by runtime/http.py's `listen` (the CLI binds before
    torch loads), else bound here."""
    check_host(host, api_key)  # before any model is loaded
    # bound first: the address actually bound is checked (runtime/http.py) before the models load, and
    # requests sent meanwhile wait in the backlog
    sock = sock if sock is not None else listen(host, port, api_key)
    try:
        app, engine = build(models, api_key=api_key, **options)
    except BaseException:
        sock.close()
        raise
    log(f"serving {', '.join(models)} on http://{host}:{sock.getsockname()[1]}/v1 (max batch {engine.max_batch} rows, "
        f"{engine.device.type}){'; API key required' if api_key else ''}")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.stop()

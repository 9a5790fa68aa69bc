"""`prefalign serve`: an OpenAI-compatible server for local models (serve/)."""

from __future__ import annotations

import importlib.util

import typer

from .base import _log, app, fail


@app.command("serve")
def serve_cmd(
    models: list[str] = typer.Argument(..., help="model folders and/or LoRA runs' final/ folders; each is served "
                                                 "under its path as given"),
    host: str = typer.Option("127.0.0.1", help="address to bind; any non-loopback address needs --api-key"),
    port: int = typer.Option(8000, help="port to bind"),
    api_key: str | None = typer.Option(None, envvar="PREFALIGN_API_KEY",
                                       help="bearer token checked on every route but /health"),
    max_batch: int = typer.Option(32, help="rows (completions) decoded together at most (1: one request at a "
                                           "time); a request of more rows (n x prompts) is refused"),
    max_prompts: int = typer.Option(64, min=1, help="prompts in one /v1/completions request at most"),
    max_tokens: int = typer.Option(1024, help="largest max_tokens a request may ask for"),
    max_body: int = typer.Option(1 << 20, help="largest request body in bytes"),
    chat_template: str | None = typer.Option(None, help="chat template FILE (Jinja) or shipped NAME (chatml, zephyr, "
                                                        "llama3) for models whose tokenizer has none"),
    device: str = typer.Option("auto", help="auto (a GPU if there is one) or a torch device name"),
    dtype: str = typer.Option("fp32", help="weights in fp32, bf16 or fp16"),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's)"),
) -> None:
    """An OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions): several models,
    LoRA adapters on a shared base, concurrent requests batched with the KV cache."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"prefalign serve needs {' and '.join(missing)}: pip install 'prefalign[serve]'")
    from ..runtime.http import listen
    from ..serve.host import check_host

    check_host(host, api_key)  # before torch and the models load
    sock = listen(host, port, api_key)  # the address actually bound checked too, before they load
    from ..serve.api import Limits
    from ..serve.server import serve

    limits = Limits(max_tokens=max_tokens, max_body_bytes=max_body, max_prompts=max_prompts)
    serve(models, host=host, port=port, api_key=api_key, sock=sock, log=_log, max_batch=max_batch, device=device,
          dtype=dtype, chat_template=chat_template, threads=threads, limits=limits)

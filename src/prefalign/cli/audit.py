"""`prefalign audit`: DPO against PPO and RLOO on your prompts, reward, model and hardware (tasks/audit.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .base import _config_and_overrides, _log, app, build, fail


@app.command("audit")
def audit(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides"),
    output: str | None = typer.Option(None, "-o", "--output", help="folder for audit.json, audit.md, audit.html"),
    demo: bool = typer.Option(False, "--demo", help="on the shipped model and task (6 min measured on 2 CPU cores)"),
    quick: bool = typer.Option(False, "--quick", help="with --demo: every stage shrunk (seconds, for tests)"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Should this team move from PPO to DPO? Both arms (DPO; PPO and RLOO) swept on validation prompts, the
    chosen settings run with several seeds on test prompts: reward, win-rate, exact KL, retention, and
    each stage's time, device-hours, peak memory, energy and money; a verdict written from the numbers."""
    from ..tasks.audit import AuditConfig, demo_config, run_audit

    config, overrides = _config_and_overrides(args)
    if quick and not demo:
        fail("--quick shrinks the demo: give it with --demo")
    if demo:
        base = demo_config(output or "runs/audit-demo", quick=quick)
    elif config is None:
        fail("give CONFIG.yaml (or --demo)")
    else:
        base = {"output": output} if output else {}
    cfg = build(AuditConfig, base, overrides, config)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    run_audit(cfg, _log, progress=not no_progress)

"""``tunesmith search``: hyperparameter search with Optuna over settings the config declares.

Optuna's TPE sampler proposes values for ``search.params`` (dotted config keys); each trial is an
ordinary run (``<search>/trials/<name>-trial-N/``) trained without touching the test split. The
objective is the trial's best validation loss (lower is better); a median pruner, fed the
validation loss at each validation, stops trials that trail the median of earlier ones.

The study lives in ``<search>/study.sqlite`` (Optuna's RDB storage). A killed search resumes:
a trial left running is continued from its own checkpoint (the same trial number and settings),
so no trial is lost or run twice. At the end: a table of trials (``trials.csv``), plots
(``search.html``: optimisation history, metric against each parameter, parameter importances),
the best config (``best.yaml``), and the best trial evaluated once on the test split. Trial 0
runs the config's own values (``search.include_config``), so the search measures what it beat.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith.config import Config, flatten, load_config, save_config
from tunesmith.io import atomic_write_json, atomic_write_text

OBJECTIVE = "validation loss"


class SearchStopped(Exception):
    """The search was stopped (Ctrl-C/SIGTERM) with its running trial checkpointed: run it again to resume."""


def search_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-search"


def _suggest(trial: Any, key: str, spec: Any, current: Any) -> Any:
    """One value for ``key`` from its spec: integers for integer settings (``lora.r``), floats otherwise."""
    integer = isinstance(current, int) and not isinstance(current, bool)
    if spec.choices is not None:
        return trial.suggest_categorical(key, [int(c) if integer and float(c).is_integer() else c for c in spec.choices])
    if integer:
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def trial_config(source: str | Path, overrides: list[str], params: dict[str, Any], cfg: Config, number: int) -> Config:
    """The config of trial ``number``: the searched config with the trial's values set."""
    folder = search_dir(cfg) / "trials"
    extra = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()]
    return load_config(source, overrides + extra + [f"output_dir={folder}", f"name={cfg.name}-trial-{number}"])


def _storage(folder: Path) -> Any:
    import optuna

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.sqlite").touch()  # sqlite would create it 0644 whatever the umask
    return optuna.storages.RDBStorage(f"sqlite:///{folder / 'study.sqlite'}",
                                      engine_kwargs={"connect_args": {"timeout": 30}})


def _study(cfg: Config, folder: Path) -> Any:
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    s = cfg.search
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=0)
              if s.pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=cfg.name, storage=_storage(folder), direction="minimize",
                               sampler=optuna.samplers.TPESampler(seed=s.seed), pruner=pruner, load_if_exists=True)


def _run_trial(study: Any, trial: Any, source: str | Path, overrides: list[str], cfg: Config, console: Console,
               resume: bool) -> None:
    """Train one trial as an ordinary run and tell the study its result (or that it was pruned)."""
    import optuna

    from tunesmith.runs.folder import RunError, finetune

    tcfg = trial_config(source, overrides, trial.params, cfg, trial.number)
    trial.set_user_attr("run_dir", str(tcfg.run_dir))

    def report(step: int, val_loss: float) -> bool:
        trial.report(val_loss, step)
        return trial.should_prune()

    console.rule(f"trial {trial.number}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()))
    try:
        run = finetune(tcfg, resume=resume, overwrite=not resume, console=console, evaluate=False, on_validation=report)
    except RunError as e:
        if resume and "no checkpoint" in str(e):  # killed before its first checkpoint: the same trial from the start
            run = finetune(tcfg, overwrite=True, console=console, evaluate=False, on_validation=report)
        else:
            raise
    if run.train.get("interrupted"):
        raise SearchStopped(f"trial {trial.number} stopped at step {run.train.get('steps')} with a checkpoint "
                            "(the search continues it; the train --resume line above is for that trial alone)")
    value = run.train.get("best_val_loss")
    trial.set_user_attr("train_seconds", run.train.get("train_seconds"))
    trial.set_user_attr("steps", run.train.get("steps"))
    if run.train.get("pruned"):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        console.print(f"trial {trial.number} pruned at step {run.train.get('steps')} (validation loss behind the median)")
    elif value is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)
        console.print(f"trial {trial.number}: best {OBJECTIVE} {value:.4f}", highlight=False)


def search(source: str | Path, overrides: list[str] | None = None, trials: int | None = None,
           console: Console | None = None, evaluate_best: bool = True) -> dict[str, Any]:
    """Run (or resume) the search the config at ``source`` declares; returns the summary written to
    ``<search>/search.json``. ``trials`` overrides ``search.trials``.

    Raises ConfigError (no ``search.params``, or a bad range), what ``finetune`` raises for a trial,
    and SearchStopped when interrupted (the study and the running trial's checkpoint are kept)."""
    import optuna

    from tunesmith.config import ConfigError

    console = console or Console()
    overrides = list(overrides or [])
    cfg = load_config(source, overrides)
    if not cfg.search.params:
        raise ConfigError(["search.params: name at least one setting to search, e.g. train.lr: {low: 1e-5, high: 1e-3, log: true}"],
                          str(source))
    if cfg.method == "prompt":
        raise ConfigError(["method: prompt trains nothing, there is nothing to search (use lora or full)"], str(source))
    total = trials or cfg.search.trials
    folder = search_dir(cfg)
    study = _study(cfg, folder)
    save_config(cfg, folder / "config.yaml")
    current = flatten(cfg)
    console.print(f"[bold]search[/bold] {len(cfg.search.params)} setting{'s' if len(cfg.search.params) > 1 else ''} "
                  f"({', '.join(cfg.search.params)}), {total} trials; objective: the best {OBJECTIVE} of each trial "
                  "(the validation split; the test split is used once, for the best trial at the end); "
                  f"study: {folder / 'study.sqlite'}", highlight=False)
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        console.print(f"resuming trial {frozen.number} (left running by a stopped search)")
        _run_trial(study, optuna.trial.Trial(study, frozen._trial_id), source, overrides, cfg, console, resume=True)
    if not study.get_trials(deepcopy=False) and cfg.search.include_config:  # trial 0: the config as written
        given = {k: current.get(k) for k in cfg.search.params}
        if all(v is not None and _within(v, cfg.search.params[k]) for k, v in given.items()):
            study.enqueue_trial(given, user_attrs={"source": "config"})
    while (n := len(study.get_trials(deepcopy=False))) < total:
        # the sampler's random state is not in the study: seeded by the trial's number, a resumed
        # search draws what an uninterrupted one would (one seed for all would repeat a trial)
        study.sampler = optuna.samplers.TPESampler(seed=cfg.search.seed * 1_000_003 + n)
        trial = study.ask()
        for key, spec in cfg.search.params.items():
            _suggest(trial, key, spec, current.get(key))
        _run_trial(study, trial, source, overrides, cfg, console, resume=False)
    summary = summarize(study, cfg, folder, source, overrides)
    if evaluate_best and summary.get("best"):
        from tunesmith.runs.folder import evaluate_run

        best_dir = Path(summary["best"]["run_dir"])
        console.rule(f"best trial {summary['best']['number']} on the test split")
        evaluation = evaluate_run(best_dir, console=console)
        summary["best"]["test"] = {"metric": evaluation.get("metric"),
                                   "tuned": (evaluation.get("tuned") or {}).get(evaluation.get("metric")),
                                   "base": (evaluation.get("base") or {}).get(evaluation.get("metric")),
                                   "ci": ((evaluation.get("tuned") or {}).get("ci") or {}).get(evaluation.get("metric"))}
        atomic_write_json(folder / "search.json", summary)
    return summary


def _within(value: Any, spec: Any) -> bool:
    if spec.choices is not None:
        return value in spec.choices
    return spec.low <= value <= spec.high


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summarize(study: Any, cfg: Config, folder: Path, source: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Write trials.csv, best.yaml, search.html and search.json; return the summary."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, **t.params,
                     "steps": t.user_attrs.get("steps"), "train_seconds": t.user_attrs.get("train_seconds"),
                     "run_dir": t.user_attrs.get("run_dir")})
    keys = list(cfg.search.params)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["number", "state", "value", *keys, "steps", "train_seconds", "run_dir"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "trials.csv", buf.getvalue())
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    summary: dict[str, Any] = {"objective": f"best {OBJECTIVE} (validation split; lower is better)", "study": str(folder / "study.sqlite"),
                               "trials": rows, "params": list(keys),
                               "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}}
    if done:
        best = min(done, key=lambda t: t.value)
        best_cfg = trial_config(source, overrides, best.params, cfg, best.number)
        best_cfg.name, best_cfg.output_dir = f"{cfg.name}-best", cfg.output_dir
        best_cfg.search = type(cfg.search)()  # an ordinary config: training it does not start another search
        save_config(best_cfg, folder / "best.yaml")
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run_dir": best.user_attrs.get("run_dir"), "config": str(folder / "best.yaml")}
        given = [t for t in done if t.user_attrs.get("source") == "config"]
        if given:
            summary["config_trial"] = {"number": given[0].number, "value": given[0].value, "params": given[0].params}
        with contextlib.suppress(Exception):  # importances need two or more finished trials that differ
            summary["importances"] = dict(optuna.importance.get_param_importances(study))
    atomic_write_text(folder / "search.html", _page(study, summary))
    atomic_write_json(folder / "search.json", summary)
    return summary


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(out.getvalue()).decode()}">'


def plots(study: Any) -> dict[str, str]:
    """Optuna's own matplotlib plots as inline PNGs: history, each parameter, importances."""
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, fn in (("optimisation history", ovm.plot_optimization_history), ("metric against each parameter", ovm.plot_slice),
                         ("parameter importances", ovm.plot_param_importances)):
            with contextlib.suppress(Exception):  # e.g. importances of a single finished trial
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                out[name] = _png(fig)
    return out


def _page(study: Any, summary: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in ("trial", "state", "validation loss", *summary["params"], "steps"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v) if v is not None else '')}</td>"
                                    for v in (r["number"], r["state"], r["value"], *[r.get(k) for k in summary["params"]], r["steps"]))
                   + "</tr>" for r in summary["trials"])
    best = summary.get("best")
    figs = "".join(f"<h2>{html.escape(n)}</h2>{img}" for n, img in plots(study).items())
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tunesmith search</title></head><body>"
            f"<h1>Hyperparameter search</h1><p>Objective: {html.escape(summary['objective'])}. "
            + (f"Best: trial {best['number']}, {best['value']:.4f}, {html.escape(json.dumps(best['params']))}.</p>" if best else "</p>")
            + f"<table border='1'><tr>{head}</tr>{body}</table>{figs}</body></html>")


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The trials as a table, and the best one."""
    t = Table(title=f"trials ({summary['objective']})")
    for col in ("trial", "state", "val loss", *summary["params"], "steps", "time (s)"):
        t.add_column(col, justify="right", no_wrap=True)
    best = (summary.get("best") or {}).get("number")
    for r in summary["trials"]:
        t.add_row(*[("* " if r["number"] == best else "") + str(r["number"]), r["state"], _fmt(r["value"]) if r["value"] is not None else "",
                    *[_fmt(r.get(k)) for k in summary["params"]], str(r["steps"] or ""),
                    f"{r['train_seconds']:.0f}" if r.get("train_seconds") else ""])
    console.print(t)
    if summary.get("importances"):
        console.print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items()), highlight=False)
    if summary.get("best"):
        b = summary["best"]
        console.print(f"best: trial {b['number']} ({OBJECTIVE} {b['value']:.4f}); config: {b['config']}", highlight=False)
        if summary.get("config_trial"):
            c = summary["config_trial"]
            console.print(f"the config as written (trial {c['number']}): {OBJECTIVE} {c['value']:.4f}", highlight=False)
        if b.get("test"):
            te = b["test"]
            ci = f" [{te['ci'][0]:.3f}, {te['ci'][1]:.3f}]" if te.get("ci") else ""
            base = f" (base {te['base']:.3f})" if isinstance(te.get("base"), float) else ""
            console.print(f"best trial on the test split, once: {te['metric']} {te['tuned']:.3f}{ci}{base}", highlight=False)

"""After a sweep: mark each trial's MLflow child run, pick and register the champion, and
write the summary (table, best config, plots) to `<run_dir>/summary` and the parent run."""

from __future__ import annotations

import csv
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from raybench.track import RUN_NAME_TAG, Tracker, register_champion
from raybench.tune.trial import trial_config, trial_name


@dataclass
class TrialRow:
    trial_id: str
    state: str  # completed | pruned | error
    params: dict[str, Any]
    accuracy: float | None = None
    cost: float | None = None
    val_loss: float | None = None
    evals: int = 0
    step: int = 0
    run_id: str | None = None
    qtype_acc: dict[str, float] = field(default_factory=dict)


def _rows(sweep, grid) -> list[TrialRow]:
    cost_key = sweep.cfg.sweep.cost_metric
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name.split("_", 1)[-1]
        evals = int(m.get("training_iteration", 0))
        if result.error is not None:
            state = "error"
        elif int(m.get("step", 0)) < sweep.cfg.train.steps:
            state = "pruned"  # stopped by ASHA before its last step
        else:
            state = "completed"
        rows.append(TrialRow(
            trial_id=trial_id, state=state, params=dict(result.config or {}),
            accuracy=m.get("accuracy"), cost=m.get(cost_key), val_loss=m.get("val_loss"), evals=evals,
            step=int(m.get("step", 0)), qtype_acc={k[4:]: v for k, v in m.items() if k.startswith("acc/")}))
    return sorted(rows, key=lambda r: r.trial_id)


def pareto_front(rows: list[TrialRow]) -> list[TrialRow]:
    """Trials no other trial beats on both accuracy (higher) and cost (lower)."""
    done = [r for r in rows if r.accuracy is not None and r.cost is not None]

    def dominated(r: TrialRow) -> bool:
        return any(o.accuracy >= r.accuracy and o.cost <= r.cost and (o.accuracy > r.accuracy or o.cost < r.cost)
                   for o in done)

    return sorted((r for r in done if not dominated(r)), key=lambda r: r.cost)


def _link_runs(client: MlflowClient, parent_run_id: str, sweep_name: str, rows: list[TrialRow]) -> None:
    exp_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    by_name = {r.data.tags.get(RUN_NAME_TAG): r for r in children}
    for row in rows:
        run = by_name.get(trial_name(sweep_name, row.trial_id))
        if run is None:
            continue  # failed before rank 0 opened its run
        row.run_id = run.info.run_id
        client.set_tag(row.run_id, "raybench.trial_state", row.state)
        if run.info.status == "RUNNING":  # stopped by Tune before its rank 0 ended the run
            status = {"completed": "FINISHED", "pruned": "KILLED"}.get(row.state, "FAILED")
            client.set_terminated(row.run_id, status)


def _has_model(client: MlflowClient, run_id: str) -> bool:
    return any(a.path == "model/model.safetensors" for a in client.list_artifacts(run_id, "model"))


def _champion(client: MlflowClient, rows: list[TrialRow]) -> TrialRow | None:
    candidates = [r for r in rows if r.state == "completed" and r.accuracy is not None and r.run_id
                  and _has_model(client, r.run_id)]
    # Best accuracy; on a tie the cheaper model (lower cost) wins.
    return max(candidates, key=lambda r: (r.accuracy, -(r.cost or 0.0)), default=None)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(rows: list[TrialRow], cost_key: str, champion: TrialRow | None) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in rows for k in r.params})
    header = ["trial", "state", "accuracy", cost_key, "val_loss", "evals", *keys]
    body = [[r.trial_id + (" *" if champion is r else ""), r.state, _fmt(r.accuracy), _fmt(r.cost),
             _fmt(r.val_loss), str(r.evals), *(_fmt(r.params.get(k)) for k in keys)] for r in rows]
    return header, body


def record_grid_in_study(sweep, rows: list[TrialRow]) -> None:
    """A grid sweep has no searcher: write its trials into the same Optuna study a TPE sweep
    would have, so the plots and optuna-dashboard show it the same way (once per trial)."""
    import optuna

    from raybench.tune.space import optuna_space

    _, modes = sweep.metrics
    study = optuna.create_study(study_name=sweep.cfg.name, storage=sweep.study_storage, load_if_exists=True,
                                directions=["maximize" if m == "max" else "minimize" for m in modes])
    recorded = {t.user_attrs.get("trial_id") for t in study.get_trials(deepcopy=False)}
    dists = optuna_space(sweep.cfg.sweep.space)
    for r in rows:
        if r.trial_id in recorded:
            continue
        values = [r.accuracy] + ([r.cost] if len(modes) == 2 else [])
        ok = r.state == "completed" and None not in values
        state = (optuna.trial.TrialState.COMPLETE if ok else
                 optuna.trial.TrialState.PRUNED if r.state == "pruned" else optuna.trial.TrialState.FAIL)
        study.add_trial(optuna.trial.create_trial(
            params={k: v for k, v in r.params.items() if k in dists}, distributions=dists,
            values=values if ok else None, state=state, user_attrs={"trial_id": r.trial_id},
            intermediate_values={r.evals: r.accuracy} if r.state == "pruned" and r.accuracy is not None else None))


def _plots(study_name: str, storage: str, out: Path, pareto: bool) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name=study_name, storage=storage)
    plots = {"optimization_history.png": (lambda: ovm.plot_optimization_history(study)) if not pareto else None,
             "param_importances.png": (lambda: ovm.plot_param_importances(
                 study, target=(lambda t: t.values[0]) if pareto else None)),
             "pareto_front.png": (lambda: ovm.plot_pareto_front(study, target_names=["accuracy", "cost"]))
             if pareto else None}
    written = []
    for name, draw in plots.items():
        if draw is None:
            continue
        try:
            ax = draw()
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ finished trials
            print(f"[raybench] skipped {name}: {err}", flush=True)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _write_summary(out: Path, sweep, rows, champion, front, plots) -> None:
    cost_key = sweep.cfg.sweep.cost_metric
    header, body = _table(rows, cost_key, champion)
    with (out / "trials.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    (out / "trials.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    text = [f"# Sweep `{sweep.cfg.name}`", "", f"objective: {sweep.cfg.sweep.objective}; "
            f"{len(rows)} trials; `*` = champion", "", *md]
    if front:
        text += ["", "## Pareto front (accuracy vs " + cost_key + ")", "",
                 *(f"- {r.trial_id}: accuracy {r.accuracy:.4f}, {cost_key} {r.cost:.4g}" for r in front)]
    text += ["", *(f"![{p}]({p})" for p in plots)]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    (out / "summary.html").write_text(
        f"<html><body><h1>Sweep {html.escape(sweep.cfg.name)}</h1><table border=1><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>{cells}</table>"
        + "".join(f'<p><img src="{p}"></p>' for p in plots) + "</body></html>\n")
    if champion:
        best = trial_config(_ctx(sweep), champion.params, champion.trial_id)
        (out / "best_config.yaml").write_text(yaml.safe_dump(
            {"trial": champion.trial_id, "accuracy": champion.accuracy, "params": champion.params,
             "model": best.model.model_dump(mode="json"), "train": best.train.model_dump(mode="json")},
            sort_keys=False))


def _ctx(sweep) -> dict[str, Any]:
    return {"raw": sweep.raw, "name": sweep.cfg.name, "run_dir": str(sweep.run_dir),
            "data_path": str(sweep.cfg.data_path.resolve())}


def summarize(sweep, grid, parent: Tracker) -> dict[str, Any]:
    s = sweep.cfg.sweep
    client = parent.client
    rows = _rows(sweep, grid)
    _link_runs(client, parent.run_id, sweep.cfg.name, rows)
    champion = _champion(client, rows)
    front = pareto_front(rows) if s.objective == "pareto" else []
    out = sweep.run_dir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    if s.search == "grid":
        record_grid_in_study(sweep, rows)
    plots = _plots(sweep.cfg.name, sweep.study_storage, out, s.objective == "pareto")
    _write_summary(out, sweep, rows, champion, front, plots)

    version = None
    if champion:
        version = register_champion(client.tracking_uri, champion.run_id, s.registered_model, s.alias,
                                    tags={"raybench.sweep": sweep.cfg.name, "accuracy": champion.accuracy})
        client.set_tag(parent.run_id, "raybench.champion_run_id", champion.run_id)
    counts = {st: sum(r.state == st for r in rows) for st in ("completed", "pruned", "error")}
    parent.log_metrics({"best_accuracy": champion.accuracy if champion else 0.0, "trials": len(rows),
                        **{f"trials_{k}": v for k, v in counts.items()}}, step=0)
    client.log_artifacts(parent.run_id, str(out), "summary")
    parent.finish("FINISHED" if champion else "FAILED")

    print((out / "summary.md").read_text(), flush=True)
    summary = {"run_id": parent.run_id, "trials": len(rows), **counts,
               "champion": asdict(champion) if champion else None,
               "model_uri": f"models:/{s.registered_model}@{s.alias}" if version else None,
               "model_version": version, "summary_dir": str(out),
               "pareto_front": [r.trial_id for r in front]}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary

"""Ablation: IMTL-G on the shared feature z (``imtl_g``) vs exact IMTL-G on the shared
parameters θ (``imtl_g_exact``, the paper's "IMTL-G (exact)" of Table 1).

Reports, per variant: test metrics (selected on validation), mean step time (the exact variant
costs T encoder VJPs), and -- measured along each variant's own training trajectory every
``--probe-every`` steps -- the cosine between the two shared update directions computed on the
*same* params and batch: ``cos(Σ α^z_t ∇_θ L_t, Σ α^θ_t ∇_θ L_t)`` (the raw shared gradients
the methods hand to the optimizer), their norm ratio and the L1 distance between the α vectors.
The probe runs before the step and is excluded from the step time.

The diagnosis of the representation level (why IMTL-G at z can trail the parameter level) is
measured on the same probes: the smallest eigenvalue of the cosine matrix ``K = U U^T`` of the
unit task gradients at z and at θ (1: orthogonal tasks; near 0: nearly dependent, where alpha is
ill-determined), the spread of the per-task gradient norms at each level (max/min), and, from
the runs' alpha trajectories, how often one task gets nearly all the weight
(``max_t |α_t| / Σ|α_t| > 0.9``) and how far alpha moves between consecutive steps (mean L1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DESCRIPTION = "IMTL-G on the shared feature z vs exact IMTL-G on the shared parameters θ."
USAGE = """examples:
  python -m experiments ablation_z_vs_theta                     # MultiMNIST
  python -m experiments ablation_z_vs_theta --benchmark qm9 --steps 2000 --probe-every 100
"""
DEFAULTS = dict(methods=["imtl_g", "imtl_g_exact"])


def add_flags(parser):
    parser.add_argument("--probe-every", type=int, default=None,
                        help="measure the z-vs-θ cosine every k steps (default: steps/12; with --tiny: 2)")
    return ("probe_every",)


def _diagnostics_method(level: str):
    """A probe-only :class:`imtl_jax.Method` whose weighting reads the (T, F) matrix of per-task
    gradients at ``level`` and reports its cosine matrix's smallest eigenvalue and the row norms
    (its weights are EW's; they are never applied)."""
    import jax.numpy as jnp
    import imtl_jax
    from imtl_jax.methods.equal import IDENTITY

    def weigh(grads, losses, state, key, priorities):
        del losses, key, priorities
        g = grads.astype(jnp.float32)
        norms = jnp.linalg.norm(g, axis=1)
        eig = jnp.linalg.eigvalsh(imtl_jax.cosine_matrix(g))
        info = {"min_eig_cosines": eig[0], "norm_spread": jnp.max(norms) / jnp.maximum(jnp.min(norms), 1e-30)}
        return imtl_jax.WeightingOutput(jnp.ones(grads.shape[:1], grads.dtype), state, info)

    weighting = imtl_jax.Weighting(name=f"probe_{level}", init=lambda num_tasks, dtype=None: (), weigh=weigh)
    return imtl_jax.Method(f"probe_{level}", IDENTITY, weighting, level=level)


def alpha_trajectory_stats(weights) -> dict:
    """From a run's per-step weights (steps, T): the fraction of steps where one task holds more
    than 90 % of ``Σ|α|``, and the mean L1 distance between consecutive steps' α.

    >>> {k: round(v, 4) for k, v in alpha_trajectory_stats([[0.5, 0.5], [0.95, 0.05], [0.5, 0.5]]).items()}
    {'dominated_fraction': 0.3333, 'mean_l1_jump': 0.9}
    """
    import numpy as np
    if len(weights) == 0:
        return {"dominated_fraction": None, "mean_l1_jump": None}
    w = np.asarray(weights, np.float64).reshape(len(weights), -1)
    w = w[np.all(np.isfinite(w), axis=1)]
    if len(w) == 0:
        return {"dominated_fraction": None, "mean_l1_jump": None}
    share = np.max(np.abs(w), axis=1) / np.maximum(np.sum(np.abs(w), axis=1), 1e-30)
    jumps = np.sum(np.abs(np.diff(w, axis=0)), axis=1)
    return {"dominated_fraction": float(np.mean(share > 0.9)),
            "mean_l1_jump": float(np.mean(jumps)) if len(jumps) else None}


#: (column title, probe key or alpha-trajectory key) of :func:`diagnosis_table`.
DIAGNOSIS_COLUMNS = (("cos(update z, update θ)", "cos_shared"), ("‖α_z − α_θ‖₁", "alpha_l1_diff"),
                     ("min eig K at z", "min_eig_cosines_z"), ("min eig K at θ", "min_eig_cosines_theta"),
                     ("norm spread at z", "grad_norm_spread_z"), ("norm spread at θ", "grad_norm_spread_theta"),
                     ("α dominated (share of steps)", "dominated_fraction"), ("α L1 jump per step", "mean_l1_jump"))


def diagnosis_table(payload: dict) -> str:
    """The probes of a results.json written by this study, one row per trained method: each
    column's per-run mean along the trajectory, averaged over seeds, with the seeds' range.

    Probe columns (``probe_summary`` of each run): the cosine of the two shared updates and the
    α distance on the same params and batch, the smallest eigenvalue of the unit gradients' cosine
    matrix K at z and at θ, the max/min spread of the per-task gradient norms; α columns
    (``alpha_trajectories``, every step): the share of steps where one task holds > 90 % of Σ|α|
    and the mean L1 move of α between steps.
    """
    import numpy as np
    traj = payload.get("alpha_trajectories") or {}
    by_method: dict = {}
    for r in payload["runs"]:
        if r.get("single_task") is None and r.get("status") == "ok":
            by_method.setdefault(r["method"], []).append(r)
    lines = ["| along the run of | seeds | " + " | ".join(t for t, _ in DIAGNOSIS_COLUMNS) + " |",
             "|---|---|" + "---|" * len(DIAGNOSIS_COLUMNS)]
    for method, runs in by_method.items():
        cells = []
        for _, key in DIAGNOSIS_COLUMNS:
            vals = [((r.get("probe_summary") or {}).get(key) or {}).get("mean") for r in runs] if key in \
                _PROBE_KEYS else [(traj.get(f"{method}/seed{r['seed']}") or {}).get(key) for r in runs]
            vals = [float(v) for v in vals if v is not None]
            cells.append("n/a" if not vals else f"{np.mean(vals):.3g}" if len(vals) == 1 else
                         f"{np.mean(vals):.3g} ({min(vals):.3g}–{max(vals):.3g})")
        lines.append(f"| {method} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    lines += ["", f"Probed every {payload.get('probe_every', '?')} steps on the same parameters and batch (mean "
                  "along each run; averaged over seeds, range in brackets); the α columns use every step."]
    return "\n".join(lines)


_PROBE_KEYS = {"cos_shared", "alpha_l1_diff", "min_eig_cosines_z", "min_eig_cosines_theta", "grad_norm_spread_z",
               "grad_norm_spread_theta"}


def direction_probe(program):
    """``program`` -> probe(params, method_state, batch, key) -> dict (one run; vmapped by the loop)."""
    import jax
    import jax.numpy as jnp
    import imtl_jax
    from experiments.errors import ExperimentError
    if program.has_state:
        raise ExperimentError("the z-vs-θ probe needs a parameter-only encoder; pass --norm group")
    pure = program.pure
    step_z = imtl_jax.mtl_step(pure.encoder, pure.task_losses, "imtl_g")
    step_t = imtl_jax.mtl_step(pure.encoder, pure.task_losses, "imtl_g_exact")
    diag_z = imtl_jax.mtl_step(pure.encoder, pure.task_losses, _diagnostics_method("representation"))
    diag_t = imtl_jax.mtl_step(pure.encoder, pure.task_losses, _diagnostics_method("parameters"))

    def flat(tree):
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])

    def probe(params, method_state, batch, key):
        del method_state
        gz, _, az = step_z(params, step_z.init(params), batch, key=key)
        gt, _, at = step_t(params, step_t.init(params), batch, key=key)
        a, b = flat(gz.shared), flat(gt.shared)
        na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
        _, _, dz = diag_z(params, (), batch, key=key)
        _, _, dt = diag_t(params, (), batch, key=key)
        return {"cos_shared": jnp.dot(a, b) / (na * nb), "norm_ratio_z_over_theta": na / nb,
                "alpha_l1_diff": jnp.sum(jnp.abs(az.weights - at.weights)),
                "alpha_z": az.weights, "alpha_theta": at.weights,
                "min_eig_cosines_z": dz.info["min_eig_cosines"], "min_eig_cosines_theta": dt.info["min_eig_cosines"],
                "grad_norm_spread_z": dz.info["norm_spread"], "grad_norm_spread_theta": dt.info["norm_spread"]}

    return probe


def plot_probes(path: Path, histories: dict) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    any_line = False
    for (method, seed), h in sorted(histories.items()):
        pr = h.get("probe") or []
        if not pr:
            continue
        st = [p["step"] for p in pr]
        axes[0].plot(st, [p["cos_shared"] for p in pr], "o-", ms=3, label=f"along {method}, seed {seed}")
        axes[1].plot(st, [p["alpha_l1_diff"] for p in pr], "o-", ms=3, label=f"along {method}, seed {seed}")
        any_line = True
    if not any_line:
        plt.close(fig)
        return False
    axes[0].set_title("cosine of the shared updates via z and via θ")
    axes[0].set_ylabel("cos(update_z, update_θ)")
    axes[1].set_title("distance of the task weights")
    axes[1].set_ylabel("‖α_z − α_θ‖₁")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(o, command: str) -> dict:
    from experiments import records, suites
    from experiments.errors import CLIError
    from experiments.runs import RunConfig, expand_methods
    from experiments.studies.compare import train_and_report
    expand_methods(o.methods, 1)
    with suites.build(o.benchmark, o) as bench:
        specs = expand_methods(o.methods, bench.num_tasks)
        cfg = RunConfig.from_options(o, bench)
        every = o.extra.get("probe_every")
        if every is None:
            every = 2 if o.tiny else max(1, cfg.steps // 12)
        if every < 1:
            raise CLIError("--probe-every must be >= 1")
        out = Path(o.out)
        t0 = time.perf_counter()
        res = train_and_report(bench, specs, cfg, o, command, title=f"{bench.name}: IMTL-G on z vs θ",
                               print_table=False, probe=direction_probe, probe_every=every)
        results = res["results"]
        hist = records.load_histories(out, results)
        (out / "plots").mkdir(parents=True, exist_ok=True)
        have_plot = plot_probes(out / "plots" / "cos_z_vs_theta.png", hist)
        lines = ["| trajectory of | seed | cos mean | cos min | cos last | ‖α_z−α_θ‖₁ mean | norm ratio z/θ mean | "
                 "min eig K at z | min eig K at θ | norm spread z | norm spread θ | α dominated (share of steps) | "
                 "α L1 jump per step | step ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            ps = r.get("probe_summary") or {}
            c, a, n = ps.get("cos_shared", {}), ps.get("alpha_l1_diff", {}), ps.get("norm_ratio_z_over_theta", {})

            def f(d, k):
                return "n/a" if d.get(k) is None else f"{d[k]:.4f}"

            def g(name):
                return f(ps.get(name, {}), "mean")  # noqa: B023 (f, ps: this iteration's, used within it)

            traj = alpha_trajectory_stats((hist.get((r["method"], r["seed"])) or {}).get("weight") or [])
            r["alpha_trajectory"] = traj

            def t(k):
                return "n/a" if traj[k] is None else f"{traj[k]:.3f}"  # noqa: B023 (used within this iteration)

            lines.append(f"| {r['method']} | {r['seed']} | {f(c, 'mean')} | {f(c, 'min')} | {f(c, 'last')} | "
                         f"{f(a, 'mean')} | {f(n, 'mean')} | {g('min_eig_cosines_z')} | {g('min_eig_cosines_theta')} | "
                         f"{g('grad_norm_spread_z')} | {g('grad_norm_spread_theta')} | {t('dominated_fraction')} | "
                         f"{t('mean_l1_jump')} | "
                         f"{'n/a' if r.get('step_time_ms') is None else format(r['step_time_ms'], '.1f')} |")
        st = {r["method"]: r.get("step_time_ms") for r in results if r.get("step_time_ms")}
        ratio = (st["imtl_g_exact"] / st["imtl_g"]) if {"imtl_g", "imtl_g_exact"} <= set(st) else None
        probe_md = ("Cosine between the two shared update directions on the same params and batch, "
                    f"every {every} steps along each run:\n\n" + "\n".join(lines)
                    + (f"\n\nStep time exact (θ) / z: {ratio:.2f}×." if ratio else "")
                    + ("\n\nPlot: [cos_z_vs_theta.png](plots/cos_z_vs_theta.png)" if have_plot else ""))
        with open(out / "results.md", "a") as fh:
            fh.write("\n" + probe_md + "\n")
        payload = json.loads((out / "results.json").read_text())
        payload["probe_every"] = every
        payload["step_time_ratio_exact_over_z"] = ratio
        payload["alpha_trajectories"] = {f"{r['method']}/seed{r['seed']}": r.get("alpha_trajectory") for r in results}
        payload["total_wall_s"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(records.to_json(payload), indent=1))
        print(res["markdown"] + "\n\n" + probe_md)
        return payload

"""Ablation: IMTL-G on the shared feature z (``imtl_g``) vs exact IMTL-G on the shared
parameters θ (``imtl_g_exact``, the paper's "IMTL-G (exact)" of Table 1).

Reports, per variant: test metrics (selected on validation), mean step time (the exact variant
costs T encoder VJPs), and -- measured along each variant's own training trajectory every
``--probe-every`` steps -- the cosine between the two shared update directions computed on the
*same* params and batch: ``cos(Σ α^z_t ∇_θ L_t, Σ α^θ_t ∇_θ L_t)`` (the raw shared gradients
the methods hand to the optimizer), their norm ratio and the L1 distance between the α vectors.
The probe runs before the step and is excluded from the step time.
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

    def flat(tree):
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])

    def probe(params, method_state, batch, key):
        del method_state
        gz, _, az = step_z(params, step_z.init(params), batch, key=key)
        gt, _, at = step_t(params, step_t.init(params), batch, key=key)
        a, b = flat(gz.shared), flat(gt.shared)
        na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
        return {"cos_shared": jnp.dot(a, b) / (na * nb), "norm_ratio_z_over_theta": na / nb,
                "alpha_l1_diff": jnp.sum(jnp.abs(az.weights - at.weights)),
                "alpha_z": az.weights, "alpha_theta": at.weights}

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
                 "step ms |", "|---|---|---|---|---|---|---|---|"]
        for r in results:
            ps = r.get("probe_summary") or {}
            c, a, n = ps.get("cos_shared", {}), ps.get("alpha_l1_diff", {}), ps.get("norm_ratio_z_over_theta", {})
            f = (lambda d, k: "n/a" if d.get(k) is None else f"{d[k]:.4f}")
            lines.append(f"| {r['method']} | {r['seed']} | {f(c, 'mean')} | {f(c, 'min')} | {f(c, 'last')} | "
                         f"{f(a, 'mean')} | {f(n, 'mean')} | "
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
        payload["total_wall_s"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(records.to_json(payload), indent=1))
        print(res["markdown"] + "\n\n" + probe_md)
        return payload

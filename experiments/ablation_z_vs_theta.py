"""Ablation: IMTL-G on the shared feature z (``imtl_g``) vs exact IMTL-G on the shared
parameters θ (``imtl_g_exact``, the paper's "IMTL-G (exact)" of Table 1).

    python -m experiments.ablation_z_vs_theta                      # MultiMNIST, 600 steps
    python -m experiments.ablation_z_vs_theta --benchmark qm9 --steps 2000 --probe-every 100

Reports, per variant: final test metrics, mean step time (the exact variant costs T encoder
VJPs), and -- measured along each variant's own training trajectory every ``--probe-every``
steps -- the cosine between the two shared update directions computed on the *same* params
and batch: ``cos(Σ α^z_t ∇_θ L_t, Σ α^θ_t ∇_θ L_t)`` (the raw shared gradients the methods
hand to the optimizer), their norm ratio and the L1 distance between the two α vectors.
The probe runs before the step and is excluded from the step time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments import cli

DEFAULTS = dict(methods=["imtl_g", "imtl_g_exact"], seeds=[0], steps=600, batch_size=128, lr=1e-3,
                eval_every=0)
PROG = "python -m experiments.ablation_z_vs_theta"


def direction_probe(fm):
    """``fm`` (a harness FunctionalModel) -> jitted probe(params, state, batch, key) -> dict."""
    import jax
    import jax.numpy as jnp
    import imtl_jax
    step_z = imtl_jax.mtl_step(fm.encoder, fm.task_losses, "imtl_g")
    step_t = imtl_jax.mtl_step(fm.encoder, fm.task_losses, "imtl_g_exact")

    def flat(tree):
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])

    @jax.jit
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


def _flags(parser):
    from experiments.harness import BENCHMARK_BUILDERS
    parser.add_argument("--benchmark", default="multimnist", choices=sorted(BENCHMARK_BUILDERS))
    parser.add_argument("--dataset", default="multimnist",
                        choices=["multimnist", "multifashion", "multi_fashion_mnist"])
    parser.add_argument("--probe-every", type=int, default=None,
                        help="measure the z-vs-θ cosine every k steps (default: steps/12)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--max-eval", type=int, default=None)


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
        axes[0].plot(st, [p["cos_shared"] for p in pr], "o-", ms=3, label=f"trajectory of {method} s{seed}")
        axes[1].plot(st, [p["alpha_l1_diff"] for p in pr], "o-", ms=3, label=f"{method} s{seed}")
        any_line = True
    if not any_line:
        plt.close(fig)
        return False
    axes[0].set_title("cos(shared update via z, via θ)")
    axes[1].set_title("‖α_z − α_θ‖₁")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    def body():
        from experiments import harness, report
        parser = cli.make_parser(PROG, __doc__.split("\n")[0])
        _flags(parser)
        s = cli.parse_settings(parser, argv, dict(DEFAULTS, out="runs/ablation_z_vs_theta"),
                               extra_keys=("benchmark", "dataset", "probe_every", "image_size", "max_eval"))
        harness.expand_methods(s.methods, 1)  # unknown names fail before any data is loaded
        bench = harness.build_benchmark(s.extra["benchmark"], s)
        try:
            specs = harness.expand_methods(s.methods, bench.num_tasks)
            cfg = harness.settings_to_run_config(s, bench)
            every = s.extra.get("probe_every")
            if every is None:
                every = 2 if s.tiny else max(1, cfg.steps // 12)
            if every < 1:
                raise cli.CLIError("--probe-every must be >= 1")
            cfg.probe, cfg.probe_every = direction_probe, every
            out = Path(s.out)
            t0 = time.perf_counter()
            results = harness.run_experiment(bench, specs, s.seeds, cfg, out)
            hist = harness.load_histories(out, results)
            wall = time.perf_counter() - t0
            (out / "plots").mkdir(parents=True, exist_ok=True)
            have_plot = plot_probes(out / "plots" / "cos_z_vs_theta.png", hist)
            lines = ["| trajectory of | seed | cos mean | cos min | cos last | ‖α_z−α_θ‖₁ mean | "
                     "norm ratio z/θ mean | step ms |", "|---|---|---|---|---|---|---|---|"]
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
            summary = report.write_reports(out, bench, results, hist, command=harness.command_line(PROG, argv),
                                           total_wall_s=wall, title=f"{bench.name}: IMTL-G on z vs θ",
                                           extra_md=probe_md)
            payload = json.loads((out / "results.json").read_text())
            payload["probe_every"] = every
            payload["step_time_ratio_exact_over_z"] = ratio
            (out / "results.json").write_text(json.dumps(payload, indent=1))
            print(summary["markdown"] + "\n\n" + probe_md)
        finally:
            if bench.cleanup is not None:
                bench.cleanup()

    return cli.run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())

"""imtl-jax: Impartial Multi-Task Learning for JAX, Flax and optax.

The public API, re-exported flat (as optax does):

* math: :func:`imtl_g_weights`, :func:`imtl_g_solve`, :func:`scale_losses`
* training: :func:`mtl_step`, :class:`MTLParams`, :func:`stacked_task_losses`, :func:`accumulate_step`
* optax: :func:`imtl_g`, :func:`aggregate`, :func:`multi_steps`, :func:`safe_optimizer`, :func:`skipped_steps`,
  :func:`flag_nonfinite`
* skipping non-finite steps whole: :func:`skip_nonfinite`, :func:`safe_step`
* Flax NNX: :mod:`imtl_jax.nnx` (:class:`~imtl_jax.nnx.LossScales`, :func:`~imtl_jax.nnx.make_train_step`)
* Flax Linen: :mod:`imtl_jax.linen` (:func:`~imtl_jax.linen.encoder`)
* task affinity and grouping: :func:`affinity_tracker`, :func:`with_affinity`,
  :func:`propose_groups`; overfitting tasks: :func:`plateau_policy`
* methods: :mod:`imtl_jax.methods` (registry), :class:`Method`, :class:`Weighting`,
  :class:`LossScaling`
"""

__version__ = "0.1.0"

from imtl_jax._imtl_g import ImtlGResult, imtl_g_solve, imtl_g_weights
from imtl_jax._loss_scaling import scale_losses
from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput
from imtl_jax import methods
from imtl_jax._step import (MTLParams, MTLStep, StackedTaskLosses, StepAux, mtl_step,
                            stacked_task_losses)
from imtl_jax._aggregator import AggregatorState, aggregate, imtl_g
from imtl_jax._accumulate import AccumulatedStep, MultiStepsState, accumulate_step, multi_steps
from imtl_jax._affinity import (AffinityState, AffinityStats, AffinityTracker, TrackedState,
                                affinity_stats, affinity_tracker, cosine_matrix, grouping_score,
                                lookahead_affinity, propose_groups, random_groups, with_affinity)
from imtl_jax._task_policy import TaskPolicy, TaskPolicyState, best_final_gap, plateau_policy
from imtl_jax._safety import (SafeStep, flag_nonfinite, safe_optimizer, safe_step,
                              skip_nonfinite, skipped_steps)

__all__ = [
    "AggregatorState", "ImtlGResult", "LossScaling", "MTLParams", "MTLStep", "Method",
    "StackedTaskLosses", "StepAux", "Weighting", "WeightingOutput", "aggregate", "imtl_g",
    "imtl_g_solve", "imtl_g_weights", "methods", "mtl_step", "scale_losses",
    "stacked_task_losses", "flag_nonfinite", "safe_optimizer", "skipped_steps",
    "AccumulatedStep", "MultiStepsState", "accumulate_step", "multi_steps",
    "AffinityState", "AffinityStats", "AffinityTracker", "TrackedState", "affinity_stats",
    "affinity_tracker", "cosine_matrix", "grouping_score", "lookahead_affinity", "propose_groups",
    "random_groups", "with_affinity",
    "TaskPolicy", "TaskPolicyState", "best_final_gap", "plateau_policy",
    "SafeStep", "safe_step", "skip_nonfinite",
]

"""The registry of balancing methods: name -> :class:`imtl_jax.Method`.

Every registered method works in :func:`imtl_jax.mtl_step` (representation or parameter level;
those of :func:`parameters_only_methods`, MoCo, at the parameter level only, where they are
registered) and, through its :class:`imtl_jax.Weighting`, in the optax aggregator
:func:`imtl_jax.aggregate`. Tests loop over :func:`method_names`, so a new method cannot be
added without passing them.

Example:
  >>> import imtl_jax
  >>> "imtl_h" in imtl_jax.methods.method_names()
  True
  >>> imtl_jax.methods.get_method("imtl_h").weighting.name
  'imtl_g'
"""

from __future__ import annotations

from typing import Union

from imtl_jax._method import Method

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` to the registry under ``method.name`` and returns it."""
    if method.name in _REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """All registered method names, in registration order."""
    return tuple(_REGISTRY)


def parameters_only_methods() -> tuple[str, ...]:
    """The registered methods defined at ``level="parameters"`` only (their weighting returns a
    ``direction`` of its own: MoCo). They are registered at that level; a runner that offers
    ``<name>@params`` variants offers these only so (``moco@params``), never at the
    representation.

    Example:
      >>> import imtl_jax
      >>> imtl_jax.methods.parameters_only_methods()
      ('moco',)
    """
    return tuple(n for n, m in _REGISTRY.items() if m.weighting.returns_direction)


def get_method(method: Union[str, Method]) -> Method:
    """Looks a method up by name (a :class:`Method` is returned as is).

    Raises:
      ValueError: unknown name; the message lists the registered names.
    """
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or method not in _REGISTRY:
        raise ValueError(
            f"`method` must be one of {sorted(_REGISTRY)} or an imtl_jax.Method, got {method!r}."
        )
    return _REGISTRY[method]


# Registration happens on import of each family module. Keep this list in sync with the files.
from imtl_jax.methods import equal as _equal  # noqa: E402,F401
from imtl_jax.methods import imtl as _imtl  # noqa: E402,F401
from imtl_jax.methods import loss_weighting as _loss_weighting  # noqa: E402,F401
from imtl_jax.methods import gradnorm as _gradnorm  # noqa: E402,F401
from imtl_jax.methods import mgda as _mgda  # noqa: E402,F401
from imtl_jax.methods import pcgrad as _pcgrad  # noqa: E402,F401
from imtl_jax.methods import cagrad as _cagrad  # noqa: E402,F401
from imtl_jax.methods import nash_mtl as _nash_mtl  # noqa: E402,F401
from imtl_jax.methods import aligned_mtl as _aligned_mtl  # noqa: E402,F401
from imtl_jax.methods import upgrad as _upgrad  # noqa: E402,F401
from imtl_jax.methods import rlw as _rlw  # noqa: E402,F401
from imtl_jax.methods import scale_invariant as _scale_invariant  # noqa: E402,F401
from imtl_jax.methods import config as _config  # noqa: E402,F401
from imtl_jax.methods import db_mtl as _db_mtl  # noqa: E402,F401
from imtl_jax.methods import stch as _stch  # noqa: E402,F401
from imtl_jax.methods import gradvac as _gradvac  # noqa: E402,F401
from imtl_jax.methods import dualproj as _dualproj  # noqa: E402,F401
from imtl_jax.methods import fairgrad as _fairgrad  # noqa: E402,F401
from imtl_jax.methods import sdmgrad as _sdmgrad  # noqa: E402,F401
from imtl_jax.methods import modo as _modo  # noqa: E402,F401
from imtl_jax.methods import cr_mogm as _cr_mogm  # noqa: E402,F401
from imtl_jax.methods import preference as _preference  # noqa: E402,F401
from imtl_jax.methods import excess_mtl as _excess_mtl  # noqa: E402,F401
from imtl_jax.methods import graddrop as _graddrop  # noqa: E402,F401
from imtl_jax.methods import moco as _moco  # noqa: E402,F401

from imtl_jax.methods.loss_weighting import single_task as single_task  # noqa: E402  (a factory, not registered)

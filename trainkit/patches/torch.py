"""Patches of torch internals. Checked on torch 2.11 (needed) and 2.13 (fixed upstream: not applied).

``torch.fsdp2_frozen_integer_params`` (``allow_frozen_integer_params_in_fsdp2()``)
    FSDP2's ``FSDPParam._init_sharded_param`` creates the sharded ``nn.Parameter`` without passing
    ``requires_grad`` (the default, True) and sets the original's flag after; for a uint8 parameter, such as
    the packed bytes of a 4-bit weight, the creation itself fails with "only Tensors of floating point dtype
    can require gradients" (pytorch issues 177844 and 185239; torch 2.13 passes the flag). While that method
    runs for a non-floating parameter, ``nn.Parameter`` as that module sees it creates it frozen. Applied only
    when the method is the code this patch knows; a torch that passes the flag needs nothing, and any other
    code is a PatchError.
    The same torches also apply the mixed-precision ``param_dtype`` to every parameter, so the 4-bit bytes
    arrived as bf16 numbers (seen on an H200 with torch 2.11: "A must be uint8, got torch.bfloat16");
    ``FSDPParam.init_dtype_attrs`` then leaves non-floating parameters uncast, as torch 2.13 does itself.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from trainkit.patches import LOCK_HINT, Patch

__all__ = ["allow_frozen_integer_params_in_fsdp2"]

FSDP2_FROZEN_INTEGER_PARAMS = Patch(
    "torch.fsdp2_frozen_integer_params", "torch",
    "FSDP2 creates the shards of frozen uint8 parameters (4-bit weights) without requires_grad and gathers them "
    "uncast, as torch 2.13 does",
    checked="2.11, 2.13")


def _frozen_if_not_floating(data=None, requires_grad=True):
    if data is not None and not (data.is_floating_point() or data.is_complex()):
        requires_grad = False
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def allow_frozen_integer_params_in_fsdp2() -> bool:
    """Let fully_shard shard frozen uint8 parameters on torches whose FSDP2 cannot; True when patched."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    method = _fsdp_param.FSDPParam._init_sharded_param
    if getattr(method, "_trainkit_patched", False):
        return True
    source = inspect.getsource(method)
    if "requires_grad=param.requires_grad" in source:  # this torch passes the flag itself
        return False
    if "nn.Parameter(" not in source or "requires_grad_(param.requires_grad)" not in source:
        raise FSDP2_FROZEN_INTEGER_PARAMS.error(
            "FSDPParam._init_sharded_param is not the code this patch knows",
            "FSDP cannot shard the 4-bit weights with this torch: use DDP (--accelerate-config ddp), or " + LOCK_HINT)
    nn_frozen_aware = types.SimpleNamespace(**{**vars(torch.nn), "Parameter": _frozen_if_not_floating})

    @functools.wraps(method)
    def _init_sharded_param(self, param, *args, **kwargs):
        if param.is_floating_point() or param.is_complex():
            return method(self, param, *args, **kwargs)
        _fsdp_param.nn = nn_frozen_aware  # the module-level name the method resolves nn.Parameter through
        try:
            return method(self, param, *args, **kwargs)
        finally:
            _fsdp_param.nn = torch.nn

    _init_sharded_param._trainkit_patched = True
    _fsdp_param.FSDPParam._init_sharded_param = _init_sharded_param

    init_dtype_attrs = _fsdp_param.FSDPParam.init_dtype_attrs
    if "is_floating_point" not in inspect.getsource(init_dtype_attrs):
        if "self.param_dtype" not in inspect.getsource(init_dtype_attrs):
            raise FSDP2_FROZEN_INTEGER_PARAMS.error(
                "FSDPParam.init_dtype_attrs does not set param_dtype",
                "FSDP cannot shard the 4-bit weights with this torch: use DDP (--accelerate-config ddp), or " + LOCK_HINT)

        @functools.wraps(init_dtype_attrs)
        def _init_dtype_attrs(self, mp_policy):
            init_dtype_attrs(self, mp_policy)
            if not self.orig_dtype.is_floating_point:  # packed 4-bit bytes: gathered as they are, never cast
                self.param_dtype = None

        _fsdp_param.FSDPParam.init_dtype_attrs = _init_dtype_attrs
    FSDP2_FROZEN_INTEGER_PARAMS.mark_applied()
    return True

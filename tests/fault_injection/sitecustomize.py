"""Fault injection for the tests: the one place where a training run is made to fail on purpose.

Python imports `sitecustomize` at start-up from the first directory of sys.path that has one, so a
test runs a training script with this directory on PYTHONPATH (tests/helpers_qlora.fault_env) and
the variables below set. The training code has no test-only path: the fault is put in from outside.

TRAINKIT_FAULT_NONFINITE_STEPS=3,7  the loss of those optimizer steps (1-based) is multiplied by NaN
                                    before backward, so their gradients are NaN.
"""

import os

_steps = {int(s) for s in os.environ.get("TRAINKIT_FAULT_NONFINITE_STEPS", "").split(",") if s.strip()}

if _steps:
    from accelerate import Accelerator

    _backward = Accelerator.backward

    def _backward_with_faults(self, loss, **kwargs):
        # The scheduler registered for checkpointing counts the optimizer steps done (restored on resume).
        schedulers = [o for o in self._custom_objects if hasattr(o, "last_epoch")]
        if len(schedulers) != 1:
            raise RuntimeError(f"fault injection: expected one registered lr scheduler, found {len(schedulers)}")
        if schedulers[0].last_epoch + 1 in _steps:
            loss = loss * float("nan")
        return _backward(self, loss, **kwargs)

    Accelerator.backward = _backward_with_faults

"""A check of `test_gpu.py` that holds on any backend, run on the CPU by `make test`: the gpu
tests run only where an accelerator is lent, so a mistake in one (as when the no-recompile
check changed `max_new_tokens`, which sizes the cache, between its two calls) would otherwise
show only there. The bf16 and device-against-CPU checks need the device and stay there; seeded
sampling under the budget is checked on the CPU by `test_budget.py`."""

from __future__ import annotations

import test_gpu


def test_the_gpu_no_recompile_check_holds_on_the_cpu():
    test_gpu.test_no_recompiles_across_rounds_on_device()

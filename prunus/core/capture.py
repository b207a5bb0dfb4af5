"""Run a model up to one module and take that module's inputs: calibration capture and chunked-head
perplexity both need it (so nothing after the module, such as a 49k-vocabulary head, is computed)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn


class _Stop(Exception):
    pass


def inputs_of(module: nn.Module, run: Callable[[], Any]) -> Optional[tuple[tuple, dict]]:
    """The (args, kwargs) ``module`` is called with when ``run()`` runs, stopping the forward there.

    Everything after ``module`` (later blocks, a 49k-vocabulary head) is never computed. Returns
    None if ``run`` never reaches ``module``.
    """
    got: list[tuple[tuple, dict]] = []

    def grab(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0] if got else None

"""What ``tunefast.patch`` keeps, and where: on the model, never in module globals.

The patched root model holds one :class:`PatchState` (its ``__dict__`` under ``ROOT_KEY``: not an
attribute lookup, since a PeftModel forwards unknown attributes to the wrapped model) and every module
the patch swapped holds a reference to the same object (``LAYER_KEY``). Through it a patched layer finds
the routing of *its* model in *its* thread: a ``tunefast.route`` block on one model never changes another
model's outputs, and a forward in another thread never sees it.

``deepcopy`` copies the state with the model (the references are shared inside the copy, so the copy has
its own); pickling drops the routes (they only live inside a ``with`` block).
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

from torch import nn

ROOT_KEY = "_tunefast_root"  # in the patched root model's __dict__
LAYER_KEY = "_tunefast_state"  # in each swapped module's __dict__


class PatchState:
    """One patch of one model: its backend, its report, and the routes active per thread."""

    def __init__(self, backend: str, report):
        self.backend = backend
        self.report = report
        self.n_swapped = 0  # modules whose class the patch swapped (0: nothing to go stale)
        # thread id -> stack of (adapter names, adapter ids (tokens,) or (batch,)) of tunefast.route blocks.
        # Empty almost always: the hot path reads only its truthiness (torch.compile guards on it).
        self.routes: dict[int, list] = {}

    def current_route(self):
        """(adapter names, ids) of the innermost ``route`` block of this thread, or None."""
        if not self.routes:
            return None
        stack = self.routes.get(threading.get_ident())
        return stack[-1] if stack else None

    @contextmanager
    def routed(self, route):
        tid = threading.get_ident()
        stack = self.routes.setdefault(tid, [])
        stack.append(route)
        try:
            yield
        finally:
            stack.pop()
            if not stack:
                del self.routes[tid]

    def __getstate__(self):
        return {**self.__dict__, "routes": {}}


def root_state(model: nn.Module) -> PatchState | None:
    return model.__dict__.get(ROOT_KEY)


def layer_state(module: nn.Module) -> PatchState | None:
    return module.__dict__.get(LAYER_KEY)


def owns_any_module(state: PatchState, model: nn.Module) -> bool:
    """Whether some module of ``model`` is still patched under ``state`` (False once another patch of an
    enclosing or nested model took the modules over, or an unpatch removed them)."""
    return any(layer_state(m) is state for m in model.modules())


def attach(state: PatchState, model: nn.Module, modules) -> None:
    model.__dict__[ROOT_KEY] = state
    for m in modules:
        m.__dict__[LAYER_KEY] = state


def detach_all(model: nn.Module) -> None:
    """Forget every patch state in ``model``: its own and those of nested roots patched separately."""
    for m in model.modules():
        m.__dict__.pop(ROOT_KEY, None)
        m.__dict__.pop(LAYER_KEY, None)


class _RoutedCheckpoint(functools.partial):
    """transformers' checkpoint function with the caller's route re-entered around every run of the
    checkpointed layer: its forward and its recompute during backward (which may come after the ``with``
    block, or in autograd's own thread). The same partial keywords as the original (use_reentrant...)."""

    def __new__(cls, original, state: PatchState):
        if isinstance(original, functools.partial):
            self = super().__new__(cls, original.func, *original.args, **original.keywords)
        else:
            self = super().__new__(cls, original)
        self.original, self.state = original, state
        return self

    def __call__(self, function, *args, **kwargs):
        route = self.state.current_route()
        if route is None:
            return self.original(function, *args, **kwargs)

        def run(*a, **k):
            with self.state.routed(route):
                return function(*a, **k)

        return self.original(run, *args, **kwargs)

    def __reduce__(self):
        return (_RoutedCheckpoint, (self.original, self.state))


def wrap_checkpointing(model: nn.Module, state: PatchState) -> None:
    """Make the checkpoint functions of ``model``'s layers carry ``state``'s routes (tunefast.route)."""
    for m in model.modules():
        func = m.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not (isinstance(func, _RoutedCheckpoint) and func.state is state):
            m._gradient_checkpointing_func = _RoutedCheckpoint(getattr(func, "original", func), state)


def unwrap_checkpointing(model: nn.Module) -> None:
    """Put back the checkpoint functions ``wrap_checkpointing`` wrapped (``tunefast.unpatch`` does)."""
    for m in model.modules():
        func = m.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _RoutedCheckpoint):
            m._gradient_checkpointing_func = func.original

"""Registry of bench problems and implementations.

A family module (``bench/<family>.py``) registers:
  - problems: ``@problem(family, name, grads=(...))`` on a factory ``make(device, quick) -> dict``
    of named inputs. Tensors named in ``grads`` get gradients in forward+backward timing.
  - implementations: ``@impl(family, name, ours=False, baseline=False)`` on ``build(inputs) -> forward`` where
    ``forward()`` returns a tensor or a tuple of tensors. A baseline (a bare GEMM roofline,
    the nn.Linear a layer replaces) is timed and shown but is not a peer in the ratios. ``build`` may raise ``Unsupported``
    to skip a problem, and a problem's factory runs once for all its implementations.
  - train-step problems: ``@problem(..., train_step=True)``; their ``build(inputs)`` returns a
    ``TrainStep(forward, step)``: ``forward()`` is the model's forward (checked, timed as "fwd")
    and ``step()`` one whole training step, zero_grad + forward + loss + backward + optimizer
    step (timed as "fwd+bwd", and its peak memory reported).
The first output of every implementation is compared with the first peer's by the problem's
``compare(ours, peer) -> str`` (e.g. "max err 3e-3" or "0 mismatches").
"""
from dataclasses import dataclass, field
from typing import Callable, Optional


class Unsupported(Exception):
    """Raised by a build function for a problem it does not handle (reported, not an error)."""


@dataclass
class Problem:
    family: str
    name: str
    make: Callable
    grads: tuple = ()
    compare: Optional[Callable] = None
    note: str = ""
    train_step: bool = False


@dataclass
class TrainStep:
    """What a train-step problem's build returns: forward() -> the model's output (tensor or
    tuple), step() -> one full training step (zero_grad, forward, loss, backward, optimizer)."""
    forward: Callable
    step: Callable


@dataclass
class Impl:
    family: str
    name: str
    build: Callable
    ours: bool = False
    backward: bool = True
    problems: Optional[tuple] = None  # None: every problem of the family
    baseline: bool = False  # shown for scale (a roofline, the layer replaced), not a peer


@dataclass
class Registry:
    problems: dict = field(default_factory=dict)
    impls: list = field(default_factory=list)

    def cases(self, families=None, problems=None):
        """(problem, [impls]) pairs in registration order, filtered by name."""
        for p in self.problems.values():
            if families and p.family not in families:
                continue
            if problems and p.name not in problems:
                continue
            impls = [i for i in self.impls if i.family == p.family
                     and (i.problems is None or p.name in i.problems)]
            yield p, impls


REGISTRY = Registry()


def problem(family, name, *, grads=(), compare=None, note="", train_step=False):
    def wrap(make):
        REGISTRY.problems[(family, name)] = Problem(family, name, make, tuple(grads), compare,
                                                    note, train_step)
        return make
    return wrap


def impl(family, name, *, ours=False, backward=True, problems=None, baseline=False):
    def wrap(build):
        REGISTRY.impls.append(Impl(family, name, build, ours, backward,
                                   tuple(problems) if problems else None, baseline))
        return build
    return wrap


def load_families():
    """Imports every family module of the bench package (which registers its cases)."""
    import importlib
    import pkgutil

    import bench

    skip = {"core", "peers", "__main__", "conftest", "report_only"}
    for mod in pkgutil.iter_modules(bench.__path__):
        if mod.name in skip or mod.name.startswith(("test_", "_")):
            continue
        importlib.import_module(f"bench.{mod.name}")
    return REGISTRY

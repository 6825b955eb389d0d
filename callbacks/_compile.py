"""Monitoring compiled models: module hooks run on recording steps, eagerly, and the compiled graphs stay valid.

A forward hook registered after ``torch.compile`` never runs inside the compiled graph, and registering one
makes dynamo recompile (its guards check the hooks). So on the steps a monitor records (and only then) the
step runs under ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6): every compiled function runs its
original Python code, the module hooks fire, and nothing is compiled. The hooks are removed and the stance
restored at the end of the step, so the compiled graph's guards hold again on the next step: a fit compiles
as often as without the monitors (``tests/test_callbacks_setups.py`` counts the graphs). On an older torch the
hooks are registered all the same (dynamo may skip them, or trace them in and recompile), and the monitor
says so once.

Tags use the uncompiled names: ``net._orig_mod.0`` (``self.net = torch.compile(net)``) is logged as ``net.0``,
so compiled and uncompiled runs write the same tags.
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from callbacks._internals import compiled_by_lightning, optimized_module_type

#: the attribute of ``torch._dynamo.eval_frame.OptimizedModule`` that holds the compiled module
_ORIG = "_orig_mod."
#: torch >= 2.6
HAS_STANCE = hasattr(torch, "compiler") and hasattr(torch.compiler, "set_stance")


def tag_name(qualified: str) -> str:
    """The qualified name of a module or parameter without the compiled wrappers' ``_orig_mod.``."""
    return qualified.replace(_ORIG, "") if _ORIG in qualified else qualified


def is_compiled(pl_module: "pl.LightningModule") -> bool:
    """Whether some of the module runs compiled: a compiled submodule, or ``trainer.fit(torch.compile(model))``."""
    if compiled_by_lightning(pl_module):
        return True
    optimized = optimized_module_type()
    return optimized is not None and any(isinstance(m, optimized) for m in pl_module.modules())


class _Stance:
    """The process-wide ``force_eager`` stance, entered by several monitors at once (counted)."""

    depth = 0
    context: object | None = None

    @classmethod
    def enter(cls) -> None:
        if cls.depth == 0:
            cls.context = torch.compiler.set_stance("force_eager")  # sets it now; `__exit__` restores the previous
        cls.depth += 1

    @classmethod
    def exit(cls) -> None:
        if cls.depth == 0:
            return
        cls.depth -= 1
        if cls.depth == 0 and cls.context is not None:
            cls.context.__exit__(None, None, None)
            cls.context = None


class EagerSteps:
    """One monitor's share of the eager stance: ``enter`` on a recording step, ``exit`` when its hooks go."""

    def __init__(self) -> None:
        self.needed = False
        self.entered = False

    def setup(self, pl_module: nn.Module, watching: bool, owner: str) -> None:
        """Decides at the start of fit whether recording steps must run eagerly (a compiled model)."""
        self.exit()
        compiled = watching and is_compiled(pl_module)  # type: ignore[arg-type]
        self.needed = compiled and HAS_STANCE
        if compiled and not HAS_STANCE:
            rank_zero_warn(
                f"{owner}: the model is compiled and torch {torch.__version__} has no"
                " `torch.compiler.set_stance` (torch >= 2.6): the activations inside compiled modules may not be"
                " watched, or be watched at the cost of recompiling on logged steps. Upgrade torch, or fit the"
                " model uncompiled to watch them."
            )

    def enter(self) -> None:
        if self.needed and not self.entered:
            self.entered = True
            _Stance.enter()

    def exit(self) -> None:
        if self.entered:
            self.entered = False
            _Stance.exit()

"""The order of a model's layers, as the probes report it to the judges: which layer comes right before another.

A normalisation right before an activation changes the advice for it (its gain, not the weights' scale), and a
bias right before a BatchNorm does nothing (the norm subtracts each feature's batch mean). "Right before" is the
previous sibling in registration order (``nn.Sequential``'s order and the usual ``self.bn = ...; self.act = ...``):
the forward pass itself is not traced.
"""

from torch import nn

from callbacks._compile import tag_name

_SKIPPED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def _previous_leaf(root: nn.Module, qualified: str) -> tuple[str, nn.Module] | None:
    """The leaf module right before ``qualified``: the previous child of the same parent in registration order
    (``nn.Sequential``'s order, and the usual ``self.bn = ...; self.act = ...``), skipping dropout and identity
    layers; for a container, its last leaf."""
    parent_name, _, child = qualified.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        return None
    children = list(parent.named_children())
    names = [n for n, _ in children]
    if child not in names:
        return None
    for prev_name, prev in reversed(children[: names.index(child)]):
        leaf_name, leaf = prev_name, prev
        for sub_name, sub in prev.named_modules():
            if not list(sub.children()):
                leaf_name, leaf = f"{prev_name}.{sub_name}" if sub_name else prev_name, sub
        if isinstance(leaf, _SKIPPED):
            continue
        return f"{parent_name + '.' if parent_name else ''}{leaf_name}", leaf
    return None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: any whose class name has "Norm" in it (BatchNorm, LayerNorm, GroupNorm, RMSNorm, the
    lecture's hand-written ``BatchNorm1d``)."""
    return "norm" in type(module).__name__.lower()


def norm_before(root: nn.Module, qualified: str) -> str | None:
    """``"name (BatchNorm1d)"`` of the normalisation layer right before module ``qualified``, or None.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        >>> norm_before(net, "2"), norm_before(net, "1")
        ('1 (BatchNorm1d)', None)
    """
    prev = _previous_leaf(root, qualified)
    if prev is None or not is_norm(prev[1]):
        return None
    return f"{tag_name(prev[0])} ({type(prev[1]).__name__})"


def biases_before_batchnorm(root: nn.Module) -> list[tuple[str, str]]:
    """``(bias name, norm label)`` for every layer with a bias right before a batch normalisation, which subtracts
    the batch mean of each feature, so that bias does nothing (only the norm's own shift counts).

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8, bias=False))
        >>> biases_before_batchnorm(net)
        [('0.bias', '1 (BatchNorm1d)')]
    """
    found = []
    for name, module in root.named_modules():
        if not name or "batchnorm" not in type(module).__name__.lower():
            continue
        prev = _previous_leaf(root, name)
        bias = getattr(prev[1], "bias", None) if prev is not None else None
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            found.append((tag_name(f"{prev[0]}.bias"), f"{tag_name(name)} ({type(module).__name__})"))
    return found

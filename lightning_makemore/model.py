"""The character-level MLP language model of makemore part 3, with every init regime of the lecture.

    embedding -> flatten -> n_layers x [Linear -> BatchNorm1d (optional) -> activation] -> Linear
              -> BatchNorm1d on the logits (optional, the lecture's deep net)

This file is the network alone: no data, no training loop, no I/O (see `module.py` for those).

The init regimes reproduce the rows of the lecture's loss log (``../shared/LECTURE.md``):

=============  ==========================================================================================
``pytorch``    PyTorch's defaults (uniform +-1/sqrt(fan_in) for Linear, N(0, 1) for the embedding).
``naive``      every weight and bias ``randn`` with no scaling: the lecture's "original" net.
``tanh_fix``   hidden weights ``randn * 0.2``, biases ``randn * 0.01``: the lecture's hand-tuned fix.
``kaiming``    hidden weights ``randn * gain / sqrt(fan_in)`` (gain 5/3 for tanh), biases ``randn * 0.01``.
=============  ==========================================================================================

``last_layer_scale`` is the lecture's softmax fix: the output weights become ``randn * scale`` and the
output bias zero, so the first predictions are near uniform (loss near ln(vocab)). Without it the output
layer is initialised like the hidden ones (with gain 1, as no activation follows it).
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

InitName = Literal["pytorch", "naive", "tanh_fix", "kaiming"]
ActivationName = Literal["tanh", "relu", "leaky_relu", "gelu", "silu", "sigmoid", "identity"]

INITS: tuple[str, ...] = ("pytorch", "naive", "tanh_fix", "kaiming")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def kaiming_gain(activation: str) -> float:
    """The gain that keeps activations at unit scale through `activation` (He et al. 2015).

    tanh 5/3, ReLU sqrt(2), leaky ReLU sqrt(2 / (1 + 0.01^2)), sigmoid and identity 1. GELU and SiLU have no
    closed form; like ReLU they roughly halve the variance, so they use sqrt(2).

    Example::

        >>> round(kaiming_gain("tanh"), 4), round(kaiming_gain("relu"), 4)
        (1.6667, 1.4142)
    """
    if activation in ("gelu", "silu"):
        return math.sqrt(2.0)
    if activation == "identity":
        return 1.0
    return nn.init.calculate_gain(activation)


class MLP(nn.Module):
    """makemore's MLP: a context of `block_size` characters in, logits over the vocabulary out.

    Args:
        vocab_size: number of tokens (27 for names.txt: `.` and a-z).
        block_size: characters of context.
        n_embd: embedding dimensions per character.
        n_hidden: width of every hidden layer.
        n_layers: number of [Linear -> BatchNorm -> activation] blocks (1 = the lecture's shallow net,
            5 = its deep net).
        init: the init regime: ``pytorch`` (PyTorch's defaults), ``naive`` (plain randn: the lecture's first
            net), ``tanh_fix`` (the lecture's hand-tuned scales) or ``kaiming`` (gain / sqrt(fan_in)).
        last_layer_scale: softmax fix: output weights ``randn * scale``, output bias 0. None leaves the
            output layer to `init`.
        batchnorm: BatchNorm1d after each hidden Linear, whose bias is then dropped (BatchNorm's beta
            replaces it).
        bn_momentum: running-statistics momentum (lecture: 0.001 for the shallow net, 0.1 for the deep one).
        bn_eps: BatchNorm epsilon.
        logits_batchnorm: BatchNorm1d on the logits, like the lecture's deep net.
        logits_bn_gamma: initial gamma of that BatchNorm (lecture: 0.1, for a near-uniform first softmax).
        activation: nonlinearity of the hidden blocks; Kaiming's gain follows it.
        dropout: dropout probability after each activation (0 = none, as in the lecture).
        context_dropout: probability of dropping each character of the context during training (its whole
            embedding zeroed, the others scaled by 1 / (1 - p)): the net learns to predict from partial
            contexts too, like an n-gram model backing off to shorter ones.
        generator: optional `torch.Generator` for the init, for bit-for-bit reproducible weights.

    Example::

        >>> net = MLP(vocab_size=27, block_size=3, n_embd=10, n_hidden=200)
        >>> net(torch.zeros(4, 3, dtype=torch.long)).shape
        torch.Size([4, 27])
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 3,
        n_embd: int = 10,
        n_hidden: int = 200,
        n_layers: int = 1,
        init: InitName = "kaiming",
        last_layer_scale: float | None = 0.01,
        batchnorm: bool = True,
        bn_momentum: float = 0.001,
        bn_eps: float = 1e-5,
        logits_batchnorm: bool = False,
        logits_bn_gamma: float = 0.1,
        activation: ActivationName = "tanh",
        dropout: float = 0.0,
        context_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_settings(dict(locals()))
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.init_name, self.activation_name = init, activation
        self.embedding = nn.Embedding(vocab_size, n_embd)
        # (B, block_size, n_embd): Dropout1d zeroes whole "channels", here whole characters
        self.context_dropout = nn.Dropout1d(context_dropout) if context_dropout > 0 else None
        blocks = []
        fan_in = block_size * n_embd
        for _ in range(n_layers):
            block = nn.Sequential()
            block.add_module("linear", nn.Linear(fan_in, n_hidden, bias=not batchnorm))
            if batchnorm:
                block.add_module("bn", nn.BatchNorm1d(n_hidden, eps=bn_eps, momentum=bn_momentum))
            block.add_module("act", ACTIVATIONS[activation]())
            if dropout > 0:
                block.add_module("dropout", nn.Dropout(dropout))
            blocks.append(block)
            fan_in = n_hidden
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(fan_in, vocab_size, bias=not logits_batchnorm)  # BatchNorm's beta is its bias
        self.head_bn = nn.BatchNorm1d(vocab_size, eps=bn_eps, momentum=bn_momentum) if logits_batchnorm else None
        self._init_weights(init, last_layer_scale, logits_bn_gamma, generator)

    @torch.no_grad()
    def _init_weights(
        self, init: str, last_layer_scale: float | None, logits_bn_gamma: float, g: torch.Generator | None
    ) -> None:
        def randn_(t: Tensor, scale: float = 1.0) -> None:
            t.copy_(torch.randn(t.shape, generator=g) * scale)

        if init != "pytorch":
            randn_(self.embedding.weight)  # the lecture's C = randn((vocab, n_embd))
            hidden_linears = [block.linear for block in self.blocks]
            for layer in [*hidden_linears, self.head]:
                fan_in = layer.in_features
                is_head = layer is self.head
                if init == "naive":
                    w_scale, b_scale = 1.0, 1.0
                elif init == "tanh_fix":  # the lecture's hand-picked numbers for W1 and b1
                    w_scale, b_scale = (1.0, 1.0) if is_head else (0.2, 0.01)
                else:  # kaiming: keep unit variance through Linear + activation
                    gain = 1.0 if is_head else kaiming_gain(self.activation_name)
                    w_scale, b_scale = gain / math.sqrt(fan_in), 0.01
                randn_(layer.weight, w_scale)
                if layer.bias is not None:
                    randn_(layer.bias, b_scale)
        if last_layer_scale is not None:
            # scale the last layer down so the softmax starts near uniform (loss ~ ln(vocab_size))
            randn_(self.head.weight, last_layer_scale)
            if self.head.bias is not None:
                self.head.bias.zero_()
        if self.head_bn is not None:
            # the deep net's trick: a small gamma on the logits' BatchNorm makes the first softmax diffuse
            self.head_bn.weight.fill_(logits_bn_gamma)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, vocab_size) for contexts `idx` (B, block_size) of token ids."""
        emb = self.embedding(idx)  # (B, block_size, n_embd)
        if self.context_dropout is not None:
            emb = self.context_dropout(emb)
        x = emb.view(emb.shape[0], -1)  # (B, block_size * n_embd)
        x = self.blocks(x)  # (B, n_hidden)
        logits = self.head(x)  # (B, vocab_size)
        if self.head_bn is not None:
            logits = self.head_bn(logits)
        return logits

    def activations(self, idx: Tensor) -> list[Tensor]:
        """The output of every hidden activation for `idx`, in order (for init statistics and plots)."""
        outs: list[Tensor] = []
        x = self.embedding(idx).flatten(1)
        for block in self.blocks:
            for name, layer in block.named_children():
                x = layer(x)
                if name == "act":
                    outs.append(x)
        return outs


#: MLP arguments that are not settings of the network: the data's shape and the init's random generator
_NOT_SETTINGS = ("self", "vocab_size", "block_size", "generator")


def net_settings(**overrides: Any) -> dict[str, Any]:
    """The network's settings: `MLP`'s keyword arguments with their defaults, `overrides` applied and checked.

    Raises:
        ValueError: an unknown setting (with the closest known name) or a value the MLP cannot be built with.

    Example::

        >>> s = net_settings(n_hidden=64)
        >>> s["n_hidden"], s["n_layers"], s["init"]
        (64, 1, 'kaiming')
    """
    defaults = {
        name: p.default for name, p in inspect.signature(MLP.__init__).parameters.items() if name not in _NOT_SETTINGS
    }
    for name in overrides:
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown network setting {name!r}.{hint} Expected one of {', '.join(defaults)}.")
    settings = defaults | overrides
    _check_settings(settings)
    return settings


def _check_settings(args: dict[str, Any]) -> None:
    """Fail fast, with what is allowed, on arguments the MLP cannot be built with (missing ones are not checked)."""
    for name in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layers"):
        value = args.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"Expected {name} to be an integer >= 1, but got {value!r}.")
    if args["init"] not in INITS:
        raise ValueError(f"Expected init to be one of {', '.join(INITS)}, but got {args['init']!r}.")
    if args["activation"] not in ACTIVATIONS:
        raise ValueError(f"Expected activation to be one of {', '.join(ACTIVATIONS)}, but got {args['activation']!r}.")
    for name in ("dropout", "context_dropout"):
        if not 0.0 <= args[name] < 1.0:
            raise ValueError(f"Expected {name} in [0, 1), but got {args[name]!r}.")
    if not 0.0 <= args["bn_momentum"] <= 1.0:
        raise ValueError(f"Expected bn_momentum in [0, 1], but got {args['bn_momentum']!r}.")

"""The attention probe: its numbers against logits computed here from q and k (by hand, and with plain torch from the
modules' own weights), through nanoGPT-style SDPA blocks, ``nn.MultiheadAttention`` (with and without weights),
``nn.TransformerEncoderLayer``, Hugging Face GPT-2 (eager and SDPA) and a Llama block with rotary embeddings; and
that the interception of torch's functions is undone after every step, an exception included."""

import math
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from callbacks._attention import BLOCK, LOG_BINS, attention_stats, bin_edges, quantile_from_hist
from callbacks._cadence import Cadence
from callbacks._recorder import Part, Recorder
from callbacks.judges.base import Judge
from callbacks.probes.attention import AttentionProbe
from tests.callbacks_helpers import trainer

SDPA = F.scaled_dot_product_attention
MHA_FORWARD = F.multi_head_attention_forward


class Keep(Judge):
    reads = ("attention",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, Any] = {}

    def observe(self, step: int, readouts: Any) -> list:
        self.seen[step] = readouts["attention"]
        return []


def reference(q: Tensor, k: Tensor, allowed: Tensor, bias: Tensor | None = None, scale: float | None = None) -> dict:
    """Per head: max |s|, the entropy sum and log(allowed) sum over rows, from s = scale q k^T, plainly."""
    q, k = q.double(), k.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # (B, H, L, S)
    allowed = allowed.expand_as(s)
    z = (s + bias.double() if bias is not None else s).masked_fill(~allowed, -math.inf)
    p = torch.softmax(z, -1)
    ent = -torch.where(allowed, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(-1)
    return {
        "max": s.abs().masked_fill(~allowed, -1).amax((0, 2, 3)),
        "entropy": ent.sum((0, 2)),
        "uniform": allowed.sum(-1).double().log().sum((0, 2)),
        "values": s.abs()[allowed],
    }


def test_stats_by_hand():
    # one head, d = 4 (scale 1/2); q1 = (2,0,0,0), k1 = (1,0,0,0), k2 = (-3,0,0,0): s = [[1, -3]]
    q = torch.tensor([[[[2.0, 0, 0, 0], [0, 0, 0, 0]]]])  # (1, 1, 2, 4)
    k = torch.tensor([[[[1.0, 0, 0, 0], [-3.0, 0, 0, 0]]]])
    st = attention_stats(q, k)
    assert st.max_abs.tolist() == [3.0]  # |-3|
    p = [1 / (1 + math.exp(-4)), math.exp(-4) / (1 + math.exp(-4))]  # softmax([1, -3]); the second row is uniform
    assert st.entropy.item() == pytest.approx(-sum(x * math.log(x) for x in p) + math.log(2), rel=1e-6)
    assert st.uniform.item() == pytest.approx(2 * math.log(2))
    assert st.rows.item() == 2
    # causal: the first row sees k1 only (entropy 0, |s| 1), the second sees both with s = 0
    st = attention_stats(q, k, is_causal=True)
    assert st.max_abs.tolist() == [1.0]
    assert st.entropy.item() == pytest.approx(math.log(2))
    assert st.uniform.item() == pytest.approx(math.log(2))
    assert st.hist.sum().item() == 3  # three allowed entries: |s| = 1, 0, 0
    # scale given; a boolean mask hiding k2 everywhere
    st = attention_stats(q, k, attn_mask=torch.tensor([[True, False], [True, False]]), scale=1.0)
    assert st.max_abs.tolist() == [2.0] and st.entropy.item() == 0.0


@pytest.mark.parametrize("case", ["none", "causal", "bool", "float", "gqa", "sampled"])
@pytest.mark.parametrize("block", [BLOCK, 300, 20])  # one block; two heads a block; one (batch, head) a block
def test_stats_against_plain_torch(case, block, monkeypatch):
    monkeypatch.setattr("callbacks._attention.BLOCK", block)
    torch.manual_seed(0)
    B, H, L, S, E = 2, 4, 12, 12, 8
    q, k = torch.randn(B, H, L, E) * 3, torch.randn(B, H if case != "gqa" else 2, S, E) * 3
    allowed, bias, kwargs = torch.ones(L, S, dtype=torch.bool), None, {}
    if case == "causal":
        allowed, kwargs = allowed.tril(), {"is_causal": True}
    elif case == "bool":
        allowed = torch.rand(B, 1, L, S) > 0.3
        allowed[..., 0] = True
        kwargs = {"attn_mask": allowed}
    elif case == "float":
        bias = torch.randn(B, H, L, S)
        bias[..., 5] = -math.inf  # a float mask that hides key 5
        allowed = torch.ones(B, H, L, S, dtype=torch.bool)
        allowed[..., 5] = False
        kwargs = {"attn_mask": bias}
    elif case == "sampled":
        kwargs = {"is_causal": True, "max_queries": 4}
        allowed = allowed.tril()
    st = attention_stats(q, k, **kwargs)
    kk = k.repeat_interleave(2, dim=1) if case == "gqa" else k
    if case == "sampled":  # positions 0, 4, 7, 11 (evenly spread, first and last)
        rows = torch.tensor([0, 4, 7, 11])
        assert st.sampled == 4 and st.queries == L
        ref = reference(q[:, :, rows], kk, allowed[rows])
    else:
        ref = reference(q, kk, allowed, bias)
    assert st.max_abs.tolist() == pytest.approx(ref["max"].tolist(), rel=1e-5)
    assert st.entropy.tolist() == pytest.approx(ref["entropy"].tolist(), rel=1e-5)
    assert st.uniform.tolist() == pytest.approx(ref["uniform"].tolist(), rel=1e-9)
    # the quantile from the log bins: within one bin (a factor 2**(1/8)) of the exact one
    exact = torch.quantile(ref["values"], 0.99).item()
    assert quantile_from_hist(st.hist.tolist(), 0.99) == pytest.approx(exact, rel=2 ** (1 / 8) - 1)


def test_histogram_counts_each_allowed_logit_in_its_bin_and_a_nan_stops_nothing():
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 10, 4) * 4, torch.randn(2, 3, 10, 4) * 4
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    values = torch.matmul(q, k.transpose(-1, -2)).mul(0.5).abs()[..., allowed]  # d = 4: scale 1/2
    inner = torch.tensor(bin_edges()[1:-1], dtype=torch.float64)  # bin i holds edges[i] <= |s| < edges[i + 1]
    expected = torch.bincount(torch.bucketize(values.double().flatten(), inner, right=True), minlength=LOG_BINS)
    st = attention_stats(q, k, is_causal=True)
    assert st.hist.tolist() == expected.double().tolist()
    # a NaN in one query (a diverged step): its row is counted nowhere, its head's max is NaN, nothing raises
    q[0, 1, 3] = math.nan
    st = attention_stats(q, k, is_causal=True)
    assert st.hist.sum().item() == values.numel() - 4  # row 3 sees keys 0..3
    assert math.isnan(st.max_abs[1].item()) and not st.max_abs[[0, 2]].isnan().any()


# ----------------------------------------------------------------------------------------- through a fit
class SelfAttention(nn.Module):
    """nanoGPT's attention: one Linear for q, k, v, then F.scaled_dot_product_attention (causal)."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        q, k, _ = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))


class TinyGPT(L.LightningModule):
    def __init__(self, kind: str = "sdpa", vocab: int = 11, width: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(vocab, width)
        if kind == "sdpa":
            self.blocks = nn.ModuleList(SelfAttention(width) for _ in range(layers))
        elif kind == "encoder":
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True) for _ in range(layers)
            )
        else:  # "mha" / "mha_weights": nn.MultiheadAttention, returning its weights or not
            self.blocks = nn.ModuleList(nn.MultiheadAttention(width, 2, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(width, vocab)
        self.inputs: list[list[Any]] = []  # each block's (q, k), per forward (the test's own record)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx)
        T = idx.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True: left out (nn.MultiheadAttention's convention)
        seen = []
        for block in self.blocks:
            with torch.no_grad():
                seen.append(qk_of(block, x))  # q and k from the block's weights and input, the test's own way
            if self.kind == "sdpa":
                x = x + block(x)
            elif self.kind == "encoder":
                x = block(x, src_mask=causal)
            else:
                x = x + block(x, x, x, attn_mask=causal, need_weights=self.kind == "mha_weights")[0]
        self.inputs.append(seen)
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (idx,) = batch
        logits = self(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def qk_of(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The block's q and k for input ``x``, from its own weights (the test's reference)."""
    if isinstance(block, SelfAttention):
        return block.qk(x)
    mha = block.self_attn if isinstance(block, nn.TransformerEncoderLayer) else block
    E, H = mha.embed_dim, mha.num_heads
    if isinstance(block, nn.TransformerEncoderLayer) and block.norm_first:
        x = block.norm1(x)
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    B, T, _ = x.shape
    q, k = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k)
    return tuple(t.view(B, T, H, E // H).transpose(1, 2) for t in (q, k))


def fit(tmp_path, model: L.LightningModule, probe: AttentionProbe, steps: int = 3, every: int = 2, **kw) -> Keep:
    keep = Keep()
    recorder = Recorder([Part("AttentionProbe", [probe], [keep])])
    t = trainer(tmp_path, [recorder], logger=CSVLogger(str(tmp_path)), max_steps=steps, log_every_n_steps=every, **kw)
    torch.manual_seed(0)
    idx = torch.randint(0, 11, (4 * steps, 9))
    t.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(idx), batch_size=4))
    return keep


@pytest.mark.parametrize("kind", ["sdpa", "mha", "mha_weights", "encoder"])
def test_probe_through_a_fit(tmp_path, kind):
    torch.manual_seed(0)
    model = TinyGPT(kind)
    probe = AttentionProbe(cadence=Cadence(every_n_steps=2, histogram_every_n_steps=0))
    keep = fit(tmp_path, model, probe)
    assert sorted(keep.seen) == [0, 1]
    assert SDPA is F.scaled_dot_product_attention and MHA_FORWARD is F.multi_head_attention_forward  # restored
    for step, readout in keep.seen.items():
        names = [layer.name for layer in readout.layers]
        expected = [f"blocks.{i}" if kind != "encoder" else f"blocks.{i}.self_attn" for i in range(2)]
        assert names == expected  # no "(outside)": every call was inside a watched module
        # the weights of step `step` are those before its update: recompute from the recorded forward's inputs
        for i, layer in enumerate(readout.layers):
            assert layer.calls == 1 and layer.exact and layer.rows == 4 * 8 * 2
            q, k = model.inputs[step][i]
            ref = reference(q, k, torch.ones(8, 8, dtype=torch.bool).tril())
            assert layer.head_logit_max == pytest.approx(ref["max"].tolist(), rel=1e-5)
            assert layer.logit_max == pytest.approx(ref["max"].max().item(), rel=1e-5)
            share = ref["entropy"].sum().item() / ref["uniform"].sum().item()
            assert layer.entropy_share == pytest.approx(share, rel=1e-5)
            assert layer.entropy == pytest.approx(ref["entropy"].sum().item() / (4 * 8 * 2), rel=1e-5)


class GoesNaN(TinyGPT):
    """A TinyGPT whose first block's attention weights turn NaN before step 2 (a diverged update)."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == 2:
            with torch.no_grad():
                self.blocks[0].c_attn.weight[0, 0] = math.nan


def test_a_fit_whose_attention_turns_nan_goes_on_and_the_readout_says_nan(tmp_path):
    torch.manual_seed(0)
    probe = AttentionProbe(cadence=Cadence(every_n_steps=1, histogram_every_n_steps=0))
    keep = fit(tmp_path, GoesNaN(), probe, steps=4, every=1)
    assert sorted(keep.seen) == [0, 1, 2, 3]  # every step recorded, training not stopped by the probe
    healthy, broken = keep.seen[1].layers[0], keep.seen[2].layers[0]
    assert math.isfinite(healthy.logit_max) and math.isnan(broken.logit_max)


# ----------------------------------------------------------------------------------------- Hugging Face
class HFLM(L.LightningModule):
    """A Hugging Face causal LM in a LightningModule; the test's own pre-hooks keep each layer's q and k."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.qk: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (idx,) = batch
        return self.model(input_ids=idx, labels=idx).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def hf_model(family: str, implementation: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=11, attn_pdrop=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0,
        )  # fmt: skip
    else:  # Llama: rotary embeddings, grouped-query attention (4 query heads, 2 key/value heads)
        config = transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=11, max_position_embeddings=16,
        )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.train()


def reference_qk(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """q and k of a GPT-2 or Llama attention module for this call, from its weights (rotary applied for Llama)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    h = args[0] if args else kwargs["hidden_states"]
    B, T, _ = h.shape
    with torch.no_grad():
        if hasattr(module, "c_attn"):  # GPT2Attention: one Conv1D for q, k, v
            q, k, _ = module.c_attn(h).split(module.split_size, dim=2)
            return tuple(t.view(B, T, -1, module.head_dim).transpose(1, 2) for t in (q, k))
        q = module.q_proj(h).view(B, T, -1, module.head_dim).transpose(1, 2)
        k = module.k_proj(h).view(B, T, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, repeat_kv(k, module.num_key_value_groups)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hugging_face_models(tmp_path, family, implementation):
    model = HFLM(hf_model(family, implementation))
    attention_type = "GPT2Attention" if family == "gpt2" else "LlamaAttention"
    layers = [m for m in model.modules() if type(m).__name__ == attention_type]
    for m in layers:
        m.register_forward_pre_hook(lambda mod, a, kw: model.qk.append(reference_qk(mod, a, kw)), with_kwargs=True)
    keep = fit(tmp_path, model, AttentionProbe(cadence=Cadence(every_n_steps=2, histogram_every_n_steps=0)), steps=2)
    assert SDPA is F.scaled_dot_product_attention
    readout = keep.seen[1]  # step 1: the second forward
    stack, attn = ("transformer.h", "attn") if family == "gpt2" else ("model.layers", "self_attn")
    assert [x.label for x in readout.layers] == [f"model.{stack}.{i}.{attn} ({attention_type})" for i in range(2)]
    for i, layer in enumerate(readout.layers):
        q, k = model.qk[2 + i]  # the second forward's calls
        ref = reference(q, k, torch.ones(9, 9, dtype=torch.bool).tril())
        assert layer.head_logit_max == pytest.approx(ref["max"].tolist(), rel=1e-4)
        assert layer.entropy_share == pytest.approx(ref["entropy"].sum().item() / ref["uniform"].sum().item(), rel=1e-4)
        assert layer.calls == 1 and layer.exact


class Breaks(TinyGPT):
    """Raises in its recorded step 3, after the attention ran (inside the tap)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        tapped = F.scaled_dot_product_attention is not SDPA
        assert tapped == (batch_idx != 2)  # on during the recorded steps 0, 1 and 3 only
        if batch_idx == 3:
            raise RuntimeError("boom")
        return loss


def test_interception_undone_on_every_exit(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, Breaks(), AttentionProbe(cadence=Cadence(every_n_steps=2, histogram_every_n_steps=0)), steps=5)
    assert F.scaled_dot_product_attention is SDPA and F.multi_head_attention_forward is MHA_FORWARD
    # a model without attention modules: nothing intercepted, nothing recorded
    keep = fit(tmp_path, TinyGPT("sdpa", layers=0), AttentionProbe(cadence=Cadence(every_n_steps=1)), steps=2)
    assert all(not r.layers for r in keep.seen.values())


def test_bad_arguments():
    for kwargs, message in [
        ({"quantile": 1.0}, "Expected `quantile` to be a number in \\(0, 1\\), but got 1.0."),
        ({"max_queries": 0}, "Expected `max_queries` to be an int >= 1, but got 0."),
        ({"modules": [3]}, "Expected `modules` to hold `nn.Module` subclasses or name patterns"),
    ]:
        with pytest.raises(ValueError, match=message):
            AttentionProbe(**kwargs)

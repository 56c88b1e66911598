"""The CSR closed-form gradient of the sparse ET attention (``etbench.models.edge_csr``): its one-shift and per-row
softmax paths and its hand-written backward, each against the edge-gather oracle (``SparseEnergyAttention.energy``
differentiated by autograd, twice for the backward) and the dense masked attention, in float64."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.utils import to_undirected

from etbench.models import edge_csr
from etbench.models.edge_csr import CSRAttentionGrad, EdgePlan, csr_forward
from etbench.models.energy import EnergyAttention
from etbench.models.et_config import ETConfig
from etbench.models.graph import SparseEnergyAttention

CFG = dict(dim=12, heads=2, head_dim=4, memories=20, attn_init_std=0.4, mem_init_std=0.3)
N = 15


def graph(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    src, dst = torch.randint(0, N, (2, 45), generator=gen)
    if kind == "undirected":
        keep = src != dst
        return to_undirected(torch.stack([src[keep], dst[keep]]), num_nodes=N)
    dst = torch.where(dst < 2, src, dst)  # nodes 0 and 1: only self-loops in, i.e. no keys without self-attention
    return torch.stack([src, dst])


def attention(self_attention: bool, scale: float = 1.0) -> SparseEnergyAttention:
    torch.manual_seed(0)
    att = SparseEnergyAttention(ETConfig(**CFG, self_attention=self_attention)).double()
    with torch.no_grad():
        att.wq.mul_(scale)
        att.wk.mul_(scale)
    return att


def tokens() -> torch.Tensor:
    g = torch.randn(N, CFG["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g[4] *= 8.0  # one token with a large norm: its scores dominate the graph's largest score
    return g


def oracle(att: SparseEnergyAttention, g: torch.Tensor, ei: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E^ATT, ∂E/∂g with its graph kept) from the edge-gather energy and autograd."""
    if not g.requires_grad:
        g = g.detach().requires_grad_(True)
    e = att.energy(g, ei)
    (grad,) = torch.autograd.grad(e, g, create_graph=True)
    return e, grad


def count_row_max(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = EdgePlan.row_max

    def spy(self: EdgePlan, values: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return real(self, values)

    monkeypatch.setattr(EdgePlan, "row_max", spy)
    return calls


@pytest.mark.parametrize(("scale", "per_row"), [(1.0, False), (12.0, True)])
@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("kind", ["directed", "undirected"])
def test_both_softmax_paths_equal_the_oracle_and_the_dense_attention(
        kind: str, self_attention: bool, scale: float, per_row: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small scores take the one-shift path; with large weights some row sums fall below the threshold after the
    global shift and the per-row max is used. Both give the oracle's energy and gradient to rounding."""
    ei, att = graph(kind), attention(self_attention, scale)
    g = tokens()
    calls = count_row_max(monkeypatch)
    grad, e = att.grad(g, ei)
    assert (calls[0] > 0) == per_row
    e_ref, grad_ref = oracle(att, g, ei)
    torch.testing.assert_close(e, e_ref.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, grad_ref.detach(), rtol=1e-10, atol=1e-10)
    dense = EnergyAttention(ETConfig(**CFG, self_attention=self_attention)).double()
    dense.load_state_dict(att.state_dict())
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[ei[1], ei[0]] = True
    eye = torch.eye(N, dtype=torch.bool)
    mask = (mask | eye if self_attention else mask & ~eye)[None]
    torch.testing.assert_close(grad, dense.grad(g[None], mask)[0][0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 12.0])
@pytest.mark.parametrize(("kind", "self_attention"), [("directed", False), ("undirected", True)])
def test_backward_equals_double_backward_of_the_oracle(kind: str, self_attention: bool, scale: float) -> None:
    """The hand-written backward (∂L/∂g, ∂L/∂W^Q, ∂L/∂W^K for L = ⟨U, ∂E/∂g⟩) against autograd differentiating the
    autograd gradient of the gather energy, in float64, on both softmax paths."""
    ei, att = graph(kind), attention(self_attention, scale)
    g = tokens().requires_grad_(True)
    u = torch.randn(N, CFG["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, _ = CSRAttentionGrad.apply(g, att.wq, att.wk, att.beta, att.plan(ei, N))
    got = torch.autograd.grad((out * u).sum(), (g, att.wq, att.wk))
    _, grad_ref = oracle(att, g, ei)
    want = torch.autograd.grad((grad_ref * u).sum(), (g, att.wq, att.wk))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_backward_passes_gradcheck_on_the_per_row_path() -> None:
    ei, att = graph("directed"), attention(False, 12.0)
    plan = att.plan(ei, N)
    g = tokens().requires_grad_(True)
    wq, wk = (w.detach().clone().requires_grad_(True) for w in (att.wq, att.wk))
    assert torch.autograd.gradcheck(lambda g, wq, wk: CSRAttentionGrad.apply(g, wq, wk, att.beta, plan)[0],
                                    (g, wq, wk), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float32_matches_float64_on_both_paths() -> None:
    ei = graph("undirected")
    for scale in (1.0, 12.0):
        att = attention(True, scale)
        g = tokens()
        grad64, e64 = att.grad(g, ei)
        att32 = attention(True, scale).float()
        grad32, e32 = att32.grad(g.float(), ei)
        torch.testing.assert_close(e32.double(), e64, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-4)


def test_plan_indices_and_transpose() -> None:
    ei = graph("directed")
    att = attention(False)
    plan = att.plan(ei, N)
    assert all(t.dtype == torch.int32 for t in (plan.crow, plan.col, plan.rows, plan.t_crow, plan.t_col, plan.t_perm))
    vals = torch.rand(plan.col.numel(), dtype=torch.float64)
    dense = plan.csr(vals).to_dense()
    torch.testing.assert_close(plan.csr_t(plan.transpose_values(vals)).to_dense(), dense.T)
    # the rows of each head are the edge destinations; row max of an empty row is 0
    s = torch.randn(plan.col.numel(), dtype=torch.float64)
    m = plan.row_max(s)
    assert torch.all(m[plan.lengths == 0] == 0)
    torch.testing.assert_close(m.index_select(0, plan.rows) >= s, torch.ones_like(s, dtype=torch.bool))


def test_threshold_table_covers_the_float_types() -> None:
    assert set(edge_csr.GLOBAL_SHIFT_MIN_ROW_SUM) == {torch.float32, torch.float64}
    att = attention(True)
    plan = att.plan(graph("undirected"), N)
    out, e, saved = csr_forward(plan, tokens(), att.wq.detach(), att.wk.detach(), att.beta)
    assert out.shape == (N, CFG["dim"]) and e.shape == () and len(saved) == 7


@pytest.mark.parametrize("boost", [1.2, 40.0])
def test_a_component_does_not_change_another_components_gradient(boost: float, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """The graph-wide score shift must not couple disjoint components: the gradient on a graph equals its rows in the
    disjoint union with a copy whose tokens are scaled up (a larger largest score; at ×40, not at ×1.2, the first
    component's row sums fall below the threshold and the per-row path runs)."""
    ei, att = graph("undirected"), attention(True)
    g = tokens()
    calls = count_row_max(monkeypatch)
    alone, e_alone = att.grad(g, ei)
    assert calls[0] == 0
    union = torch.cat([ei, ei + N], 1)
    both, _ = att.grad(torch.cat([g, boost * g]), union)
    assert (calls[0] > 0) == (boost > 10)
    torch.testing.assert_close(both[:N], alone, rtol=1e-12, atol=1e-12)
    e_other, _ = oracle(att, boost * g, ei)
    torch.testing.assert_close(att.grad(torch.cat([g, boost * g]), union)[1], e_alone + e_other.detach(),
                               rtol=1e-12, atol=1e-9)

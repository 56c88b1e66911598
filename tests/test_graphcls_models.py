"""Graph classification models and the one-fold task (SPEC §5): the graph-level ET's per-graph energy and closed-form
gradient against a dense masked energy written here by hand (float64), descent, logits of every registered model on
batched MUTAG, node-permutation invariance, Laplacian PE against numpy, configs, and a tiny one-fold training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_file
from torch_geometric.data import Batch, Data

from etbench.config import ConfigError, ModelConfig, resolve_run_config
from etbench.data.tudataset import TU_DATASETS, load_tu_dataset
from etbench.engine.graphcls_run import graphcls_config, train_fold
from etbench.models import registry
from etbench.models.et_config import ETConfig
from etbench.models.graphcls import GRAPHCLS_ET_DEFAULTS, GraphClsET, GraphClsETConfig
from etbench.tasks.graphcls_task import GraphClsTask, add_laplacian_pe, laplacian_pe

K = 4  # Laplacian eigenvectors in these tests
SMALL_ET = {"dim": 8, "heads": 2, "head_dim": 4, "memories": 12, "steps": 2, "attn_init_std": 0.4,
            "mem_init_std": 0.3}


@pytest.fixture(scope="module")
def mutag(shared_data: Path) -> Batch:
    """The first 12 MUTAG graphs with PE, batched."""
    require_file(shared_data / TU_DATASETS["mutag"].relpath)
    ds = load_tu_dataset("mutag", root=shared_data)
    return Batch.from_data_list(add_laplacian_pe(ds.graphs[:12], K))


def small_batch() -> Batch:
    """Three graphs: a single node, a 4-cycle with a chord, and 5 nodes (a triangle, an edge, one isolated node)."""
    gen = torch.Generator().manual_seed(3)
    pairs = [[], [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)], [(0, 1), (1, 2), (2, 0), (3, 4)]]
    sizes = [1, 4, 6]
    graphs = []
    for n, p in zip(sizes, pairs, strict=True):
        ei = torch.tensor(p, dtype=torch.long).reshape(-1, 2).T
        ei = torch.cat([ei, ei.flip(0)], 1)
        graphs.append(Data(x=torch.randn(n, 3, generator=gen, dtype=torch.float64), edge_index=ei, num_nodes=n))
    return Batch.from_data_list(add_laplacian_pe(graphs, K))


def et_model(in_dim: int, **et: object) -> GraphClsET:
    torch.manual_seed(0)
    cfg = GraphClsETConfig(in_dim=in_dim, num_classes=3, pe_dim=K, blocks=2, et={**SMALL_ET, **et})
    return GraphClsET(cfg).double().eval()


def run(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    return model(b.x.double(), b.edge_index, b.batch, b.num_graphs, pe=b.pe.double())


# ------------------------------------------------------------------------------------------ dense reference energy
def dense_allowed(b: Batch, self_attention: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, B] = query C may attend key B over N nodes + G CLS tokens (CLS of graph j at N + j), and token → graph."""
    n, g = b.num_nodes, b.num_graphs
    a = torch.zeros(n + g, n + g, dtype=torch.bool)
    a[b.edge_index[1], b.edge_index[0]] = True
    for v in range(n):
        cls = n + int(b.batch[v])
        a[v, cls] = a[cls, v] = True
    eye = torch.eye(n + g, dtype=torch.bool)
    a = a | eye if self_attention else a & ~eye
    return a, torch.cat([b.batch, torch.arange(g)])


def dense_graph_energy(block: torch.nn.Module, g: torch.Tensor, allowed: torch.Tensor, owner: torch.Tensor,
                       num_graphs: int) -> torch.Tensor:
    """Per graph: −(1/β) Σ_h Σ_C log Σ_{B allowed} exp(β Q_hC·K_hB) + E^HN, with plain dense tensors."""
    att, hn = block.attn, block.hn
    beta = 1.0 / math.sqrt(att.head_dim)
    q = torch.einsum("hyd,td->hty", att.wq, g)
    k = torch.einsum("hyd,td->hty", att.wk, g)
    s = (beta * q @ k.transpose(1, 2)).masked_fill(~allowed, -torch.inf)
    lse = torch.logsumexp(s, -1)  # (H, T)
    lse = torch.where(allowed.any(-1), lse, torch.zeros_like(lse))
    per_token = -lse.sum(0) / beta
    h = g @ hn.xi.T
    if block.cfg.hn_kind == "relu":
        per_token = per_token - 0.5 * torch.relu(h).pow(2).sum(-1)
    else:
        b = hn.beta.clamp_min(1e-6)
        per_token = per_token - torch.logsumexp(b * h, -1) / b
    return torch.zeros(num_graphs, dtype=g.dtype).index_add(0, owner, per_token)


@pytest.mark.parametrize(("self_attention", "hn_kind"), [(True, "relu"), (False, "relu"), (True, "softmax")])
def test_per_graph_energy_and_gradient_equal_the_dense_reference(self_attention: bool, hn_kind: str) -> None:
    b = small_batch()
    model = et_model(3, self_attention=self_attention, hn_kind=hn_kind)
    tokens = model.tokens(b.x, b.edge_index, b.batch, b.num_graphs, b.pe.double())
    allowed, owner = dense_allowed(b, self_attention)
    assert torch.equal(tokens.owner, owner)
    x = tokens.x.detach()
    for block in model.blocks:
        g = block.norm(x).detach().requires_grad_(True)
        want = dense_graph_energy(block, g, allowed, owner, b.num_graphs)
        (want_grad,) = torch.autograd.grad(want.sum(), g)
        got = model.graph_energies(block, g, tokens)
        torch.testing.assert_close(got.E, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.E_att + got.E_hn, got.E)
        with torch.no_grad():  # the inference branch of the closed form
            grad_eval, _ = block.energy_grad(g.detach(), tokens.edges, mode="analytic")
        grad_train, _ = block.energy_grad(g, tokens.edges, mode="analytic")  # the training branch (CSR Function)
        (grad_auto,) = torch.autograd.grad(model.graph_energies(block, g, tokens).E.sum(), g)
        for grad in (grad_eval, grad_train, grad_auto):
            torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
        x = x - block.cfg.alpha * want_grad  # the next block starts where this one's descent ends


def test_descent_follows_the_blocks_and_lowers_each_graph_energy(mutag: Batch) -> None:
    model = et_model(mutag.num_node_features, alpha=0.01, steps=3)
    b = mutag
    tokens = model.tokens(b.x.double(), b.edge_index, b.batch, b.num_graphs, b.pe.double())
    with torch.no_grad():
        logits, trace = model.forward_with_trace(b.x.double(), b.edge_index, b.batch, b.num_graphs, b.pe.double())
        x = tokens.x
        for block in model.blocks:  # the library's descent, block by block, ends at the same CLS tokens
            x = block.descend(x, mask=tokens.edges, trace=False)[0]
        want = model.head(model.blocks[-1].norm(x[-b.num_graphs:]))
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(run(model, b), logits)
    assert trace.E.shape == (2, b.num_graphs, 4) and trace.dx_norm.shape == (2, b.num_graphs, 3)
    assert not trace.rose().any() and (trace.E[..., -1] < trace.E[..., 0]).all()


# -------------------------------------------------------------------------------------------- every model, batched
@pytest.mark.parametrize("name", registry.names("graphcls"))
def test_every_model_gives_one_row_of_logits_per_graph_and_ignores_node_order(mutag: Batch, name: str) -> None:
    torch.manual_seed(0)
    opts = registry.options("graphcls", name, ModelConfig(et=ETConfig(**SMALL_ET), hidden=16, layers=2))
    model = registry.build("graphcls", name, in_dim=mutag.num_node_features, num_classes=2, pe_dim=K,
                           **opts).double()
    model.train()
    assert run(model, mutag).shape == (mutag.num_graphs, 2)
    model.eval()
    with torch.no_grad():
        logits = run(model, mutag)
        perm = torch.randperm(mutag.num_nodes, generator=torch.Generator().manual_seed(1))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        shuffled = Batch(x=mutag.x[perm], edge_index=inv[mutag.edge_index], batch=mutag.batch[perm],
                         pe=mutag.pe[perm])
        shuffled._num_graphs = mutag.num_graphs
        torch.testing.assert_close(run(model, shuffled), logits, rtol=1e-10, atol=1e-10)
    assert logits.shape == (mutag.num_graphs, 2) and torch.isfinite(logits).all()


def test_pe_signs_flip_at_random_in_training_only(mutag: Batch) -> None:
    model = et_model(mutag.num_node_features)
    with torch.no_grad():
        assert torch.equal(run(model, mutag), run(model, mutag))
        model.train()
        assert not torch.allclose(run(model, mutag), run(model, mutag))
        with pytest.raises(ValueError, match=r"needs Laplacian PE of shape"):
            model(mutag.x.double(), mutag.edge_index, mutag.batch)


# -------------------------------------------------------------------------------------------------- Laplacian PE
def test_laplacian_pe_is_the_normalised_laplacians_eigenvectors_padded() -> None:
    ei = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])  # the path 0-1-2-3
    a = np.zeros((4, 4))
    a[ei[0].numpy(), ei[1].numpy()] = 1
    d = a.sum(1) ** -0.5
    vals, vecs = np.linalg.eigh(np.eye(4) - d[:, None] * a * d[None])
    assert np.all(np.diff(vals) > 1e-6)  # distinct eigenvalues: eigenvectors unique up to sign
    pe = laplacian_pe(Data(edge_index=ei, num_nodes=4), 6).double().numpy()
    assert pe.shape == (4, 6) and np.all(pe[:, 3:] == 0)
    for j in range(3):
        col, ref = pe[:, j], vecs[:, j + 1]
        assert np.allclose(col, ref, atol=1e-6) or np.allclose(col, -ref, atol=1e-6)
    assert torch.equal(laplacian_pe(Data(edge_index=torch.empty(2, 0, dtype=torch.long), num_nodes=1), 3),
                       torch.zeros(1, 3))



def test_laplacian_pe_of_a_large_graph_is_reproducible_and_correct() -> None:
    """From 100 nodes PyG solves with ARPACK, whose random start vector made the same graph's PE differ from call to
    call (and from process to process: identical runs did not reproduce). Now bit-identical, and still eigenvectors
    of the normalised Laplacian (checked by L v = λ v on the computed columns)."""
    n = 150
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    chords = torch.stack([torch.arange(0, n, 7), (torch.arange(0, n, 7) * 3 + 11) % n])
    ei = torch.cat([ring, chords], 1)
    ei = torch.unique(torch.cat([ei, ei.flip(0)], 1), dim=1)
    g = Data(edge_index=ei, num_nodes=n)
    first, second = (add_laplacian_pe([g], K)[0].pe for _ in range(2))
    assert torch.equal(first, second)
    a = np.zeros((n, n))
    a[ei[0].numpy(), ei[1].numpy()] = 1
    d = a.sum(1) ** -0.5
    lap = np.eye(n) - d[:, None] * a * d[None]
    v = first.double().numpy()
    lam = np.einsum("ij,ij->j", v, lap @ v) / np.einsum("ij,ij->j", v, v)
    assert np.allclose(lap @ v, v * lam, atol=1e-4) and np.all(lam > 1e-6)  # non-trivial eigenvectors

# --------------------------------------------------------------------------------------------- configs and the task
def test_run_config_defaults_and_model_names() -> None:
    cfg = resolve_run_config({"task": {"kind": "graphcls"}})
    assert cfg.task.dataset == "mutag" and cfg.task.protocol == "cv10" and cfg.task.pe_dim == 15
    assert cfg.model.layers == 4 and cfg.model.et.steps == GRAPHCLS_ET_DEFAULTS["steps"] == 1
    assert cfg.model.et.alpha == 0.1 and cfg.model.et.dim == 64
    with pytest.raises(ConfigError, match=r"not a graphcls model; allowed: et, mlp, gin"):
        resolve_run_config({"task": {"kind": "graphcls"}, "model": {"name": "gcn"}})
    with pytest.raises(ConfigError, match=r"task.dataset"):
        resolve_run_config({"task": {"kind": "graphcls", "dataset": "cora"}})
    with pytest.raises(ValueError, match="needs a graphcls task config"):
        train_fold(resolve_run_config({"task": {"kind": "graph"}}), Path("/nonexistent"))


def test_fold_selection_and_the_authors_protocol(shared_data: Path) -> None:
    require_file(shared_data / TU_DATASETS["mutag"].relpath)
    ds = load_tu_dataset("mutag", root=shared_data)
    cpu = torch.device("cpu")
    task = GraphClsTask(graphcls_config("mutag", "mlp", fold=3, repeat=1), ds, cpu)
    f = task.fold
    assert (f.repeat, f.fold, f.seed, task.best_metric) == (1, 3, 1, "val/acc")
    assert len(np.intersect1d(f.train, f.test)) == 0 and f.train.size + f.val.size + f.test.size == 188
    authors = GraphClsTask(graphcls_config("mutag", "mlp", protocol="authors"), ds, cpu)
    assert authors.best_metric == "epoch" and authors.fold.training_accuracy  # the last epoch: no holdout
    ranks = [GraphClsTask(graphcls_config("mutag", "mlp", overrides={"train": {"batch_size": 28}}), ds, cpu, r, 4)
             for r in range(4)]  # 152 training graphs over 4 workers: 38 each, in 38 // 7 → 6 steps, in step
    shards = [t._shard(1) for t in ranks]
    assert [s.size for s in shards] == [38] * 4 and set(np.concatenate(shards)) == set(ranks[0].fold.train.tolist())
    assert [len(list(t.train_batches(1))) for t in ranks] == [t.num_train_batches() for t in ranks] == [6] * 4
    assert sum(sum(b.num_graphs for b in t._eval_batches("test")) for t in ranks) == 19
    with pytest.raises(ValueError, match=r"task.fold 10 .* folds 0..9"):
        GraphClsTask(graphcls_config("mutag", "mlp", fold=10), ds, cpu)


def test_one_fold_of_mutag_trains_above_chance_and_writes_its_metrics(shared_data: Path, tmp_path: Path) -> None:
    require_file(shared_data / TU_DATASETS["mutag"].relpath)
    over = {"train": {"epochs": 3, "lr": 1e-2, "batch_size": 32, "warmup_epochs": 0},
            "model": {"et": {"dim": 16, "heads": 2, "head_dim": 8}, "layers": 2}, "task": {"pe_dim": K}}
    res = train_fold(graphcls_config("mutag", "et", fold=0, overrides=over), tmp_path / "fold-0")
    history = json.loads((tmp_path / "fold-0" / "metrics.json").read_text())
    assert len(history) == 3
    for row in history:
        assert {"train/loss", "train/acc", "val/acc", "val/loss", "test/acc", "test/loss"} <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in ("train/acc", "val/acc", "test/acc"))
    chance = 125 / 188  # MUTAG's majority class
    assert max(row["train/acc"] for row in history) > chance + 0.05
    summary = json.loads((tmp_path / "fold-0" / "summary.json").read_text())
    best = int(np.argmax([row["val/acc"] for row in history]))
    assert summary["best_epoch"] == best + 1 == res.state.best_epoch + 1
    assert summary["data"]["split_sizes"] == {"train": 152, "val": 17, "test": 19}
    assert summary["cost"]["flops_per_sample"] > 0 and (tmp_path / "fold-0" / "energy_trace.csv").exists()

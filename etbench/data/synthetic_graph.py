"""A seeded synthetic anomaly detection graph: stochastic block model + BOND/PyGOD-style injected anomalies.

Normal structure: balanced communities, edges drawn block by block (SBM) with a chosen mean degree and homophily;
features are Gaussian around a per-community mean. Anomalies follow the injection recipe of BOND (Liu et al.,
NeurIPS 2022), as used for inj_cora / inj_amazon:
- structural: ``num_cliques`` groups of ``clique_size`` random nodes, each group made fully connected;
- contextual: for each of ``num_contextual`` further nodes, draw ``num_candidates`` random other nodes and copy the
  features of the candidate farthest in Euclidean distance.
The two sets are disjoint here, so the graph has exactly ``clique_size * num_cliques + num_contextual`` anomalies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etbench.data.graph_formats import RawGraph

CONTEXTUAL, STRUCTURAL = 1, 2  # anomaly_type bits, as in the PyGOD injected datasets


@dataclass(frozen=True)
class SyntheticGraphConfig:
    """Generator parameters; all of them enter the graph's checksum."""

    num_nodes: int = 1000
    num_features: int = 16
    num_communities: int = 5
    avg_degree: float = 10.0  # expected degree of a normal node before injection
    homophily: float = 0.9  # expected fraction of a node's edges inside its own community
    feature_separation: float = 2.0  # std of the community means (within-community noise has std 1)
    clique_size: int = 10
    num_cliques: int = 3
    num_contextual: int = 30
    num_candidates: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        n = self.num_nodes
        checks = {
            "num_nodes >= 2": n >= 2,
            "num_features >= 1": self.num_features >= 1,
            "1 <= num_communities <= num_nodes": 1 <= self.num_communities <= n,
            "avg_degree >= 0": self.avg_degree >= 0,
            "0 <= homophily <= 1": 0 <= self.homophily <= 1,
            "feature_separation >= 0": self.feature_separation >= 0,
            "clique_size >= 2": self.clique_size >= 2,
            "num_cliques >= 0 and num_contextual >= 0": self.num_cliques >= 0 and self.num_contextual >= 0,
            "clique_size * num_cliques + num_contextual <= num_nodes":
                self.clique_size * self.num_cliques + self.num_contextual <= n,
            "1 <= num_candidates <= num_nodes - 1": 1 <= self.num_candidates <= n - 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"bad synthetic graph parameters {self}: need {failed}")


def _sbm_edges(community: np.ndarray, cfg: SyntheticGraphConfig, rng: np.random.Generator) -> np.ndarray:
    """Draw each block's edge count from its binomial, then its endpoints uniformly (duplicates removed later)."""
    members = [np.flatnonzero(community == c) for c in range(cfg.num_communities)]
    size = cfg.num_nodes / cfg.num_communities
    p_in = cfg.avg_degree * cfg.homophily / max(size - 1, 1)
    p_out = cfg.avg_degree * (1 - cfg.homophily) / max(cfg.num_nodes - size, 1)
    parts = []
    for a, ma in enumerate(members):
        for b in range(a, cfg.num_communities):
            mb = members[b]
            pairs = len(ma) * (len(ma) - 1) // 2 if a == b else len(ma) * len(mb)
            count = rng.binomial(pairs, min(p_in if a == b else p_out, 1.0))
            parts.append(np.stack([ma[rng.integers(len(ma), size=count)], mb[rng.integers(len(mb), size=count)]]))
    return np.concatenate(parts, axis=1)


def generate_synthetic_graph(cfg: SyntheticGraphConfig) -> RawGraph:
    """The graph for ``cfg``; identical arrays for identical parameters (numpy ``default_rng(seed)``)."""
    rng = np.random.default_rng(cfg.seed)
    n, m = cfg.num_nodes, cfg.clique_size
    community = rng.permutation(np.arange(n) % cfg.num_communities)
    edges = [_sbm_edges(community, cfg, rng)]
    means = rng.normal(0.0, cfg.feature_separation, (cfg.num_communities, cfg.num_features))
    x = means[community] + rng.normal(0.0, 1.0, (n, cfg.num_features))
    kind = np.zeros(n, np.int64)

    cliques = rng.choice(n, m * cfg.num_cliques, replace=False).reshape(cfg.num_cliques, m)
    iu = np.triu_indices(m, 1)
    edges += [np.stack([c[iu[0]], c[iu[1]]]) for c in cliques]
    kind[cliques.ravel()] |= STRUCTURAL

    source = x.copy()  # candidates are compared on the un-injected features
    for i in rng.choice(np.flatnonzero(kind == 0), cfg.num_contextual, replace=False):
        others = rng.choice(n - 1, cfg.num_candidates, replace=False)
        others += others >= i  # skip node i itself
        far = others[np.linalg.norm(source[others] - source[i], axis=1).argmax()]
        x[i] = source[far]
        kind[i] |= CONTEXTUAL
    return RawGraph(x=x.astype(np.float32), y=(kind > 0).astype(np.int64),
                    edges={"homo": np.concatenate(edges, axis=1).astype(np.int64)}, anomaly_type=kind)

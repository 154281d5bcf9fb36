"""A small CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv 1604.00772), minimising.

    es = CMAES(x0, sigma0, popsize=8, seed=0)
    while not done:
        xs = es.ask()                       # [popsize, n]
        es.tell(xs, [f(x) for x in xs])
    es.best_x, es.best_f

Full covariance, weighted recombination, cumulative step-size adaptation, rank-one and rank-mu updates,
with the tutorial's default constants. `state()` / `from_state()` round-trip everything (the random
generator included), so an interrupted run resumes to the same result.
"""
from __future__ import annotations

import math

import numpy as np


class CMAES:
    def __init__(self, x0, sigma0: float, popsize: int | None = None, seed: int = 0):
        self.n = n = len(x0)
        self.lam = popsize or 4 + int(3 * math.log(n))
        self.mu = self.lam // 2
        w = math.log((self.lam + 1) / 2) - np.log(np.arange(1, self.mu + 1))
        self.weights = w / w.sum()
        self.mueff = 1.0 / (self.weights ** 2).sum()
        self.cc = (4 + self.mueff / n) / (n + 4 + 2 * self.mueff / n)
        self.cs = (self.mueff + 2) / (n + self.mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + self.mueff)
        self.cmu = min(1 - self.c1, 2 * (self.mueff - 2 + 1 / self.mueff) / ((n + 2) ** 2 + self.mueff))
        self.damps = 1 + 2 * max(0.0, math.sqrt((self.mueff - 1) / (n + 1)) - 1) + self.cs
        self.chin = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.mean = np.asarray(x0, dtype=np.float64).copy()
        self.sigma = float(sigma0)
        self.pc, self.ps = np.zeros(n), np.zeros(n)
        self.C, self.B, self.D = np.eye(n), np.eye(n), np.ones(n)
        self.generation = 0
        self.evaluations = 0
        self.best_x, self.best_f = self.mean.copy(), math.inf
        self.rng = np.random.default_rng(seed)

    def ask(self) -> np.ndarray:
        z = self.rng.standard_normal((self.lam, self.n))
        return self.mean + self.sigma * (z * self.D) @ self.B.T

    def tell(self, xs: np.ndarray, fs) -> None:
        xs, fs = np.asarray(xs, dtype=np.float64), np.asarray(fs, dtype=np.float64)
        order = np.argsort(fs, kind="stable")
        if fs[order[0]] < self.best_f:
            self.best_f, self.best_x = float(fs[order[0]]), xs[order[0]].copy()
        old = self.mean
        y = (xs[order[: self.mu]] - old) / self.sigma  # [mu, n]
        self.mean = old + self.sigma * self.weights @ y
        yw = self.weights @ y
        c_inv_sqrt = self.B @ np.diag(1 / self.D) @ self.B.T
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * c_inv_sqrt @ yw
        self.generation += 1
        self.evaluations += len(fs)
        norm_ps = np.linalg.norm(self.ps)
        hsig = norm_ps / math.sqrt(1 - (1 - self.cs) ** (2 * self.generation)) / self.chin < 1.4 + 2 / (self.n + 1)
        self.pc = (1 - self.cc) * self.pc + hsig * math.sqrt(self.cc * (2 - self.cc) * self.mueff) * yw
        rank_mu = (y.T * self.weights) @ y
        self.C = ((1 - self.c1 - self.cmu) * self.C
                  + self.c1 * (np.outer(self.pc, self.pc) + (1 - hsig) * self.cc * (2 - self.cc) * self.C)
                  + self.cmu * rank_mu)
        self.sigma *= math.exp((self.cs / self.damps) * (norm_ps / self.chin - 1))
        self.C = (self.C + self.C.T) / 2
        d2, self.B = np.linalg.eigh(self.C)
        self.D = np.sqrt(np.maximum(d2, 1e-20))

    def state(self) -> dict:
        arrays = {k: getattr(self, k) for k in ("mean", "pc", "ps", "C", "B", "D", "best_x")}
        scalars = {k: getattr(self, k) for k in ("sigma", "generation", "evaluations", "best_f", "lam")}
        return {"arrays": {k: v.tolist() for k, v in arrays.items()}, **scalars,
                "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state(cls, state: dict) -> "CMAES":
        es = cls(state["arrays"]["mean"], state["sigma"], popsize=state["lam"])
        for k, v in state["arrays"].items():
            setattr(es, k, np.asarray(v, dtype=np.float64))
        for k in ("sigma", "generation", "evaluations", "best_f"):
            setattr(es, k, state[k])
        es.rng.bit_generator.state = state["rng"]
        return es

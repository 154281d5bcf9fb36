"""CMA-ES through the maintained `cmaes` library (Nomura & Shibata, CyberAgent), minimising, with a state
that resumes without pickles.

    es = CMAES(x0, sigma0, popsize=8, seed=0)
    while not done:
        xs = es.ask()                       # [popsize, n]
        es.tell(xs, [f(x) for x in xs])
    es.best_x, es.best_f

The library saves its state by pickling (and re-seeds its generator on unpickling, so a resumed search would
differ). `state()` is instead the start (x0, sigma0, population, seed), every generation's fitness values and
the best point: `from_state()` replays ask/tell from the seed with those values, which rebuilds the search
exactly (the library draws from numpy's seeded RandomState), so an interrupted run resumes to the same result.
The library's linear algebra (the covariance's eigendecomposition) runs on one BLAS thread: its last bits
otherwise depend on the thread count, and the next generation's samples with them (a search under torchrun,
whose workers get OMP_NUM_THREADS=1, would drift from the same search in one process).
"""
from __future__ import annotations

import math

import numpy as np
from cmaes import CMA
from threadpoolctl import threadpool_limits


class CMAES:
    def __init__(self, x0, sigma0: float, popsize: int | None = None, seed: int = 0):
        self.x0 = np.asarray(x0, dtype=np.float64).copy()
        self.sigma0, self.seed = float(sigma0), int(seed)
        self._cma = CMA(mean=self.x0.copy(), sigma=self.sigma0, population_size=popsize, seed=self.seed)
        self.lam = self._cma.population_size
        self.fitness: list[list[float]] = []  # every generation's values, in the order asked
        self.best_x, self.best_f = self.x0.copy(), math.inf

    @property
    def generation(self) -> int:
        return len(self.fitness)

    @property
    def evaluations(self) -> int:
        return self.generation * self.lam

    @property
    def sigma(self) -> float:
        return float(self._cma._sigma)  # the library exposes no public step size; reported in the history only

    def ask(self) -> np.ndarray:
        with threadpool_limits(limits=1, user_api="blas"):
            return np.stack([self._cma.ask() for _ in range(self.lam)])

    def tell(self, xs: np.ndarray, fs) -> None:
        fs = [float(f) for f in fs]
        with threadpool_limits(limits=1, user_api="blas"):
            self._cma.tell(list(zip(np.asarray(xs, dtype=np.float64), fs)))
        i = int(np.argmin(fs))
        if fs[i] < self.best_f:
            self.best_f, self.best_x = fs[i], np.asarray(xs[i], dtype=np.float64).copy()
        self.fitness.append(fs)

    def state(self) -> dict:
        return {"x0": self.x0.tolist(), "sigma0": self.sigma0, "popsize": self.lam, "seed": self.seed,
                "fitness": self.fitness, "best_f": self.best_f, "best_x": self.best_x.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "CMAES":
        es = cls(state["x0"], state["sigma0"], popsize=state["popsize"], seed=state["seed"])
        for fs in state["fitness"]:
            es.tell(es.ask(), fs)
        es.best_f, es.best_x = float(state["best_f"]), np.asarray(state["best_x"], dtype=np.float64)
        return es

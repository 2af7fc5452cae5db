"""How small a difference a design can detect, and how many seeds a given difference needs,
at 80% power: statsmodels' solvers for the t-tests of the group table and for the F-test of
a factor in the blocked ANOVA.

Differences here are fractions of 1 (0.01 is one accuracy point)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from scipy import optimize
from statsmodels.stats.power import FTestPowerF2

POWER = 0.8
MAX_SEEDS = 100_000  # past this a design "needs more seeds than anyone will run"


def detectable(se: float, df: float, alpha: float) -> float:
    """The difference a two-sided t-test with standard error ``se`` and ``df`` degrees of
    freedom finds with 80% power; NaN where it cannot be said (no spread, no df)."""
    if not se > 0 or not df >= 1:
        return math.nan
    return se * math.sqrt(_noncentrality(float(df), alpha))


@functools.lru_cache(maxsize=1024)
def _noncentrality(df: float, alpha: float) -> float:
    """(diff / se)^2 at which the t-test has 80% power: a two-sided t-test is the F-test of
    its square, F(1, df). statsmodels' TTestPower returns NaN for 2 seeds at large effects
    (measured: d = 8, 12, 16); its F power does not. (statsmodels: nc = f2 (df1 + df2).)"""
    return _solved(lambda nc: FTestPowerF2().power(nc / (1 + df), 1, df, alpha, ncc=0))


@dataclass(frozen=True)
class FactorDesign:
    """What the F-test of one factor in an ANOVA depends on, per seed."""

    levels: int  # of this factor
    cells: int  # configurations in the study (groups)
    params: int  # the model's parameters besides the seed block
    blocked: bool  # seed is a block of the model
    mse: float  # the model's residual mean square (accuracy as a fraction, squared)

    def df_resid(self, seeds: int) -> int:
        return seeds * self.cells - self.params - (seeds - 1 if self.blocked else 0)

    def power(self, diff: float, seeds: int, alpha: float) -> float:
        """Power to find the factor matters when two of its levels differ by ``diff`` and the
        rest lie between them (the least favourable case: noncentrality n d^2 / 2 sigma^2
        with n runs a level)."""
        df_resid = self.df_resid(seeds)
        if df_resid < 1 or not self.mse > 0:
            return math.nan
        per_level = seeds * self.cells / self.levels
        noncentrality = per_level * diff**2 / (2 * self.mse)
        df_num = self.levels - 1
        f2 = noncentrality / (df_num + df_resid)  # statsmodels: nc = f2 (df1 + df2) at ncc=0
        return float(FTestPowerF2().power(f2, df_num, df_resid, alpha, ncc=0))

    def detectable(self, seeds: int, alpha: float) -> float:
        df_resid = self.df_resid(seeds)
        if df_resid < 1 or not self.mse > 0:
            return math.nan
        df_num = self.levels - 1
        f2 = _solved(lambda f2: FTestPowerF2().power(f2, df_num, df_resid, alpha, ncc=0))
        per_level = seeds * self.cells / self.levels
        return math.sqrt(2 * self.mse * f2 * (df_num + df_resid) / per_level)

    def seeds_needed(self, diff: float, alpha: float) -> int | None:
        """The fewest seeds whose design finds ``diff`` with 80% power (None: none up to
        MAX_SEEDS); power grows with seeds, so a bisection finds it."""
        if not diff > 0 or not self.mse > 0:
            return None
        low = 2
        while self.df_resid(low) < 1:
            low += 1
        if self.power(diff, low, alpha) >= POWER:
            return low
        high = low
        while self.power(diff, high, alpha) < POWER:
            if high >= MAX_SEEDS:
                return None
            low, high = high, min(high * 2, MAX_SEEDS)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (
                (low, middle) if self.power(diff, middle, alpha) >= POWER else (middle, high)
            )
        return high


def _solved(power_of: Callable[[float], float]) -> float:
    """The effect size whose power is 80%. statsmodels' ``solve_power`` is not used: with
    few residual degrees of freedom (1 to 5) it returns an effect whose power is 5%, without
    an error; scipy's root finder on statsmodels' power function does not."""
    high = 1.0
    while power_of(high) < POWER:
        high *= 4
        if high > 1e12:
            return math.nan
    return float(optimize.brentq(lambda effect: power_of(effect) - POWER, 0.0, high, xtol=1e-12))

"""Line decisions: region, vial and strip from per-patch scores; products by k-of-n runs.

The positive class is "defective" everywhere: "reject" = predicted defective, a true positive
is a defective unit rejected, TPR is the share of defective units rejected and TNR the share
of good units accepted (the thesis's tables mix the two conventions; this module does not).

Per acquisition (thesis 10.5.4, eq. 10.3):
- a region of a vial is rejected when any of its patches (one per key frame or rank image)
  scores >= that region's threshold; a score that is not a finite number always rejects;
- a vial is rejected when any of its regions is;
- a strip acquisition is rejected when any of its patches is: the max over its patches, each
  against its own region's threshold.

Per product (thesis 10.5.4.0.1): each product is acquired n times (10 on the line). With the
acceptance policy "k of n" (7 of 10) a product is declared good when at least k of its n runs
say good, defective when at least k say defective, and undecided otherwise. It is classified
correctly when at least k of its runs give its true label; an undecided product is wrong
whatever its label. k must be more than n / 2 so that a product cannot be both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomalyqc.errors import ConfigError

PRODUCT_GOOD = "good"
PRODUCT_DEFECTIVE = "defective"
PRODUCT_UNDECIDED = "undecided"


def region_rejects(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Patch decisions: (..., R) scores against (R,) thresholds -> bool, True = reject.

    NaN or inf scores reject: a failed detector never passes a unit as good.
    """
    s = np.asarray(scores, np.float64)
    t = np.asarray(thresholds, np.float64)
    if s.shape[-1:] != t.shape:
        raise ValueError(f"scores end in {s.shape[-1:]} regions but there are {t.shape} thresholds")
    return np.asarray(~np.isfinite(s) | (s >= t))


def acquisition_decisions(scores: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Decisions of acquisitions from their patch scores.

    `scores` is (..., S, V, R): S source images (key frames, rank images), V vials, R regions.
    Returns bool arrays (True = reject): "patch" (..., S, V, R), "region" (..., V, R) (any
    source), "vial" (..., V) (any region), "strip" (...) (any patch: eq. 10.3).
    """
    patch = region_rejects(scores, thresholds)
    region = patch.any(axis=-3)
    vial = region.any(axis=-1)
    return {
        "patch": patch,
        "region": np.asarray(region),
        "vial": np.asarray(vial),
        "strip": np.asarray(vial.any(axis=-1)),
    }


def region_scores(scores: np.ndarray) -> np.ndarray:
    """A region's score in one acquisition: the max over its source patches, NaN if any is
    not finite (so it rejects and sorts like a reject). (..., S, V, R) -> (..., V, R)."""
    s = np.asarray(scores, np.float64)
    out = s.max(axis=-3)
    out[~np.isfinite(s).all(axis=-3)] = np.nan
    return out


def strip_margin(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How far the worst patch of each acquisition is over its region's threshold (score -
    threshold; >= 0 means rejected, +inf when a score is not finite). (..., S, V, R) -> (...)."""
    s = np.asarray(scores, np.float64) - np.asarray(thresholds, np.float64)
    s[~np.isfinite(s)] = np.inf
    return np.asarray(s.reshape(*s.shape[:-3], -1).max(axis=-1))


@dataclass(frozen=True)
class AcceptancePolicy:
    """k of n: a product's label is the one at least k of its n runs agree on (see module doc)."""

    k: int = 7
    n: int = 10

    def __post_init__(self) -> None:
        if not (1 <= self.k <= self.n):
            raise ConfigError(f"acceptance policy {self.k}/{self.n}: need 1 <= k <= n, e.g. 7/10")
        if 2 * self.k <= self.n:
            raise ConfigError(
                f"acceptance policy {self.k}/{self.n}: k must be more than n/2, or a product could "
                f"be both good and defective; use e.g. {self.n // 2 + 1}/{self.n}"
            )

    @classmethod
    def parse(cls, text: str) -> AcceptancePolicy:
        """'7/10' -> AcceptancePolicy(7, 10)."""
        parts = text.replace(" ", "").split("/")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"acceptance policy must look like 7/10 (k of n runs), got {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"

    def describe(self) -> str:
        return (
            f"a product is declared good when at least {self.k} of its {self.n} runs accept it, "
            f"defective when at least {self.k} reject it, undecided otherwise; it is classified "
            f"correctly when at least {self.k} of its {self.n} runs give its true label"
        )

    def decide(self, run_rejects: np.ndarray) -> np.ndarray:
        """Product decisions from (P, n) run decisions (True = reject): (P,) of strings."""
        r = np.asarray(run_rejects, bool)
        if r.ndim != 2 or r.shape[1] != self.n:
            raise ConfigError(
                f"acceptance policy {self}: every product needs {self.n} runs, got "
                f"{r.shape[-1] if r.ndim == 2 else r.shape}; give --accept K/{r.shape[-1]} "
                "for this kit"
            )
        n_reject = r.sum(axis=1)
        out = np.full(r.shape[0], PRODUCT_UNDECIDED, dtype=object)
        out[n_reject >= self.k] = PRODUCT_DEFECTIVE
        out[(self.n - n_reject) >= self.k] = PRODUCT_GOOD
        return out

    def correct(self, run_rejects: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(P,) bool: at least k of a product's runs gave its true label (1 = defective)."""
        truth = np.where(np.asarray(labels) == 1, PRODUCT_DEFECTIVE, PRODUCT_GOOD)
        return np.asarray(self.decide(run_rejects) == truth)

"""Small statistics for the reports (rlt.report, rlt.experiment; pure Python: no SciPy in the environment).

mean_se          mean and standard error (sample standard deviation / sqrt(n))
t_quantile       quantile of Student's t (regularised incomplete beta, inverted by bisection)
mean_ci95        mean and the half-width of its two-sided 95% t interval
rise_z           Welch's t of the difference of two window means (sqrt(se1^2 + se2^2)), its df and 95% critical value
pearson          Pearson's r, with a 95% interval from Fisher's z transform
spearman         Spearman's rho (Pearson's r on average ranks)
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return sum(xs) / len(xs)


def sample_sd(xs: Sequence[float]) -> float:
    """Standard deviation with n - 1 in the denominator (0 for one value)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is NaN for a single value."""
    if len(xs) < 2:
        return mean(xs), float("nan")
    return mean(xs), sample_sd(xs) / math.sqrt(len(xs))


# ----------------------------------------------------------------------------------------- Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2, 0.5, x)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p, for 0 < p < 1."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0 (got {p}, {df})")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci95(xs: Sequence[float]) -> dict:
    """{mean, ci95 (half-width of the two-sided 95% t interval over the values), n, values}."""
    m, se = mean_se(xs)
    half = float("nan") if len(xs) < 2 else t_quantile(0.975, len(xs) - 1) * se
    return {"mean": m, "ci95": half, "n": len(xs), "values": list(xs)}


def rise_z(first: Sequence[float], last: Sequence[float]) -> dict:
    """Means and standard errors of two windows, z = (mean_last - mean_first) / sqrt(se_first^2 + se_last^2)
    (Welch's t), its Welch-Satterthwaite degrees of freedom ``df`` and ``crit``, the two-sided 95% critical
    value of t at ``df``: with windows of a few steps, |z| > 2 happens by chance far more often than 5%."""
    m1, s1 = mean_se(first)
    m2, s2 = mean_se(last)
    denom = math.sqrt(s1 * s1 + s2 * s2) if len(first) > 1 and len(last) > 1 else float("nan")
    z = (m2 - m1) / denom if denom and denom == denom else float("nan")
    df = crit = float("nan")
    if denom and denom == denom:
        v1, v2 = s1 ** 4 / (len(first) - 1), s2 ** 4 / (len(last) - 1)
        df = denom ** 4 / (v1 + v2)
        crit = t_quantile(0.975, df)
    return {"first_mean": m1, "first_se": s1, "last_mean": m2, "last_se": s2, "z": z, "df": df, "crit": crit}


# ----------------------------------------------------------------------------------------- correlation
def pearson(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """{r, ci95: [lo, hi] (Fisher z, n > 3), n}; r is NaN when either side is constant."""
    if len(xs) != len(ys):
        raise ValueError("pearson: sequences of different lengths")
    n = len(xs)
    if n < 2:
        return {"r": float("nan"), "ci95": [float("nan"), float("nan")], "n": n}
    mx, my = mean(xs), mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return {"r": float("nan"), "ci95": [float("nan"), float("nan")], "n": n}
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    if n <= 3 or abs(r) == 1.0:
        return {"r": r, "ci95": [float("nan"), float("nan")], "n": n}
    z, half = math.atanh(r), 1.959963984540054 / math.sqrt(n - 3)
    return {"r": r, "ci95": [math.tanh(z - half), math.tanh(z + half)], "n": n}


def ranks(xs: Sequence[float]) -> list[float]:
    """Average ranks (1-based; ties share the mean of their positions)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    return pearson(ranks(xs), ranks(ys))["r"]

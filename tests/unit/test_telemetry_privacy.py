"""The privacy machinery on the device and the aggregate on the controller, with real OpenDP.

- The noise has the scale the epsilon promises: Laplace(b = sensitivity / epsilon) for
  `laplace`, and for `gaussian` the sigma OpenDP calibrates for (epsilon, delta); the empirical
  variance and mean of many draws match (5-sigma bounds, so a wrong scale fails and a right one
  fails about once in a million runs).
- The budget: a stream stops when its budget for the period is spent, stays stopped across a
  restart (the ledger is on disk), and starts again in the next period; the owner's lower cap
  wins; a damaged ledger is an error, never a fresh budget.
- Consent: nothing is granted by default, a grant and a revoke are on disk at once, names are
  checked, a damaged file is an error.
- The fleet aggregate of many devices' noisy reports lands within its stated 95% error bar of the
  true mean about 95% of the time (checked over 400 fleets of 25 devices).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from agent.telemetry.budget import BudgetError, BudgetLedger
from agent.telemetry.consent import ConsentError, ConsentStore
from agent.telemetry.noise import noise_std, release
from fleet.telemetry.aggregate import Entry, combine
from ota.rune.runefile import InputRef
from ota.rune.streams import Mechanism, StreamKind, StreamSpec

MEAN = StreamSpec("m", StreamKind.MEAN, InputRef("x"), 0.5, 10.0, bounds=(-1.0, 1.0))
HISTOGRAM = StreamSpec(
    "h", StreamKind.HISTOGRAM, InputRef("x"), 1.0, 10.0, bins=(0.0, 1.0, 2.0, 3.0)
)
GAUSSIAN = StreamSpec(
    "g",
    StreamKind.MEAN,
    InputRef("x"),
    1.0,
    10.0,
    mechanism=Mechanism.GAUSSIAN,
    delta=1e-5,
    bounds=(0.0, 1.0),
)


def _draws(spec: StreamSpec, value: list[float], n: int) -> list[list[float]]:
    return [list(release(spec, value).values) for _ in range(n)]


def test_laplace_noise_has_the_scale_epsilon_promises() -> None:
    # A clamped mean over [-1, 1]: sensitivity 2, epsilon 0.5 -> b = 4, variance 2 b^2 = 32.
    n = 10_000
    samples = [d[0] - 0.25 for d in _draws(MEAN, [0.25], n)]
    b = 2.0 / 0.5
    variance = statistics.pvariance(samples)
    # Laplace kurtosis is 6: the variance estimate's relative sd is sqrt(5 / n).
    assert abs(variance / (2 * b * b) - 1) < 5 * math.sqrt(5 / n)
    assert abs(statistics.fmean(samples)) < 5 * math.sqrt(2) * b / math.sqrt(n)
    assert noise_std(MEAN) == pytest.approx(math.sqrt(2) * b)


def test_shares_get_noise_for_an_l1_sensitivity_of_two() -> None:
    n = 3_000
    draws = _draws(HISTOGRAM, [0.5, 0.25, 0.25], n)
    for key, true in enumerate([0.5, 0.25, 0.25]):
        variance = statistics.pvariance([d[key] - true for d in draws])
        assert abs(variance / (2 * 2.0**2) - 1) < 5 * math.sqrt(5 / n)


def test_gaussian_noise_is_calibrated_to_epsilon_and_delta() -> None:
    import opendp.prelude as dp

    sigma = noise_std(GAUSSIAN)
    # OpenDP's own accountant says this sigma costs at most (1.0, 1e-5) at sensitivity 1 ...
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=1)
    measurement = dp.c.make_fix_delta(
        dp.c.make_zCDP_to_approxDP(dp.m.make_gaussian(domain, dp.l2_distance(T=float), sigma)),
        1e-5,
    )
    epsilon, delta = measurement.map(1.0)
    assert epsilon <= 1.0 + 1e-9 and delta == 1e-5
    # ... and the draws have that sigma.
    n = 5_000
    samples = [d[0] - 0.5 for d in _draws(GAUSSIAN, [0.5], n)]
    assert abs(statistics.pvariance(samples) / sigma**2 - 1) < 5 * math.sqrt(2 / n)


def test_a_release_refuses_what_it_cannot_protect() -> None:
    with pytest.raises(ValueError, match="keys"):
        release(HISTOGRAM, [0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        release(MEAN, [math.nan])


def test_a_stream_stops_when_its_budget_is_spent_and_stays_stopped(tmp_path: Path) -> None:
    day = 86400.0
    now = 10 * day + 100
    ledger = BudgetLedger(tmp_path)
    paid = [ledger.spend("sine/m", 1.0, 0.0, 3.0, day, now + i) for i in range(5)]
    assert paid == [True, True, True, False, False]
    assert ledger.spent("sine/m", day, now).epsilon == 3.0
    # A restart reads the same spend back from disk: no new budget.
    again = BudgetLedger(tmp_path)
    assert not again.spend("sine/m", 1.0, 0.0, 3.0, day, now + 10)
    # Another stream has its own budget; the next period starts afresh.
    assert again.spend("sine/h", 1.0, 0.0, 3.0, day, now)
    assert again.spend("sine/m", 1.0, 0.0, 3.0, day, 11 * day + 1)
    assert again.spent("sine/m", day, 11 * day + 2).reports == 1


def test_float_budgets_are_not_lost_to_rounding(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path)
    paid = [ledger.spend("s/x", 0.1, 0.0, 1.0, 3600.0, 5.0) for _ in range(11)]
    assert paid.count(True) == 10


def test_a_damaged_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "budget.json").write_text("{not json")
    with pytest.raises(BudgetError, match="restore it"):
        BudgetLedger(tmp_path)


def test_consent_is_off_by_default_and_follows_the_owner(tmp_path: Path) -> None:
    store = ConsentStore(tmp_path)
    assert store.grants() == {}
    store.grant("sine/sine_mean", 100.0, budget=5.0)
    assert set(ConsentStore(tmp_path).grants()) == {"sine/sine_mean"}
    assert ConsentStore(tmp_path).grants()["sine/sine_mean"].budget == 5.0
    assert store.revoke("sine/sine_mean")
    assert not store.revoke("sine/sine_mean")
    assert ConsentStore(tmp_path).grants() == {}
    assert (tmp_path / "telemetry" / "consent.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("name", ["sine", "sine/", "/x", "sine/Mean", "*/*", "a/b/c"])
def test_consent_needs_a_stream_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConsentError, match="RUNE/STREAM"):
        ConsentStore(tmp_path).grant(name, 1.0)


def test_a_damaged_consent_file_grants_nothing(tmp_path: Path) -> None:
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "consent.json").write_text('{"format": "other"}')
    with pytest.raises(ConsentError, match="not a consent file"):
        ConsentStore(tmp_path).grants()


def test_the_fleet_aggregate_lands_within_its_error_bar() -> None:
    fleets, devices = 400, 25
    covered = within_one_sd = 0
    for fleet in range(fleets):
        true = [((fleet * 7 + d * 13) % 100) / 100 * 2 - 1 for d in range(devices)]
        entries = [
            Entry(f"d{d}", ("mean",), release(MEAN, [v]).values, noise_std(MEAN), float(d))
            for d, v in enumerate(true)
        ]
        aggregate = combine(entries)
        assert aggregate is not None and aggregate.devices == devices
        miss = abs(aggregate.value[0] - statistics.fmean(true))
        covered += miss <= aggregate.error[0]
        within_one_sd += miss <= aggregate.noise_std
    # The 95% bar covers the truth 95% of the time (binomial sd over 400 fleets: 1.1%), and one
    # noise sd 68% of the time (sd 2.3%): a bar too narrow or too wide fails one of the two.
    assert covered / fleets >= 0.95 - 5 * 0.011
    assert 0.683 - 5 * 0.023 <= within_one_sd / fleets <= 0.683 + 5 * 0.023

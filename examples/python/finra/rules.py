"""FINRA-style trade validation: the market data, the portfolio, the audit rules, the aggregator.

Everything here is deterministic: the same ``(data_mib, seed)`` gives the same table on any
host, and a rule gives the same verdict on the same table in any process, so the verdicts of
every way of handing the state to the validators can be compared with a single-process run.

The market table (one row per trade, sorted by time, ``ROW_BYTES`` bytes a row):

    ts (int64, ms since epoch of the first session), symbol (int16), account (int32),
    side (int8, +1 buy / -1 sell), price (float64), qty (int32), venue (int8)

with a few planted anomalies (fat-finger prices, volume spikes on some symbol-days, wash
trades) so that every rule finds something. The portfolio is private to the producer: each
account's positions (account, symbol, signed qty) and its cash.
"""

import hashlib
import json

import numpy as np
import pandas as pd

ROW_BYTES = 8 + 2 + 4 + 1 + 8 + 4 + 1
N_SYMBOLS = 400
N_ACCOUNTS = 2000
N_DAYS = 5
DAY_MS = 86_400_000
OPEN_MS = 34_200_000  # 09:30
SESSION_MS = 23_400_000  # 6.5 hours


def make_market(data_mib, seed=42):
    """A table of about ``data_mib`` MiB of trades."""
    n = max(5000, int(data_mib * (1 << 20)) // ROW_BYTES)
    rng = np.random.default_rng(seed)
    day = np.sort(rng.integers(0, N_DAYS, n))
    ts = day * DAY_MS + OPEN_MS + rng.integers(0, SESSION_MS, n)
    ts.sort(kind="stable")
    day = ts // DAY_MS
    popularity = 1.0 / np.arange(1, N_SYMBOLS + 1) ** 0.8
    symbol = rng.choice(N_SYMBOLS, n, p=popularity / popularity.sum()).astype(np.int16)
    # Each symbol's price walks from day to day; trades scatter around the day's level.
    base = np.exp(rng.uniform(np.log(5.0), np.log(500.0), N_SYMBOLS))
    walk = np.exp(np.cumsum(rng.normal(0.0, rng.uniform(0.005, 0.04, (N_SYMBOLS, 1)),
                                       (N_SYMBOLS, N_DAYS)), axis=1))
    level = base[:, None] * walk
    price = level[symbol, day] * (1.0 + rng.normal(0.0, 0.004, n))
    fat = rng.random(n) < 2e-4
    price[fat] *= rng.choice([0.8, 0.9, 1.1, 1.25], int(fat.sum()))
    # Marking the close: some trades of the last five minutes printed 3% off the day's level.
    late = np.flatnonzero(ts % DAY_MS - OPEN_MS >= SESSION_MS - 300_000)
    marked = rng.choice(late, min(len(late), max(3, n // 50000)), replace=False)
    price[marked] *= 1.03
    price = np.round(price, 2)
    qty = (100 * rng.integers(1, 50, n)).astype(np.int32)
    odd = rng.random(n) < 0.03
    qty[odd] = rng.integers(1, 100, int(odd.sum()))
    # Volume spikes: a few symbol-days trade ten times their usual size.
    spikes = rng.choice(N_SYMBOLS * N_DAYS, 12, replace=False)
    spiked = np.isin(symbol.astype(np.int64) * N_DAYS + day, spikes)
    qty[spiked] *= 10
    account = rng.choice(N_ACCOUNTS, n, p=_skewed(rng, N_ACCOUNTS)).astype(np.int32)
    side = rng.choice(np.array([-1, 1], dtype=np.int8), n)
    venue = rng.integers(0, 8, n).astype(np.int8)
    # Wash trades: the next trade undoes this one (same account, symbol, size and price).
    washes = rng.choice(n - 1, max(3, n // 20000), replace=False)
    nxt = washes + 1
    account[nxt] = account[washes]
    symbol[nxt] = symbol[washes]
    side[nxt] = -side[washes]
    qty[nxt] = qty[washes]
    price[nxt] = price[washes]
    return pd.DataFrame(
        {
            "ts": ts.astype(np.int64),
            "symbol": symbol,
            "account": account,
            "side": side,
            "price": price,
            "qty": qty,
            "venue": venue,
        }
    )


def _skewed(rng, n):
    w = rng.pareto(1.5, n) + 0.1
    return w / w.sum()


def make_portfolio(seed=42):
    """Private data: positions (account, symbol, signed qty) and each account's cash."""
    rng = np.random.default_rng(seed + 1)
    per = rng.integers(1, 16, N_ACCOUNTS)
    account = np.repeat(np.arange(N_ACCOUNTS, dtype=np.int32), per)
    symbol = rng.integers(0, N_SYMBOLS, len(account)).astype(np.int16)
    qty = (rng.integers(1, 200, len(account)) * 10).astype(np.int64)
    qty *= np.where(rng.random(len(account)) < 0.15, -1, 1)
    positions = pd.DataFrame({"account": account, "symbol": symbol, "qty": qty})
    positions = positions.groupby(["account", "symbol"], as_index=False)["qty"].sum()
    cash = pd.Series(rng.normal(20_000.0, 40_000.0, N_ACCOUNTS), name="cash")
    return {"positions": positions, "cash": cash}


# -- the rules ----------------------------------------------------------------------------
#
# Each takes (market, portfolio, param) and returns (ids flagged, a metric); ids are trade
# rows, accounts or symbol-days, whichever the rule is about.


def _day(m):
    return m["ts"].to_numpy() // DAY_MS


def _symbol_day(m):
    return m["symbol"].to_numpy().astype(np.int64) * N_DAYS + _day(m)


def price_band(m, p, pct):
    """Trades priced more than ``pct`` away from their symbol's median price that day."""
    median = m["price"].groupby(_symbol_day(m)).transform("median").to_numpy()
    dev = np.abs(m["price"].to_numpy() / median - 1.0)
    return np.flatnonzero(dev > pct), float(dev.max())


def volume_spike(m, p, k):
    """Symbol-days whose volume is over ``k`` times the symbol's median daily volume."""
    vol = m["qty"].astype(np.int64).groupby([m["symbol"], _day(m)]).sum()
    daily = vol.unstack(fill_value=0)
    med = daily.median(axis=1).replace(0, np.nan)
    ratio = daily.div(med, axis=0).fillna(0.0)
    sym, d = np.nonzero(ratio.to_numpy() > k)
    ids = daily.index.to_numpy()[sym].astype(np.int64) * N_DAYS + daily.columns.to_numpy()[d]
    return np.sort(ids), float(np.nanmax(ratio.to_numpy()))


def _last_and_vol(m):
    """Each symbol's last price and the std of its daily close-to-close log returns."""
    last = m.groupby("symbol")["price"].last()
    close = m["price"].groupby([m["symbol"], _day(m)]).last().unstack()
    rets = np.diff(np.log(close.to_numpy()), axis=1)
    vol = pd.Series(np.nan_to_num(np.nanstd(rets, axis=1), nan=0.05), index=close.index)
    return last, vol


def _valued(m, p):
    last, vol = _last_and_vol(m)
    pos = p["positions"]
    price = last.reindex(pos["symbol"].to_numpy()).fillna(0.0).to_numpy()
    sigma = vol.reindex(pos["symbol"].to_numpy()).fillna(0.05).to_numpy()
    value = pos["qty"].to_numpy() * price
    return pos["account"].to_numpy(), value, sigma


def margin(m, p, rate):
    """Accounts whose equity is below their margin requirement: ``rate`` of each position's
    value plus three times its symbol's daily volatility (from the whole table)."""
    account, value, sigma = _valued(m, p)
    need = np.abs(value) * (rate + 3.0 * sigma)
    equity = p["cash"].to_numpy() + np.bincount(account, value, N_ACCOUNTS)
    required = np.bincount(account, need, N_ACCOUNTS)
    short = np.flatnonzero(equity < required)
    return short, float((required - equity).max())


def concentration(m, p, limit):
    """Accounts with more than ``limit`` of their gross exposure in one symbol."""
    account, value, _ = _valued(m, p)
    gross = np.bincount(account, np.abs(value), N_ACCOUNTS)
    biggest = pd.Series(np.abs(value)).groupby(account).max()
    share = biggest.to_numpy() / np.where(gross[biggest.index] > 0, gross[biggest.index], 1.0)
    ids = biggest.index.to_numpy()[share > limit]
    return ids, float(share.max())


def wash_trade(m, p, window_ms):
    """Accounts that bought and sold the same size of one symbol at the same price within
    ``window_ms`` (the pair nets to nothing)."""
    acct = m["account"].to_numpy()
    sym = m["symbol"].to_numpy()
    ts = m["ts"].to_numpy()
    order = np.lexsort((ts, sym, acct))
    a, s, t = acct[order], sym[order], ts[order]
    side = m["side"].to_numpy()[order]
    q = m["qty"].to_numpy()[order]
    px = m["price"].to_numpy()[order]
    pair = (
        (a[1:] == a[:-1])
        & (s[1:] == s[:-1])
        & (side[1:] != side[:-1])
        & (q[1:] == q[:-1])
        & (t[1:] - t[:-1] <= window_ms)
        & (np.abs(px[1:] / px[:-1] - 1.0) < 1e-3)
    )
    return np.unique(a[1:][pair]), float(pair.sum())


def marking_close(m, p, minutes):
    """Accounts trading in the last ``minutes`` of a session more than 2% away from the
    symbol's volume-weighted price that day."""
    sd = _symbol_day(m)
    notional = m["price"].to_numpy() * m["qty"].to_numpy()
    g = pd.DataFrame({"n": notional, "q": m["qty"].to_numpy().astype(np.float64)}).groupby(sd)
    vwap = (g["n"].transform("sum") / g["q"].transform("sum")).to_numpy()
    into = m["ts"].to_numpy() % DAY_MS - OPEN_MS
    late = into >= SESSION_MS - minutes * 60_000
    off = np.abs(m["price"].to_numpy() / vwap - 1.0)
    hit = late & (off > 0.02)
    return np.unique(m["account"].to_numpy()[hit]), float(off[late].max()) if late.any() else 0.0


def return_outliers(m, p, z):
    """Trades whose trade-to-trade log return is over ``z`` standard deviations of their
    symbol's returns (numpy statistics over the whole table)."""
    sym = m["symbol"].to_numpy()
    order = np.argsort(sym, kind="stable")
    s = sym[order]
    lp = np.log(m["price"].to_numpy()[order])
    r = np.diff(lp)
    same = s[1:] == s[:-1]
    r = np.where(same, r, np.nan)
    stats = pd.Series(r).groupby(s[1:]).agg(["mean", "std"])
    mu = stats["mean"].reindex(s[1:]).to_numpy()
    sd = stats["std"].reindex(s[1:]).to_numpy()
    score = np.abs(r - mu) / np.where(sd > 0, sd, np.inf)
    score = np.nan_to_num(score, nan=0.0)
    ids = np.sort(order[1:][score > z])
    kurt = pd.Series(r).groupby(s[1:]).apply(lambda x: float(x.kurt()) if x.count() > 3 else 0.0)
    return ids, float(np.nanmax(kurt.to_numpy()))


def odd_lot(m, p, share):
    """Accounts with at least 50 trades of which more than ``share`` are odd lots."""
    acct = m["account"].to_numpy()
    odd = (m["qty"].to_numpy() % 100) != 0
    trades = np.bincount(acct, minlength=N_ACCOUNTS)
    odds = np.bincount(acct, odd, N_ACCOUNTS)
    frac = np.where(trades > 0, odds / np.maximum(trades, 1), 0.0)
    ids = np.flatnonzero((trades >= 50) & (frac > share))
    return ids, float(frac.max())


def missing_column(m, p, _):
    """Not a rule: a validator that fails the way a broken one does (a column the table
    lacks). Used to check that a failing validator is reported."""
    return np.asarray(m["settlement_date"]), 0.0


RULES = {
    "price_band": (price_band, [0.05, 0.08, 0.12, 0.2]),
    "volume_spike": (volume_spike, [3.0, 4.0, 6.0, 8.0]),
    "margin": (margin, [0.25, 0.3, 0.4, 0.5]),
    "concentration": (concentration, [0.3, 0.4, 0.5, 0.6]),
    "wash_trade": (wash_trade, [1000, 2000, 5000, 10000]),
    "marking_close": (marking_close, [5, 10, 15, 30]),
    "return_outliers": (return_outliers, [4.0, 5.0, 6.0, 8.0]),
    "odd_lot": (odd_lot, [0.05, 0.1, 0.2, 0.3]),
}
FAILING = "missing_column"
NAMES = list(RULES)


def specs(n, fail=()):
    """Validator i's spec: rule ``NAMES[i % 8]`` with the (i // 8)-th of its parameters, so
    32 validators run 32 distinct checks; validators in ``fail`` get the failing rule."""
    out = []
    for i in range(n):
        if i in fail:
            out.append(f"{FAILING}:0")
            continue
        name = NAMES[i % len(NAMES)]
        params = RULES[name][1]
        out.append(f"{name}:{(i // len(NAMES)) % len(params)}")
    return out


def run_rule(spec, market, portfolio):
    """Runs one validator's spec; returns its verdict (JSON-ready)."""
    name, level = spec.split(":")
    if name == FAILING:
        fn, param = missing_column, 0
    else:
        fn, params = RULES[name]
        param = params[int(level)]
    ids, metric = fn(market, portfolio, param)
    ids = np.asarray(ids, dtype=np.int64)
    return {
        "rule": name,
        "param": param,
        "flagged": int(len(ids)),
        "ids": [int(x) for x in ids[:20]],
        "ids_digest": hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16],
        "metric": float(f"{metric:.9g}"),
    }


def aggregate(verdicts):
    """The aggregator: combines the verdicts (index -> verdict) into one report whose
    ``digest`` covers every verdict, so two runs agree iff every validator agreed."""
    items = [verdicts[i] for i in sorted(verdicts)]
    by_rule = {}
    accounts = set()
    for v in items:
        by_rule[v["rule"]] = by_rule.get(v["rule"], 0) + v["flagged"]
        if v["rule"] in ("margin", "concentration", "wash_trade", "marking_close", "odd_lot"):
            accounts.update(v["ids"])
    canon = json.dumps(items, sort_keys=True, separators=(",", ":"))
    return {
        "validators": len(items),
        "flags_by_rule": by_rule,
        "accounts_flagged_sample": sorted(accounts)[:20],
        "digest": hashlib.sha256(canon.encode()).hexdigest()[:16],
    }

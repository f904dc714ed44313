"""A seeded simulator of click logs for a classifieds site's "recommended for you" feed.

Why a simulator: a ranker needs click logs, real ones are private, and a simulator's hidden
truth lets the README say how close the model comes to the best any ranker could do.

The world (all drawn from one seed):
  users   age 18-65, gender, city (12), device, and a hidden taste for each of the 12
          categories = a taste shared by their age band and gender + one shared by their
          city + a personal part no feature reveals; a hidden budget (log price they like)
          that grows with age and is higher in tier-1 cities and on iOS.
          Observable besides the profile: `recent_category`, the category of their last
          click, drawn from their taste (a noisy hint of the personal part).
  items   item_id, category, brand (8 per category), price (log-normal around the
          category's typical price), rating 1-5 (a noisy view of a hidden quality), and
          age_days (how long the listing has been up).
  clicks  a session shows one user 20 listings drawn at random from the catalogue; each is
          clicked with probability sigmoid(logit):
            logit = -2.6 + 1.4 * taste[category] + 0.5 * quality + 0.4 * brand quality
                    - 0.6 * |log price - budget| - 0.25 * log1p(age_days / 7)
          with no position effect (the list order is random).

Users are split: sessions of the first 80% of users are for training, sessions of the rest
(users the model never saw) are held out. `session(...)` yields what a request carries
(the user's and items' observable features) plus each listing's click and true click
probability, the oracle the README compares with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 2024
CITIES = ("beijing", "shanghai", "guangzhou", "shenzhen", "chengdu", "hangzhou")
CITIES += ("wuhan", "xian", "nanjing", "tianjin", "kunming", "harbin")
TIER1 = 4  # the first four cities are tier 1: higher budgets
CATEGORIES = ("phones", "laptops", "furniture", "appliances", "cars", "bikes")
CATEGORIES += ("rentals", "cameras", "pets", "baby", "sports", "books")
TYPICAL_PRICE = (2500, 5000, 1200, 1800, 80000, 600, 3500, 3000, 800, 300, 400, 40)
DEVICES = ("android", "ios", "web")
GENDERS = ("f", "m")
N_USERS, N_ITEMS, SESSION_SIZE = 3000, 2000, 20
TRAIN_USERS = 0.8


@dataclass
class Session:
    """One feed impression: the request's features, and what happened."""

    user: dict[str, Any]
    candidates: list[dict[str, Any]]
    clicks: np.ndarray  # 0/1 per candidate
    truth: np.ndarray  # the true click probability per candidate

    def request(self) -> dict[str, Any]:
        """The jsonData a client sends for this session."""
        return {"user": self.user, "candidates": self.candidates}


class World:
    """The users and items of one seeded world; `sessions` draws click logs from it."""

    def __init__(self, seed: int = SEED):
        rng = np.random.default_rng(seed)
        n_cat = len(CATEGORIES)
        band_taste = rng.normal(0, 1.0, (4, len(GENDERS), n_cat))
        city_taste = rng.normal(0, 0.6, (len(CITIES), n_cat))
        self.users: list[dict[str, Any]] = []
        self.taste = np.empty((N_USERS, n_cat))
        self.budget = np.empty(N_USERS)
        for u in range(N_USERS):
            age = int(rng.integers(18, 66))
            gender, city, device = int(rng.integers(2)), int(rng.integers(len(CITIES))), int(rng.integers(3))
            taste = band_taste[min((age - 18) // 12, 3), gender] + city_taste[city] + rng.normal(0, 0.5, n_cat)
            self.taste[u] = taste
            self.budget[u] = 0.03 * (age - 40) + 0.4 * (city < TIER1) + 0.3 * (device == 1) + rng.normal(0, 0.3)
            recent = rng.choice(n_cat, p=_softmax(1.5 * taste))
            self.users.append(
                {
                    "user_id": f"u{u:05d}",
                    "age": age,
                    "gender": GENDERS[gender],
                    "city": CITIES[city],
                    "device": DEVICES[device],
                    "recent_category": CATEGORIES[recent],
                }
            )
        brand_quality = rng.normal(0, 1.0, (n_cat, 8))
        self.items: list[dict[str, Any]] = []
        self.item_logit = np.empty(N_ITEMS)  # the user-independent part of the logit
        self.item_category = np.empty(N_ITEMS, int)
        self.item_log_price = np.empty(N_ITEMS)  # relative to the category's typical price
        for i in range(N_ITEMS):
            cat, brand = int(rng.integers(n_cat)), int(rng.integers(8))
            quality = rng.normal(0, 1.0)
            relative = rng.normal(0, 0.5)
            price = round(TYPICAL_PRICE[cat] * float(np.exp(relative)), 2)
            age_days = int(rng.exponential(20))
            self.item_category[i], self.item_log_price[i] = cat, relative
            self.item_logit[i] = 0.5 * quality + 0.4 * brand_quality[cat, brand] - 0.25 * np.log1p(age_days / 7)
            self.items.append(
                {
                    "item_id": f"i{i:05d}",
                    "category": CATEGORIES[cat],
                    "brand": f"{CATEGORIES[cat]}-b{brand}",
                    "price": price,
                    "rating": float(np.clip(round(3.5 + 0.6 * quality + rng.normal(0, 0.4), 1), 1, 5)),
                    "age_days": age_days,
                }
            )

    def click_probability(self, user: int, items: np.ndarray) -> np.ndarray:
        taste = self.taste[user, self.item_category[items]]
        fit = np.abs(self.item_log_price[items] - self.budget[user])
        return _sigmoid(-2.6 + 1.4 * taste + self.item_logit[items] - 0.6 * fit)

    def sessions(self, count: int, *, held_out: bool, seed: int) -> list[Session]:
        """`count` sessions of training users (held_out=False) or of held-out users."""
        rng = np.random.default_rng(seed)
        cut = int(N_USERS * TRAIN_USERS)
        low, high = (cut, N_USERS) if held_out else (0, cut)
        result = []
        for _ in range(count):
            user = int(rng.integers(low, high))
            items = rng.choice(N_ITEMS, SESSION_SIZE, replace=False)
            truth = self.click_probability(user, items)
            clicks = (rng.random(SESSION_SIZE) < truth).astype(np.int64)
            result.append(Session(dict(self.users[user]), [dict(self.items[i]) for i in items], clicks, truth))
        return result


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


TRAIN_SESSIONS, HELD_OUT_SESSIONS = 5000, 1000


def train_sessions() -> list[Session]:
    return World().sessions(TRAIN_SESSIONS, held_out=False, seed=1)


def held_out_sessions() -> list[Session]:
    return World().sessions(HELD_OUT_SESSIONS, held_out=True, seed=2)

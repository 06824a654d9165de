"""Which exact form runs a group's second pass: cached dense weights, dense weights prepared now, or low-rank.

Cost model (seconds, measured: once at load by ``MassRuntime.calibrate`` on a small batch, then updated after
every second pass and every preparation as an exponential moving average):

- ``dense_per_image``: the encoder graph with dense weights, per image;
- ``lowrank_extra_per_image_task``: what the low-rank graph costs beyond that, per image and per task in the
  set (the update's rank is |S| k, and its cost R(m + n) per token grows with it);
- ``product_per_task``: densifying a set whose factors are ready (the products A @ B into the weights, plus the
  upload), per task in the set. Computing the factors themselves (Gram matrices, eigen-decompositions) is
  needed by both forms, so it is not part of the choice.

Rule, per task set S and group of n images (rent or buy): a cached S runs dense. Otherwise running S low-rank
costs ``n * extra(S)`` now, densifying costs ``product(S)`` once and then nothing extra while S stays cached.
S keeps a running total of the extra it has paid; once that total plus this group's extra reaches
``product(S)``, S is densified (a set common enough to repay its preparation gets it; a rare set never stalls
the stream with a preparation it would not repay: at most twice the cost of the best choice in hindsight).
A set another thread is preparing runs low-rank meanwhile rather than waiting. Buying assumes the dense set stays
cached until it is used again: when the caller says it would not (``dense_fits=False``: more distinct sets in
recent use than the cache holds dense sets, so LRU would evict each before its next use; measured on ViT-B-16 with
a 1.1 GB share: 50 of 53 groups densified, every set evicted unused), the set runs low-rank.
"""

from __future__ import annotations

import threading

SECOND_PASS_FORMS = ("auto", "dense", "lowrank")
EMA_WEIGHT = 0.2  # weight of the newest measurement
MAX_TRACKED_SETS = 4096  # rent totals kept; the oldest are dropped past this (a dropped set starts over)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new


class SecondPassPlanner:
    def __init__(self, form: str = "auto", lowrank_available: bool = True):
        if form not in SECOND_PASS_FORMS:
            raise ValueError(f"second pass form {form!r}: choose one of {', '.join(SECOND_PASS_FORMS)}")
        self.form = form if lowrank_available else "dense"
        self.dense_per_image: float | None = None
        self.lowrank_extra_per_image_task: float | None = None
        self.product_per_task: float | None = None
        self.paid: dict[tuple[int, ...], float] = {}
        self.choices = {"dense_cached": 0, "dense_prepared": 0, "lowrank": 0}
        self._lock = threading.Lock()

    @property
    def calibrated(self) -> bool:
        return None not in (self.dense_per_image, self.lowrank_extra_per_image_task, self.product_per_task)

    def choose(self, task_set: tuple[int, ...], images: int, dense_cached: bool, dense_in_flight: bool,
               dense_fits: bool = True) -> str:
        """'dense' or 'lowrank' for a group of ``images`` images on ``task_set``."""
        with self._lock:
            if dense_cached:
                self.choices["dense_cached"] += 1
                return "dense"
            if self.form == "dense" or (self.form == "auto" and not dense_in_flight and not self.calibrated):
                self.choices["dense_prepared"] += 1
                return "dense"
            if self.form == "lowrank" or dense_in_flight or (self.form == "auto" and not dense_fits):
                self.choices["lowrank"] += 1
                return "lowrank"
            extra = images * max(self.lowrank_extra_per_image_task, 0.0) * len(task_set)
            paid = self.paid.pop(task_set, 0.0)
            if paid + extra >= self.product_per_task * len(task_set):
                self.choices["dense_prepared"] += 1
                return "dense"
            self.paid[task_set] = paid + extra
            while len(self.paid) > MAX_TRACKED_SETS:
                self.paid.pop(next(iter(self.paid)))
            self.choices["lowrank"] += 1
            return "lowrank"

    def observe_dense(self, images: int, seconds: float) -> None:
        with self._lock:
            self.dense_per_image = _ema(self.dense_per_image, seconds / images)

    def observe_lowrank(self, task_set_size: int, images: int, seconds: float) -> None:
        with self._lock:
            if self.dense_per_image is not None:
                extra = (seconds / images - self.dense_per_image) / task_set_size
                self.lowrank_extra_per_image_task = _ema(self.lowrank_extra_per_image_task, extra)

    def observe_product(self, task_set_size: int, seconds: float) -> None:
        with self._lock:
            self.product_per_task = _ema(self.product_per_task, seconds / task_set_size)

    def info(self) -> dict:
        with self._lock:
            return {"form": self.form, "choices": dict(self.choices),
                    "model_seconds": {"dense_per_image": self.dense_per_image,
                                      "lowrank_extra_per_image_task": self.lowrank_extra_per_image_task,
                                      "product_per_task": self.product_per_task}}

"""Sensitivities refined around the solved policy: rounds of measuring in context and re-solving.

Scores measured at INT8 treat every layer alone, so they cannot see that lowering several layers
of one stage together costs more than the sum of lowering each. Round 1 is the INT8 measurement;
round r + 1 measures every layer again with the others at the policy the mean of rounds 1..r
solves for the budget, and the mean over all rounds is the result. Averaging damps the
alternation a plain fixed-point iteration shows (a layer raised in one round looks cheap in the
next). Cost: one measurement per round.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Optional

from lib.policy import Policy
from lib.search.ilp import KnapsackProblem
from lib.search.sensitivity import Sensitivities

log = logging.getLogger(__name__)


def mean_scores(rounds: list) -> list:
    """Per layer, decision and bits, the mean of the rounds' scores."""
    first = rounds[0]
    return [{decision: {bits: sum(r[i][decision][bits] for r in rounds) / len(rounds) for bits in row[decision]}
             for decision in row} for i, row in enumerate(first)]


def refine(first: Sensitivities, rounds: int, budgets: Mapping[str, float],
           problem_for: Callable[[Sensitivities], KnapsackProblem],
           measure_around: Callable[[Policy], Sensitivities]) -> Sensitivities:
    """`first` (the INT8 measurement) refined by `rounds` − 1 measurements around the solved policy."""
    started = time.perf_counter()
    history = [first.scores]
    passes = dict(first.passes)
    current = first
    previous: Optional[list] = None
    for number in range(2, rounds + 1):
        context = problem_for(current).solve(budgets).policy
        bits = context.as_array().tolist()
        if bits == previous:
            log.info("sensitivity round %d: the solved policy repeats; stopping", number)
            break
        previous = bits
        measured = measure_around(context)
        history.append(measured.scores)
        for key, value in measured.passes.items():
            passes[key] = passes.get(key, 0) + value
        current = Sensitivities(first.method, mean_scores(history))
        log.info("sensitivity round %d of %d: measured around %s", number, rounds,
                 " ".join(f"{w}/{a}" for w, a, *_ in bits))
    return Sensitivities(first.method, current.scores, first.seconds + time.perf_counter() - started, passes,
                         rounds=len(history))

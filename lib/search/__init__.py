"""Mixed-precision search: per-layer weight/input(/ADC) bits chosen by an agent (DDPG or random),
rewarded by accuracy after a short finetune and by the cost model's ratio of the chosen objective
(crossbar latency by default; energy, EDP or area), optionally under hard budgets on several; or
planned without an agent: an integer program over per-layer sensitivities (ilp) or greedy lowering."""
from lib.lazy_names import lazy_names

# names load on first use: rl_quantize.py builds its flags from lib.search.config before torch loads
__getattr__, __all__ = lazy_names(__name__, {
    "lib.search.agent": ("DDPGAgent", "RandomAgent", "ReplayMemory"),
    "lib.search.config": ("DDPGConfig", "SearchConfig", "SearchConfigError"),
    "lib.search.search": ("DIVERGE_ENV", "KILL_ENV", "SearchError", "SearchResult", "prepare", "run_search"),
    "lib.search.space": ("BitSpace", "action_to_bits"),
})

"""Mixed-precision search: per-layer weight/input(/ADC) bits chosen by an agent (DDPG or random),
rewarded by accuracy after a short finetune and by the cost model's ratio of the chosen objective
(crossbar latency by default; energy, EDP or area), optionally under hard budgets on several."""
from lib.search.agent import DDPGAgent, RandomAgent, ReplayMemory
from lib.search.config import DDPGConfig, SearchConfig, SearchConfigError
from lib.search.search import DIVERGE_ENV, KILL_ENV, SearchError, SearchResult, prepare, run_search
from lib.search.space import BitSpace, action_to_bits

__all__ = ["DDPGAgent", "RandomAgent", "ReplayMemory", "DDPGConfig", "SearchConfig", "SearchConfigError", "KILL_ENV",
           "DIVERGE_ENV", "SearchError", "SearchResult", "prepare", "run_search", "BitSpace", "action_to_bits"]

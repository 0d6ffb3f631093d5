"""The agents that pick an action in [0, 1] per decision: DDPG (HAQ's) and uniform random (the ablation).

DDPG: actor and critic MLPs, target copies updated softly (tau), a replay memory with its own
seeded generator, random actions for the warm-up episodes, then the actor's action perturbed by
truncated-normal noise whose width decays per episode. Every transition of an episode gets the
episode's final reward minus a moving-average baseline. All randomness lives in generators the
agent owns, so `state_dict()` / `load_state_dict()` resume it exactly.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from scipy.stats import truncnorm
from torch import nn

from lib.search.config import DDPGConfig


class Actor(nn.Module):
    """state → action in [0, 1]."""

    def __init__(self, states: int, hidden1: int, hidden2: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(states, hidden1), nn.ReLU(), nn.Linear(hidden1, hidden2), nn.ReLU(),
                                 nn.Linear(hidden2, 1), nn.Sigmoid())

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class Critic(nn.Module):
    """(state, action) → Q: the action joins at the first hidden layer."""

    def __init__(self, states: int, hidden1: int, hidden2: int) -> None:
        super().__init__()
        self.state_in = nn.Linear(states, hidden1)
        self.action_in = nn.Linear(1, hidden1)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden1, hidden2), nn.ReLU(), nn.Linear(hidden2, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.state_in(state) + self.action_in(action))


class ReplayMemory:
    """A ring buffer of (state, action, reward, next state, done) with its own seeded sampler."""

    def __init__(self, capacity: int, states: int, seed: int) -> None:
        self.capacity = capacity
        self.states = np.zeros((capacity, states), np.float32)
        self.next_states = np.zeros((capacity, states), np.float32)
        self.actions = np.zeros((capacity, 1), np.float32)
        self.rewards = np.zeros((capacity, 1), np.float32)
        self.dones = np.zeros((capacity, 1), np.float32)
        self.size = 0
        self.cursor = 0
        self.rng = np.random.RandomState(seed)

    def __len__(self) -> int:
        return self.size

    def append(self, state, action: float, reward: float, next_state, done: bool) -> None:
        i = self.cursor
        self.states[i], self.actions[i, 0], self.rewards[i, 0] = state, action, reward
        self.next_states[i], self.dones[i, 0] = next_state, float(done)
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch: int) -> tuple:
        index = self.rng.randint(0, self.size, size=batch)
        return (self.states[index], self.actions[index], self.rewards[index], self.next_states[index],
                self.dones[index])

    def state_dict(self) -> dict:
        n = self.size
        return {"capacity": self.capacity, "size": n, "cursor": self.cursor,
                "states": torch.from_numpy(self.states[:n].copy()),
                "next_states": torch.from_numpy(self.next_states[:n].copy()),
                "actions": torch.from_numpy(self.actions[:n].copy()),
                "rewards": torch.from_numpy(self.rewards[:n].copy()),
                "dones": torch.from_numpy(self.dones[:n].copy()), "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        n = int(state["size"])
        for key in ("states", "next_states", "actions", "rewards", "dones"):
            getattr(self, key)[:n] = state[key].numpy()
        self.size, self.cursor = n, int(state["cursor"])
        _set_rng_state(self.rng, state["rng"])


def _rng_state(rng: np.random.RandomState) -> dict:
    kind, keys, pos, has_gauss, gauss = rng.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_rng_state(rng: np.random.RandomState, state: dict) -> None:
    rng.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                   state["gauss"]))


class RandomAgent:
    """Uniformly random actions with its own generator: the same environment without learning."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def act(self, state: np.ndarray, episode: int) -> float:
        return float(self.rng.uniform(0.0, 1.0))

    def observe_episode(self, transitions: list, reward: float, episode: int) -> None:
        """Random search learns nothing."""

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        _set_rng_state(self.rng, state["rng"])


class DDPGAgent:
    """HAQ's DDPG over single-action decisions; `act` then `observe_episode` once per episode."""

    def __init__(self, states: int, decisions_per_episode: int, config: DDPGConfig, warmup: int, seed: int) -> None:
        self.config = config
        self.warmup = warmup
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.actor = Actor(states, config.hidden1, config.hidden2)
        self.critic = Critic(states, config.hidden1, config.hidden2)
        torch.random.set_rng_state(generator_state)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic)
        self.memory = ReplayMemory(config.rmsize * decisions_per_episode, states, seed + 1)
        self.noise_rng = np.random.RandomState(seed + 2)
        self.moving_average: Optional[float] = None
        self.updates = 0

    def delta(self, episode: int) -> float:
        """Exploration noise width for `episode` (decays after the warm-up)."""
        return self.config.init_delta * self.config.delta_decay ** max(episode - self.warmup, 0)

    def act(self, state: np.ndarray, episode: int) -> float:
        if episode < self.warmup:
            return float(self.noise_rng.uniform(0.0, 1.0))
        with torch.no_grad():
            mean = float(self.actor(torch.from_numpy(state).unsqueeze(0)).item())
        sigma = self.delta(episode)
        a, b = (0.0 - mean) / sigma, (1.0 - mean) / sigma
        return float(np.clip(truncnorm.rvs(a, b, loc=mean, scale=sigma, random_state=self.noise_rng), 0.0, 1.0))

    def observe_episode(self, transitions: list, reward: float, episode: int) -> None:
        """Store the episode's transitions with its final reward; after the warm-up, one update per transition."""
        alpha = self.config.moving_alpha
        self.moving_average = reward if self.moving_average is None else \
            self.moving_average + alpha * (reward - self.moving_average)
        for state, action, next_state, done in transitions:
            self.memory.append(state, action, reward, next_state, done)
        if episode >= self.warmup:
            for _ in transitions:
                self.update()

    def update(self) -> None:
        cfg = self.config
        if len(self.memory) < 1:
            return
        state, action, reward, next_state, done = (torch.from_numpy(x) for x in self.memory.sample(cfg.bsize))
        reward = reward - float(self.moving_average or 0.0)
        with torch.no_grad():
            next_q = self.critic_target(next_state, self.actor_target(next_state))
            target_q = reward + cfg.discount * (1.0 - done) * next_q
        q = self.critic(state, action)
        critic_loss = nn.functional.mse_loss(q, target_q)
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()
        actor_loss = -self.critic(state, self.actor(state)).mean()
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()
        self._soft_update(self.actor_target, self.actor)
        self._soft_update(self.critic_target, self.critic)
        self.updates += 1

    def _soft_update(self, target: nn.Module, source: nn.Module) -> None:
        tau = self.config.tau
        with torch.no_grad():
            for t, s in zip(target.parameters(), source.parameters()):
                t.mul_(1.0 - tau).add_(s, alpha=tau)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_optim": self.actor_optim.state_dict(), "critic_optim": self.critic_optim.state_dict(),
                "memory": self.memory.state_dict(), "noise_rng": _rng_state(self.noise_rng),
                "moving_average": self.moving_average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key in ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim"):
            getattr(self, key).load_state_dict(state[key])
        self.memory.load_state_dict(state["memory"])
        _set_rng_state(self.noise_rng, state["noise_rng"])
        self.moving_average = state["moving_average"]
        self.updates = int(state["updates"])

"""Choosing the split point: static rules, the heuristic, and a PPO policy trained in a cost simulator.

State s = (U / log C, CPU load, bandwidth), bandwidth as log2(Mbit/s / 0.25) / 6 ∈ [0, 1] for 0.25–16 Mbit/s.
Action: k ∈ {0..L}. Reward (weights from the config, defaults after the reference code):

    r = α·A(k) − β·latency(k, load, bw)/T_max − η·energy(k)/E_budget − ζ·bytes(k)/B_budget

with α = 10, β = 5, η = 3, T_max = 200 ms, E_budget = 100 mJ, A(k) the measured embedding
fidelity at k and latency/energy from :class:`~qfl.clients.edge.costs.CostModel`. The last
term is qfl's, off by default (ζ = 0, the paper's reward): a price on the uplink itself, for
a metered or shared link, with B_budget = 1000 B per window.

:class:`SplitSimulator` plays episodes of ``horizon`` decisions, with uncertainties
drawn from ``uncertainties`` (measured on the stream; uniform on [0, log C] if none).
PPO trains on conditions drawn uniformly over the whole state space
(:meth:`SplitSimulator.uniform_episodes`: load on [0, 0.95], bandwidth
log-uniform on 0.25–16 Mbit/s, independently at every step); policies are
evaluated on held-out client traces (:func:`~qfl.clients.edge.costs.client_conditions`,
:meth:`SplitSimulator.episodes`). Trained on client traces instead, where a
loaded CPU or a slow link is rare, the policy collapsed to the split that is
best most of the time (k = 2 everywhere on the scripted trace, measured).
:func:`train_ppo` trains an actor-critic MLP 3→128→128 (tanh) with a policy
head (L+1 logits) and a value head by PPO: clipped ratio ε = 0.2, GAE(γ, λ = 0.95),
Adam 1e-3, 4 epochs of minibatches of 128 per 512 collected steps, entropy bonus
0.001. (The reference code's Adam 3e-4 and bonus 0.01 learned the common
split but not the rare ones within 300 iterations.) γ = 0 by default: the split choice does not change the next state (load
and bandwidth are exogenous traces), so the return of a decision is its own
reward, and GAE reduces to r − V(s). (With γ = 0.9 the other decisions' rewards
enter each return as noise; in our measurements that policy collapsed to one k.) Baselines: static k (0 = server-centric, L = edge-only,
L//2 = mid), random, and the heuristic k = clip(⌊L·(0.6·(1 − load) + 0.4·b)⌋, 1, L−1)
with b the bandwidth feature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .costs import BANDWIDTH_RANGE_MBPS, MAX_LOAD, CostModel, client_conditions, single_thread

Policy = Callable[[np.ndarray], np.ndarray]  # states [N, 3] -> split points [N]


@dataclass(frozen=True)
class RewardWeights:
    alpha: float = 10.0
    beta: float = 5.0
    eta: float = 3.0
    t_max_ms: float = 200.0
    e_budget_mj: float = 100.0
    zeta: float = 0.0
    b_budget_bytes: float = 1000.0


def bandwidth_feature(mbps: np.ndarray | float) -> np.ndarray:
    lo, hi = BANDWIDTH_RANGE_MBPS
    return np.clip(np.log2(np.asarray(mbps, dtype=float) / lo) / np.log2(hi / lo), 0.0, 1.0)


def states(uncertainty: np.ndarray, log_c: float, load: np.ndarray, mbps: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(uncertainty) / log_c, np.asarray(load), bandwidth_feature(mbps)], axis=-1).astype(np.float32)


class SplitSimulator:
    """Rewards, latency and energy of split choices on (uncertainty, load, bandwidth) conditions."""

    def __init__(
        self, costs: CostModel, weights: RewardWeights, log_c: float, uncertainties: np.ndarray | None = None,
        seed: int = 0, horizon: int = 32,
    ) -> None:
        self.costs, self.weights, self.log_c, self.horizon = costs, weights, log_c, horizon
        self.uncertainties = uncertainties
        self.rng = np.random.default_rng([seed, 41])
        k = np.arange(costs.depth + 1)
        self._fidelity = np.asarray(costs.fidelity_by_k)
        self._energy = np.array([costs.energy_mj(int(i)) for i in k])
        self._device = np.array([costs.device_ms(int(i), 0.0) for i in k])  # at zero load
        self._server = np.array([costs.server_ms(int(i)) for i in k])
        self._bits = 8.0 * np.asarray(costs.bytes_by_k, dtype=float)

    @property
    def actions(self) -> int:
        return self.costs.depth + 1

    def latency(self, k: np.ndarray, load: np.ndarray, mbps: np.ndarray) -> np.ndarray:
        share = 1.0 - np.clip(load, 0.0, 0.95)
        return self._device[k] / share + self._bits[k] / (mbps * 1000.0) + self.costs.rtt_ms + self._server[k]

    def energy(self, k: np.ndarray) -> np.ndarray:
        return self._energy[k]

    def reward(self, k: np.ndarray, load: np.ndarray, mbps: np.ndarray) -> np.ndarray:
        w = self.weights
        return (
            w.alpha * self._fidelity[k]
            - w.beta * self.latency(k, load, mbps) / w.t_max_ms
            - w.eta * self.energy(k) / w.e_budget_mj
            - w.zeta * self._bits[k] / (8.0 * w.b_budget_bytes)
        )

    def episodes(self, count: int, first_client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uncertainty, load, Mbit/s), each ``[count, horizon]``, from clients first_client.. (their own traces)."""
        loads, bws = zip(*(client_conditions(0, first_client + i, self.horizon) for i in range(count)))
        if self.uncertainties is not None and len(self.uncertainties):
            u = self.rng.choice(self.uncertainties, size=(count, self.horizon))
        else:
            u = self.rng.uniform(0, self.log_c, size=(count, self.horizon))
        return u, np.array(loads), np.array(bws)

    def uniform_episodes(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uncertainty, load, Mbit/s), each ``[count, horizon]``, drawn independently and uniformly over the states."""
        lo, hi = BANDWIDTH_RANGE_MBPS
        shape = (count, self.horizon)
        if self.uncertainties is not None and len(self.uncertainties):
            u = self.rng.choice(self.uncertainties, size=shape)
        else:
            u = self.rng.uniform(0, self.log_c, size=shape)
        load = self.rng.uniform(0.0, MAX_LOAD, size=shape)
        mbps = np.exp(self.rng.uniform(np.log(lo), np.log(hi), size=shape))
        return u, load, mbps

    def evaluate(self, policy: Policy, count: int = 64, first_client: int = 10_000) -> dict[str, float]:
        """Mean reward, latency (ms), energy (mJ), bytes and split histogram of ``policy`` on held-out traces."""
        u, load, mbps = self.episodes(count, first_client)
        k = policy(states(u, self.log_c, load, mbps).reshape(-1, 3)).reshape(u.shape)
        return {
            "reward": float(self.reward(k, load, mbps).mean()),
            "latency_ms": float(self.latency(k, load, mbps).mean()),
            "energy_mj": float(self.energy(k).mean()),
            "bytes_per_window": float((self._bits[k] / 8).mean()),
            "split_hist": np.bincount(k.ravel(), minlength=self.actions).tolist(),
        }


class ActorCritic(nn.Module):
    def __init__(self, actions: int, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.policy = nn.Linear(hidden, actions)
        self.value = nn.Linear(hidden, 1)

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(s)
        return self.policy(h), self.value(h).squeeze(-1)

    def greedy(self, s: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self(torch.from_numpy(np.asarray(s, dtype=np.float32)))[0].argmax(-1).numpy()


def train_ppo(
    sim: SplitSimulator, iterations: int = 80, envs: int = 16, seed: int = 0, lr: float = 1e-3,
    gamma: float = 0.0, lam: float = 0.95, clip: float = 0.2, epochs: int = 4, minibatch: int = 128,
    entropy: float = 0.001,
) -> ActorCritic:
    """PPO on ``envs`` parallel client traces per iteration (``envs × horizon`` steps); returns the actor-critic."""
    with single_thread():
        return _train_ppo(sim, iterations, envs, seed, lr, gamma, lam, clip, epochs, minibatch, entropy)


def _train_ppo(
    sim: SplitSimulator, iterations: int, envs: int, seed: int, lr: float, gamma: float, lam: float, clip: float,
    epochs: int, minibatch: int, entropy: float,
) -> ActorCritic:
    torch.manual_seed(seed)
    net = ActorCritic(sim.actions)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    scale = sim.weights.alpha  # rewards are O(alpha); scaled to O(1) for the value head
    for _ in range(iterations):
        u, load, mbps = sim.uniform_episodes(envs)
        obs = torch.from_numpy(states(u, sim.log_c, load, mbps))  # [E, T, 3]
        with torch.no_grad():
            logits, values = net(obs)
            dist = torch.distributions.Categorical(logits=logits)
            actions = dist.sample()
            old_logp = dist.log_prob(actions)
        rewards = torch.from_numpy(sim.reward(actions.numpy(), load, mbps).astype(np.float32)) / scale
        adv = torch.zeros_like(rewards)
        last = torch.zeros(envs)
        for t in reversed(range(sim.horizon)):
            next_value = values[:, t + 1] if t + 1 < sim.horizon else torch.zeros(envs)
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            last = delta + gamma * lam * last
            adv[:, t] = last
        returns = (adv + values).reshape(-1)
        flat_obs, flat_act, flat_logp = obs.reshape(-1, 3), actions.reshape(-1), old_logp.reshape(-1)
        flat_adv = adv.reshape(-1)
        flat_adv = (flat_adv - flat_adv.mean()) / (flat_adv.std() + 1e-8)
        for _ in range(epochs):
            order = torch.randperm(len(flat_obs), generator=generator)
            for start in range(0, len(order), minibatch):
                idx = order[start : start + minibatch]
                logits, value = net(flat_obs[idx])
                dist = torch.distributions.Categorical(logits=logits)
                ratio = (dist.log_prob(flat_act[idx]) - flat_logp[idx]).exp()
                surrogate = torch.min(ratio * flat_adv[idx], ratio.clamp(1 - clip, 1 + clip) * flat_adv[idx])
                loss = -surrogate.mean() + 0.5 * (value - returns[idx]).square().mean() - entropy * dist.entropy().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net


def static_policy(k: int) -> Policy:
    return lambda s: np.full(len(s), k, dtype=np.int64)


def random_policy(actions: int, seed: int = 0) -> Policy:
    rng = np.random.default_rng([seed, 43])
    return lambda s: rng.integers(0, actions, size=len(s))


def heuristic_policy(depth: int) -> Policy:
    """k = clip(⌊L·(0.6·(1 − load) + 0.4·b)⌋, 1, L − 1), b the bandwidth feature in [0, 1]."""

    def choose(s: np.ndarray) -> np.ndarray:
        raw = np.floor(depth * (0.6 * (1.0 - s[:, 1]) + 0.4 * s[:, 2])).astype(np.int64)
        return np.clip(raw, 1, max(depth - 1, 1))

    return choose


def oracle_policy(sim: SplitSimulator) -> Policy:
    """The best k for each state (knows the cost model exactly): an upper bound, not a method."""
    lo, hi = BANDWIDTH_RANGE_MBPS

    def choose(s: np.ndarray) -> np.ndarray:
        mbps = lo * (hi / lo) ** s[:, 2]
        ks = np.arange(sim.actions)
        r = np.stack([sim.reward(np.full(len(s), k), s[:, 1], mbps) for k in ks], axis=1)
        return r.argmax(1)

    return choose

"""The GRPO loss: PPO's clipped surrogate with group advantages, a KL penalty, the four ways of
averaging token losses that the literature uses, and the published variants of each piece.
Derivation: docs/algorithm.md. Every option lives in one frozen `LossSettings`.

Per token t of completion i, with mask M (1 = completion token, 0 = padding), defaults first::

    rho    = exp(logp - old_logp)                                  (importance_sampling_level)
    l      = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)        (policy_loss)
    kl     = exp(ref_logp - logp) - (ref_logp - logp) - 1         (kl_estimator k3, >= 0)
    loss_t = l * w * e + beta * kl - entropy_coef * H             (w: is_weights, e: entropy mask)

aggregated by ``loss_type`` (N rows; M_i = sum_t M_it, its completion length)::

    grpo     mean_i (sum_t loss_t M / max(M_i, 1))   per-sequence mean (DeepSeekMath)
    bnpo     sum loss_t M / sum M                    token mean of the local batch
    dapo     sum loss_t M / num_items * world_size   token mean of the generation batch (DAPO)
    dr_grpo  sum loss_t M / (N * max_completion_length)   constant normaliser (Dr. GRPO)

Variants (each a function below, next to the one it varies; all off by default):

- ratio: `importance_ratio`, token (PPO) / sequence (GSPO) / sequence_token (GSPO-token).
- surrogate: `ppo_surrogate` (+ `two_sided_clip`, INTELLECT-2's delta, and `dual_clip`,
  Ye et al.'s c), `cispo_surrogate` (MiniMax-M1), `sapo_surrogate` (SAPO's soft gate).
- KL: `kl_estimate`, Schulman's k1 / k2 / k3 and verl's low_var_kl; kl_in_reward moves the KL
  out of the loss and into the reward (grpo.advantages.kl_penalized_rewards).
- entropy: an entropy bonus (entropy_coef) and the top-rho high-entropy token mask
  (`high_entropy_mask`, its threshold taken over the tokens of every rank).

Distributed convention: each rank returns a loss whose MEAN over ranks is the global loss,
which is what DDP's gradient averaging assumes. grpo and dr_grpo have it when ranks hold equal
row counts; dapo divides by the all-rank token count ``num_items`` and so is scaled by the world
size. bnpo is by definition local.

Numerics: computed in at least float32 (float64 stays float64); gradients flow through logp
(and through entropy, for the entropy bonus) only. Log-ratios are clamped from above at
LOG_RATIO_BOUND = 20 before exp (exp of a negative is harmless). The clip range lies inside
(0, e^20), so wherever logp - old_logp <= 20 everything is PPO's exactly; above it, A > 0 was on
the constant clipped branch anyway, and only A < 0 changes: PPO's unbounded rho * |A| is capped
at e^20 * |A| with zero gradient. k3 is capped likewise where ref_logp - logp > 20. Padding
positions are never read: they may hold anything, even NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.distributed import all_gather_cat, get_world_size

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IS_LEVELS = ("token", "sequence", "sequence_token")
POLICY_LOSSES = ("ppo", "cispo", "sapo")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOG_RATIO_BOUND = 20.0
LOW_VAR_KL_BOUND = 10.0


def _check_inputs(
    logp: Tensor, named: dict[str, Tensor | None], advantages: Tensor, mask: Tensor
) -> None:
    """Raise ValueError naming the offending tensor."""
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be a [N, T] float tensor, got {logp.dtype} {logp.shape}")
    if logp.shape[0] == 0:
        raise ValueError("empty batch: logp has no rows")
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if torch.isnan(advantages).any():
        rows = torch.isnan(advantages).nonzero().flatten().tolist()
        raise ValueError(f"advantages are NaN at rows {rows}: drop rows without a reward first")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask must hold only 0 and 1")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class LossSettings:
    """Every option of `grpo_loss`, validated once. The defaults are plain GRPO (DeepSeekMath).

    loss_type: how token losses are averaged, one of LOSS_TYPES (module docstring).
    beta: KL coefficient, >= 0 (0: no KL term, ref_logp may be None).
    eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high]; eps_high=None means eps_low.
        CISPO clips its weight to the same range.
    max_completion_length: the dr_grpo denominator (None: the padded width T).
    importance_sampling_level: "token" (PPO), "sequence" (GSPO) or "sequence_token"
        (GSPO-token), see `importance_ratio`.
    policy_loss: "ppo" (clipped surrogate), "cispo" or "sapo", see the *_surrogate functions.
    delta: INTELLECT-2's cap on the ratio of the unclipped branch (> 1 + eps_high; ppo only).
    clip_ratio_c: dual-clip PPO's bound c on the loss of A < 0 tokens (> 1; ppo only).
    sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures for A > 0 and A <= 0 (> 0).
    kl_estimator: "k1", "k2", "k3" or "low_var_kl", see `kl_estimate`.
    kl_in_reward: the KL is subtracted from the rewards (grpo.advantages.kl_penalized_rewards)
        instead of added to the loss; the loss then has no KL term (stats["kl"] still reported).
    entropy_coef: loss -= entropy_coef * H, aggregated like the loss (needs entropy).
    top_entropy_quantile: rho in [0, 1]; < 1 keeps the policy term of only the tokens whose
        entropy is in the top rho fraction of the active tokens of all ranks (needs entropy).
    """

    loss_type: str = "grpo"
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float | None = None
    max_completion_length: int | None = None
    importance_sampling_level: str = "token"
    policy_loss: str = "ppo"
    delta: float | None = None
    clip_ratio_c: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0

    def __post_init__(self) -> None:
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _one_of("policy_loss", self.policy_loss, POLICY_LOSSES)
        _one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        # The clip range must stay inside the clamp's range, or clamping would change the clip.
        high = self.clip_high
        if not (0 <= self.eps_low < 1 and high >= 0 and math.log1p(high) < LOG_RATIO_BOUND):
            raise ValueError(
                f"need 0 <= eps_low < 1 and 0 <= eps_high < e^20 - 1, got eps_low={self.eps_low}, "
                f"eps_high={self.eps_high}"
            )
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(
                f"max_completion_length must be None or >= 1, got {self.max_completion_length}"
            )
        for name in ("delta", "clip_ratio_c"):
            if getattr(self, name) is not None and self.policy_loss != "ppo":
                raise ValueError(
                    f"{name} applies to policy_loss='ppo' only, not {self.policy_loss!r}"
                )
        if self.delta is not None and not 1 + high < self.delta < math.exp(LOG_RATIO_BOUND):
            raise ValueError(
                f"delta must lie in (1 + eps_high, e^20) = ({1 + high}, ...), got {self.delta}"
            )
        if self.clip_ratio_c is not None and not 1 < self.clip_ratio_c < math.exp(LOG_RATIO_BOUND):
            raise ValueError(f"clip_ratio_c must lie in (1, e^20), got {self.clip_ratio_c}")
        if not (self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0):
            raise ValueError(
                f"sapo_tau_pos and sapo_tau_neg must be > 0, got {self.sapo_tau_pos}, "
                f"{self.sapo_tau_neg}"
            )
        if self.kl_in_reward and self.beta <= 0:
            raise ValueError(
                "kl_in_reward=True needs beta > 0 (beta is the reward's KL coefficient)"
            )
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef must be finite, got {self.entropy_coef}")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ValueError(
                f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}"
            )

    @property
    def advantage_weighted_only(self) -> bool:
        """Whether every term of the loss is multiplied by an advantage (no KL term in the
        loss, no entropy bonus): then a batch whose advantages are all zero has a loss and a
        gradient that are exactly zero, whatever the policy's log-probs."""
        return (self.beta == 0 or self.kl_in_reward) and self.entropy_coef == 0

    @property
    def clip_high(self) -> float:
        """eps_high, with None resolved to eps_low."""
        return self.eps_low if self.eps_high is None else self.eps_high

    @property
    def needs_entropy(self) -> bool:
        """True when grpo_loss reads its `entropy` argument."""
        return self.entropy_coef != 0 or self.top_entropy_quantile < 1


def _aggregate(
    per_token: Tensor,
    mf: Tensor,
    loss_type: str,
    max_len: int | None,
    num_items: float | Tensor | None,
) -> Tensor:
    """Reduce masked token losses [N, T] (already zero on padding) to the scalar loss."""
    row_sum = per_token.sum(dim=1)  # [N]
    lengths = mf.sum(dim=1)  # [N]
    if loss_type == "grpo":
        return (row_sum / lengths.clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return row_sum.sum() / lengths.sum().clamp(min=1.0)
    if loss_type == "dapo":
        if num_items is None:
            return row_sum.sum() / lengths.sum().clamp(min=1.0) * get_world_size()
        if float(num_items) <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        return row_sum.sum() / num_items * get_world_size()
    length = per_token.shape[1] if max_len is None else max_len
    if length < 1 or lengths.max() > length:
        longest = int(lengths.max())
        raise ValueError(f"dr_grpo: max_completion_length={length} < completion of {longest}")
    return row_sum.sum() / (per_token.shape[0] * length)


def importance_ratio(logp: Tensor, old_logp: Tensor, m: Tensor, level: str = "token") -> Tensor:
    """The importance ratio of every token, [N, T], by ``level`` (logp with grad; old_logp, m:
    the bool mask, [N, T]). Zero log-ratio on padding; log-ratios clamped from above at 20.

    token (PPO, Schulman et al. 2017)::

        rho_{i,t} = exp(logp_{i,t} - old_logp_{i,t})

    sequence (GSPO, Zheng et al. 2025, arXiv:2507.18071): one length-normalised ratio per
    sequence, broadcast over its tokens (its gradient reaches every token, d s_i / d logp_{i,t} =
    s_i / |o_i|)::

        s_i = exp((1 / |o_i|) sum_t M_{i,t} (logp_{i,t} - old_logp_{i,t}))

    sequence_token (GSPO-token, the same paper): the value of s_i, a per-token gradient
    (d s_{i,t} / d logp_{i,t} = s_i; other tokens do not move it)::

        s_{i,t} = sg[s_i] * exp(logp_{i,t} - sg[logp_{i,t}])
    """
    log_ratio = torch.where(m, logp - old_logp, 0.0)  # [N, T]
    if level == "token":
        return torch.exp(log_ratio.clamp(max=LOG_RATIO_BOUND))  # [N, T]
    lengths = m.sum(dim=1, keepdim=True).clamp(min=1).to(logp.dtype)  # [N, 1]
    seq_log = log_ratio.sum(dim=1, keepdim=True) / lengths  # [N, 1]  log s_i
    if level == "sequence":
        return torch.exp(seq_log.clamp(max=LOG_RATIO_BOUND)).expand_as(logp)  # [N, T]
    tok = torch.where(m, logp, 0.0)  # [N, T]
    log_s = seq_log.detach() + (tok - tok.detach())  # [N, T]  value log s_i, gradient per token
    return torch.exp(log_s.clamp(max=LOG_RATIO_BOUND))  # [N, T]


def ppo_surrogate(
    ratio: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float,
    delta: float | None = None,
    clip_ratio_c: float | None = None,
) -> Tensor:
    """PPO's clipped surrogate as a loss (Schulman et al. 2017, arXiv:1707.06347), [N, T]::

        l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)

    ratio: [N, T]; adv: [N, 1]. delta and clip_ratio_c bound the A < 0 side, see
    `two_sided_clip` and `dual_clip`.
    """
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)  # [N, T]
    unclipped = ratio if delta is None else two_sided_clip(ratio, delta)  # [N, T]
    per_token = -torch.minimum(unclipped * adv, clipped * adv)  # [N, T]
    if clip_ratio_c is not None:
        per_token = dual_clip(per_token, adv, clip_ratio_c)  # [N, T]
    return per_token


def two_sided_clip(ratio: Tensor, delta: float) -> Tensor:
    """INTELLECT-2's two-sided clipping (Prime Intellect 2025, arXiv:2505.07291):
    the unclipped branch's ratio is capped at delta > 1 + eps_high, [N, T]::

        l = -min(min(rho, delta) * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)

    For A > 0 nothing changes (the min already picks <= 1 + eps_high < delta). For A < 0 the
    loss |A| * rho, unbounded in PPO, stops growing at delta * |A| (zero gradient beyond).
    """
    return ratio.clamp(max=delta)  # [N, T]


def dual_clip(per_token: Tensor, adv: Tensor, c: float) -> Tensor:
    """Dual-clip PPO (Ye et al. 2020, arXiv:1912.09729): for A < 0 the clipped loss is
    bounded by c * |A| (c > 1), [N, T]::

        l' = min(l, -c * A)  if A < 0,   l' = l  otherwise

    (for A < 0, l = |A| max(rho, clip(rho)), so this caps it where rho > c, with zero gradient).
    """
    return torch.where(adv < 0, torch.minimum(per_token, -c * adv), per_token)  # [N, T]


def cispo_surrogate(
    ratio: Tensor, logp: Tensor, adv: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """CISPO (MiniMax-M1, arXiv:2506.13585): REINFORCE with a clipped, stopped-gradient
    importance weight, so every token keeps a gradient (none is dropped by the clip), [N, T]::

        l = -sg[clip(rho, 1 - eps_low, 1 + eps_high)] * A * logp

    ratio, logp: [N, T] (logp already 0 on padding); adv: [N, 1]. The paper's recommended
    setting has no lower bound in effect (eps_low close to 1) and a large eps_high. TRL's
    loss_type="cispo" clamps the weight from above only, at an absolute epsilon_high (its
    clip(rho, max=eps_high)); verl's policy_loss "cispo" is the formula above.
    """
    weight = ratio.detach().clamp(1 - eps_low, 1 + eps_high)  # [N, T]
    return -weight * adv * logp  # [N, T]


def sapo_surrogate(ratio: Tensor, adv: Tensor, tau_pos: float, tau_neg: float) -> Tensor:
    """SAPO, soft adaptive policy optimisation (arXiv:2511.20347): a smooth
    sigmoid gate replaces the hard clip, with a temperature per advantage sign, [N, T]::

        f_tau(rho) = sigmoid(tau * (rho - 1)) * 4 / tau,   tau = tau_pos if A > 0 else tau_neg
        l = -f_tau(rho) * A

    as TRL (loss_type="sapo", sapo_temperature_pos/neg = 1.0 / 1.05) and verl (policy_loss
    "sapo", tau_pos / tau_neg = 1.0 / 1.05) compute it. d f / d rho = 4 sigma (1 - sigma) is 1
    at rho = 1, so on-policy the gradient is PPO's (-A grad logp), while the loss value is
    -2 A / tau; away from rho = 1 the gradient decays smoothly instead of dropping to 0.
    A larger tau_neg damps negative updates faster (they are the less stable ones).
    """
    tau = torch.where(adv > 0, adv.new_tensor(tau_pos), adv.new_tensor(tau_neg))  # [N, 1]
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau  # [N, T]
    return -gate * adv  # [N, T]


def kl_estimate(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens, [N, T], 0 on padding
    (Schulman 2020, http://joschu.net/blog/kl-approx.html). With x = ref_logp - logp::

        k1 = -x                      unbiased, high variance, can be negative
        k2 = x^2 / 2                 biased, low variance; its gradient is the true KL's
        k3 = exp(x) - x - 1          unbiased, >= 0 (x clamped from above at 20)
        low_var_kl = clip(k3, -10, 10)   verl's kl_penalty="low_var_kl"

    logp: [N, T] (gradient flows through it); ref_logp: [N, T] (detached); mask: [N, T].
    Computed in at least float32. Also used for the KL in the reward (on old_logp).
    """
    _one_of("kl_estimator", estimator, KL_ESTIMATORS)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()  # [N, T]
    logp = logp.to(dtype)  # [N, T]
    d = torch.where(m, ref_logp.detach().to(dtype) - logp, 0.0)  # [N, T]  x
    if estimator == "k1":
        return -d  # [N, T]
    if estimator == "k2":
        return 0.5 * d**2  # [N, T]
    d = d.clamp(max=LOG_RATIO_BOUND)  # [N, T]
    kl = torch.exp(d) - d - 1  # [N, T]
    if estimator == "low_var_kl":
        kl = kl.clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)  # [N, T]
    return kl


def _linear_quantile(values: Tensor, q: float) -> Tensor:
    """q-quantile of a 1-D tensor [n >= 1] with linear interpolation (torch.quantile's default
    rule, without its input-size limit): sorted v, position p = q (n - 1),
    v[floor p] + (p - floor p) (v[floor p + 1] - v[floor p]). 0-d."""
    v = values.sort().values  # [n]
    pos = q * (v.numel() - 1)
    lo = min(math.floor(pos), v.numel() - 1)
    hi = min(lo + 1, v.numel() - 1)
    return torch.lerp(v[lo], v[hi], pos - lo)  # []


def entropy_threshold(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    """The (1 - rho)-quantile of the entropies of the active tokens of EVERY rank, 0-d.

    Each rank's active entropies [n_r] are padded to the longest, all-gathered with a validity
    flag, and the padding dropped, so every rank computes the quantile over the same values,
    as one process holding the concatenated batch would. All ranks must call this together.
    +inf when no rank has an active token.
    """
    local = entropy.detach()[mask.bool()]  # [n_r]
    count = torch.tensor([local.numel()], device=local.device)  # [1]
    width = int(all_gather_cat(count).max())
    padded = local.new_zeros(width)  # [width]
    padded[: local.numel()] = local
    valid = torch.arange(width, device=local.device) < local.numel()  # [width]
    values = all_gather_cat(padded)[all_gather_cat(valid)]  # [sum_r n_r]
    if values.numel() == 0:
        return local.new_tensor(math.inf)  # []
    return _linear_quantile(values, 1.0 - rho)  # []


def high_entropy_mask(entropy: Tensor, mask: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """Tokens whose entropy is in the top rho fraction of the batch (all ranks), and the
    threshold: (Bool [N, T], 0-d). "Beyond the 80/20 rule" (Wang et al. 2025, arXiv:2506.01939)
    keeps the policy gradient of only these forking tokens (rho = 0.2 in the paper)::

        keep_{i,t} = M_{i,t} and H_{i,t} >= quantile_{1 - rho}(H over active tokens, all ranks)

    rho = 1 keeps every token; rho = 0 only the highest-entropy ones (as TRL's
    top_entropy_quantile). entropy, mask: [N, T]. A collective when distributed.
    """
    threshold = entropy_threshold(entropy, mask, rho)  # []
    keep = mask.bool() & (entropy.detach() >= threshold)  # [N, T]
    return keep, threshold


def _stats(
    ratio: Tensor, kl: Tensor, m: Tensor, low: Tensor, high: Tensor, extra: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Token-level diagnostics over the active tokens (0-d, detached). low / high: [N, T] bool,
    the tokens whose lower / upper clip is active (per policy_loss)."""
    ratio, kl = ratio.detach(), kl.detach()
    n = m.sum().clamp(min=1).to(ratio.dtype)
    low, high = low & m, high & m  # [N, T]
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    has = m.any()
    out = {
        "kl": torch.where(m, kl, 0.0).sum() / n,
        "clip_frac_low": low.sum() / n,
        "clip_frac_high": high.sum() / n,
        "clip_frac": (low | high).sum() / n,
        "ratio_mean": torch.where(has, torch.where(m, ratio, 0.0).sum() / n, one),
        "ratio_min": torch.where(has, torch.where(m, ratio, torch.inf).amin(), one),
        "ratio_max": torch.where(has, torch.where(m, ratio, -torch.inf).amax(), one),
    }
    out.update({k: (v & m).sum() / n if v.dtype == torch.bool else v for k, v in extra.items()})
    return {k: v.detach() for k, v in out.items()}


def _policy_term(
    ratio: Tensor, logp: Tensor, adv: Tensor, m: Tensor, s: LossSettings
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The per-token policy loss [N, T] of s.policy_loss, the low / high clip masks [N, T] for
    the statistics, and extra statistics (bool [N, T] masks become active-token fractions)."""
    eps_low, eps_high = s.eps_low, s.clip_high
    r = ratio.detach()  # [N, T]
    extra: dict[str, Tensor] = {}
    if s.policy_loss == "cispo":
        per_token = cispo_surrogate(ratio, torch.where(m, logp, 0.0), adv, eps_low, eps_high)
        return per_token, r < 1 - eps_low, r > 1 + eps_high, extra  # the weight is clipped
    if s.policy_loss == "sapo":
        per_token = sapo_surrogate(ratio, adv, s.sapo_tau_pos, s.sapo_tau_neg)  # [N, T]
        none = torch.zeros_like(m)  # [N, T]  a soft gate clips nothing
        return per_token, none, none, extra
    per_token = ppo_surrogate(ratio, adv, eps_low, eps_high, s.delta, s.clip_ratio_c)  # [N, T]
    if s.delta is not None:
        extra["clip_frac_delta"] = (r > s.delta) & (adv < 0)  # [N, T]
    if s.clip_ratio_c is not None:
        extra["clip_frac_dual"] = (r > s.clip_ratio_c) & (adv < 0)  # [N, T]
    low = (r < 1 - eps_low) & (adv < 0)  # [N, T] clipped branch active, A < 0
    high = (r > 1 + eps_high) & (adv > 0)  # [N, T] clipped branch active, A > 0
    return per_token, low, high, extra


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    settings: LossSettings = LossSettings(),
    *,
    num_items: float | Tensor | None = None,
    is_weights: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (formulas in the module docstring) and detached 0-d statistics.

    logp, old_logp, ref_logp, mask, is_weights, entropy: [N, T]; advantages: [N] (NaN is a
    ValueError). settings: every option (LossSettings). ref_logp may be None when the loss has
    no KL term (beta == 0 or kl_in_reward; then stats["kl"] is 0). mask is 0/1, bool or float;
    a row with no active token contributes 0. num_items: the dapo denominator, the active-token
    count of the whole generation batch over all ranks (None: this batch's count). is_weights
    multiply the policy term only, not the KL or entropy terms; a token of weight 0 still
    counts in the normaliser. entropy: per-token entropy of the policy, needed (and read) only
    when settings.needs_entropy; the bonus's gradient flows through it. With
    top_entropy_quantile < 1 every rank must call this together (a batch-wide quantile).

    stats: kl (token mean of the chosen estimator), clip_frac_low / clip_frac_high (ppo: the
    clipped branch is active, rho < 1 - eps_low with A < 0 / rho > 1 + eps_high with A > 0;
    cispo: the weight is clipped, either sign; sapo: 0), clip_frac (their sum), ratio_mean /
    ratio_min / ratio_max, all over this rank's active tokens; when the option is on also
    clip_frac_delta, clip_frac_dual (A < 0 tokens capped), entropy_threshold and
    entropy_kept_frac.
    """
    s = settings
    named = {"old_logp": old_logp, "ref_logp": ref_logp, "mask": mask, "is_weights": is_weights}
    named["entropy"] = entropy
    _check_inputs(logp, named, advantages, mask)
    kl_in_loss = s.beta > 0 and not s.kl_in_reward
    if kl_in_loss and ref_logp is None:
        raise ValueError(f"beta={s.beta} > 0 needs ref_logp")
    if s.needs_entropy and entropy is None:
        raise ValueError("entropy_coef != 0 or top_entropy_quantile < 1 needs entropy [N, T]")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()  # [N, T]
    logp = logp.to(dtype)  # [N, T]
    adv = advantages.detach().to(dtype).unsqueeze(1)  # [N, 1]

    # where() first (inside importance_ratio), so padding values (possibly inf/NaN) never reach
    # exp or the backward pass.
    old = old_logp.detach().to(dtype)  # [N, T]
    ratio = importance_ratio(logp, old, m, s.importance_sampling_level)  # [N, T]
    per_token, low, high, extra = _policy_term(ratio, logp, adv, m, s)  # [N, T]
    if is_weights is not None:
        per_token = per_token * torch.where(m, is_weights.detach().to(dtype), 0.0)  # [N, T]
    if s.top_entropy_quantile < 1:
        keep, threshold = high_entropy_mask(entropy, m, s.top_entropy_quantile)  # [N, T], []
        per_token = per_token * keep  # [N, T]
        extra["entropy_threshold"] = threshold.to(dtype)
        extra["entropy_kept_frac"] = keep

    kl = torch.zeros_like(logp)  # [N, T]
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, m, s.kl_estimator)  # [N, T]
    if kl_in_loss:
        per_token = per_token + s.beta * kl  # [N, T]
    if s.entropy_coef != 0:
        per_token = per_token - s.entropy_coef * torch.where(m, entropy.to(dtype), 0.0)  # [N, T]
    per_token = torch.where(m, per_token, 0.0)  # [N, T]

    loss = _aggregate(per_token, m.to(dtype), s.loss_type, s.max_completion_length, num_items)
    return loss, _stats(ratio, kl, m, low, high, extra)

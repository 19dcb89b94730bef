//! The batch entry point: per-sequence inputs → aggregated loss, dL/dℓ per token, metrics.
//!
//! total = RL when no sequence is an expert sequence, otherwise
//! total = (1−μ)·RL(non-expert) + μ·SFT(expert), where
//! - RL = agg(policy loss per token) + agg(β·kl_weight·k per token) over non-expert sequences,
//!   the KL term present only when [`LossConfig::loss_kl`] says so;
//! - SFT = Σ m·(−ℓ) / Σ m over expert sequences (token mean, docs/algorithms.md#dads-entropy-and-sft-mixing).
//!
//! Tokens with mask 0 are never evaluated, so padding may hold any value (even NaN) and gets a
//! zero gradient.

use serde::Serialize;

use super::aggregate::token_weights;
use super::config::{KlEstimator, LossConfig, PolicyLoss, RatioLevel};
use super::kl::kl_per_token;
use super::policy::{
    cispo_token, gspo_token, ppo_clip_token, rec_keeps_token, rec_token, rec_weight_value,
    reinforce_token, stable_reinforce_token, topr_token, TokenLoss,
};
use super::LossError;

/// One response's per-token inputs. Every per-token vector has the length of `logp`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqInput {
    /// ℓ: current-policy log-probs (the values of the tensor that carries the gradient).
    pub logp: Vec<f64>,
    /// ℓᵒ: behaviour-policy log-probs (detached).
    pub logp_old: Vec<f64>,
    /// ℓʳ: reference-policy log-probs; required when a KL term enters the loss.
    pub logp_ref: Option<Vec<f64>>,
    /// Token mask (1 = response token, 0 = padding); non-negative weights are allowed.
    pub mask: Vec<f64>,
    /// Advantage per token (the trainer broadcasts a response's scalar).
    pub adv: Vec<f64>,
    /// Multiplies this response's KL term in the loss: the DADS weight (see `dads_weight`);
    /// 1.0 by default.
    pub kl_weight: f64,
    /// An expert/ground-truth sequence for the SFT mix: it gets −ℓ instead of the RL loss.
    pub expert: bool,
}

impl SeqInput {
    /// A non-expert sequence without reference log-probs and with KL weight 1.
    pub fn new(logp: Vec<f64>, logp_old: Vec<f64>, mask: Vec<f64>, adv: Vec<f64>) -> Self {
        Self {
            logp,
            logp_old,
            logp_ref: None,
            mask,
            adv,
            kl_weight: 1.0,
            expert: false,
        }
    }
}

/// Scalars for the metrics log (docs/metrics.md names in brackets). Fractions and means are over
/// the valid (mask > 0) tokens of non-expert sequences; all are 0 when there are none.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LossMetrics {
    /// Aggregated policy term, before the SFT mix weight (`loss/policy`).
    pub policy_loss: f64,
    /// Aggregated KL term as added to the loss, β included, before the mix weight (`loss/kl`).
    pub kl_loss: f64,
    /// SFT token mean of −ℓ over expert sequences, before μ; 0 without experts.
    pub sft_loss: f64,
    /// Fraction of tokens whose gradient PPO clipping or the dual clip zeroed (`loss/clipfrac`).
    pub clipfrac: f64,
    /// Fraction of tokens REC's mask dropped (`loss/masked_frac`).
    pub masked_frac: f64,
    /// Mean of ρ = exp(ℓ − ℓᵒ) (`is/ratio_mean`).
    pub ratio_mean: f64,
    /// Max of ρ (`is/ratio_max`).
    pub ratio_max: f64,
    /// Mean k3(ℓ, ℓʳ) over tokens of sequences that have ℓʳ; 0 when none do (`kl/k3`).
    pub kl_k3: f64,
    /// Number of valid tokens in the batch, expert sequences included.
    pub tokens: usize,
}

/// The aggregated loss and its gradient with respect to every ℓ\[i\]\[t\] (same shape as the
/// inputs' `logp`; zero for masked tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    pub loss: f64,
    pub grad_logp: Vec<Vec<f64>>,
    pub metrics: LossMetrics,
}

/// Validates `cfg` and the inputs, then computes the loss, dL/dℓ and metrics.
pub fn compute(cfg: &LossConfig, seqs: &[SeqInput]) -> Result<LossOutput, LossError> {
    compute_with_detached(cfg, seqs, None)
}

/// [`compute`] where the *detached* quantities (REC's W and M, TOPR's α, sequence ratios) are
/// evaluated at `detached_logp` instead of `logp`. Finite-difference tests use it to freeze
/// them, which is exactly what detaching means; `compute` passes `None`.
fn compute_with_detached(
    cfg: &LossConfig,
    seqs: &[SeqInput],
    detached_logp: Option<&[Vec<f64>]>,
) -> Result<LossOutput, LossError> {
    cfg.validate()?;
    let loss_kl = cfg.loss_kl();
    for (i, s) in seqs.iter().enumerate() {
        check_sequence(i, s)?;
        if loss_kl.is_some() && !s.expert && s.logp_ref.is_none() {
            let reason = if cfg.dads {
                "dads = true puts a KL term in the loss"
            } else {
                "kl_coef > 0 with the KL term in the loss"
            };
            return Err(LossError::MissingRef { seq: i, reason });
        }
    }

    let mut grad_logp: Vec<Vec<f64>> = seqs.iter().map(|s| vec![0.0; s.logp.len()]).collect();
    let mut stats = Stats::default();

    // RL part over non-expert sequences.
    let rl: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].expert).collect();
    let rl_masks: Vec<&[f64]> = rl.iter().map(|&i| seqs[i].mask.as_slice()).collect();
    let weights = token_weights(cfg.agg, &rl_masks, cfg.max_len)?;
    let (mut policy_loss, mut kl_loss) = (0.0, 0.0);
    let mut rl_grads: Vec<(usize, Vec<f64>)> = Vec::with_capacity(rl.len());
    for (&i, w) in rl.iter().zip(&weights) {
        let s = &seqs[i];
        let detached = detached_row(s, detached_logp.and_then(|d| d.get(i)));
        let terms = sequence_terms(cfg, s, detached, loss_kl, &mut stats);
        let mut g = vec![0.0; s.logp.len()];
        for (t, term) in terms.iter().enumerate() {
            if let (Some(term), Some(&wt)) = (term, w.get(t)) {
                policy_loss += wt * term.policy.loss;
                kl_loss += wt * term.kl;
                g[t] = wt * (term.policy.grad + term.kl_grad);
            }
        }
        rl_grads.push((i, g));
    }

    // SFT part over expert sequences: token mean of −ℓ.
    let expert_tokens: f64 = seqs
        .iter()
        .filter(|s| s.expert)
        .map(|s| s.mask.iter().sum::<f64>())
        .sum();
    let has_expert = seqs.iter().any(|s| s.expert);
    let (rl_scale, sft_scale) = if has_expert {
        (1.0 - cfg.sft_mu, cfg.sft_mu)
    } else {
        (1.0, 0.0)
    };
    let mut sft_loss = 0.0;
    if expert_tokens > 0.0 {
        for (s, g) in seqs
            .iter()
            .zip(grad_logp.iter_mut())
            .filter(|(s, _)| s.expert)
        {
            for ((&l, &m), gt) in s.logp.iter().zip(&s.mask).zip(g.iter_mut()) {
                if m > 0.0 {
                    sft_loss += m * -l / expert_tokens;
                    *gt = sft_scale * -m / expert_tokens;
                    stats.tokens += 1;
                }
            }
        }
    }
    for (i, g) in rl_grads {
        if let Some(out) = grad_logp.get_mut(i) {
            *out = g.into_iter().map(|x| rl_scale * x).collect();
        }
    }

    let loss = rl_scale * (policy_loss + kl_loss) + sft_scale * sft_loss;
    Ok(LossOutput {
        loss,
        grad_logp,
        metrics: stats.into_metrics(policy_loss, kl_loss, sft_loss),
    })
}

/// Shapes and values of one sequence: lengths equal to `logp`'s, masks finite and ≥ 0, and the
/// values of valid tokens finite.
fn check_sequence(i: usize, s: &SeqInput) -> Result<(), LossError> {
    let n = s.logp.len();
    let mut fields: Vec<(&'static str, &[f64])> = vec![
        ("logp_old", &s.logp_old),
        ("mask", &s.mask),
        ("adv", &s.adv),
    ];
    if let Some(r) = &s.logp_ref {
        fields.push(("logp_ref", r));
    }
    for (field, v) in &fields {
        if v.len() != n {
            return Err(LossError::LengthMismatch {
                seq: i,
                field,
                found: v.len(),
                expected: n,
            });
        }
    }
    if !(s.kl_weight.is_finite() && s.kl_weight >= 0.0) {
        return Err(LossError::InvalidKlWeight {
            seq: i,
            value: s.kl_weight,
        });
    }
    fields.retain(|(f, _)| *f != "mask");
    fields.insert(0, ("logp", &s.logp));
    for (t, &m) in s.mask.iter().enumerate() {
        if !(m.is_finite() && m >= 0.0) {
            return Err(LossError::InvalidMask {
                seq: i,
                token: t,
                value: m,
            });
        }
        if m == 0.0 {
            continue;
        }
        for (field, v) in &fields {
            let value = v.get(t).copied().unwrap_or(0.0);
            if !value.is_finite() {
                return Err(LossError::NonFinite {
                    seq: i,
                    token: t,
                    field,
                    value,
                });
            }
        }
    }
    Ok(())
}

/// The row of ℓ at which detached quantities are evaluated: `detached` when it has the right
/// length, else the sequence's own ℓ.
fn detached_row<'a>(s: &'a SeqInput, detached: Option<&'a Vec<f64>>) -> &'a [f64] {
    match detached {
        Some(d) if d.len() == s.logp.len() => d,
        _ => &s.logp,
    }
}

/// One valid token's policy loss and KL contribution (β·kl_weight·k and its gradient).
struct TokenTerms {
    policy: TokenLoss,
    kl: f64,
    kl_grad: f64,
}

/// Per-token terms of one non-expert sequence (`None` for masked tokens), updating `stats`.
fn sequence_terms(
    cfg: &LossConfig,
    s: &SeqInput,
    detached: &[f64],
    loss_kl: Option<(f64, KlEstimator)>,
    stats: &mut Stats,
) -> Vec<Option<TokenTerms>> {
    let seq_ratio = sequence_ratio(detached, &s.logp_old, &s.mask);
    let ref_row = s.logp_ref.as_deref();
    let mut out = Vec::with_capacity(s.logp.len());
    for t in 0..s.logp.len() {
        let (Some(&m), Some(&l), Some(&lo), Some(&a), Some(&ld)) = (
            s.mask.get(t),
            s.logp.get(t),
            s.logp_old.get(t),
            s.adv.get(t),
            detached.get(t),
        ) else {
            out.push(None);
            continue;
        };
        if m <= 0.0 {
            out.push(None);
            continue;
        }
        let lr = ref_row.and_then(|r| r.get(t)).copied();
        let policy = policy_token(cfg, (l, ld), lo, a, (ld - lo).exp(), seq_ratio);
        let (kl, kl_grad) = match (loss_kl, lr) {
            (Some((beta, est)), Some(lr)) => {
                let (k, dk) = kl_per_token(est, l, lr);
                let scale = beta * s.kl_weight;
                (scale * k, scale * dk)
            }
            _ => (0.0, 0.0),
        };
        stats.add_token(&policy, (l - lo).exp(), lr.map(|lr| kl_per_token_k3(l, lr)));
        out.push(Some(TokenTerms {
            policy,
            kl,
            kl_grad,
        }));
    }
    out
}

fn kl_per_token_k3(logp: f64, logp_ref: f64) -> f64 {
    kl_per_token(KlEstimator::K3, logp, logp_ref).0
}

/// exp(mean_t Δ) over valid tokens, Δ = ℓ − ℓᵒ weighted by the mask (1 when none are valid).
fn sequence_ratio(logp: &[f64], logp_old: &[f64], mask: &[f64]) -> f64 {
    let (mut sum, mut weight) = (0.0, 0.0);
    for ((&l, &lo), &m) in logp.iter().zip(logp_old).zip(mask) {
        if m > 0.0 {
            sum += m * (l - lo);
            weight += m;
        }
    }
    if weight > 0.0 {
        (sum / weight).exp()
    } else {
        1.0
    }
}

/// Dispatches to the configured per-token loss. `ratio` and `seq_ratio` are the detached token
/// and sequence ratios used by REC's W/M, TOPR's α, CISPO's weight and GSPO's sg(s);
/// `logp_detached` is ℓ where the detached quantities were evaluated.
fn policy_token(
    cfg: &LossConfig,
    (logp, logp_detached): (f64, f64),
    logp_old: f64,
    adv: f64,
    ratio: f64,
    seq_ratio: f64,
) -> TokenLoss {
    match cfg.loss {
        PolicyLoss::Reinforce => reinforce_token(logp, adv),
        PolicyLoss::PpoClip => ppo_clip_token(
            logp,
            logp_old,
            adv,
            cfg.eps_low,
            cfg.eps_high,
            cfg.dual_clip,
        ),
        PolicyLoss::StableReinforce => stable_reinforce_token(
            logp,
            logp_old,
            adv,
            cfg.eps_low,
            cfg.eps_high,
            cfg.dual_clip,
            (cfg.stable_logratio_min, cfg.stable_logratio_max),
        ),
        PolicyLoss::Rec => {
            let weight = rec_weight_value(
                cfg.rec_weight,
                ratio,
                seq_ratio,
                cfg.eps_prime_low,
                cfg.eps_prime_high,
            );
            let keep = rec_keeps_token(cfg.rec_mask, adv, ratio, seq_ratio, cfg);
            rec_token(logp, logp_old, adv, weight, keep, cfg.rec_reg, cfg.reg_coef)
        }
        PolicyLoss::Topr => {
            let r = match cfg.topr_ratio {
                RatioLevel::Token => ratio,
                RatioLevel::Sequence => seq_ratio,
            };
            topr_token(logp, adv, r)
        }
        PolicyLoss::Gspo => gspo_token(
            logp,
            logp_detached,
            seq_ratio.ln(),
            adv,
            cfg.seq_eps_low,
            cfg.seq_eps_high,
        ),
        PolicyLoss::Cispo => cispo_token(logp, adv, ratio, cfg.eps_low, cfg.eps_high),
    }
}

/// Running sums for the metrics over valid non-expert tokens.
#[derive(Default)]
struct Stats {
    rl_tokens: usize,
    tokens: usize,
    clipped: usize,
    masked: usize,
    ratio_sum: f64,
    ratio_max: Option<f64>,
    k3_sum: f64,
    k3_count: usize,
}

impl Stats {
    fn add_token(&mut self, t: &TokenLoss, ratio: f64, k3: Option<f64>) {
        self.rl_tokens += 1;
        self.tokens += 1;
        self.clipped += usize::from(t.clipped);
        self.masked += usize::from(t.masked);
        self.ratio_sum += ratio;
        self.ratio_max = Some(self.ratio_max.map_or(ratio, |m| m.max(ratio)));
        if let Some(k) = k3 {
            self.k3_sum += k;
            self.k3_count += 1;
        }
    }

    fn into_metrics(self, policy_loss: f64, kl_loss: f64, sft_loss: f64) -> LossMetrics {
        let frac = |x: usize| {
            if self.rl_tokens > 0 {
                x as f64 / self.rl_tokens as f64
            } else {
                0.0
            }
        };
        LossMetrics {
            policy_loss,
            kl_loss,
            sft_loss,
            clipfrac: frac(self.clipped),
            masked_frac: frac(self.masked),
            ratio_mean: if self.rl_tokens > 0 {
                self.ratio_sum / self.rl_tokens as f64
            } else {
                0.0
            },
            ratio_max: self.ratio_max.unwrap_or(0.0),
            kl_k3: if self.k3_count > 0 {
                self.k3_sum / self.k3_count as f64
            } else {
                0.0
            },
            tokens: self.tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{Aggregation, RecMask, RecReg, RecWeight};
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        crate::testing::close_rel(a, b, 1e-12)
    }

    #[track_caller]
    fn assert_grads(got: &[Vec<f64>], want: &[Vec<f64>]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.len(), w.len(), "row {i}");
            for (t, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() < 1e-12, "grad[{i}][{t}] = {a}, want {b}");
            }
        }
    }

    /// A sequence whose ratios ρ_t = exp(ℓ_t − ℓᵒ_t) are as given, with ℓ_t = −1 − 0.1·t.
    fn seq_with_ratios(ratios: &[f64], adv: &[f64], mask: &[f64]) -> SeqInput {
        let logp: Vec<f64> = (0..ratios.len()).map(|t| -1.0 - 0.1 * t as f64).collect();
        let logp_old = logp.iter().zip(ratios).map(|(l, r)| l - r.ln()).collect();
        let logp_ref = logp
            .iter()
            .enumerate()
            .map(|(t, l)| l + 0.3 * ((t % 3) as f64 - 1.0) + 0.2)
            .collect();
        SeqInput {
            logp_ref: Some(logp_ref),
            ..SeqInput::new(logp, logp_old, mask.to_vec(), adv.to_vec())
        }
    }

    /// Ratios inside and outside [0.8, 1.2] (and beyond c = 3 and the ring bounds 0.4 / 3),
    /// both signs of A, per-token A, a masked token, a fully masked sequence, and different
    /// lengths. No ratio sits on a clip boundary.
    fn mixed_batch() -> Vec<SeqInput> {
        vec![
            seq_with_ratios(&[0.5, 1.1, 1.5, 20.0], &[1.0; 4], &[1.0; 4]),
            seq_with_ratios(&[0.3, 1.5], &[-0.5; 2], &[1.0; 2]),
            seq_with_ratios(
                &[0.9, 3.5, 0.6, 1.05, 1.15, 0.7],
                &[0.8, -0.3, 0.5, 0.0, 1.2, -1.1],
                &[1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
            ),
            seq_with_ratios(&[1.3, 0.2], &[2.0; 2], &[0.0; 2]),
        ]
    }

    fn with_expert(mut batch: Vec<SeqInput>) -> Vec<SeqInput> {
        batch.push(SeqInput {
            expert: true,
            ..SeqInput::new(
                vec![-0.4, -2.2, -0.9],
                vec![0.0; 3],
                vec![1.0, 1.0, 0.0],
                vec![0.0; 3],
            )
        });
        batch
    }

    fn run(cfg: &LossConfig, seqs: &[SeqInput]) -> LossOutput {
        compute(cfg, seqs).expect("compute")
    }

    #[test]
    fn reinforce_token_mean_by_hand() {
        // ℓ = [−1, −2], A = 1, token-mean: loss = (1 + 2)/2 = 1.5, grad = −A/2 = −0.5 each
        let cfg = LossConfig {
            loss: PolicyLoss::Reinforce,
            ..Default::default()
        };
        let s = SeqInput::new(
            vec![-1.0, -2.0],
            vec![-1.0, -2.0],
            vec![1.0, 1.0],
            vec![1.0, 1.0],
        );
        let out = run(&cfg, &[s]);
        assert!(close(out.loss, 1.5));
        assert_grads(&out.grad_logp, &[vec![-0.5, -0.5]]);
        assert_eq!(out.metrics.tokens, 2);
    }

    #[test]
    fn aggregation_modes_give_different_gradients_for_different_lengths() {
        // reinforce, A = 1, ℓ = −1: every token loss 1, d/dℓ = −1; lengths 1 and 3
        let seqs = vec![
            SeqInput::new(vec![-1.0], vec![-1.0], vec![1.0], vec![1.0]),
            SeqInput::new(vec![-1.0; 3], vec![-1.0; 3], vec![1.0; 3], vec![1.0; 3]),
        ];
        let cases = [
            // token-mean: w = 1/4 everywhere; loss 4/4 = 1
            (Aggregation::TokenMean, 1.0, [-0.25, -0.25]),
            // seq-mean-token-mean: w = 1/(1·2), 1/(3·2); loss (1 + 1)/2 = 1
            (Aggregation::SeqMeanTokenMean, 1.0, [-0.5, -1.0 / 6.0]),
            // seq-mean-token-sum: w = 1/2; loss (1 + 3)/2 = 2
            (Aggregation::SeqMeanTokenSum, 2.0, [-0.5, -0.5]),
            // sum-norm, L_max = 5: w = 1/(2·5); loss 4/10 = 0.4
            (Aggregation::SeqMeanTokenSumNorm, 0.4, [-0.1, -0.1]),
        ];
        for (agg, loss, [g0, g1]) in cases {
            let cfg = LossConfig {
                loss: PolicyLoss::Reinforce,
                agg,
                max_len: Some(5),
                ..Default::default()
            };
            let out = run(&cfg, &seqs);
            assert!(close(out.loss, loss), "{agg}: loss {}", out.loss);
            assert_grads(&out.grad_logp, &[vec![g0], vec![g1; 3]]);
        }
    }

    #[test]
    fn ppo_clip_batch_by_hand_with_metrics() {
        // ratios [0.5, 1.5, 1.1, 0.7], A = [1, 1, 1, −1], token-mean (w = 1/4):
        //   0.5, A>0: unclipped, loss −0.5, grad −0.5
        //   1.5, A>0: clipped,   loss −1.2, grad 0
        //   1.1, A>0: inside,    loss −1.1, grad −1.1
        //   0.7, A<0: clipped,   loss max(0.7, 0.8) = 0.8, grad 0
        // loss = (−0.5 − 1.2 − 1.1 + 0.8)/4 = −0.5; grads ×1/4
        let s = seq_with_ratios(&[0.5, 1.5, 1.1, 0.7], &[1.0, 1.0, 1.0, -1.0], &[1.0; 4]);
        let out = run(&LossConfig::default(), std::slice::from_ref(&s));
        assert!(close(out.loss, -0.5), "{}", out.loss);
        assert_grads(&out.grad_logp, &[vec![-0.125, 0.0, -0.275, 0.0]]);
        let m = &out.metrics;
        assert!(close(m.clipfrac, 0.5));
        assert_eq!(m.masked_frac, 0.0);
        // (0.5 + 1.5 + 1.1 + 0.7)/4 = 0.95
        assert!(close(m.ratio_mean, 0.95) && close(m.ratio_max, 1.5));
        assert!(close(m.policy_loss, -0.5) && m.kl_loss == 0.0);
        // kl/k3: Δʳ = ℓ − ℓʳ = −(0.3·((t%3) − 1) + 0.2) = [0.1, −0.2, −0.5, 0.1]
        let k3 = |d: f64| (-d).exp() - 1.0 + d;
        let want = (k3(0.1) + k3(-0.2) + k3(-0.5) + k3(0.1)) / 4.0;
        assert!(close(m.kl_k3, want), "{} vs {want}", m.kl_k3);
        // REC one-side masks exactly the PPO-clipped tokens
        let rec = LossConfig {
            loss: PolicyLoss::Rec,
            rec_weight: RecWeight::Is,
            rec_mask: RecMask::OneSide,
            ..Default::default()
        };
        assert!(close(run(&rec, &[s]).metrics.masked_frac, 0.5));
    }

    #[test]
    fn dual_clip_caps_through_compute() {
        // ratio 4, A = −1, c = 3, one token: loss min(max(4, 1.2), 3) = 3, grad 0, clipped
        let s = seq_with_ratios(&[4.0], &[-1.0], &[1.0]);
        let cfg = LossConfig {
            dual_clip: Some(3.0),
            ..Default::default()
        };
        let out = run(&cfg, std::slice::from_ref(&s));
        assert!(close(out.loss, 3.0));
        assert_grads(&out.grad_logp, &[vec![0.0]]);
        assert_eq!(out.metrics.clipfrac, 1.0);
        // without the dual clip: loss 4, grad −A·ρ = 4
        let out = run(&LossConfig::default(), &[s]);
        assert!(close(out.loss, 4.0));
        assert_grads(&out.grad_logp, &[vec![4.0]]);
    }

    #[test]
    fn kl_term_in_the_loss_by_hand() {
        // reinforce A = 1, ℓ = [−1, −2], ℓʳ = [−1.5, −1.5] ⇒ Δʳ = [0.5, −0.5], k2, β = 0.1,
        // token-mean: policy (1 + 2)/2 = 1.5; kl 0.1·(0.125 + 0.125)/2 = 0.0125
        // grad = ½·(−1 + 0.1·Δʳ) = [−0.475, −0.525]
        let cfg = LossConfig {
            loss: PolicyLoss::Reinforce,
            kl_coef: 0.1,
            kl_estimator: KlEstimator::K2,
            ..Default::default()
        };
        let s = SeqInput {
            logp_ref: Some(vec![-1.5, -1.5]),
            ..SeqInput::new(
                vec![-1.0, -2.0],
                vec![-1.0, -2.0],
                vec![1.0, 1.0],
                vec![1.0, 1.0],
            )
        };
        let out = run(&cfg, std::slice::from_ref(&s));
        assert!(close(out.loss, 1.5125), "{}", out.loss);
        assert!(close(out.metrics.kl_loss, 0.0125) && close(out.metrics.policy_loss, 1.5));
        assert_grads(&out.grad_logp, &[vec![-0.475, -0.525]]);
        // kl_in_reward: the trainer handles it, the loss has no KL term
        let in_reward = LossConfig {
            kl_in_reward: true,
            ..cfg
        };
        let out = run(&in_reward, &[s]);
        assert!(close(out.loss, 1.5));
        assert_grads(&out.grad_logp, &[vec![-0.5, -0.5]]);
    }

    #[test]
    fn dads_weights_the_k3_term_per_sequence() {
        // reinforce with A = 0 isolates the KL: one token each, Δʳ = 0.5, k3 = 0.1065306597126334,
        // dk3 = 0.3934693402873666; β = 1e-3; kl_weight 0.5 and 1; token-mean w = 1/2
        let mk = |w| SeqInput {
            logp_ref: Some(vec![-1.5]),
            kl_weight: w,
            ..SeqInput::new(vec![-1.0], vec![-1.0], vec![1.0], vec![0.0])
        };
        let cfg = LossConfig {
            loss: PolicyLoss::Reinforce,
            dads: true,
            ..Default::default()
        };
        let out = run(&cfg, &[mk(0.5), mk(1.0)]);
        // loss = ½·1e-3·k3·(0.5 + 1)
        assert!(
            close(out.loss, 0.5 * 1e-3 * 0.1065306597126334 * 1.5),
            "{}",
            out.loss
        );
        assert_grads(
            &out.grad_logp,
            &[
                vec![0.5 * 1e-3 * 0.5 * 0.3934693402873666],
                vec![0.5 * 1e-3 * 0.3934693402873666],
            ],
        );
    }

    #[test]
    fn sft_mix_by_hand() {
        // RL: reinforce A = 2, ℓ = [−1] ⇒ RL = 2, dRL = −2
        // expert: ℓ = [−0.5, −1.5] ⇒ SFT = (0.5 + 1.5)/2 = 1, dSFT = −½ each
        // μ = 0.1: loss = 0.9·2 + 0.1·1 = 1.9; grads 0.9·(−2) = −1.8 and 0.1·(−½) = −0.05
        let cfg = LossConfig {
            loss: PolicyLoss::Reinforce,
            ..Default::default()
        };
        let rl = SeqInput::new(vec![-1.0], vec![-1.0], vec![1.0], vec![2.0]);
        let expert = SeqInput {
            expert: true,
            ..SeqInput::new(vec![-0.5, -1.5], vec![0.0; 2], vec![1.0; 2], vec![0.0; 2])
        };
        let out = run(&cfg, &[rl.clone(), expert]);
        assert!(close(out.loss, 1.9), "{}", out.loss);
        assert_grads(&out.grad_logp, &[vec![-1.8], vec![-0.05, -0.05]]);
        assert!(close(out.metrics.sft_loss, 1.0) && close(out.metrics.policy_loss, 2.0));
        assert_eq!(out.metrics.tokens, 3);
        // without experts there is no (1−μ) factor
        assert!(close(run(&cfg, &[rl]).loss, 2.0));
    }

    #[test]
    fn empty_masks_give_zero_loss_and_gradients_without_nan() {
        let mut s = seq_with_ratios(&[1.5, 0.2], &[1.0, -1.0], &[0.0, 0.0]);
        s.logp[1] = f64::NAN; // padding may hold anything
        for agg in Aggregation::ALL {
            for loss in PolicyLoss::ALL {
                let agg = if loss.needs_seq_mean_token_mean() {
                    Aggregation::SeqMeanTokenMean
                } else {
                    *agg
                };
                let cfg = LossConfig {
                    loss: *loss,
                    agg,
                    max_len: Some(4),
                    kl_coef: 0.1,
                    ..Default::default()
                };
                let out = run(&cfg, std::slice::from_ref(&s));
                assert_eq!(out.loss, 0.0, "{loss} {agg}");
                assert_grads(&out.grad_logp, &[vec![0.0, 0.0]]);
                assert_eq!(out.metrics, LossMetrics::default());
            }
        }
        let out = run(&LossConfig::default(), &[]);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad_logp.is_empty());
    }

    #[test]
    fn reduction_rec_is_one_side_has_the_gradient_of_ppo_clip() {
        let batch = mixed_batch();
        let rec = LossConfig {
            loss: PolicyLoss::Rec,
            rec_weight: RecWeight::Is,
            rec_mask: RecMask::OneSide,
            ..Default::default()
        };
        for agg in [Aggregation::TokenMean, Aggregation::SeqMeanTokenMean] {
            let ppo_out = run(
                &LossConfig {
                    agg,
                    ..Default::default()
                },
                &batch,
            );
            let rec_out = run(&LossConfig { agg, ..rec.clone() }, &batch);
            // The data really exercises clipping on both sides and unclipped tokens.
            assert!(ppo_out.metrics.clipfrac > 0.2 && ppo_out.metrics.clipfrac < 0.8);
            assert_grads(&rec_out.grad_logp, &ppo_out.grad_logp);
            assert!(
                (rec_out.loss - ppo_out.loss).abs() > 1e-3,
                "losses differ, gradients agree"
            );
        }
    }

    #[test]
    fn reduction_topr_on_policy_is_reinforce() {
        let mut batch = mixed_batch();
        for s in &mut batch {
            s.logp_old = s.logp.clone(); // ℓ = ℓᵒ
        }
        let agg = Aggregation::SeqMeanTokenMean;
        let reinforce = run(
            &LossConfig {
                loss: PolicyLoss::Reinforce,
                agg,
                ..Default::default()
            },
            &batch,
        );
        for topr_ratio in RatioLevel::ALL {
            let cfg = LossConfig {
                loss: PolicyLoss::Topr,
                agg,
                topr_ratio: *topr_ratio,
                ..Default::default()
            };
            let topr = run(&cfg, &batch);
            assert_grads(&topr.grad_logp, &reinforce.grad_logp);
            assert!(close(topr.loss, reinforce.loss));
        }
        // off-policy, negative samples with ρ < 1 are tapered, so the two differ
        let off = mixed_batch();
        let r = run(
            &LossConfig {
                loss: PolicyLoss::Reinforce,
                agg,
                ..Default::default()
            },
            &off,
        );
        let t = run(
            &LossConfig {
                loss: PolicyLoss::Topr,
                agg,
                ..Default::default()
            },
            &off,
        );
        assert!((r.grad_logp[1][0] - t.grad_logp[1][0]).abs() > 1e-3);
    }

    /// Sequences whose behaviour log-probs equal the current ones (ρ = 1 everywhere), one
    /// advantage per sequence as the trainer broadcasts it.
    fn on_policy_batch() -> Vec<SeqInput> {
        vec![
            SeqInput::new(
                vec![-0.5, -1.5],
                vec![-0.5, -1.5],
                vec![1.0, 1.0],
                vec![0.8; 2],
            ),
            SeqInput::new(
                vec![-0.2, -2.0, -0.9],
                vec![-0.2, -2.0, -0.9],
                vec![1.0, 1.0, 0.0],
                vec![-1.3; 3],
            ),
        ]
    }

    #[test]
    fn reduction_gspo_on_policy_is_ppo_clip_with_sequence_mean() {
        let seqs = on_policy_batch();
        let agg = Aggregation::SeqMeanTokenMean;
        let grpo = run(
            &LossConfig {
                agg,
                ..Default::default()
            },
            &seqs,
        );
        let gspo = run(
            &LossConfig {
                loss: PolicyLoss::Gspo,
                agg,
                ..Default::default()
            },
            &seqs,
        );
        assert_eq!(gspo.grad_logp, grpo.grad_logp);
        assert!(close(gspo.loss, grpo.loss));
        // by hand: seq 0 has A = 0.8, L = 2, B = 2 ⇒ −0.8/(2·2) = −0.2 per token; seq 1 has
        // A = −1.3, L = 2 ⇒ 1.3/4 = 0.325 per valid token; loss (−0.8 + 1.3)/2 = 0.25
        assert_grads(
            &gspo.grad_logp,
            &[vec![-0.2, -0.2], vec![0.325, 0.325, 0.0]],
        );
        assert!(close(gspo.loss, 0.25));
    }

    #[test]
    fn gspo_clips_whole_sequences_by_hand() {
        // seq 0: Δ = (0.1, −0.3), mean −0.1, s = 0.9048374, A = −1 ⇒ below 1 − 3e-4 with A < 0:
        // clipped, loss 0.9997, both tokens' gradients 0. seq 1: Δ = (0.0002, 0.0), mean 1e-4,
        // s = 1.0001 inside [0.9997, 1.0004], A = 2 ⇒ loss −2·1.0001 = −2.0002, per-token
        // gradient −A·s/(L·B) = −2.0002/4. Total loss (0.9997 − 2.0002)/2 = −0.50025.
        let seqs = vec![
            SeqInput::new(
                vec![-0.9, -1.3],
                vec![-1.0, -1.0],
                vec![1.0, 1.0],
                vec![-1.0; 2],
            ),
            SeqInput::new(
                vec![-0.9998, -1.0],
                vec![-1.0, -1.0],
                vec![1.0, 1.0],
                vec![2.0; 2],
            ),
        ];
        let cfg = LossConfig {
            loss: PolicyLoss::Gspo,
            agg: Aggregation::SeqMeanTokenMean,
            ..Default::default()
        };
        let out = run(&cfg, &seqs);
        let s1 = 1e-4_f64.exp();
        assert!(close(out.loss, (0.9997 - 2.0 * s1) / 2.0), "{}", out.loss);
        assert_grads(&out.grad_logp, &[vec![0.0, 0.0], vec![-2.0 * s1 / 4.0; 2]]);
        assert!(close(out.metrics.clipfrac, 0.5));
    }

    #[test]
    fn reduction_cispo_on_policy_is_reinforce() {
        let seqs = on_policy_batch();
        for agg in Aggregation::ALL {
            let base = LossConfig {
                agg: *agg,
                max_len: Some(3),
                ..Default::default()
            };
            let reinforce = run(
                &LossConfig {
                    loss: PolicyLoss::Reinforce,
                    ..base.clone()
                },
                &seqs,
            );
            let cispo = run(
                &LossConfig {
                    loss: PolicyLoss::Cispo,
                    eps_low: 1.0,
                    eps_high: 0.28,
                    ..base
                },
                &seqs,
            );
            assert_eq!(cispo.grad_logp, reinforce.grad_logp, "{agg}");
            assert_eq!(cispo.loss, reinforce.loss, "{agg}");
        }
    }

    #[test]
    fn reduction_rec_without_weight_mask_or_reg_is_reinforce() {
        let batch = mixed_batch();
        for agg in [Aggregation::TokenMean, Aggregation::SeqMeanTokenSum] {
            let r = run(
                &LossConfig {
                    loss: PolicyLoss::Reinforce,
                    agg,
                    ..Default::default()
                },
                &batch,
            );
            let rec = run(
                &LossConfig {
                    loss: PolicyLoss::Rec,
                    agg,
                    ..Default::default()
                },
                &batch,
            );
            assert_grads(&rec.grad_logp, &r.grad_logp);
            assert!(close(rec.loss, r.loss));
        }
    }

    #[test]
    fn rec_seq_is_uses_the_sequence_ratio() {
        // ratios [2, 0.5] ⇒ mean Δ = (ln 2 + ln 0.5)/2 = 0 ⇒ W = 1 for both tokens;
        // A = 1, token-mean: grad = −1/2 each (with W = is it would be −2/2 and −0.5/2)
        let s = seq_with_ratios(&[2.0, 0.5], &[1.0; 2], &[1.0; 2]);
        let cfg = LossConfig {
            loss: PolicyLoss::Rec,
            rec_weight: RecWeight::SeqIs,
            ..Default::default()
        };
        assert_grads(
            &run(&cfg, std::slice::from_ref(&s)).grad_logp,
            &[vec![-0.5, -0.5]],
        );
        let is = LossConfig {
            rec_weight: RecWeight::Is,
            ..cfg
        };
        assert_grads(&run(&is, &[s]).grad_logp, &[vec![-1.0, -0.25]]);
    }

    #[test]
    fn shape_errors_name_sequence_and_field() {
        let good = SeqInput::new(vec![-1.0; 3], vec![-1.0; 3], vec![1.0; 3], vec![1.0; 3]);
        let bad = SeqInput {
            adv: vec![1.0; 2],
            ..good.clone()
        };
        let err = compute(&LossConfig::default(), &[good.clone(), bad]).expect_err("ragged");
        assert_eq!(
            err.to_string(),
            "sequence 1: adv has 2 entries but logp has 3"
        );
        let bad_ref = SeqInput {
            logp_ref: Some(vec![0.0; 4]),
            ..good.clone()
        };
        let err = compute(&LossConfig::default(), &[bad_ref]).expect_err("ragged ref");
        assert_eq!(
            err.to_string(),
            "sequence 0: logp_ref has 4 entries but logp has 3"
        );
    }

    #[test]
    fn value_errors_name_sequence_token_and_field() {
        let good = SeqInput::new(vec![-1.0; 3], vec![-1.0; 3], vec![1.0; 3], vec![1.0; 3]);
        let mut nan = good.clone();
        nan.logp_old[2] = f64::NAN;
        let err = compute(&LossConfig::default(), &[nan]).expect_err("nan");
        assert_eq!(
            err.to_string(),
            "sequence 0, token 2: logp_old must be finite, found NaN"
        );
        let mut neg = good.clone();
        neg.mask[1] = -1.0;
        let err = compute(&LossConfig::default(), &[neg]).expect_err("mask");
        assert_eq!(
            err.to_string(),
            "sequence 0, token 1: mask must be a finite number >= 0, found -1"
        );
        let w = SeqInput {
            kl_weight: -0.5,
            ..good.clone()
        };
        assert!(matches!(
            compute(&LossConfig::default(), &[w]),
            Err(LossError::InvalidKlWeight { seq: 0, .. })
        ));
        let cfg = LossConfig {
            kl_coef: 0.1,
            ..Default::default()
        };
        let err = compute(&cfg, std::slice::from_ref(&good)).expect_err("no ref");
        assert_eq!(err.to_string(), "sequence 0: logp_ref is required (kl_coef > 0 with the KL term in the loss) but is missing");
        let bad_cfg = LossConfig {
            eps_low: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            compute(&bad_cfg, &[good]),
            Err(LossError::InvalidConfig {
                field: "eps_low",
                ..
            })
        ));
    }

    /// Every loss configuration the library offers, paired with KL and SFT variants below.
    fn all_policy_configs() -> Vec<LossConfig> {
        let mut out = vec![
            LossConfig {
                loss: PolicyLoss::Reinforce,
                ..Default::default()
            },
            LossConfig::default(),
            LossConfig {
                eps_high: 0.28,
                dual_clip: Some(3.0),
                ..Default::default()
            },
            LossConfig {
                loss: PolicyLoss::StableReinforce,
                ..Default::default()
            },
            // a narrow clamp so that ratios 3.5 and 20 fall outside it (zero gradient there)
            LossConfig {
                loss: PolicyLoss::StableReinforce,
                stable_logratio_min: -1.0,
                stable_logratio_max: 1.0,
                dual_clip: Some(3.0),
                ..Default::default()
            },
        ];
        for (seq_eps_low, seq_eps_high) in [(3e-4, 4e-4), (0.9, 5.0)] {
            out.push(LossConfig {
                loss: PolicyLoss::Gspo,
                agg: Aggregation::SeqMeanTokenMean,
                seq_eps_low,
                seq_eps_high,
                ..Default::default()
            });
        }
        for (eps_low, eps_high) in [(1.0, 0.28), (0.2, 0.2)] {
            out.push(LossConfig {
                loss: PolicyLoss::Cispo,
                eps_low,
                eps_high,
                ..Default::default()
            });
        }
        for topr_ratio in RatioLevel::ALL {
            out.push(LossConfig {
                loss: PolicyLoss::Topr,
                agg: Aggregation::SeqMeanTokenMean,
                topr_ratio: *topr_ratio,
                ..Default::default()
            });
        }
        for &rec_weight in RecWeight::ALL {
            for &rec_mask in RecMask::ALL {
                for &rec_reg in RecReg::ALL {
                    out.push(LossConfig {
                        loss: PolicyLoss::Rec,
                        rec_weight,
                        rec_mask,
                        rec_reg,
                        ..Default::default()
                    });
                }
            }
        }
        out
    }

    #[test]
    fn gradients_match_central_differences_for_every_configuration() {
        let h = 1e-5;
        let mut checked = 0;
        for base in all_policy_configs() {
            let aggs: &[Aggregation] = if base.loss.needs_seq_mean_token_mean() {
                &[Aggregation::SeqMeanTokenMean]
            } else {
                Aggregation::ALL
            };
            let kls: Vec<(f64, KlEstimator, bool)> = std::iter::once((0.0, KlEstimator::K1, false))
                .chain(KlEstimator::ALL.iter().map(|&e| (0.1, e, false)))
                .chain(std::iter::once((0.0, KlEstimator::LowVarKl, true)))
                .collect();
            for &agg in aggs {
                for &(kl_coef, kl_estimator, dads) in &kls {
                    for expert in [false, true] {
                        let cfg = LossConfig {
                            agg,
                            max_len: Some(7),
                            kl_coef,
                            kl_estimator,
                            dads,
                            ..base.clone()
                        };
                        let mut batch = mixed_batch();
                        batch[1].kl_weight = 0.4; // DADS-like per-sequence weight
                        if expert {
                            batch = with_expert(batch);
                        }
                        let out = run(&cfg, &batch);
                        let frozen: Vec<Vec<f64>> = batch.iter().map(|s| s.logp.clone()).collect();
                        for i in 0..batch.len() {
                            for t in 0..batch[i].logp.len() {
                                let at = |x: f64| {
                                    let mut b = batch.clone();
                                    b[i].logp[t] = x;
                                    compute_with_detached(&cfg, &b, Some(&frozen))
                                        .expect("compute")
                                        .loss
                                };
                                let l = batch[i].logp[t];
                                let fd = (at(l + h) - at(l - h)) / (2.0 * h);
                                let g = out.grad_logp[i][t];
                                assert!(
                                    (fd - g).abs() < 1e-6,
                                    "{cfg:?}\nseq {i} token {t}: finite difference {fd} vs analytic {g}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        // 67 configs × agg × KL × SFT variants × tokens = 48 732 checks
        assert!(checked > 40_000, "checked {checked} gradients");
    }

    #[test]
    fn finite_differences_see_ppo_clip_zeroing() {
        // Guard for the check above: a wrong gradient would be caught. PPO with ρ = 1.5, A > 0
        // is clipped: the loss is flat in ℓ and the analytic gradient is exactly 0.
        let s = seq_with_ratios(&[1.5], &[1.0], &[1.0]);
        let h = 1e-5;
        let at = |x: f64| {
            let mut b = s.clone();
            b.logp[0] = x;
            run(&LossConfig::default(), &[b]).loss
        };
        let fd = (at(s.logp[0] + h) - at(s.logp[0] - h)) / (2.0 * h);
        assert!(fd.abs() < 1e-9);
        assert_eq!(run(&LossConfig::default(), &[s]).grad_logp[0][0], 0.0);
    }
}

//! Per-token policy losses (docs/algorithms.md#policy-losses): each a small pure function of one token's
//! scalars returning the loss, its derivative with respect to the current log-prob ℓ, and
//! whether the token was clipped or masked.
//!
//! Conventions: Δ = ℓ − ℓᵒ, ρ = exp(Δ). Arguments documented as *detached* (REC's weight and
//! keep flag, TOPR's ratio) are constants here: the caller computes them and they contribute no
//! gradient.

use super::config::{LossConfig, RecMask, RecReg, RecWeight};

/// One token's loss and its exact derivative dloss/dℓ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    pub loss: f64,
    pub grad: f64,
    /// PPO clipping (or the dual-clip cap) zeroed this token's gradient.
    pub clipped: bool,
    /// REC's mask M dropped this token's policy-gradient term.
    pub masked: bool,
}

impl TokenLoss {
    fn plain(loss: f64, grad: f64) -> Self {
        Self {
            loss,
            grad,
            clipped: false,
            masked: false,
        }
    }
}

/// `reinforce`: −A·ℓ, gradient −A.
pub fn reinforce_token(logp: f64, adv: f64) -> TokenLoss {
    TokenLoss::plain(-adv * logp, -adv)
}

/// PPO-clip given the log-ratio `delta` and its derivative `ddelta` = dΔ/dℓ (1, or 0 where a
/// caller clamped Δ). Ties between the two branches take the unclipped one (gradient −A·ρ), so
/// a ratio exactly on the boundary keeps its gradient, as REC's one-side mask does.
fn ppo_clip_from_logratio(
    delta: f64,
    ddelta: f64,
    adv: f64,
    eps_low: f64,
    eps_high: f64,
    dual_clip: Option<f64>,
) -> TokenLoss {
    let ratio = delta.exp();
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
    let (mut loss, mut grad, mut was_clipped) = if unclipped >= clipped {
        (unclipped, -adv * ratio * ddelta, false)
    } else {
        (clipped, 0.0, true)
    };
    // Dual clip: for A < 0 cap the loss at −c·A (a constant, so no gradient).
    if let Some(c) = dual_clip {
        let cap = -c * adv;
        if adv < 0.0 && loss > cap {
            (loss, grad, was_clipped) = (cap, 0.0, true);
        }
    }
    TokenLoss {
        loss,
        grad,
        clipped: was_clipped,
        masked: false,
    }
}

/// `ppo-clip`: max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), ρ = exp(ℓ − ℓᵒ) carrying gradient
/// (dρ/dℓ = ρ). With `dual_clip = Some(c)` and A < 0 the loss is capped at −c·A.
pub fn ppo_clip_token(
    logp: f64,
    logp_old: f64,
    adv: f64,
    eps_low: f64,
    eps_high: f64,
    dual_clip: Option<f64>,
) -> TokenLoss {
    ppo_clip_from_logratio(logp - logp_old, 1.0, adv, eps_low, eps_high, dual_clip)
}

/// `stable-reinforce`: PPO-clip with Δ clamped to `logratio_range` = (min, max) before exp.
/// Outside the clamp Δ is constant, so its gradient is zero there.
pub fn stable_reinforce_token(
    logp: f64,
    logp_old: f64,
    adv: f64,
    eps_low: f64,
    eps_high: f64,
    dual_clip: Option<f64>,
    logratio_range: (f64, f64),
) -> TokenLoss {
    let (lo, hi) = logratio_range;
    let delta = logp - logp_old;
    let inside = (lo..=hi).contains(&delta);
    let ddelta = if inside { 1.0 } else { 0.0 };
    ppo_clip_from_logratio(
        delta.clamp(lo, hi),
        ddelta,
        adv,
        eps_low,
        eps_high,
        dual_clip,
    )
}

/// REC's detached weight W for one token, given the token ratio ρ and the sequence ratio
/// exp(mean_t Δ).
pub fn rec_weight_value(
    kind: RecWeight,
    ratio: f64,
    seq_ratio: f64,
    eps_prime_low: f64,
    eps_prime_high: f64,
) -> f64 {
    match kind {
        RecWeight::None => 1.0,
        RecWeight::Is => ratio,
        RecWeight::TruncatedIs => ratio.clamp(1.0 - eps_prime_low, 1.0 + eps_prime_high),
        RecWeight::SeqIs => seq_ratio,
    }
}

/// The one-side rule: (A ≥ 0 and ρ ≤ 1+ε_high) or (A ≤ 0 and ρ ≥ 1−ε_low).
fn one_side_keeps(adv: f64, ratio: f64, eps_low: f64, eps_high: f64) -> bool {
    (adv >= 0.0 && ratio <= 1.0 + eps_high) || (adv <= 0.0 && ratio >= 1.0 - eps_low)
}

fn two_side_keeps(ratio: f64, eps_low: f64, eps_high: f64) -> bool {
    (1.0 - eps_low..=1.0 + eps_high).contains(&ratio)
}

/// REC's detached mask M for one token: true when the token keeps its policy-gradient term.
/// `ratio` is the token ratio, `seq_ratio` the sequence ratio (used by `seq-one-side` with the
/// sequence-level ε).
pub fn rec_keeps_token(
    kind: RecMask,
    adv: f64,
    ratio: f64,
    seq_ratio: f64,
    cfg: &LossConfig,
) -> bool {
    let (el, eh) = (cfg.eps_low, cfg.eps_high);
    match kind {
        RecMask::None => true,
        RecMask::OneSide => one_side_keeps(adv, ratio, el, eh),
        RecMask::TwoSide => two_side_keeps(ratio, el, eh),
        RecMask::Ring => {
            two_side_keeps(ratio, el, eh)
                || (adv >= 0.0 && ratio <= 1.0 - cfg.eps_prime_low)
                || (adv <= 0.0 && ratio >= 1.0 + cfg.eps_prime_high)
        }
        RecMask::SeqOneSide => one_side_keeps(adv, seq_ratio, cfg.seq_eps_low, cfg.seq_eps_high),
    }
}

/// `rec`: −W·A·ℓ·M + Reg with W (`weight`) and M (`keep`) detached.
/// Reg: `asymre` −c·ℓ (gradient −c); `opmd` +c·Δ² (gradient 2c·Δ). Reg is outside M.
pub fn rec_token(
    logp: f64,
    logp_old: f64,
    adv: f64,
    weight: f64,
    keep: bool,
    reg: RecReg,
    reg_coef: f64,
) -> TokenLoss {
    let m = if keep { 1.0 } else { 0.0 };
    let (reg_loss, reg_grad) = match reg {
        RecReg::None => (0.0, 0.0),
        RecReg::Asymre => (-reg_coef * logp, -reg_coef),
        RecReg::Opmd => {
            let delta = logp - logp_old;
            (reg_coef * delta * delta, 2.0 * reg_coef * delta)
        }
    };
    TokenLoss {
        loss: -weight * adv * logp * m + reg_loss,
        grad: -weight * adv * m + reg_grad,
        clipped: false,
        masked: !keep,
    }
}

/// `gspo` (GSPO-token form): PPO-clip on s_t = sg(s)·exp(ℓ − sg(ℓ)), where s = exp(mean_t Δ)
/// is the sequence ratio evaluated at the detached log-probs (`seq_log_ratio` = ln s) and
/// `logp - logp_detached` is 0 in value, so s_t = s and ds_t/dℓ = s. The clip uses the sequence
/// ε, so a sequence is clipped as a whole. Under `seq-mean-token-mean` and with one advantage
/// per sequence this is GSPO's sequence objective −min(s·A, clip(s)·A) with its exact gradient
/// (Zheng et al. 2025): d/dℓ_t of s is s/L, and the aggregation weight carries the 1/L.
pub fn gspo_token(
    logp: f64,
    logp_detached: f64,
    seq_log_ratio: f64,
    adv: f64,
    seq_eps_low: f64,
    seq_eps_high: f64,
) -> TokenLoss {
    ppo_clip_from_logratio(
        seq_log_ratio + (logp - logp_detached),
        1.0,
        adv,
        seq_eps_low,
        seq_eps_high,
        None,
    )
}

/// `cispo`: −w·A·ℓ with w = clip(ρ, 1−ε_low, 1+ε_high) detached (`ratio` is the detached token
/// ratio). Unlike PPO no token loses its gradient: clipping bounds the weight, it never masks
/// (CISPO, MiniMax-M1 2025).
pub fn cispo_token(logp: f64, adv: f64, ratio: f64, eps_low: f64, eps_high: f64) -> TokenLoss {
    let w = ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
    TokenLoss::plain(-w * adv * logp, -w * adv)
}

/// `topr`: −α·A·ℓ with α = 1 when A > 0, else clamp(ρ, 0, 1); `ratio` (token or sequence
/// level) is detached. The per-sequence normalisation is the aggregation's job
/// (`seq-mean-token-mean`, enforced by `LossConfig::validate`).
pub fn topr_token(logp: f64, adv: f64, ratio: f64) -> TokenLoss {
    let alpha = if adv > 0.0 {
        1.0
    } else {
        ratio.clamp(0.0, 1.0)
    };
    TokenLoss::plain(-alpha * adv * logp, -alpha * adv)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        crate::testing::close_rel(a, b, TOL)
    }

    #[track_caller]
    fn assert_token(t: TokenLoss, loss: f64, grad: f64, clipped: bool) {
        assert!(close(t.loss, loss), "loss {} != {loss}", t.loss);
        assert!(close(t.grad, grad), "grad {} != {grad}", t.grad);
        assert_eq!(t.clipped, clipped, "clipped flag");
    }

    /// ℓᵒ such that exp(ℓ − ℓᵒ) = ratio for ℓ = −1.
    fn old_for(ratio: f64) -> f64 {
        -1.0 - ratio.ln()
    }

    #[test]
    fn reinforce_is_minus_a_logp() {
        // −A·ℓ = −2·(−0.5) = 1; d/dℓ = −A = −2
        assert_token(reinforce_token(-0.5, 2.0), 1.0, -2.0, false);
    }

    #[test]
    fn ppo_clip_inside_range_keeps_ratio_gradient() {
        let t = ppo_clip_token(-1.0, old_for(1.1), 2.0, 0.2, 0.2, None);
        // ρ = 1.1 inside [0.8, 1.2]: loss −A·ρ = −2.2, grad −A·ρ = −2.2
        assert_token(t, -2.2, -2.2, false);
    }

    #[test]
    fn ppo_clip_positive_advantage_above_range_is_clipped() {
        let t = ppo_clip_token(-1.0, old_for(1.5), 2.0, 0.2, 0.2, None);
        // max(−2·1.5, −2·1.2) = −2.4 (clipped branch), grad 0
        assert_token(t, -2.4, 0.0, true);
    }

    #[test]
    fn ppo_clip_positive_advantage_below_range_is_not_clipped() {
        let t = ppo_clip_token(-1.0, old_for(0.5), 2.0, 0.2, 0.2, None);
        // max(−2·0.5, −2·0.8) = −1.0 (unclipped), grad −A·ρ = −1.0
        assert_token(t, -1.0, -1.0, false);
    }

    #[test]
    fn ppo_clip_negative_advantage_below_range_is_clipped() {
        let t = ppo_clip_token(-1.0, old_for(0.5), -2.0, 0.2, 0.2, None);
        // max(2·0.5, 2·0.8) = 1.6 (clipped), grad 0
        assert_token(t, 1.6, 0.0, true);
    }

    #[test]
    fn ppo_clip_negative_advantage_above_range_is_not_clipped() {
        let t = ppo_clip_token(-1.0, old_for(1.5), -2.0, 0.2, 0.2, None);
        // max(2·1.5, 2·1.2) = 3.0 (unclipped), grad −A·ρ = 3.0
        assert_token(t, 3.0, 3.0, false);
    }

    #[test]
    fn ppo_clip_asymmetric_clip_higher() {
        // ε_high = 0.28: ρ = 1.25 < 1.28 stays unclipped for A > 0: loss = grad = −1.25
        let t = ppo_clip_token(-1.0, old_for(1.25), 1.0, 0.2, 0.28, None);
        assert_token(t, -1.25, -1.25, false);
        // with the symmetric 0.2 it is clipped: loss −1.2, grad 0
        let t = ppo_clip_token(-1.0, old_for(1.25), 1.0, 0.2, 0.2, None);
        assert_token(t, -1.2, 0.0, true);
    }

    #[test]
    fn dual_clip_caps_negative_advantage_loss() {
        // A = −2, ρ = 4, c = 3: PPO loss 2·4 = 8 > cap −c·A = 6 ⇒ loss 6, grad 0
        let t = ppo_clip_token(-1.0, old_for(4.0), -2.0, 0.2, 0.2, Some(3.0));
        assert_token(t, 6.0, 0.0, true);
        // ρ = 2.5: loss 5 < 6, untouched: grad −A·ρ = 5
        let t = ppo_clip_token(-1.0, old_for(2.5), -2.0, 0.2, 0.2, Some(3.0));
        assert_token(t, 5.0, 5.0, false);
        // A > 0 is never capped: ρ = 4 ⇒ clipped branch −2·1.2 = −2.4
        let t = ppo_clip_token(-1.0, old_for(4.0), 2.0, 0.2, 0.2, Some(3.0));
        assert_token(t, -2.4, 0.0, true);
    }

    #[test]
    fn stable_reinforce_equals_ppo_clip_inside_the_clamp() {
        let range = (1e-3_f64.ln(), 1e3_f64.ln());
        for (ratio, adv) in [(1.1, 1.0), (1.5, -0.7), (0.5, 0.3), (0.5, -1.0)] {
            let s = stable_reinforce_token(-1.0, old_for(ratio), adv, 0.2, 0.2, None, range);
            let p = ppo_clip_token(-1.0, old_for(ratio), adv, 0.2, 0.2, None);
            assert_eq!(s, p);
        }
    }

    #[test]
    fn stable_reinforce_clamps_the_log_ratio_with_zero_gradient_outside() {
        let range = (1e-3_f64.ln(), 1e3_f64.ln());
        // Δ = ln 1e4 → clamped to ln 1e3, A = −1: loss = 1·1e3, grad 0 (outside clamp)
        let t = stable_reinforce_token(-1.0, old_for(1e4), -1.0, 0.2, 0.2, None, range);
        assert!(close(t.loss, 1e3), "{t:?}");
        assert_eq!(t.grad, 0.0);
        assert!(!t.clipped);
        // Δ = ln 1e-4, A = 2: ρ clamped to 1e-3, loss max(−2e-3, −1.6) = −2e-3, grad 0
        let t = stable_reinforce_token(-1.0, old_for(1e-4), 2.0, 0.2, 0.2, None, range);
        assert_token(t, -2e-3, 0.0, false);
        // plain PPO at Δ = ln 1e4 would give loss 1e4 and gradient 1e4
        let p = ppo_clip_token(-1.0, old_for(1e4), -1.0, 0.2, 0.2, None);
        assert!(close(p.grad, 1e4));
    }

    #[test]
    fn rec_weights() {
        let w = |k, r| rec_weight_value(k, r, 0.9, 0.6, 2.0);
        assert_eq!(w(RecWeight::None, 1.7), 1.0);
        assert_eq!(w(RecWeight::Is, 1.7), 1.7);
        // truncated-is clamps to [1−0.6, 1+2.0] = [0.4, 3.0]
        assert_eq!(w(RecWeight::TruncatedIs, 0.2), 0.4);
        assert_eq!(w(RecWeight::TruncatedIs, 5.0), 3.0);
        assert_eq!(w(RecWeight::TruncatedIs, 1.5), 1.5);
        // seq-is uses the sequence ratio given (0.9), whatever the token ratio
        assert_eq!(w(RecWeight::SeqIs, 1.7), 0.9);
    }

    #[test]
    fn rec_one_side_and_two_side_masks() {
        let cfg = LossConfig::default(); // ε = 0.2/0.2
        let keep = |m, a, r| rec_keeps_token(m, a, r, 1.0, &cfg);
        // one-side: A ≥ 0 keeps ρ ≤ 1.2; A ≤ 0 keeps ρ ≥ 0.8; A = 0 keeps everything.
        assert!(keep(RecMask::OneSide, 1.0, 0.3));
        assert!(keep(RecMask::OneSide, 1.0, 1.2));
        assert!(!keep(RecMask::OneSide, 1.0, 1.3));
        assert!(keep(RecMask::OneSide, -1.0, 1.9));
        assert!(!keep(RecMask::OneSide, -1.0, 0.7));
        assert!(keep(RecMask::OneSide, 0.0, 5.0));
        // two-side: 0.8 ≤ ρ ≤ 1.2 regardless of A
        assert!(keep(RecMask::TwoSide, 1.0, 0.8));
        assert!(!keep(RecMask::TwoSide, 1.0, 0.7));
        assert!(!keep(RecMask::TwoSide, -1.0, 1.3));
        assert!(keep(RecMask::None, -1.0, 100.0));
    }

    #[test]
    fn rec_ring_mask() {
        let cfg = LossConfig::default(); // ε = 0.2/0.2, ε′ = 0.6/2.0
        let keep = |a, r| rec_keeps_token(RecMask::Ring, a, r, 1.0, &cfg);
        assert!(keep(1.0, 1.1)); // inside [0.8, 1.2]
        assert!(keep(1.0, 0.3)); // A ≥ 0 and ρ ≤ 1−0.6 = 0.4
        assert!(!keep(1.0, 0.5)); // between 0.4 and 0.8
        assert!(!keep(1.0, 3.5)); // A > 0, far above: not in the ring
        assert!(keep(-1.0, 3.5)); // A ≤ 0 and ρ ≥ 1+2.0 = 3
        assert!(!keep(-1.0, 2.0)); // between 1.2 and 3
        assert!(!keep(-1.0, 0.3)); // A < 0, far below: not in the ring
    }

    #[test]
    fn rec_seq_one_side_uses_sequence_ratio_and_sequence_eps() {
        let cfg = LossConfig::default(); // seq ε = 3e-4 / 4e-4
        let keep = |a, seq_ratio| rec_keeps_token(RecMask::SeqOneSide, a, 1.0, seq_ratio, &cfg);
        assert!(keep(1.0, 1.0003)); // ≤ 1.0004
        assert!(!keep(1.0, 1.0005));
        assert!(keep(-1.0, 0.9998)); // ≥ 0.9997
        assert!(!keep(-1.0, 0.9996));
        // the token ratio is ignored: token ρ = 5 but sequence ratio 1 ⇒ kept
        assert!(rec_keeps_token(RecMask::SeqOneSide, 1.0, 5.0, 1.0, &cfg));
    }

    #[test]
    fn rec_token_with_each_regulariser() {
        // ℓ = −0.5, ℓᵒ = −0.8 (Δ = 0.3), A = 2, W = 1.5, kept, c = 0.1
        let none = rec_token(-0.5, -0.8, 2.0, 1.5, true, RecReg::None, 0.1);
        // loss −1.5·2·(−0.5) = 1.5; grad −1.5·2 = −3
        assert_token(none, 1.5, -3.0, false);
        assert!(!none.masked);
        let asym = rec_token(-0.5, -0.8, 2.0, 1.5, true, RecReg::Asymre, 0.1);
        // + (−0.1·(−0.5)) = +0.05; grad −3 − 0.1
        assert_token(asym, 1.55, -3.1, false);
        let opmd = rec_token(-0.5, -0.8, 2.0, 1.5, true, RecReg::Opmd, 0.1);
        // + 0.1·0.3² = 0.009; grad −3 + 2·0.1·0.3 = −2.94
        assert_token(opmd, 1.509, -2.94, false);
        // masked: only the regulariser remains
        let masked = rec_token(-0.5, -0.8, 2.0, 1.5, false, RecReg::Opmd, 0.1);
        assert_token(masked, 0.009, 0.06, false);
        assert!(masked.masked);
    }

    #[test]
    fn topr_tapers_only_negative_samples() {
        // A > 0: α = 1 ⇒ loss −A·ℓ = −1.5·(−2) = 3, grad −1.5 (ratio ignored)
        assert_token(topr_token(-2.0, 1.5, 7.0), 3.0, -1.5, false);
        // A < 0, ρ = 0.5: α = 0.5 ⇒ loss −0.5·(−1)·(−2) = −1, grad 0.5
        assert_token(topr_token(-2.0, -1.0, 0.5), -1.0, 0.5, false);
        // A < 0, ρ = 2: α = clamp(2, 0, 1) = 1 ⇒ loss −2, grad 1
        assert_token(topr_token(-2.0, -1.0, 2.0), -2.0, 1.0, false);
        // A = 0: nothing
        assert_token(topr_token(-2.0, 0.0, 0.5), 0.0, 0.0, false);
    }

    #[test]
    fn gspo_clips_the_sequence_ratio_with_the_sequence_eps() {
        // ln s = −0.1 ⇒ s = 0.9048374; A = 1: max(−0.9048374, −0.9997) = −0.9048374, unclipped,
        // grad −A·s = −0.9048374 (a positive advantage below the range is never clipped)
        assert_token(
            gspo_token(-1.0, -1.0, -0.1, 1.0, 3e-4, 4e-4),
            -0.904_837_418_035_959_6,
            -0.904_837_418_035_959_6,
            false,
        );
        // A = −1: max(0.9048374, 0.9997) = 0.9997 (clipped, grad 0)
        assert_token(
            gspo_token(-1.0, -1.0, -0.1, -1.0, 3e-4, 4e-4),
            0.9997,
            0.0,
            true,
        );
        // on-policy (s = 1) it is −A with gradient −A, as PPO-clip at ρ = 1
        assert_token(
            gspo_token(-2.0, -2.0, 0.0, 0.7, 3e-4, 4e-4),
            -0.7,
            -0.7,
            false,
        );
    }

    #[test]
    fn cispo_clips_and_detaches_the_weight_and_drops_nothing() {
        // ρ = 1.5, A = 2, ε_high = 0.28: w = 1.28 ⇒ loss −1.28·2·(−1) = 2.56, grad −2.56
        // (PPO-clip would zero this token's gradient)
        assert_token(cispo_token(-1.0, 2.0, 1.5, 1.0, 0.28), 2.56, -2.56, false);
        // ρ = 0.1 with ε_low = 1 (no lower bound): w = 0.1 ⇒ loss −0.1·2·(−1) = 0.2, grad −0.2
        assert_token(cispo_token(-1.0, 2.0, 0.1, 1.0, 0.28), 0.2, -0.2, false);
        // ε_low = 0.2: w = 0.8 ⇒ loss 1.6, grad −1.6
        assert_token(cispo_token(-1.0, 2.0, 0.1, 0.2, 0.28), 1.6, -1.6, false);
        // on-policy (ρ = 1) it is REINFORCE
        assert_eq!(
            cispo_token(-0.5, -3.0, 1.0, 1.0, 0.28),
            reinforce_token(-0.5, -3.0)
        );
    }

    #[test]
    fn per_token_gradients_match_central_differences() {
        // Away from clip and clamp boundaries each loss is smooth in ℓ (detached args fixed).
        let h = 1e-6;
        let range = (1e-3_f64.ln(), 1e3_f64.ln());
        type TokenFn<'a> = Box<dyn Fn(f64) -> TokenLoss + 'a>;
        let fns: Vec<(&str, TokenFn)> = vec![
            ("reinforce", Box::new(|l| reinforce_token(l, -0.7))),
            (
                "ppo in",
                Box::new(|l| ppo_clip_token(l, -1.05, 0.9, 0.2, 0.2, None)),
            ),
            (
                "ppo neg out",
                Box::new(|l| ppo_clip_token(l, -1.6, -0.9, 0.2, 0.2, None)),
            ),
            (
                "dual",
                Box::new(|l| ppo_clip_token(l, -2.5, -0.9, 0.2, 0.2, Some(3.0))),
            ),
            (
                "stable",
                Box::new(|l| stable_reinforce_token(l, -1.3, -0.4, 0.2, 0.2, None, range)),
            ),
            (
                "rec opmd",
                Box::new(|l| rec_token(l, -1.2, 0.8, 1.3, true, RecReg::Opmd, 0.1)),
            ),
            (
                "rec asym",
                Box::new(|l| rec_token(l, -1.2, -0.8, 0.7, false, RecReg::Asymre, 0.1)),
            ),
            ("topr", Box::new(|l| topr_token(l, -0.6, 0.4))),
            ("cispo", Box::new(|l| cispo_token(l, -0.6, 1.7, 1.0, 0.28))),
            // ℓ_detached fixed at −1: s_t = s·exp(ℓ + 1) carries the gradient
            (
                "gspo",
                Box::new(|l| gspo_token(l, -1.0, -0.2, 0.6, 0.5, 0.5)),
            ),
        ];
        for (name, f) in fns {
            let l = -1.0;
            let fd = (f(l + h).loss - f(l - h).loss) / (2.0 * h);
            let g = f(l).grad;
            assert!((fd - g).abs() < 1e-6, "{name}: fd {fd} vs analytic {g}");
        }
    }
}

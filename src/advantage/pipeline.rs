//! [`compute`]: a batch of groups → per-response advantages, in this order
//! (docs/algorithms.md#advantage-estimators):
//!
//! 1. validate the config and the shape of every group (errors name group, field, position);
//! 2. correctness per response (`correct`, else raw reward > `positive_threshold`);
//! 3. reward transforms: `reward_correction`, then TempSamp soft shaping (also on `all_rewards`);
//! 4. the estimator, over each group's statistics members (every response, or only the on-policy
//!    ones under TempSamp anchoring, whose ground-truth responses then get factor·max A);
//!    BNPO and the EMA scale of `noisy-backward` use statistics over the whole batch;
//! 5. adjustments: STCR, RED-Weight, the StableReinforce filter, duration weights.
//!
//! `frac_zero_std` is measured on the raw rewards, so it does not depend on the estimator.

use serde::{Deserialize, Serialize};

use super::adjust;
use super::config::{AdvantageConfig, RewardCorrection};
use super::estimators::{all_equal, Prepared};
use super::noisy;
use super::{AdvantageError, AdvantageOutput, Estimator, Group};

/// State carried between batches by the trainer (save it with checkpoints for exact resume).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AdvantageState {
    /// EMA of the batch spread of `noisy-backward`'s unscaled advantages (`noisy.ema_decay`).
    pub noisy_scale_ema: Option<f64>,
}

/// Advantages for a batch of groups with no state from earlier batches: with `noisy.ema_decay`
/// set, `noisy-backward` divides by this batch's spread. The trainer uses [`compute_with_state`].
pub fn compute(cfg: &AdvantageConfig, groups: &[Group]) -> Result<AdvantageOutput, AdvantageError> {
    compute_with_state(cfg, groups, &mut AdvantageState::default())
}

/// [`compute`], updating `state` (the EMA scale of `noisy-backward`) for the next batch.
pub fn compute_with_state(
    cfg: &AdvantageConfig,
    groups: &[Group],
    state: &mut AdvantageState,
) -> Result<AdvantageOutput, AdvantageError> {
    cfg.validate()?;
    check_groups(cfg, groups)?;
    let prepared: Vec<Prepared> = groups.iter().map(|g| prepare(cfg, g)).collect();
    let mut advantages = estimate(cfg, &prepared, state)?;
    check_finite(&advantages, "the estimator")?;

    if cfg.stcr.enabled {
        for (a, (g, p)) in advantages.iter_mut().zip(groups.iter().zip(&prepared)) {
            if let Some(lengths) = &g.lengths {
                *a = adjust::stcr(a, &p.all_correct, lengths, cfg.stcr.base);
            }
        }
    }
    if cfg.red_weight.enabled {
        for a in advantages.iter_mut().flatten() {
            *a = adjust::red_weight(*a, cfg.red_weight.tau);
        }
    }
    let mut filtered = 0;
    if cfg.stable_filter.enabled {
        let weights = token_weights(groups);
        let f = &cfg.stable_filter;
        let (kept, n) = adjust::stable_filter(
            &advantages,
            &weights,
            f.z_threshold,
            f.abs_threshold,
            cfg.eps,
        );
        advantages = kept;
        filtered = n;
    }
    if cfg.duration.enabled {
        let durations: Vec<Vec<f64>> = groups
            .iter()
            .map(|g| g.durations.clone().unwrap_or_default())
            .collect();
        let d = &cfg.duration;
        let weights = adjust::duration_weights(&durations, d.t_min, d.t_floor, d.unparsable);
        for (a, w) in advantages.iter_mut().zip(weights) {
            for (x, wi) in a.iter_mut().zip(w) {
                *x *= wi;
            }
        }
    }
    check_finite(&advantages, "the adjustments")?;

    Ok(AdvantageOutput {
        advantages,
        frac_zero_std: frac_zero_std(groups),
        filtered,
    })
}

/// Fraction of groups of two or more responses whose raw rewards are all equal.
pub fn frac_zero_std(groups: &[Group]) -> f64 {
    if groups.is_empty() {
        return 0.0;
    }
    let zero = groups
        .iter()
        .filter(|g| g.rewards.len() >= 2 && all_equal(&g.rewards))
        .count();
    zero as f64 / groups.len() as f64
}

/// One group after the reward transforms, restricted to its statistics members.
fn prepare(cfg: &AdvantageConfig, g: &Group) -> Prepared {
    let len = g.rewards.len();
    let members: Vec<usize> = match (&g.ground_truth, cfg.tempsamp_anchor.enabled) {
        (Some(gt), true) => (0..len)
            .filter(|&i| !gt.get(i).copied().unwrap_or(false))
            .collect(),
        _ => (0..len).collect(),
    };
    let all_correct: Vec<bool> = match &g.correct {
        Some(c) => c.clone(),
        None => g
            .rewards
            .iter()
            .map(|&r| r > cfg.positive_threshold)
            .collect(),
    };
    let overlong = |i: usize| match (cfg.overlong.budget(), &g.lengths) {
        (Some((max_len, cache)), Some(l)) => {
            adjust::overlong_penalty(l.get(i).copied().unwrap_or(0), max_len, cache)
        }
        _ => 0.0,
    };
    let transformed: Vec<f64> = g
        .rewards
        .iter()
        .enumerate()
        .map(|(i, &r)| transform_reward(cfg, r + overlong(i)))
        .collect();
    let rewards = pick(&transformed, &members);
    let all_rewards = match &g.all_rewards {
        Some(all) => all.iter().map(|&r| transform_reward(cfg, r)).collect(),
        None => rewards.clone(),
    };
    Prepared {
        len,
        correct: pick(&all_correct, &members),
        components: g.components.as_ref().map(|c| pick(c, &members)),
        members,
        rewards,
        all_correct,
        all_rewards,
    }
}

fn pick<T: Clone>(values: &[T], members: &[usize]) -> Vec<T> {
    members
        .iter()
        .filter_map(|&i| values.get(i).cloned())
        .collect()
}

/// Reward correction, then TempSamp soft shaping.
fn transform_reward(cfg: &AdvantageConfig, reward: f64) -> f64 {
    let n = &cfg.noisy;
    let corrected = match cfg.reward_correction {
        RewardCorrection::None => reward,
        RewardCorrection::Backward => noisy::backward_corrected(reward, n.rho0, n.rho1, cfg.eps),
        RewardCorrection::Forward => noisy::forward_corrected(reward, n.rho1),
    };
    let s = &cfg.tempsamp_shaping;
    if s.enabled {
        adjust::soft_shape(corrected, s.tau, s.a1, s.a2)
    } else {
        corrected
    }
}

/// The configured estimator over every group's members, spread back to full groups (ground-truth
/// responses anchored).
fn estimate(
    cfg: &AdvantageConfig,
    prepared: &[Prepared],
    state: &mut AdvantageState,
) -> Result<Vec<Vec<f64>>, AdvantageError> {
    let member_advantages = cfg.estimator.estimate(cfg, prepared, state)?;
    Ok(prepared
        .iter()
        .zip(member_advantages)
        .map(|(p, a)| adjust::anchor(&a, &p.members, p.len, cfg.tempsamp_anchor.factor))
        .collect())
}

/// Token weights of the StableReinforce filter: lengths when given, else 1 per response.
fn token_weights(groups: &[Group]) -> Vec<Vec<f64>> {
    groups
        .iter()
        .map(|g| match &g.lengths {
            Some(l) => l.iter().map(|&x| x as f64).collect(),
            None => vec![1.0; g.rewards.len()],
        })
        .collect()
}

fn check_finite(advantages: &[Vec<f64>], stage: &'static str) -> Result<(), AdvantageError> {
    for (group, a) in advantages.iter().enumerate() {
        if let Some((position, &value)) = a.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(AdvantageError::NonFiniteAdvantage {
                group,
                position,
                value,
                stage,
            });
        }
    }
    Ok(())
}

fn check_len<T>(
    group: usize,
    field: &'static str,
    values: &Option<Vec<T>>,
    expected: usize,
) -> Result<(), AdvantageError> {
    match values {
        Some(v) if v.len() != expected => Err(AdvantageError::LengthMismatch {
            group,
            field,
            found: v.len(),
            expected,
        }),
        _ => Ok(()),
    }
}

fn check_all_finite(
    group: usize,
    field: &'static str,
    values: &[f64],
) -> Result<(), AdvantageError> {
    match values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        Some((position, &value)) => Err(AdvantageError::NonFinite {
            group,
            field,
            position,
            value,
        }),
        None => Ok(()),
    }
}

/// Finite rewards whose sum or squared deviations overflow f64 (e.g. ±1e308) would make every
/// statistic of the group infinite, and a standardised advantage (x − m)/∞ silently 0: an
/// error naming the group and the largest magnitude instead.
fn check_no_overflow(
    group: usize,
    field: &'static str,
    values: &[f64],
) -> Result<(), AdvantageError> {
    let sum_abs: f64 = values.iter().map(|x| x.abs()).sum();
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let sum_sq: f64 = values.iter().map(|x| (x - mean) * (x - mean)).sum();
    if sum_abs.is_finite() && sum_sq.is_finite() {
        return Ok(());
    }
    Err(AdvantageError::Overflow {
        group,
        field,
        largest: values.iter().fold(0.0, |m: f64, x| m.max(x.abs())),
    })
}

/// Shapes, finiteness, and the fields the configured estimator and adjustments need.
fn check_groups(cfg: &AdvantageConfig, groups: &[Group]) -> Result<(), AdvantageError> {
    let mut component_count: Option<usize> = None;
    let uses_components =
        cfg.estimator == Estimator::Bnpo && groups.iter().any(|g| g.components.is_some());
    for (gi, g) in groups.iter().enumerate() {
        let n = g.rewards.len();
        if n == 0 {
            return Err(AdvantageError::EmptyGroup { group: gi });
        }
        check_all_finite(gi, "rewards", &g.rewards)?;
        check_no_overflow(gi, "rewards", &g.rewards)?;
        check_len(gi, "correct", &g.correct, n)?;
        check_len(gi, "lengths", &g.lengths, n)?;
        check_len(gi, "durations", &g.durations, n)?;
        check_len(gi, "ground_truth", &g.ground_truth, n)?;
        check_len(gi, "components", &g.components, n)?;
        if let Some(all) = &g.all_rewards {
            if all.is_empty() {
                return Err(AdvantageError::EmptyField {
                    group: gi,
                    field: "all_rewards",
                });
            }
            check_all_finite(gi, "all_rewards", all)?;
            check_no_overflow(gi, "all_rewards", all)?;
        }
        if let Some(rows) = &g.components {
            for (position, row) in rows.iter().enumerate() {
                let expected = *component_count.get_or_insert(row.len());
                if row.len() != expected {
                    return Err(AdvantageError::ComponentCount {
                        group: gi,
                        position,
                        found: row.len(),
                        expected,
                    });
                }
                check_all_finite(gi, "components", row)?;
            }
        } else if uses_components {
            return Err(AdvantageError::PartialField {
                group: gi,
                field: "components",
                needed_by: "the BNPO decomposition",
            });
        }
        if cfg.stcr.enabled && g.lengths.is_none() {
            return Err(AdvantageError::MissingField {
                group: gi,
                field: "lengths",
                needed_by: "stcr",
            });
        }
        if cfg.overlong.enabled && g.lengths.is_none() {
            return Err(AdvantageError::MissingField {
                group: gi,
                field: "lengths",
                needed_by: "overlong shaping",
            });
        }
        if cfg.duration.enabled && g.durations.is_none() {
            return Err(AdvantageError::MissingField {
                group: gi,
                field: "durations",
                needed_by: "duration weights",
            });
        }
        if cfg.tempsamp_anchor.enabled
            && g.ground_truth
                .as_ref()
                .is_some_and(|gt| gt.iter().all(|&x| x))
        {
            return Err(AdvantageError::NoOnPolicy { group: gi });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{estimators, StdKind};
    use super::*;
    use crate::testing::assert_close;

    fn with(estimator: Estimator) -> AdvantageConfig {
        AdvantageConfig {
            estimator,
            ..AdvantageConfig::default()
        }
    }

    fn groups(rewards: &[&[f64]]) -> Vec<Group> {
        rewards
            .iter()
            .map(|r| Group::from_rewards(r.to_vec()))
            .collect()
    }

    fn run(cfg: &AdvantageConfig, g: &[Group]) -> Vec<Vec<f64>> {
        compute(cfg, g).unwrap().advantages
    }

    #[test]
    fn grpo_reduction_through_compute() {
        // sample std: ±0.5/(0.7071068 + 1e-6) = ±0.7071058; population: ±0.5/(0.5 + 1e-6) = ±0.999998
        let g = groups(&[&[1.0, 0.0]]);
        assert_close(
            &run(&with(Estimator::Grpo), &g)[0],
            &[0.707_105_8, -0.707_105_8],
            1e-6,
        );
        let pop = AdvantageConfig {
            std: StdKind::Population,
            ..AdvantageConfig::default()
        };
        assert_close(&run(&pop, &g)[0], &[0.999_998, -0.999_998], 1e-6);
    }

    #[test]
    fn degenerate_groups_and_frac_zero_std() {
        // [1,1,1] all equal ⇒ zeros, counted; [0.4] singleton ⇒ A = r, not counted; [1,0] counted no
        // ⇒ frac_zero_std = 1/3
        let g = groups(&[&[1.0, 1.0, 1.0], &[0.4], &[1.0, 0.0]]);
        let out = compute(&AdvantageConfig::default(), &g).unwrap();
        assert_eq!(out.advantages[0], vec![0.0; 3]);
        assert_eq!(out.advantages[1], vec![0.4]);
        assert!((out.frac_zero_std - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(out.filtered, 0);
    }

    #[test]
    fn empty_batch_is_fine() {
        let out = compute(&AdvantageConfig::default(), &[]).unwrap();
        assert!(out.advantages.is_empty());
        assert_eq!(out.frac_zero_std, 0.0);
    }

    #[test]
    fn bnpo_with_alpha_beta_one_equals_group_mean_through_compute() {
        let mut cfg = with(Estimator::Bnpo);
        cfg.params.bnpo.alpha = Some(1.0);
        cfg.params.bnpo.beta = Some(1.0);
        let g = groups(&[&[1.0, 0.0, 0.0], &[0.5, 1.0, 0.25, 0.0]]);
        let a = run(&cfg, &g);
        let b = run(&with(Estimator::GroupMean), &g);
        for (x, y) in a.iter().zip(&b) {
            assert_close(x, y, 1e-12);
        }
    }

    #[test]
    fn bnpo_uses_batch_statistics() {
        // batch p = [0.25, 0.5, 0.75] ⇒ α = β = 1.5 ⇒ group 0: [0.75, −0.25×3]/1.1026578
        let g = groups(&[
            &[1.0, 0.0, 0.0, 0.0],
            &[1.0, 1.0, 0.0, 0.0],
            &[1.0, 1.0, 1.0, 0.0],
        ]);
        let a = run(&with(Estimator::Bnpo), &g);
        assert_close(
            &a[0],
            &[0.680_174_8, -0.226_724_9, -0.226_724_9, -0.226_724_9],
            1e-6,
        );
        // the same group alone: one group ⇒ α = β = 1 ⇒ group-mean [0.75, −0.25, −0.25, −0.25]
        let alone = run(&with(Estimator::Bnpo), &g[..1]);
        assert_close(&alone[0], &[0.75, -0.25, -0.25, -0.25], 1e-12);
    }

    #[test]
    fn bnpo_decomposition_through_compute() {
        // fixed α = β = 1; components c0 = [1, 0], c1 = [1, 1] ⇒ [0.5, −0.5] and [0, 0] ⇒ [0.25, −0.25]
        let mut cfg = with(Estimator::Bnpo);
        cfg.params.bnpo.alpha = Some(1.0);
        cfg.params.bnpo.beta = Some(1.0);
        let g = vec![Group {
            components: Some(vec![vec![1.0, 1.0], vec![0.0, 1.0]]),
            ..Group::from_rewards(vec![2.0 / 2.0, 1.0 / 2.0])
        }];
        assert_close(&run(&cfg, &g)[0], &[0.25, -0.25], 1e-12);
    }

    #[test]
    fn bnpo_rejects_rewards_outside_its_range() {
        let g = groups(&[&[0.0, 1.0], &[0.5, 2.0]]);
        let err = compute(&with(Estimator::Bnpo), &g).unwrap_err();
        assert_eq!(
            err,
            AdvantageError::OutOfRange {
                group: 1,
                field: "rewards",
                position: 1,
                value: 2.0,
                min: 0.0,
                max: 1.0
            }
        );
        // a wider range scales 2.0 into [0, 1]: min 0, max 2 ⇒ [0.25, 1] ⇒ fine
        let mut cfg = with(Estimator::Bnpo);
        cfg.params.bnpo.reward_max = 2.0;
        assert!(compute(&cfg, &g).is_ok());
    }

    #[test]
    fn bnpo_components_must_be_given_for_every_group() {
        let mut g = groups(&[&[0.0, 1.0], &[0.0, 1.0]]);
        g[0].components = Some(vec![vec![0.0], vec![1.0]]);
        let err = compute(&with(Estimator::Bnpo), &g).unwrap_err();
        assert!(
            matches!(err, AdvantageError::PartialField { group: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn rloo_is_g_over_g_minus_one_group_mean_through_compute() {
        // G = 4: 4/3 × group-mean
        let g = groups(&[&[1.0, 0.0, 0.5, 0.0]]);
        let gm: Vec<f64> = run(&with(Estimator::GroupMean), &g)[0]
            .iter()
            .map(|a| a * 4.0 / 3.0)
            .collect();
        assert_close(&run(&with(Estimator::Rloo), &g)[0], &gm, 1e-12);
    }

    #[test]
    fn w_reinforce_lambda_one_equals_reinforce_through_compute() {
        let mut cfg = with(Estimator::WReinforce);
        cfg.params.w_reinforce.lambda = 1.0;
        cfg.positive_threshold = 0.0; // correct = reward > 0
        let g = groups(&[&[1.0, -1.0, -1.0], &[-1.0], &[1.0, 1.0]]);
        assert_eq!(run(&cfg, &g), run(&with(Estimator::Reinforce), &g));
    }

    #[test]
    fn correctness_from_threshold_or_flags() {
        // threshold 0.5: [0.9, 0.2] ⇒ [correct, wrong] ⇒ psr [1, 0], nsr [0, −1], w-reinforce [0.1, −1]
        let g = groups(&[&[0.9, 0.2]]);
        assert_eq!(run(&with(Estimator::Psr), &g), vec![vec![1.0, 0.0]]);
        assert_eq!(run(&with(Estimator::Nsr), &g), vec![vec![0.0, -1.0]]);
        assert_eq!(run(&with(Estimator::WReinforce), &g), vec![vec![0.1, -1.0]]);
        // explicit flags win over the threshold
        let flagged = vec![Group {
            correct: Some(vec![false, true]),
            ..g[0].clone()
        }];
        assert_eq!(
            run(&with(Estimator::WReinforce), &flagged),
            vec![vec![-1.0, 0.1]]
        );
    }

    #[test]
    fn overlong_shaping_enters_the_reward_before_the_estimator() {
        // L = 10, C = 2 (free up to 8). Rewards [1, 1, 0] with lengths [4, 9, 12] become
        // [1 + 0, 1 − 0.5, 0 − 1] = [1, 0.5, −1]; group-mean: mean 1/6 ⇒ [5/6, 1/3, −7/6]
        let mut cfg = with(Estimator::GroupMean);
        cfg.overlong = super::super::config::OverlongConfig {
            enabled: true,
            max_len: Some(10),
            cache: Some(2),
        };
        let mut g = groups(&[&[1.0, 1.0, 0.0]]);
        g[0].lengths = Some(vec![4, 9, 12]);
        assert_close(
            &run(&cfg, &g)[0],
            &[5.0 / 6.0, 1.0 / 3.0, -7.0 / 6.0],
            1e-12,
        );
        // the all-equal raw group still counts as zero-variance (measured on raw rewards)
        g[0].rewards = vec![1.0, 1.0, 1.0];
        assert_eq!(compute(&cfg, &g).unwrap().frac_zero_std, 1.0);
        g[0].lengths = None;
        assert!(matches!(
            compute(&cfg, &g),
            Err(AdvantageError::MissingField {
                field: "lengths",
                ..
            })
        ));
        // default cache L/5: L = 10 ⇒ C = 2; no max_len is an error naming it
        cfg.overlong.cache = None;
        assert_eq!(cfg.overlong.budget(), Some((10, 2)));
        cfg.overlong.max_len = None;
        match cfg.validate().unwrap_err() {
            AdvantageError::InvalidConfig { field, .. } => assert_eq!(field, "overlong.max_len"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn asymre_and_opmd_through_compute() {
        // asymre: mean 0.5, baseline 0.4 ⇒ [0.6, −0.4]; opmd τ = 1: [0.3798855, −0.6201145]
        let g = groups(&[&[1.0, 0.0]]);
        assert_close(&run(&with(Estimator::Asymre), &g)[0], &[0.6, -0.4], 1e-12);
        assert_close(
            &run(&with(Estimator::Opmd), &g)[0],
            &[0.379_885_5, -0.620_114_5],
            1e-7,
        );
    }

    #[test]
    fn global_mean_through_compute() {
        // all_rewards mean 0.25 ⇒ [0.75, −0.25]; without all_rewards ⇒ group-mean [0.5, −0.5]
        let mut g = groups(&[&[1.0, 0.0], &[1.0, 0.0]]);
        g[0].all_rewards = Some(vec![1.0, 0.0, 0.0, 0.0]);
        let a = run(&with(Estimator::GlobalMean), &g);
        assert_close(&a[0], &[0.75, -0.25], 1e-12);
        assert_close(&a[1], &[0.5, -0.5], 1e-12);
    }

    #[test]
    fn correction_then_grpo_equals_raw_grpo_and_is_rejected() {
        // The noisy-verifier warning: z-scoring cancels the correction (compare the pure functions) ...
        let raw = [1.0, 0.0, 0.0, 1.0];
        let corrected: Vec<f64> = raw
            .iter()
            .map(|&r| noisy::backward_corrected(r, 0.1, 0.2, 1e-6))
            .collect();
        assert_close(
            &estimators::grpo(&corrected, StdKind::Sample, 1e-6),
            &estimators::grpo(&raw, StdKind::Sample, 1e-6),
            1e-5,
        );
        // ... so compute refuses the config.
        let mut cfg = with(Estimator::Grpo);
        cfg.reward_correction = RewardCorrection::Backward;
        cfg.noisy.rho0 = 0.1;
        cfg.noisy.rho1 = 0.2;
        let msg = compute(&cfg, &groups(&[&raw])).unwrap_err().to_string();
        assert!(msg.contains("cancels any affine correction"), "{msg}");
    }

    #[test]
    fn backward_correction_before_group_mean() {
        // r̂ = (r − 0.1)/0.7 ⇒ group-mean of r̂ = (r − r̄)/0.7 ⇒ [0.5, −0.5]/0.7 = ±0.7142857
        let mut cfg = with(Estimator::GroupMean);
        cfg.reward_correction = RewardCorrection::Backward;
        cfg.noisy.rho0 = 0.1;
        cfg.noisy.rho1 = 0.2;
        assert_close(
            &run(&cfg, &groups(&[&[1.0, 0.0]]))[0],
            &[0.714_285_7, -0.714_285_7],
            1e-7,
        );
    }

    #[test]
    fn noisy_forward_through_compute() {
        // ρ₁ = 0.2, s = 2: observed 1 ⇒ 0.2/2 = 0.1, observed 0 ⇒ −0.8/2 = −0.4
        let mut cfg = with(Estimator::NoisyForward);
        cfg.noisy.rho1 = 0.2;
        cfg.noisy.scale = 2.0;
        assert_close(&run(&cfg, &groups(&[&[1.0, 0.0]]))[0], &[0.1, -0.4], 1e-12);
    }

    #[test]
    fn noisy_backward_ema_scale_carries_across_batches() {
        // ρ = 0: r̂ = r. Batch 1 [1, 0]: LOO = [1, −1], spread 1 ⇒ EMA 1 ⇒ A = [1, −1].
        // Batch 2 [1, 0, 0]: LOO = [1, −0.5, −0.5], population std of those = sqrt(0.5) = 0.7071068
        // ⇒ EMA = 0.9·1 + 0.1·0.7071068 = 0.9707107 ⇒ A = [1.0301731, −0.5150865, −0.5150865]
        let mut cfg = with(Estimator::NoisyBackward);
        cfg.noisy.ema_decay = Some(0.9);
        let mut state = AdvantageState::default();
        let a1 = compute_with_state(&cfg, &groups(&[&[1.0, 0.0]]), &mut state).unwrap();
        assert_close(&a1.advantages[0], &[1.0, -1.0], 1e-12);
        let a2 = compute_with_state(&cfg, &groups(&[&[1.0, 0.0, 0.0]]), &mut state).unwrap();
        assert_close(
            &a2.advantages[0],
            &[1.030_173_1, -0.515_086_5, -0.515_086_5],
            1e-6,
        );
        assert!((state.noisy_scale_ema.unwrap() - 0.970_710_7).abs() < 1e-6);
    }

    #[test]
    fn noisy_backward_fixed_scale_through_compute() {
        // ρ₀ = 0.1, ρ₁ = 0.2, s = 2: [1, 0, 0] ⇒ [10/7, −5/7, −5/7]/2 (see noisy.rs)
        let mut cfg = with(Estimator::NoisyBackward);
        cfg.noisy.rho0 = 0.1;
        cfg.noisy.rho1 = 0.2;
        cfg.noisy.scale = 2.0;
        assert_close(
            &run(&cfg, &groups(&[&[1.0, 0.0, 0.0]]))[0],
            &[0.714_285_7, -0.357_142_9, -0.357_142_9],
            1e-7,
        );
    }

    #[test]
    fn tempsamp_anchoring_through_compute() {
        // ground truth at 0; on-policy [0, 1, 0]: mean 1/3, sample std sqrt(1/3) = 0.5773503
        // ⇒ A = [−0.5773493, 1.1546985, −0.5773493]; A_GT = 1.2 × 1.1546985 = 1.3856382
        let mut cfg = with(Estimator::Grpo);
        cfg.tempsamp_anchor.enabled = true;
        let g = vec![Group {
            ground_truth: Some(vec![true, false, false, false]),
            ..Group::from_rewards(vec![1.0, 0.0, 1.0, 0.0])
        }];
        assert_close(
            &run(&cfg, &g)[0],
            &[1.385_638_2, -0.577_349_3, 1.154_698_5, -0.577_349_3],
            1e-6,
        );
        // all responses ground truth ⇒ no on-policy statistics ⇒ error naming the group
        let bad = vec![Group {
            ground_truth: Some(vec![true, true]),
            ..Group::from_rewards(vec![1.0, 1.0])
        }];
        assert_eq!(
            compute(&cfg, &bad).unwrap_err(),
            AdvantageError::NoOnPolicy { group: 0 }
        );
    }

    #[test]
    fn tempsamp_soft_shaping_through_compute() {
        // shaped [1, 0] = [0.8018232, 0.0867637], mean 0.4442935 ⇒ group-mean ±0.3575298
        let mut cfg = with(Estimator::GroupMean);
        cfg.tempsamp_shaping.enabled = true;
        assert_close(
            &run(&cfg, &groups(&[&[1.0, 0.0]]))[0],
            &[0.357_529_7, -0.357_529_7],
            1e-7,
        );
    }

    #[test]
    fn stcr_through_compute() {
        // group-mean of [1, 0, 0] = [2/3, −1/3, −1/3]; correct length 10; response 1 has Δ = 10,
        // base 2 ⇒ ×(2 − 2^−10) = ×1.9990234 ⇒ −0.6663411; response 2 is shorter ⇒ unchanged
        let mut cfg = with(Estimator::GroupMean);
        cfg.stcr.enabled = true;
        cfg.stcr.base = 2.0;
        let g = vec![Group {
            lengths: Some(vec![10, 20, 5]),
            ..Group::from_rewards(vec![1.0, 0.0, 0.0])
        }];
        assert_close(
            &run(&cfg, &g)[0],
            &[2.0 / 3.0, -0.666_341_1, -1.0 / 3.0],
            1e-7,
        );
        let err = compute(&cfg, &groups(&[&[1.0, 0.0]])).unwrap_err();
        assert_eq!(
            err,
            AdvantageError::MissingField {
                group: 0,
                field: "lengths",
                needed_by: "stcr"
            }
        );
    }

    #[test]
    fn red_weight_through_compute() {
        // group-mean ±0.5 ⇒ 0.5·e^0.5 = 0.8243606, −0.5·e^−0.5 = −0.3032653
        let mut cfg = with(Estimator::GroupMean);
        cfg.red_weight.enabled = true;
        assert_close(
            &run(&cfg, &groups(&[&[1.0, 0.0]]))[0],
            &[0.824_360_6, -0.303_265_3],
            1e-7,
        );
    }

    #[test]
    fn rewards_whose_variance_overflows_are_refused() {
        // [1e308, −1e308]: mean 0, squared deviations 1e616 = ∞, std ∞ ⇒ GRPO's A = x/∞ = 0.
        for rewards in [&[1e308, -1e308][..], &[1e308, 1e308, 0.0], &[-1e200, 1e200]] {
            let err =
                compute(&with(Estimator::Grpo), &groups(&[&[0.0, 1.0], rewards])).unwrap_err();
            assert!(
                matches!(
                    err,
                    AdvantageError::Overflow {
                        group: 1,
                        field: "rewards",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("overflows f64"), "{err}");
        }
        // 1e150: squared deviations 2 · (1e150)² = 2e300 fit.
        let out = compute(&with(Estimator::Grpo), &groups(&[&[1e150, -1e150]])).unwrap();
        let inv_sqrt2 = std::f64::consts::FRAC_1_SQRT_2; // 1e150/√(2e300)
        assert_close(&out.advantages[0], &[inv_sqrt2, -inv_sqrt2], 1e-6);
    }

    #[test]
    fn overflowing_advantages_are_an_error_unless_filtered() {
        // reinforce of 800 with RED-Weight: 800·e^800 = ∞
        let mut cfg = with(Estimator::Reinforce);
        cfg.red_weight.enabled = true;
        let g = groups(&[&[800.0, 0.0]]);
        let err = compute(&cfg, &g).unwrap_err();
        assert!(
            matches!(
                err,
                AdvantageError::NonFiniteAdvantage {
                    group: 0,
                    position: 0,
                    ..
                }
            ),
            "{err}"
        );
        cfg.stable_filter.enabled = true;
        let out = compute(&cfg, &g).unwrap();
        assert_eq!((out.advantages, out.filtered), (vec![vec![0.0, 0.0]], 1));
    }

    #[test]
    fn stable_filter_through_compute_uses_lengths() {
        // reinforce [0, 1] with lengths [10, 1]: weighted z of the 1 is 3.162 > 3 ⇒ zeroed
        let mut cfg = with(Estimator::Reinforce);
        cfg.stable_filter.enabled = true;
        let g = vec![Group {
            lengths: Some(vec![10, 1]),
            ..Group::from_rewards(vec![0.0, 1.0])
        }];
        let out = compute(&cfg, &g).unwrap();
        assert_eq!((out.advantages, out.filtered), (vec![vec![0.0, 0.0]], 1));
        // without lengths each response weighs 1 ⇒ |z| = 1 ⇒ kept
        let out = compute(&cfg, &groups(&[&[0.0, 1.0]])).unwrap();
        assert_eq!((out.advantages, out.filtered), (vec![vec![0.0, 1.0]], 0));
    }

    #[test]
    fn duration_weights_through_compute() {
        // reinforce [1, 1] and [1]; Δt = [1, 3] and unparsable (−1) ⇒ 1.0; mean 5/3
        // ⇒ w = [0.6, 1.8] and [0.6]
        let mut cfg = with(Estimator::Reinforce);
        cfg.duration.enabled = true;
        let g = vec![
            Group {
                durations: Some(vec![1.0, 3.0]),
                ..Group::from_rewards(vec![1.0, 1.0])
            },
            Group {
                durations: Some(vec![-1.0]),
                ..Group::from_rewards(vec![1.0])
            },
        ];
        let a = run(&cfg, &g);
        assert_close(&a[0], &[0.6, 1.8], 1e-12);
        assert_close(&a[1], &[0.6], 1e-12);
        let err = compute(&cfg, &groups(&[&[1.0]])).unwrap_err();
        assert!(
            matches!(
                err,
                AdvantageError::MissingField {
                    field: "durations",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn reduction_equal_durations_are_unweighted() {
        // every Δt the same ⇒ every w_i = Δt / mean Δt = 1 ⇒ the estimator's advantages, bitwise
        let plain = with(Estimator::Grpo);
        let mut weighted = plain.clone();
        weighted.duration.enabled = true;
        let mut g = groups(&[&[1.0, 0.0, 0.5], &[0.2, 0.9]]);
        let unweighted = run(&plain, &g);
        for grp in &mut g {
            grp.durations = Some(vec![2.5; grp.rewards.len()]);
        }
        assert_eq!(run(&weighted, &g), unweighted);
    }

    #[test]
    fn ragged_inputs_name_group_and_field() {
        let mut g = groups(&[&[1.0, 0.0], &[1.0, 0.0, 0.0]]);
        g[1].lengths = Some(vec![3, 4]);
        let err = compute(&AdvantageConfig::default(), &g).unwrap_err();
        assert_eq!(
            err.to_string(),
            "group 1: `lengths` has 2 entries but `rewards` has 3"
        );
        let mut g = groups(&[&[1.0, 0.0]]);
        g[0].correct = Some(vec![true]);
        let err = compute(&AdvantageConfig::default(), &g).unwrap_err();
        assert_eq!(
            err,
            AdvantageError::LengthMismatch {
                group: 0,
                field: "correct",
                found: 1,
                expected: 2
            }
        );
    }

    #[test]
    fn ragged_components_are_rejected() {
        let mut g = groups(&[&[1.0, 0.0]]);
        g[0].components = Some(vec![vec![1.0, 0.0], vec![1.0]]);
        let err = compute(&with(Estimator::Bnpo), &g).unwrap_err();
        assert_eq!(
            err,
            AdvantageError::ComponentCount {
                group: 0,
                position: 1,
                found: 1,
                expected: 2
            }
        );
    }

    #[test]
    fn non_finite_and_empty_inputs_are_errors() {
        let g = groups(&[&[1.0], &[0.0, f64::NAN]]);
        let err = compute(&AdvantageConfig::default(), &g).unwrap_err();
        assert_eq!(
            err.to_string(),
            "group 1: `rewards[1]` is NaN; expected a finite number"
        );
        let g = groups(&[&[1.0], &[]]);
        assert_eq!(
            compute(&AdvantageConfig::default(), &g).unwrap_err(),
            AdvantageError::EmptyGroup { group: 1 }
        );
        let mut g = groups(&[&[1.0, 0.0]]);
        g[0].all_rewards = Some(vec![]);
        assert!(matches!(
            compute(&with(Estimator::GlobalMean), &g).unwrap_err(),
            AdvantageError::EmptyField {
                group: 0,
                field: "all_rewards"
            }
        ));
    }

    #[test]
    fn invalid_config_is_rejected_before_computing() {
        let cfg = AdvantageConfig {
            eps: -1.0,
            ..AdvantageConfig::default()
        };
        assert!(matches!(
            compute(&cfg, &groups(&[&[1.0, 0.0]])).unwrap_err(),
            AdvantageError::InvalidConfig { .. }
        ));
    }
}

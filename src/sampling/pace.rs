//! Time-paced sample streams (`sampling.pace = "time"`, docs/algorithms.md#duration-aware-updates).
//!
//! Asynchronous agents hand the learner their actions as they finish, so over a short window
//! an action that takes Δt reaches it with probability ∝ 1/Δt: the stream holds action a in
//! proportion to π(a)/Δt_a, not π(a). grove's explorer produces samples at a pace set by
//! computation; this module makes the stream's composition follow the simulated durations
//! instead, by thinning: each sampled episode is kept with probability window/Δt_i (the window
//! at most the shortest Δt), and more episodes of the same start are drawn until every group is
//! full.
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What sets the composition of the sample stream (`sampling.pace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pace {
    /// Every sampled episode reaches the learner: the stream follows the policy's choices.
    #[default]
    Compute,
    /// Episodes reach the learner at the rate their actions finish: each is kept with
    /// probability `sampling.pace_window_s` / Δt (thinning), Δt its simulated duration.
    Time,
}

/// Why a paced batch could not be filled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PaceError {
    /// An episode took less than the window: its keep probability would exceed 1, so the
    /// stream could not be ∝ π/Δt.
    #[error(
        "an episode of group {group} took Δt = {dt} s, less than sampling.pace_window_s = \
         {window} s (the window must be at most the shortest episode's duration)"
    )]
    ShorterThanWindow { group: usize, dt: f64, window: f64 },
    /// A duration that is not a finite positive number of seconds.
    #[error("an episode of group {group} has duration {dt}, expected a finite number > 0")]
    BadDuration { group: usize, dt: f64 },
    /// The sampler returned another number of items than asked (a broken invariant).
    #[error("a round asked for {asked} episodes and got {got}")]
    ShortDraw { asked: usize, got: usize },
    /// The round cap was reached with a group still short.
    #[error(
        "group {group} kept {kept} of the {size} episodes it needs after {rounds} rounds of \
         draws (sampling.pace_max_rounds); raise it, or sampling.pace_window_s if the episodes \
         are long"
    )]
    Unfilled {
        group: usize,
        kept: usize,
        size: usize,
        rounds: usize,
    },
}

impl From<PaceError> for crate::error::Error {
    fn from(e: PaceError) -> Self {
        let key = match e {
            PaceError::Unfilled { .. } => "sampling.pace_max_rounds",
            PaceError::ShortDraw { .. } => {
                return crate::error::Error::Internal(format!("sampling.pace: {e}"))
            }
            _ => "sampling.pace_window_s",
        };
        crate::error::Error::config(key, e.to_string())
    }
}

/// The probability that an episode of duration `dt` reaches the learner: window / Δt.
/// `group` names the episode's group in errors.
pub fn keep_probability(dt: f64, window: f64, group: usize) -> Result<f64, PaceError> {
    if !(dt.is_finite() && dt > 0.0) {
        return Err(PaceError::BadDuration { group, dt });
    }
    if dt < window {
        return Err(PaceError::ShorterThanWindow { group, dt, window });
    }
    Ok(window / dt)
}

/// `groups` groups of `size` items, each item drawn by `draw` and kept with probability
/// window / `duration(item)`. Round after round, `draw(&[(group, n), ...])` returns the `n`
/// missing items of every unfilled group, in request order; each drawn item takes one uniform
/// u from `rng`, in draw order, and is kept when u < window/Δt. Returns, per group, every drawn
/// item in draw order with its keep flag (exactly `size` kept), or an error when a group is
/// still short after `max_rounds` rounds.
pub fn fill_paced<T, E: From<PaceError>>(
    (groups, size): (usize, usize),
    (window, max_rounds): (f64, usize),
    duration: impl Fn(&T) -> f64,
    rng: &mut impl Rng,
    mut draw: impl FnMut(&[(usize, usize)]) -> Result<Vec<T>, E>,
) -> Result<Vec<Vec<(T, bool)>>, E> {
    let mut out: Vec<Vec<(T, bool)>> = (0..groups).map(|_| Vec::new()).collect();
    let mut kept = vec![0usize; groups];
    for _ in 0..max_rounds {
        let requests: Vec<(usize, usize)> = (0..groups)
            .filter(|&g| kept[g] < size)
            .map(|g| (g, size - kept[g]))
            .collect();
        if requests.is_empty() {
            break;
        }
        let items = draw(&requests)?;
        let asked = requests.iter().map(|r| r.1).sum();
        if items.len() != asked {
            return Err(PaceError::ShortDraw {
                asked,
                got: items.len(),
            }
            .into());
        }
        let mut items = items.into_iter();
        for &(g, n) in &requests {
            for item in items.by_ref().take(n) {
                let p = keep_probability(duration(&item), window, g)?;
                let keep = rng.gen::<f64>() < p;
                kept[g] += usize::from(keep);
                out[g].push((item, keep));
            }
        }
    }
    if let Some(g) = (0..groups).find(|&g| kept[g] < size) {
        return Err(PaceError::Unfilled {
            group: g,
            kept: kept[g],
            size,
            rounds: max_rounds,
        }
        .into());
    }
    Ok(out)
}

/// What a batch's stream kept of what was drawn (`sampling/pace_*` metrics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamStats {
    pub kept: usize,
    pub drawn: usize,
    /// Mean reward of every drawn sample, kept or not: the policy's own reward per episode.
    pub drawn_reward_mean: f64,
}

impl StreamStats {
    /// Kept / drawn.
    pub fn kept_frac(&self) -> f64 {
        self.kept as f64 / self.drawn.max(1) as f64
    }
}

/// [`StreamStats`] of a batch's groups, each given as (the rewards of its kept samples, the
/// rewards of every sample drawn for it, empty when all were kept).
pub fn stream_stats<'a>(groups: impl IntoIterator<Item = (Vec<f64>, &'a [f64])>) -> StreamStats {
    let (mut kept, mut drawn, mut sum) = (0usize, 0usize, 0.0);
    for (kept_rewards, drawn_rewards) in groups {
        kept += kept_rewards.len();
        let all = if drawn_rewards.is_empty() {
            kept_rewards.as_slice()
        } else {
            drawn_rewards
        };
        drawn += all.len();
        sum += all.iter().sum::<f64>();
    }
    StreamStats {
        kept,
        drawn,
        drawn_reward_mean: sum / drawn.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn keep_probability_is_the_window_over_the_duration() {
        assert_eq!(keep_probability(1.0, 1.0, 0), Ok(1.0));
        assert_eq!(keep_probability(4.0, 1.0, 0), Ok(0.25));
        assert_eq!(keep_probability(3.0, 1.5, 0), Ok(0.5));
        assert_eq!(
            keep_probability(0.5, 1.0, 2),
            Err(PaceError::ShorterThanWindow {
                group: 2,
                dt: 0.5,
                window: 1.0
            })
        );
        assert!(matches!(
            keep_probability(f64::NAN, 1.0, 0),
            Err(PaceError::BadDuration { .. })
        ));
        let e: crate::error::Error = PaceError::ShorterThanWindow {
            group: 2,
            dt: 0.5,
            window: 1.0,
        }
        .into();
        assert!(e.to_string().contains("sampling.pace_window_s"), "{e}");
    }

    #[test]
    fn stream_stats_by_hand() {
        // group 1 kept 2 of 4 drawn (rewards 1, 2 kept; 2, 2 dropped); group 2 kept all 2.
        let drawn = [1.0, 2.0, 2.0, 2.0];
        let s = stream_stats([(vec![1.0, 2.0], &drawn[..]), (vec![1.0, 3.0], &[][..])]);
        assert_eq!((s.kept, s.drawn), (4, 6));
        assert!((s.kept_frac() - 4.0 / 6.0).abs() < 1e-12);
        assert!((s.drawn_reward_mean - 11.0 / 6.0).abs() < 1e-12);
    }

    /// A fixed stream of uniforms (as bits a ChaCha-free `Rng` returns) to check the rule by hand.
    struct Uniforms(std::vec::IntoIter<f64>);
    impl rand::RngCore for Uniforms {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            // rand's f64 in [0, 1) is (x >> 11) · 2⁻⁵³: this x gives back exactly u.
            let u = self.0.next().expect("more uniforms than planned");
            ((u * (1u64 << 53) as f64) as u64) << 11
        }
        fn fill_bytes(&mut self, _: &mut [u8]) {
            unreachable!()
        }
        fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand::Error> {
            unreachable!()
        }
    }

    #[test]
    fn thinning_by_hand() {
        // Items are durations; group 0 draws [1, 3], group 1 draws [3, 3] in round 1.
        // window 1 ⇒ p = 1, 1/3, 1/3, 1/3. Uniforms 0.9, 0.2, 0.5, 0.3 ⇒ keep, keep, drop,
        // keep. Round 2: group 1 needs 1 more ⇒ draws [3] (p 1/3), u = 0.4 ⇒ drop;
        // round 3: [1] (p 1), u = 0.99 ⇒ keep.
        let mut rounds = vec![vec![1.0, 3.0, 3.0, 3.0], vec![3.0], vec![1.0]].into_iter();
        let mut asked = Vec::new();
        let mut rng = Uniforms(vec![0.9, 0.2, 0.5, 0.3, 0.4, 0.99].into_iter());
        let out = fill_paced::<f64, PaceError>(
            (2, 2),
            (1.0, 5),
            |&d| d,
            &mut rng,
            |req| {
                asked.push(req.to_vec());
                Ok(rounds.next().unwrap())
            },
        )
        .unwrap();
        assert_eq!(
            asked,
            vec![vec![(0, 2), (1, 2)], vec![(1, 1)], vec![(1, 1)]]
        );
        assert_eq!(out[0], vec![(1.0, true), (3.0, true)]);
        assert_eq!(
            out[1],
            vec![(3.0, false), (3.0, true), (3.0, false), (1.0, true)]
        );
    }

    /// Reduction: every duration equal to the window ⇒ every item kept, one round, the same
    /// items in the same order as an unpaced draw.
    #[test]
    fn durations_at_the_window_keep_everything() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut calls = 0;
        let out = fill_paced::<u32, PaceError>(
            (3, 4),
            (2.5, 1),
            |_| 2.5,
            &mut rng,
            |req| {
                calls += 1;
                Ok((0..req.iter().map(|r| r.1).sum::<usize>() as u32).collect())
            },
        )
        .unwrap();
        assert_eq!(calls, 1);
        let flat: Vec<(u32, bool)> = out.into_iter().flatten().collect();
        assert_eq!(flat, (0..12).map(|i| (i, true)).collect::<Vec<_>>());
    }

    #[test]
    fn the_round_cap_and_short_episodes_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // p = 1e-9: nothing is kept in 3 rounds.
        let e = fill_paced::<f64, PaceError>(
            (1, 2),
            (1.0, 3),
            |&d| d,
            &mut rng,
            |req| Ok(vec![1e9; req[0].1]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            PaceError::Unfilled {
                group: 0,
                kept: 0,
                size: 2,
                rounds: 3
            }
        );
        let e: crate::error::Error = e.into();
        assert!(e.to_string().contains("sampling.pace_max_rounds"), "{e}");
        let e = fill_paced::<f64, PaceError>(
            (2, 1),
            (1.0, 3),
            |&d| d,
            &mut rng,
            |req| {
                Ok(req
                    .iter()
                    .map(|&(g, _)| if g == 1 { 0.5 } else { 1.0 })
                    .collect())
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            PaceError::ShorterThanWindow {
                group: 1,
                dt: 0.5,
                window: 1.0
            }
        );
    }

    /// The kept stream's composition: arms drawn with π = (0.6, 0.4), durations (1, 3) s,
    /// window 1 s ⇒ a kept item is arm 2 with q₂ = (0.4/3)/(0.6 + 0.4/3) = 2/11. Over n kept
    /// items the count of arm 2 is binomial(n, q₂) given n; the test allows 4 sd.
    #[test]
    fn kept_arms_follow_pi_over_duration() {
        let (pi2, d) = (0.4, [1.0, 3.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut arms = ChaCha8Rng::seed_from_u64(8);
        let out = fill_paced::<usize, PaceError>(
            (200, 25),
            (1.0, 100),
            |&a| d[a],
            &mut rng,
            |req| {
                let n: usize = req.iter().map(|r| r.1).sum();
                Ok((0..n)
                    .map(|_| usize::from(arms.gen::<f64>() < pi2))
                    .collect())
            },
        )
        .unwrap();
        let kept: Vec<usize> = out
            .iter()
            .flatten()
            .filter(|(_, k)| *k)
            .map(|(a, _)| *a)
            .collect();
        let n = kept.len() as f64;
        assert_eq!(n, 5000.0);
        let q2 = (pi2 / d[1]) / ((1.0 - pi2) / d[0] + pi2 / d[1]);
        let got = kept.iter().sum::<usize>() as f64;
        let sd = (n * q2 * (1.0 - q2)).sqrt();
        assert!(
            (got - n * q2).abs() < 4.0 * sd,
            "arm 2 kept {got} times, expected {} ± {sd}",
            n * q2
        );
        // The drawn items follow π itself (the thinning acts on the stream only).
        let drawn: Vec<usize> = out.iter().flatten().map(|(a, _)| *a).collect();
        let m = drawn.len() as f64;
        let sd_pi = (m * pi2 * (1.0 - pi2)).sqrt();
        let got_pi = drawn.iter().sum::<usize>() as f64;
        assert!((got_pi - m * pi2).abs() < 4.0 * sd_pi, "{got_pi} of {m}");
        // Unweighted, arm 2 would be 40% of the stream: far outside the band above.
        assert!((n * pi2 - n * q2).abs() > 10.0 * sd);
    }
}

//! Drawing one token from a row of logits: inverse CDF over the tempered softmax, one uniform
//! per token and no per-entry random draws (PyTorch's `multinomial` draws an exponential per
//! vocabulary entry, two thirds of HF `generate`'s time on a 50k vocabulary).
//!
//! Per row: one pass for the max, one vectorised pass that writes e_i = exp((x_i − max)/T) and
//! sums them, then the CDF walk over blocks of 64 (block sums first, one block scanned), so the
//! walk is not a 50k-long chain of dependent additions. Top-p keeps the smallest set of most
//! probable tokens whose mass reaches p, found by partial selection (doubling k with
//! `select_nth_unstable`) instead of sorting the vocabulary.
use std::cmp::Ordering;

use super::SamplingParams;
use crate::model::fused::{fast_exp, lane_max, lane_sum};

/// Working memory reused across rows.
#[derive(Default)]
pub struct Scratch {
    e: Vec<f32>,
    /// Σ e over each block of [`BLOCK`] entries, reused by the CDF walk.
    blocks: Vec<f64>,
    idx: Vec<u32>,
}

const BLOCK: usize = 64;

/// Writes e_i = exp((x_i − max)·inv_t) into `s.e` and the per-block sums into `s.blocks`;
/// returns Σ e_i. Blocks are summed in f32 lanes (vectorised) and added in f64: accurate enough
/// (relative error ~1e-7) for a normaliser.
fn exps(logits: &[f32], max: f32, inv_t: f32, s: &mut Scratch) -> f64 {
    s.e.clear();
    s.e.extend(logits.iter().map(|&x| fast_exp((x - max) * inv_t)));
    s.blocks.clear();
    s.blocks
        .extend(s.e.chunks(BLOCK).map(|blk| lane_sum(blk) as f64));
    s.blocks.iter().sum()
}

/// Index where the running sum of `w` first exceeds `target`: whole blocks by their sums,
/// then one block entry by entry; the last index when rounding leaves the target unreached.
fn cdf_walk(w: &[f32], blocks: &[f64], target: f64) -> usize {
    let mut acc = 0f64;
    for (b, (blk, &sum)) in w.chunks(BLOCK).zip(blocks).enumerate() {
        if acc + sum > target {
            for (i, &v) in blk.iter().enumerate() {
                acc += v as f64;
                if acc > target {
                    return b * BLOCK + i;
                }
            }
            return b * BLOCK + blk.len() - 1;
        }
        acc += sum;
    }
    w.len().saturating_sub(1)
}

/// Descending probability, ties by ascending id: a total order, so the kept set is unique.
fn by_prob_desc(e: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + '_ {
    move |&a, &b| e[b as usize].total_cmp(&e[a as usize]).then(a.cmp(&b))
}

/// The token for uniform `u` ∈ [0, 1) and its log-prob under the tempered (untruncated)
/// distribution. Greedy (T = 0) ignores `u`.
pub fn sample_with_uniform(
    logits: &[f32],
    params: &SamplingParams,
    u: f64,
    s: &mut Scratch,
) -> (u32, f32) {
    let n = logits.len();
    if n == 0 {
        return (0, f32::NEG_INFINITY);
    }
    let greedy = params.temperature == 0.0;
    let inv_t = if greedy {
        1.0
    } else {
        (1.0 / params.temperature) as f32
    };
    let max = lane_max(logits);
    let z = exps(logits, max, inv_t, s);
    let log_z = z.ln();
    let logprob = |i: usize| (((logits[i] - max) * inv_t) as f64 - log_z) as f32;
    if greedy {
        // First index of the maximum.
        let best = logits.iter().position(|&x| x == max).unwrap_or(0);
        return (best as u32, logprob(best));
    }
    if params.top_p >= 1.0 {
        let i = cdf_walk(&s.e, &s.blocks, u * z);
        return (i as u32, logprob(i));
    }
    // Top-p: grow k until the top-k mass reaches p.
    let need = params.top_p * z;
    let e = std::mem::take(&mut s.e);
    s.idx.clear();
    s.idx.extend(0..n as u32);
    let mut k = 64.min(n);
    let kept = loop {
        if k < n {
            s.idx.select_nth_unstable_by(k - 1, by_prob_desc(&e));
        }
        let top = &mut s.idx[..k];
        top.sort_unstable_by(by_prob_desc(&e));
        let mut mass = 0f64;
        let mut keep = 0;
        for &i in top.iter() {
            mass += e[i as usize] as f64;
            keep += 1;
            if mass >= need {
                break;
            }
        }
        if mass >= need || k == n {
            break keep;
        }
        k = (2 * k).min(n);
    };
    let mass: f64 = s.idx[..kept].iter().map(|&i| e[i as usize] as f64).sum();
    let target = u * mass;
    let mut acc = 0f64;
    let mut pick = s.idx[kept - 1];
    for &i in &s.idx[..kept] {
        acc += e[i as usize] as f64;
        if acc > target {
            pick = i;
            break;
        }
    }
    s.e = e;
    (pick, logprob(pick as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn params(t: f64, p: f64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p: p,
            max_new_tokens: 1,
        }
    }

    /// Reference: the plain f64 inverse CDF over the full sorted-by-index distribution.
    fn reference(logits: &[f32], t: f64, u: f64) -> usize {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&x| ((x as f64 - max) / t).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut acc = 0.0;
        for (i, wi) in w.iter().enumerate() {
            acc += wi;
            if acc > u * z {
                return i;
            }
        }
        w.len() - 1
    }

    #[test]
    fn inverse_cdf_matches_the_f64_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let logits: Vec<f32> = (0..5000).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
        let mut s = Scratch::default();
        let mut same = 0;
        for _ in 0..500 {
            let u: f64 = rng.gen();
            let (tok, lp) = sample_with_uniform(&logits, &params(0.7, 1.0), u, &mut s);
            // Only a u within rounding distance of a CDF step may pick a neighbour.
            let r = reference(&logits, 0.7, u);
            assert!((tok as i64 - r as i64).abs() <= 1);
            same += (tok as usize == r) as usize;
            // log p = (x − max)/T − ln Σ e^{(x_j − max)/T}, checked in f64.
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lz = logits
                .iter()
                .map(|&x| ((x as f64 - max) / 0.7).exp())
                .sum::<f64>()
                .ln();
            let want = (logits[tok as usize] as f64 - max) / 0.7 - lz;
            assert!((lp as f64 - want).abs() < 1e-4, "{lp} vs {want}");
        }
        assert!(same >= 495, "only {same}/500 identical");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let (tok, lp) = sample_with_uniform(
            &[1.0, 3.0, 3.0, 0.0],
            &params(0.0, 1.0),
            0.5,
            &mut Scratch::default(),
        );
        assert_eq!(tok, 1);
        // 3 − ln(e¹ + 2e³ + e⁰) = 3 − ln 43.889403 = 3 − 3.781672 = −0.781672
        assert!((lp as f64 + 0.781672).abs() < 1e-5);
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        // p ∝ e^{x}; with a 300-token vocabulary the nucleus spans more than the first
        // selection of 64, so k doubles. Reference: full sort.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let logits: Vec<f32> = (0..300).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let p = 0.9;
        let w: Vec<f64> = logits.iter().map(|&x| (x as f64).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..300).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let mut nucleus = std::collections::HashSet::new();
        for &i in &order {
            mass += w[i] / z;
            nucleus.insert(i);
            if mass >= p {
                break;
            }
        }
        assert!(nucleus.len() > 64 && nucleus.len() < 300);
        let mut s = Scratch::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20000 {
            let (tok, _) = sample_with_uniform(&logits, &params(1.0, p), rng.gen(), &mut s);
            assert!(
                nucleus.contains(&(tok as usize)),
                "token {tok} outside the nucleus"
            );
            seen.insert(tok as usize);
        }
        // Nearly every nucleus member is drawn at least once in 20000 draws.
        assert!(seen.len() + 5 >= nucleus.len());
    }
}

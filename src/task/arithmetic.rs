//! The built-in verifiable task: n-digit arithmetic problems with exact integer answers.
//!
//! `"37+48="` → `"85"`. The held-out split is a fixed set of operand pairs drawn with its own
//! seed (independent of the run seed), and training never draws a held-out pair, so held-out
//! accuracy measures generalisation, not memorisation.
use std::collections::HashSet;

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::reward::rm_train::{perturb_answer, wrongness_strength, PreferencePair};

/// Seed of the held-out split: fixed so every run evaluates on the same problems.
const HELDOUT_SEED: u64 = 0x9e37_79b9;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArithmeticConfig {
    /// Digits of each operand (2: operands 10..=99).
    pub digits: u32,
    /// Operators to draw from: any of "+", "-", "*".
    pub ops: Vec<String>,
    /// Size of the fixed held-out split.
    pub heldout_size: usize,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        ArithmeticConfig {
            digits: 2,
            ops: vec!["+".into()],
            heldout_size: 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub prompt: String,
    pub answer: String,
}

pub struct ArithmeticTask {
    cfg: ArithmeticConfig,
    heldout: Vec<Problem>,
    heldout_keys: HashSet<(u64, u64, char)>,
}

impl ArithmeticConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=4).contains(&self.digits) {
            return Err(format!(
                "task.digits must be in 1..=4, found {}",
                self.digits
            ));
        }
        if self.ops.is_empty() {
            return Err("task.ops is empty: give at least one of \"+\", \"-\", \"*\"".into());
        }
        for op in &self.ops {
            if !matches!(op.as_str(), "+" | "-" | "*") {
                return Err(format!(
                    "task.ops: unknown operator {op:?} (known: \"+\", \"-\", \"*\")"
                ));
            }
        }
        let span = self.span();
        let pairs = span * span * self.ops.len() as u64;
        if self.heldout_size as u64 * 2 > pairs {
            return Err(format!(
                "task.heldout_size {} is more than half of the {pairs} distinct problems",
                self.heldout_size
            ));
        }
        Ok(())
    }
    fn lo(&self) -> u64 {
        if self.digits == 1 {
            0
        } else {
            10u64.pow(self.digits - 1)
        }
    }
    fn span(&self) -> u64 {
        10u64.pow(self.digits) - self.lo()
    }
}

fn render(a: u64, b: u64, op: char) -> Problem {
    let ans: i64 = match op {
        '+' => (a + b) as i64,
        '-' => a as i64 - b as i64,
        _ => (a * b) as i64,
    };
    Problem {
        prompt: format!("{a}{op}{b}="),
        answer: ans.to_string(),
    }
}

impl ArithmeticTask {
    pub fn new(cfg: ArithmeticConfig) -> Result<Self, String> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(HELDOUT_SEED);
        let mut heldout = Vec::with_capacity(cfg.heldout_size);
        let mut keys = HashSet::new();
        while heldout.len() < cfg.heldout_size {
            let key = Self::draw_key(&cfg, &mut rng);
            if keys.insert(key) {
                heldout.push(render(key.0, key.1, key.2));
            }
        }
        Ok(ArithmeticTask {
            cfg,
            heldout,
            heldout_keys: keys,
        })
    }

    fn draw_key<R: Rng>(cfg: &ArithmeticConfig, rng: &mut R) -> (u64, u64, char) {
        let a = cfg.lo() + rng.gen_range(0..cfg.span());
        let b = cfg.lo() + rng.gen_range(0..cfg.span());
        let op = cfg.ops[rng.gen_range(0..cfg.ops.len())]
            .chars()
            .next()
            .unwrap_or('+');
        (a, b, op)
    }

    /// A training problem: never one of the held-out split.
    pub fn sample_train<R: Rng>(&self, rng: &mut R) -> Problem {
        loop {
            let key = Self::draw_key(&self.cfg, rng);
            if !self.heldout_keys.contains(&key) {
                return render(key.0, key.1, key.2);
            }
        }
    }

    pub fn heldout(&self) -> &[Problem] {
        &self.heldout
    }

    /// Longest answer in characters, which bounds the tokens a response needs (plus EOS).
    pub fn max_answer_chars(&self) -> usize {
        let hi = 10u64.pow(self.cfg.digits) - 1;
        let mut m = 0;
        for op in &self.cfg.ops {
            let c = op.chars().next().unwrap_or('+');
            m = m
                .max(render(hi, hi, c).answer.len())
                .max(render(self.cfg.lo(), hi, c).answer.len());
        }
        m
    }
}

/// `n` preference pairs from the task's training split (never a held-out problem): chosen is
/// the correct answer, rejected a perturbed one, strength by how wrong it is
/// ([`wrongness_strength`]), ratings 1 for correct and 1 − strength/3 for wrong.
pub fn arithmetic_preferences(task: &ArithmeticTask, n: usize, seed: u64) -> Vec<PreferencePair> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let p = task.sample_train(&mut rng);
            let wrong = perturb_answer(&p.answer, &mut rng);
            let strength = match (p.answer.parse::<i64>(), wrong.parse::<i64>()) {
                (Ok(c), Ok(w)) => wrongness_strength(c, w),
                _ => 1.0,
            };
            PreferencePair {
                prompt: p.prompt,
                chosen: p.answer,
                rejected: wrong,
                strength,
                chosen_rating: Some(1.0),
                rejected_rating: Some(1.0 - strength / 3.0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_exact() {
        assert_eq!(
            render(37, 48, '+'),
            Problem {
                prompt: "37+48=".into(),
                answer: "85".into()
            }
        );
        assert_eq!(render(12, 30, '-').answer, "-18");
        assert_eq!(render(12, 30, '*').answer, "360");
    }

    #[test]
    fn heldout_is_fixed_and_disjoint_from_training() {
        let t1 = ArithmeticTask::new(ArithmeticConfig::default()).unwrap();
        let t2 = ArithmeticTask::new(ArithmeticConfig::default()).unwrap();
        assert_eq!(t1.heldout(), t2.heldout());
        assert_eq!(t1.heldout().len(), 500);
        let held: HashSet<String> = t1.heldout().iter().map(|p| p.prompt.clone()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..5000 {
            assert!(!held.contains(&t1.sample_train(&mut rng).prompt));
        }
    }

    #[test]
    fn bad_config_is_rejected_with_the_field() {
        let e = ArithmeticConfig {
            ops: vec!["/".into()],
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("task.ops") && e.contains("\"/\""), "{e}");
        let e = ArithmeticConfig {
            digits: 9,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("task.digits"), "{e}");
    }
}

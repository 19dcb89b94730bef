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

/// The operands and operator of a rendered prompt `"a<op>b="`.
fn parse_prompt(prompt: &str) -> Option<(u64, u64, char)> {
    let body = prompt.strip_suffix('=')?;
    let at = body
        .char_indices()
        .skip(1)
        .find(|(_, c)| matches!(c, '+' | '-' | '*'))?
        .0;
    let op = body[at..].chars().next()?;
    let (a, b) = (body[..at].parse().ok()?, body[at + 1..].parse().ok()?);
    Some((a, b, op))
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

    /// eva's mutator: up to `n` distinct problems near `parent` (a prompt this task rendered,
    /// `"37+48="`), each with one digit of one operand changed to another digit (a leading
    /// digit stays non-zero) and, when several operators are configured, with probability ½
    /// another operator. Operands keep the configured digits; a child is never the parent, a
    /// held-out problem or another child; its answer is recomputed exactly. Fewer than `n`
    /// come back only when 64·n tries found no more.
    pub fn mutate<R: Rng>(
        &self,
        parent: &str,
        n: usize,
        rng: &mut R,
    ) -> Result<Vec<Problem>, String> {
        let (a, b, op) = parse_prompt(parent)
            .ok_or_else(|| format!("not an arithmetic prompt of this task: {parent:?}"))?;
        let mut seen: HashSet<(u64, u64, char)> = HashSet::from([(a, b, op)]);
        let mut out = Vec::with_capacity(n);
        for _ in 0..64 * n {
            if out.len() == n {
                break;
            }
            let mut key = (a, b, op);
            let operand = if rng.gen_bool(0.5) {
                &mut key.0
            } else {
                &mut key.1
            };
            *operand = self.change_one_digit(*operand, rng);
            if self.cfg.ops.len() > 1 && rng.gen_bool(0.5) {
                let others: Vec<char> = self
                    .cfg
                    .ops
                    .iter()
                    .filter_map(|o| o.chars().next())
                    .filter(|&c| c != op)
                    .collect();
                if !others.is_empty() {
                    key.2 = others[rng.gen_range(0..others.len())];
                }
            }
            if !self.heldout_keys.contains(&key) && seen.insert(key) {
                out.push(render(key.0, key.1, key.2));
            }
        }
        Ok(out)
    }

    /// `x` with one of its `digits` decimal digits replaced by a different one, staying in
    /// the operand range (no leading zero when there is more than one digit).
    fn change_one_digit<R: Rng>(&self, x: u64, rng: &mut R) -> u64 {
        let d = self.cfg.digits;
        let pos = rng.gen_range(0..d);
        let place = 10u64.pow(pos);
        let old = (x / place) % 10;
        let lowest = if pos == d - 1 && d > 1 { 1 } else { 0 };
        let choices: Vec<u64> = (lowest..10).filter(|&v| v != old).collect();
        let new = choices[rng.gen_range(0..choices.len())];
        x - old * place + new * place
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
    fn prompts_parse_back_to_their_operands() {
        assert_eq!(parse_prompt("37+48="), Some((37, 48, '+')));
        assert_eq!(parse_prompt("12-30="), Some((12, 30, '-')));
        assert_eq!(parse_prompt("5*7="), Some((5, 7, '*')));
        assert_eq!(parse_prompt("37+48"), None);
        assert_eq!(parse_prompt("what is 2+2?"), None);
    }

    /// Every child differs from the parent in exactly one digit of one operand (and possibly
    /// the operator), keeps two-digit operands, is not held out, and has the exact answer.
    #[test]
    fn mutations_change_one_digit_and_keep_answers_exact() {
        let task = ArithmeticTask::new(ArithmeticConfig {
            ops: vec!["+".into(), "*".into()],
            ..Default::default()
        })
        .unwrap();
        let held: HashSet<String> = task.heldout().iter().map(|p| p.prompt.clone()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut op_changed = 0;
        for _ in 0..200 {
            let parent = task.sample_train(&mut rng);
            let kids = task.mutate(&parent.prompt, 4, &mut rng).unwrap();
            assert_eq!(kids.len(), 4);
            let (a, b, op) = parse_prompt(&parent.prompt).unwrap();
            let mut prompts = HashSet::new();
            for k in &kids {
                assert!(prompts.insert(k.prompt.clone()), "duplicate child {k:?}");
                assert!(!held.contains(&k.prompt) && k.prompt != parent.prompt);
                let (x, y, o) = parse_prompt(&k.prompt).unwrap();
                assert!((10..=99).contains(&x) && (10..=99).contains(&y), "{k:?}");
                let want = if o == '+' { x + y } else { x * y };
                assert_eq!(k.answer, want.to_string());
                let digit_diffs =
                    |p: u64, q: u64| usize::from(p / 10 != q / 10) + usize::from(p % 10 != q % 10);
                assert_eq!(
                    digit_diffs(a, x) + digit_diffs(b, y),
                    1,
                    "{parent:?} -> {k:?}"
                );
                op_changed += usize::from(o != op);
            }
        }
        // the operator changes in about half the children (800 of them)
        assert!((300..500).contains(&op_changed), "{op_changed}");
        // reproducible from the rng
        let p = "37+48=";
        let a = task
            .mutate(p, 4, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        let b = task
            .mutate(p, 4, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        assert_eq!(a, b);
        assert!(task
            .mutate("hello", 4, &mut rng)
            .unwrap_err()
            .contains("hello"));
    }

    #[test]
    fn one_digit_operands_may_become_zero() {
        let task = ArithmeticTask::new(ArithmeticConfig {
            digits: 1,
            heldout_size: 10,
            ..Default::default()
        })
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut values = HashSet::new();
        for _ in 0..200 {
            for k in task.mutate("5+7=", 3, &mut rng).unwrap() {
                let (x, y, _) = parse_prompt(&k.prompt).unwrap();
                assert!(x <= 9 && y <= 9 && (x == 5) != (y == 7), "{k:?}");
                values.insert(x.min(y));
            }
        }
        assert!(values.contains(&0));
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

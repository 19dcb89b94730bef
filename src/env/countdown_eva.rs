//! eva on `countdown` (`[sampling.eva]` with `[env] kind = "countdown"`,
//! docs/algorithms.md#sampling-rules): a puzzle as one prompt of eva's pool, and the mutator
//! that evolves a selected puzzle into nearby new ones. A child keeps the parent's numbers or
//! changes one of them, and takes the reachable target closest to the parent's; it is
//! solvable by construction (its target is the value of an expression over its numbers, which
//! becomes its reference play) and checked once more by the environment's exact evaluator.
use std::collections::{BTreeMap, HashSet};

use rand::Rng;
use serde_json::{json, Value};

use super::builtin::Countdown;
use super::rational::Rational;
use super::EnvConfig;
use crate::task::Problem;

/// One countdown puzzle: make `target` from `numbers`; `solution` is a reference play.
#[derive(Debug, Clone, PartialEq)]
pub struct Puzzle {
    pub numbers: Vec<i128>,
    pub target: i128,
    pub solution: String,
}

impl Puzzle {
    /// The pool's prompt of the puzzle, `make 103 from 25 4 7 3` (the short wording).
    pub fn key(&self) -> String {
        let list: Vec<String> = self.numbers.iter().map(|n| n.to_string()).collect();
        format!("make {} from {}", self.target, list.join(" "))
    }

    /// The key of the puzzle with its numbers in increasing order: the same for every order
    /// of the numbers (eva's pool holds one of them, [`crate::task::Task::pool_key`]).
    pub fn canonical_key(&self) -> String {
        let (numbers, target) = self.canonical();
        Puzzle {
            numbers,
            target,
            solution: String::new(),
        }
        .key()
    }

    /// The same puzzle whatever the order of its numbers (held-out and sibling checks).
    fn canonical(&self) -> (Vec<i128>, i128) {
        let mut n = self.numbers.clone();
        n.sort_unstable();
        (n, self.target)
    }

    /// As a pool prompt: the key as prompt, the reference play as answer.
    pub fn to_problem(&self) -> Problem {
        Problem {
            prompt: self.key(),
            answer: self.solution.clone(),
        }
    }

    /// The puzzle a pool prompt holds ([`Puzzle::to_problem`]'s inverse).
    pub fn from_problem(p: &Problem) -> Result<Self, String> {
        let bad = || {
            format!(
                "not a countdown puzzle prompt (make <target> from <numbers>): {:?}",
                p.prompt
            )
        };
        let rest = p.prompt.strip_prefix("make ").ok_or_else(bad)?;
        let (target, numbers) = rest.split_once(" from ").ok_or_else(bad)?;
        let target = target.parse().map_err(|_| bad())?;
        let numbers = numbers
            .split(' ')
            .map(|n| n.parse().map_err(|_| bad()))
            .collect::<Result<Vec<i128>, String>>()?;
        Ok(Puzzle {
            numbers,
            target,
            solution: p.answer.clone(),
        })
    }

    /// The row a countdown episode starts from ([`Countdown`]'s `reset_row`).
    pub fn to_row(&self) -> Value {
        json!({"numbers": self.numbers, "target": self.target, "solution": self.solution})
    }

    /// The puzzle of a row: `numbers` (2 or more integers), `target` (an integer) and
    /// `solution` (a string).
    pub fn from_row(row: &Value) -> Result<Self, String> {
        let numbers: Option<Vec<i128>> = row["numbers"]
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_i64().map(i128::from)).collect());
        let numbers = match numbers {
            Some(n) if n.len() >= 2 => n,
            _ => {
                return Err(format!(
                    "`numbers` must be an array of 2 or more integers, found {}",
                    row["numbers"]
                ))
            }
        };
        let target = row["target"]
            .as_i64()
            .ok_or_else(|| format!("`target` must be an integer, found {}", row["target"]))?;
        let solution = row["solution"]
            .as_str()
            .ok_or_else(|| format!("`solution` must be a string, found {}", row["solution"]))?;
        Ok(Puzzle {
            numbers,
            target: i128::from(target),
            solution: solution.to_string(),
        })
    }

    /// Whether `expression` solves the puzzle, by the environment's own exact evaluator.
    pub fn check(&self, expression: &str) -> Result<(), String> {
        let mut env = Countdown::default();
        env.numbers = self.numbers.clone();
        env.target = self.target;
        env.check(expression)
    }
}

/// Every integer target in 10..=`max_target` that a left-to-right expression over 2 or more
/// of `numbers` (each at most once, + − × ÷ exact) makes, with the first such expression
/// found (orders and operators in a fixed order), parenthesised as the environment's own
/// reference plays are.
pub fn reachable_targets(numbers: &[i128], max_target: i128) -> BTreeMap<i128, String> {
    let mut out = BTreeMap::new();
    let mut used = vec![false; numbers.len()];
    for first in 0..numbers.len() {
        used[first] = true;
        let start = Rational::integer(numbers[first]);
        extend(
            numbers,
            &mut used,
            (start, numbers[first].to_string(), '*'),
            max_target,
            &mut out,
        );
        used[first] = false;
    }
    out
}

/// Depth-first: every way to append one more unused number to `(value, text, outer)`.
fn extend(
    numbers: &[i128],
    used: &mut [bool],
    (value, text, outer): (Rational, String, char),
    max_target: i128,
    out: &mut BTreeMap<i128, String>,
) {
    for i in 0..numbers.len() {
        if used[i] {
            continue;
        }
        let r = Rational::integer(numbers[i]);
        for op in ['+', '-', '*', '/'] {
            let next = match op {
                '+' => value.checked_add(r),
                '-' => value.checked_sub(r),
                '*' => value.checked_mul(r),
                _ => value.checked_div(r),
            };
            let Ok(next) = next else { continue };
            let left = if precedence(op) > precedence(outer) {
                format!("({text})")
            } else {
                text.clone()
            };
            let t = format!("{left}{op}{}", numbers[i]);
            if next.denom() == 1 && (10..=max_target).contains(&next.numer()) {
                out.entry(next.numer()).or_insert_with(|| t.clone());
            }
            used[i] = true;
            extend(numbers, used, (next, t, op), max_target, out);
            used[i] = false;
        }
    }
}

fn precedence(op: char) -> u8 {
    match op {
        '+' | '-' => 1,
        _ => 2,
    }
}

/// The countdown puzzles of a run: training draws as the environment makes them, the
/// held-out ones to avoid, and the mutator.
pub struct CountdownPuzzles {
    generator: Countdown,
    heldout: HashSet<(Vec<i128>, i128)>,
}

impl CountdownPuzzles {
    /// The puzzles of `cfg`'s countdown; `heldout_seeds` are the held-out episodes' seeds.
    pub fn new(cfg: &EnvConfig, heldout_seeds: impl Iterator<Item = u64>) -> Self {
        let generator = Countdown::new(
            cfg.countdown_numbers,
            i128::from(cfg.countdown_max_number),
            i128::from(cfg.countdown_max_target),
        );
        let heldout = heldout_seeds
            .map(|s| Self::drawn(&generator, s).canonical())
            .collect();
        CountdownPuzzles { generator, heldout }
    }

    fn drawn(generator: &Countdown, seed: u64) -> Puzzle {
        let (numbers, target, solution) = generator.draw(seed);
        Puzzle {
            numbers,
            target,
            solution,
        }
    }

    /// The puzzle the environment plays for training seed `seed`.
    pub fn sample(&self, seed: u64) -> Puzzle {
        Self::drawn(&self.generator, seed)
    }

    /// Up to `n` new puzzles near `parent`: each keeps the parent's numbers (p = ½) or
    /// replaces one of them by another number of the pool, and takes, among the integer
    /// targets its numbers reach ([`reachable_targets`]), the one closest to the parent's
    /// target (the smaller on a tie) that makes a puzzle not yet seen: never the parent, a
    /// sibling or a held-out puzzle (in any order of the numbers). Each child's reference
    /// play solves it by the environment's check. Fewer than `n` come back only when 8·n
    /// tries found no more.
    pub fn mutate<R: Rng>(&self, parent: &Puzzle, n: usize, rng: &mut R) -> Vec<Puzzle> {
        let pool = self.generator.number_pool();
        let (_, max_target) = self.generator.shape();
        let mut seen: HashSet<(Vec<i128>, i128)> = HashSet::from([parent.canonical()]);
        let same_numbers = reachable_targets(&parent.numbers, max_target);
        let mut out = Vec::with_capacity(n);
        for _ in 0..8 * n {
            if out.len() == n {
                break;
            }
            let mut numbers = parent.numbers.clone();
            let changed;
            let reach = if rng.gen_bool(0.5) {
                let i = rng.gen_range(0..numbers.len());
                let others: Vec<i128> = pool.iter().copied().filter(|&v| v != numbers[i]).collect();
                numbers[i] = others[rng.gen_range(0..others.len())];
                changed = reachable_targets(&numbers, max_target);
                &changed
            } else {
                &same_numbers
            };
            let fresh = |t: i128| {
                let mut c = numbers.clone();
                c.sort_unstable();
                let key = (c, t);
                !seen.contains(&key) && !self.heldout.contains(&key)
            };
            let Some((&target, solution)) = reach
                .iter()
                .filter(|(&t, _)| fresh(t))
                .min_by_key(|(&t, _)| ((t - parent.target).abs(), t))
            else {
                continue;
            };
            let child = Puzzle {
                numbers,
                target,
                solution: solution.clone(),
            };
            if child.check(&child.solution).is_ok() {
                seen.insert(child.canonical());
                out.push(child);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn puzzles(count: usize, max_number: i64, max_target: i64) -> CountdownPuzzles {
        let cfg = EnvConfig {
            countdown_numbers: count,
            countdown_max_number: max_number,
            countdown_max_target: max_target,
            ..Default::default()
        };
        CountdownPuzzles::new(&cfg, std::iter::empty())
    }

    fn puzzle(numbers: &[i128], target: i128, solution: &str) -> Puzzle {
        Puzzle {
            numbers: numbers.to_vec(),
            target,
            solution: solution.into(),
        }
    }

    /// By hand: from 5 and 9 the integer values are 5+9 = 14, 5−9 = −4, 5·9 = 45, 9−5 = 4
    /// (5/9 and 9/5 are not integers); those in 10..=50 are 14 and 45. From 4, 5 and 9 add
    /// 5+9−4 = 10, 4·5−9 = 11, 4+9 = 13, (9−5)·4 = 16, 4+5+9 = 18, 4·5 = 20, (9−4)·5 = 25,
    /// 4·5+9 = 29, 4·9−5 = 31, 4·9 = 36, 4·9+5 = 41, 5·9+4 = 49 ((4+5)·9 = 81 is over 50;
    /// 12, for one, cannot be made).
    #[test]
    fn reachable_targets_are_the_values_left_to_right_expressions_make() {
        let two = reachable_targets(&[5, 9], 50);
        assert_eq!(two.keys().copied().collect::<Vec<_>>(), vec![14, 45]);
        assert_eq!(two[&14], "5+9");
        assert_eq!(two[&45], "5*9");
        let three = reachable_targets(&[4, 5, 9], 50);
        assert_eq!(
            three.keys().copied().collect::<Vec<_>>(),
            vec![10, 11, 13, 14, 16, 18, 20, 25, 29, 31, 36, 41, 45, 49]
        );
        // (4+5)·9 needs parentheses; every expression solves its own target exactly.
        let wide = reachable_targets(&[4, 5, 9], 100);
        assert_eq!(wide[&81], "(4+5)*9");
        for (t, e) in &wide {
            assert_eq!(puzzle(&[4, 5, 9], *t, e).check(e), Ok(()), "{t} = {e}");
        }
    }

    /// Parent: make 14 from 5 9 (2 numbers up to 9, targets up to 50). Keeping the numbers,
    /// the only other reachable target is 45; changing a number gives the target nearest 14
    /// that the new pair reaches (e.g. 5 and 8 reach 13 and 40: 13).
    #[test]
    fn children_are_nearby_solvable_new_and_fixed_by_the_seed() {
        let p = puzzles(2, 9, 50);
        let parent = puzzle(&[5, 9], 14, "5+9");
        let kids = p.mutate(&parent, 6, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(kids.len(), 6);
        let mut taken = HashSet::from([parent.canonical()]);
        for k in &kids {
            assert_eq!(k.check(&k.solution), Ok(()), "{k:?}");
            let changed = k
                .numbers
                .iter()
                .zip(&parent.numbers)
                .filter(|(a, b)| a != b);
            match changed.count() {
                0 => assert_eq!((k.target, k.solution.as_str()), (45, "5*9")),
                1 => {}
                c => panic!("{c} numbers changed: {k:?}"),
            }
            // The nearest target to 14 the child's numbers reach, but for those the parent
            // or an earlier sibling already took.
            let reach = reachable_targets(&k.numbers, 50);
            assert_eq!(reach.get(&k.target), Some(&k.solution), "{k:?}");
            let mut sorted = k.numbers.clone();
            sorted.sort_unstable();
            for &t in reach.keys() {
                if ((t - 14).abs(), t) < ((k.target - 14).abs(), k.target) {
                    assert!(
                        taken.contains(&(sorted.clone(), t)),
                        "{t} is nearer than {k:?}"
                    );
                }
            }
            assert!(taken.insert(k.canonical()), "duplicate {k:?}");
        }
        let again = p.mutate(&parent, 6, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(kids, again);
        let other = p.mutate(&parent, 6, &mut ChaCha8Rng::seed_from_u64(4));
        assert_ne!(kids, other);
        // With 5 and 8 the nearest target to 14 is 5+8 = 13.
        assert_eq!(
            reachable_targets(&[5, 8], 50)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![(13, "5+8".to_string()), (40, "5*8".to_string())]
        );
    }

    #[test]
    fn children_avoid_held_out_puzzles_and_the_pool_form_round_trips() {
        let cfg = EnvConfig {
            countdown_numbers: 2,
            countdown_max_number: 9,
            countdown_max_target: 50,
            ..Default::default()
        };
        let parent = puzzle(&[5, 9], 14, "5+9");
        // Hold out "make 45 from 9 5" (numbers in the other order): the only same-number
        // child, so keeping the numbers never gives one.
        let mut p = CountdownPuzzles::new(&cfg, std::iter::empty());
        p.heldout.insert((vec![5, 9], 45));
        for seed in 0..20 {
            for k in p.mutate(&parent, 4, &mut ChaCha8Rng::seed_from_u64(seed)) {
                assert_ne!(k.canonical(), (vec![5, 9], 45));
            }
        }
        let drawn = p.sample(11);
        assert_eq!(drawn.check(&drawn.solution), Ok(()));
        let back = Puzzle::from_problem(&drawn.to_problem()).unwrap();
        assert_eq!(back, drawn);
        assert_eq!(Puzzle::from_row(&drawn.to_row()).unwrap(), drawn);
        assert_eq!(parent.key(), "make 14 from 5 9");
        let e = Puzzle::from_problem(&Problem {
            prompt: "12+7=".into(),
            answer: "19".into(),
        })
        .unwrap_err();
        assert!(e.contains("not a countdown puzzle"), "{e}");
        let e =
            Puzzle::from_row(&json!({"numbers": [3], "target": 9, "solution": "3"})).unwrap_err();
        assert!(e.contains("`numbers`"), "{e}");
        // held-out seeds are avoided as the environment draws them
        let seeds = [1u64 << 63, (1u64 << 63) | 1];
        let q = CountdownPuzzles::new(&cfg, seeds.iter().copied());
        for s in seeds {
            assert!(q.heldout.contains(&q.sample(s).canonical()));
        }
    }
}

//! eva's prompt pool (`[sampling.eva]`, docs/algorithms.md#sampling-rules): `pool_size` problems drawn
//! once from the task, which batches draw their prompts from, and which the creator grows
//! every `every` steps with problems the task's mutator evolves from the most informative
//! prompts seen since the previous round (the rules are `sampling::eva`). The pool, the
//! creator's RNG and the informativeness seen so far travel in the explorer state, so a
//! checkpoint holds the evolved prompt set and a resumed run continues exactly.
use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sampling::eva::{
    informativeness, min_max_normalise, mix_into, select_count, weighted_sample, EvaConfig,
};
use crate::task::{Problem, Task};

/// One prompt of the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolPrompt {
    pub problem: Problem,
    /// The creator round that evolved it (0: one of the initial prompts).
    pub round: u64,
    /// Text datasets: the question as the user wrote it, before the prompt's chat template
    /// (what the generator is asked to vary); None for built-in tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
}

/// What a mutator made of one selected prompt: its children, and how many of its attempts
/// it rejected as degenerate (text generators: empty, too long, the parent again).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evolved {
    pub children: Vec<(Problem, Option<String>)>,
    pub rejected: usize,
}

/// What the pool did for one batch (`eva/*` metrics, docs/metrics.md).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EvaStats {
    /// Prompts in the pool after the step.
    pub pool_size: usize,
    /// Evolved prompts in the pool after the step.
    pub evolved: usize,
    /// Prompts this step's creator round added (0 on steps without a round).
    pub added: usize,
    /// Mean informativeness of the batch's groups.
    pub informativeness_mean: f64,
    /// Fraction of the batch's prompts that were evolved ones.
    pub frac_evolved_in_batch: f64,
    /// Children this step's round asked its mutator for (selected prompts × children).
    pub mutations_attempted: usize,
    /// Children the mutator made (before duplicates of pool prompts are dropped).
    pub mutations_accepted: usize,
    /// Generations a text generator rejected: empty, too long, or the parent again.
    pub mutations_rejected: usize,
}

/// The prompt pool and the creator's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptPool {
    prompts: Vec<PoolPrompt>,
    /// Latest informativeness of each prompt seen since the last round, by pool index.
    seen: BTreeMap<usize, f64>,
    /// The creator's own stream: selection and mutation draw only from it.
    rng: ChaCha8Rng,
    /// Creator rounds done.
    rounds: u64,
    /// Counts since the last [`PromptPool::take_stats`].
    batch: BatchCounts,
}

/// What one batch drew and observed, and what its round added.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BatchCounts {
    drawn: usize,
    evolved_drawn: usize,
    observed: usize,
    informativeness_sum: f64,
    added: usize,
    #[serde(default)]
    attempted: usize,
    #[serde(default)]
    accepted: usize,
    #[serde(default)]
    rejected: usize,
}

impl PromptPool {
    /// `cfg.pool_size` distinct training problems of `task`, drawn with `rng` (which becomes
    /// the creator's stream).
    pub fn new(task: &dyn Task, cfg: &EvaConfig, mut rng: ChaCha8Rng) -> Result<Self> {
        let mut prompts: Vec<PoolPrompt> = Vec::with_capacity(cfg.pool_size);
        let mut keys = std::collections::HashSet::new();
        let tries = 100 * cfg.pool_size + 1000;
        for _ in 0..tries {
            if prompts.len() == cfg.pool_size {
                break;
            }
            let problem = task.sample_train(&mut rng);
            if keys.insert(task.pool_key(&problem)) {
                let question = task.question(&problem.prompt);
                prompts.push(PoolPrompt {
                    problem,
                    round: 0,
                    question,
                });
            }
        }
        if prompts.len() < cfg.pool_size {
            return Err(Error::config(
                "sampling.eva.pool_size",
                format!(
                    "{} distinct training prompts asked for, the task gave {} in {tries} draws",
                    cfg.pool_size,
                    prompts.len()
                ),
            ));
        }
        Ok(PromptPool {
            prompts,
            seen: BTreeMap::new(),
            rng,
            rounds: 0,
            batch: BatchCounts::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn prompts(&self) -> &[PoolPrompt] {
        &self.prompts
    }

    /// `n` pool indices drawn uniformly (with replacement) from `rng`, the run's prompt stream.
    pub fn draw(&mut self, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let len = self.prompts.len();
        let ids: Vec<usize> = (0..n).map(|_| rng.gen_range(0..len)).collect();
        self.batch.drawn += n;
        self.batch.evolved_drawn += ids.iter().filter(|&&i| self.prompts[i].round > 0).count();
        ids
    }

    pub fn problem(&self, id: usize) -> &Problem {
        &self.prompts[id].problem
    }

    /// Records the rewards of a group sampled for prompt `id`: its informativeness is what
    /// the next round weighs it by (a later group of the same prompt replaces it).
    pub fn observe(&mut self, id: usize, rewards: &[f64], cfg: &EvaConfig) {
        let x = informativeness(cfg.informativeness, rewards);
        self.seen.insert(id, x);
        self.batch.observed += 1;
        self.batch.informativeness_sum += x;
    }

    /// One creator round with the task's own mutator ([`Task::evolve`]).
    pub fn evolve_round(&mut self, task: &dyn Task, cfg: &EvaConfig) -> Result<usize> {
        self.evolve_round_with(
            cfg,
            |p| task.pool_key(p),
            |parent, n, rng| {
                let Some(kids) = task.evolve(&parent.problem, n, rng)? else {
                    return Err(Error::Internal(
                        "sampling.eva: the task has no mutator (config validation should have \
                     refused this run)"
                            .into(),
                    ));
                };
                Ok(Evolved {
                    children: kids.into_iter().map(|p| (p, None)).collect(),
                    rejected: 0,
                })
            },
        )
    }

    /// One creator round: select ⌈fraction · seen⌉ of the prompts seen since the last round,
    /// weighted by min-max normalised informativeness, evolve each into `cfg.children` new
    /// problems with `mutate(parent, children, creator_rng)` and add those whose `key`
    /// ([`Task::pool_key`]) is not in the pool yet. Returns how many were added.
    pub fn evolve_round_with<F>(
        &mut self,
        cfg: &EvaConfig,
        key: impl Fn(&Problem) -> String,
        mut mutate: F,
    ) -> Result<usize>
    where
        F: FnMut(&PoolPrompt, usize, &mut ChaCha8Rng) -> Result<Evolved>,
    {
        let (ids, values): (Vec<usize>, Vec<f64>) =
            std::mem::take(&mut self.seen).into_iter().unzip();
        let weights = min_max_normalise(&values);
        let k = select_count(ids.len(), cfg.select_fraction);
        let picks = weighted_sample(&weights, k, &mut self.rng);
        self.rounds += 1;
        let mut children = Vec::new();
        for p in picks {
            let parent = &self.prompts[ids[p]];
            let kids = mutate(parent, cfg.children, &mut self.rng)?;
            self.batch.attempted += cfg.children;
            self.batch.accepted += kids.children.len();
            self.batch.rejected += kids.rejected;
            let round = self.rounds;
            children.extend(
                kids.children
                    .into_iter()
                    .map(|(problem, question)| PoolPrompt {
                        problem,
                        round,
                        question,
                    }),
            );
        }
        let added = mix_into(&mut self.prompts, children, |p| key(&p.problem));
        self.batch.added += added;
        Ok(added)
    }

    /// The `eva/*` figures since the last call, which starts the next batch's count.
    pub fn take_stats(&mut self) -> EvaStats {
        let b = std::mem::take(&mut self.batch);
        EvaStats {
            pool_size: self.prompts.len(),
            evolved: self.prompts.iter().filter(|p| p.round > 0).count(),
            added: b.added,
            informativeness_mean: b.informativeness_sum / b.observed.max(1) as f64,
            frac_evolved_in_batch: b.evolved_drawn as f64 / b.drawn.max(1) as f64,
            mutations_attempted: b.attempted,
            mutations_accepted: b.accepted,
            mutations_rejected: b.rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{ArithmeticConfig, ArithmeticTask};
    use rand::SeedableRng;

    fn cfg(pool_size: usize) -> EvaConfig {
        EvaConfig {
            pool_size,
            ..Default::default()
        }
    }

    fn task() -> ArithmeticTask {
        ArithmeticTask::new(ArithmeticConfig::default()).unwrap()
    }

    #[test]
    fn the_initial_pool_is_distinct_and_fixed_by_the_seed() {
        let t = task();
        let a = PromptPool::new(&t, &cfg(50), ChaCha8Rng::seed_from_u64(4)).unwrap();
        let b = PromptPool::new(&t, &cfg(50), ChaCha8Rng::seed_from_u64(4)).unwrap();
        assert_eq!(a.prompts(), b.prompts());
        let distinct: std::collections::HashSet<_> =
            a.prompts().iter().map(|p| &p.problem.prompt).collect();
        assert_eq!(distinct.len(), 50);
        // a 1-digit "+" task has 100 problems, 10 of them held out
        let small = ArithmeticTask::new(ArithmeticConfig {
            digits: 1,
            heldout_size: 10,
            ..Default::default()
        })
        .unwrap();
        let e = PromptPool::new(&small, &cfg(200), ChaCha8Rng::seed_from_u64(0)).unwrap_err();
        assert!(e.to_string().contains("sampling.eva.pool_size"), "{e}");
    }

    /// Four prompts seen with informativeness 0, 0, 1, 0 (max − min of their groups): the
    /// only positive weight after min-max normalisation is the third, and ⌈0.25 · 4⌉ = 1
    /// prompt is selected, so the round evolves exactly that one into 4 children.
    #[test]
    fn a_round_evolves_the_informative_prompt_and_counts_it() {
        let t = task();
        let c = cfg(4);
        let mut pool = PromptPool::new(&t, &c, ChaCha8Rng::seed_from_u64(1)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let ids = pool.draw(4, &mut rng);
        for (k, rewards) in [[0.0; 4], [1.0; 4], [1.0, 0.0, 0.0, 1.0], [0.0; 4]]
            .iter()
            .enumerate()
        {
            pool.observe(k, rewards, &c);
        }
        let informative = pool.problem(2).clone();
        assert_eq!(pool.evolve_round(&t, &c).unwrap(), 4);
        assert_eq!(pool.len(), 8);
        let parent = informative.prompt.trim_end_matches('=');
        for child in &pool.prompts()[4..] {
            assert_eq!(child.round, 1);
            // one digit of one operand differs from the informative parent
            let diff = child
                .problem
                .prompt
                .chars()
                .zip(parent.chars())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(diff, 1, "{:?} from {parent}", child.problem);
        }
        let s = pool.take_stats();
        let evolved_drawn = ids.iter().filter(|&&i| i >= 4).count();
        assert_eq!(evolved_drawn, 0);
        assert_eq!(
            s,
            EvaStats {
                pool_size: 8,
                evolved: 4,
                added: 4,
                informativeness_mean: 0.25,
                frac_evolved_in_batch: 0.0,
                mutations_attempted: 4,
                mutations_accepted: 4,
                mutations_rejected: 0,
            }
        );
        // the next round sees nothing yet: it adds nothing
        assert_eq!(pool.evolve_round(&t, &c).unwrap(), 0);
        assert_eq!(pool.take_stats().added, 0);
    }

    #[test]
    fn draws_count_evolved_prompts_and_the_state_round_trips() {
        let t = task();
        let c = cfg(8);
        let mut pool = PromptPool::new(&t, &c, ChaCha8Rng::seed_from_u64(3)).unwrap();
        for k in 0..8 {
            pool.observe(k, &[k as f64, 0.0], &c);
        }
        pool.evolve_round(&t, &c).unwrap();
        pool.take_stats();
        let saved: PromptPool =
            serde_json::from_str(&serde_json::to_string(&pool).unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let ids = pool.draw(200, &mut rng.clone());
        let evolved = ids.iter().filter(|&&i| pool.prompts()[i].round > 0).count();
        let s = pool.take_stats();
        assert!((s.frac_evolved_in_batch - evolved as f64 / 200.0).abs() < 1e-12);
        assert!(evolved > 0 && evolved < 200);
        // the saved pool draws and evolves exactly as the live one
        let mut restored = saved;
        assert_eq!(restored.draw(200, &mut rng), ids);
        for k in 0..4 {
            pool.observe(k, &[1.0, 0.0], &c);
            restored.observe(k, &[1.0, 0.0], &c);
        }
        pool.evolve_round(&t, &c).unwrap();
        restored.evolve_round(&t, &c).unwrap();
        assert_eq!(pool.prompts(), restored.prompts());
    }
}

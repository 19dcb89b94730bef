//! An environment as the source of a training run: groups of episodes from one seed (and,
//! with `env.data`, one dataset row; GRPO compares the group's returns), episodes turned into
//! experiences with their trainable masks, and greedy held-out success.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::countdown_eva::{CountdownPuzzles, Puzzle};
use super::episode::{Episode, Rollout, Transcript};
use super::{DataRow, EnvConfig, EnvKind, Factory, Start};
use crate::advantage::adjust::effective_duration;
use crate::advantage::config::DurationConfig;
use crate::buffer::{Experience, ExperienceGroup};
use crate::error::{Error, Result};
use crate::model::{CausalLm, Tokenizer};
use crate::reward::Verdict;
use crate::rollout::SamplingParams;
use crate::sampling::pace::fill_paced;
use crate::task::{Problem, Task};

/// Time pacing of a batch (`sampling.pace = "time"`): the window and round cap, how an
/// episode's Δt is priced (`[advantage.duration]`, as the duration weights price it) and the
/// run's pace stream.
pub struct Pacing<'a> {
    pub window_s: f64,
    pub max_rounds: usize,
    pub duration: &'a DurationConfig,
    pub rng: &'a mut ChaCha8Rng,
}

/// Held-out seeds have the top bit set, training seeds do not: the splits never share one.
const HELDOUT_BIT: u64 = 1 << 63;

pub struct EnvRunner {
    factory: Factory,
    transcript: Transcript,
    /// Episode numbers handed to program environments, unique within the run.
    next_episode: AtomicU64,
}

impl EnvRunner {
    /// `model` names the model in errors.
    pub fn new(cfg: &EnvConfig, tok: &Tokenizer, model: &str) -> Result<Self> {
        Ok(EnvRunner {
            factory: Factory::new(cfg)?,
            transcript: Transcript::for_tokenizer(tok, model)?,
            next_episode: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &EnvConfig {
        self.factory.config()
    }

    /// Episode numbers handed out so far (saved with checkpoints).
    pub fn episodes_numbered(&self) -> u64 {
        self.next_episode.load(Ordering::SeqCst)
    }

    /// Continues the numbering of a resumed run after its checkpoint's `n` episodes.
    pub fn resume_episode_numbering(&self, n: u64) {
        self.next_episode.store(n, Ordering::SeqCst);
    }

    /// Whether prompts start with the tokenizer's BOS (plain transcripts).
    pub fn prompt_bos(&self) -> bool {
        matches!(self.transcript, Transcript::Plain)
    }

    /// The held-out episodes: seeds 0..heldout_size of the held-out stream, each with its
    /// row of `env.heldout_data` when set (then at most as many as it has rows).
    pub fn heldout_starts(&self) -> Vec<Start> {
        let n = self.config().heldout_size;
        let rows = self.factory.heldout_rows();
        let seeds = (0..n as u64).map(|i| i | HELDOUT_BIT);
        if rows.is_empty() {
            return seeds.map(Start::seed).collect();
        }
        seeds
            .zip(rows)
            .map(|(seed, row)| Start {
                seed,
                row: Some(row.clone()),
            })
            .collect()
    }

    fn episodes<M: CausalLm + ?Sized>(
        &self,
        model: &M,
        tok: &Tokenizer,
        params: SamplingParams,
        starts: &[Start],
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Episode>> {
        let first = self
            .next_episode
            .fetch_add(starts.len() as u64, Ordering::SeqCst);
        let rollout = Rollout {
            tok,
            transcript: &self.transcript,
            factory: &self.factory,
            params,
        };
        rollout.run(model, starts, first, rng)
    }

    /// Reference plays of `n` training starts drawn from `rng` (a supervised warm-up's
    /// batch, [`Rollout::demonstrate`]); None when the environment has none.
    pub fn demonstrations(
        &self,
        tok: &Tokenizer,
        n: usize,
        max_new_tokens: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Option<Vec<Episode>>> {
        let starts: Vec<Start> = (0..n).map(|_| self.draw_start(rng)).collect();
        let rollout = Rollout {
            tok,
            transcript: &self.transcript,
            factory: &self.factory,
            params: SamplingParams::greedy(max_new_tokens),
        };
        rollout.demonstrate(&starts)
    }

    /// The start of one training group: a seed drawn from `prompt_rng`, then (with
    /// `env.data`) a row drawn uniformly.
    fn draw_start(&self, prompt_rng: &mut ChaCha8Rng) -> Start {
        let seed = prompt_rng.gen::<u64>() & !HELDOUT_BIT;
        let rows = self.factory.rows();
        let row = (!rows.is_empty()).then(|| rows[prompt_rng.gen_range(0..rows.len())].clone());
        Start { seed, row }
    }

    /// `prompts` groups of `group` episodes, each group from one training start drawn from
    /// `prompt_rng`; token draws from `sample_rng`. With `pacing` (`sampling.pace = "time"`)
    /// each episode is kept with probability window/Δt and more episodes of the group's start
    /// are drawn until it is full; the rewards of every episode drawn, kept or not, go to the
    /// group's `drawn_rewards` when some were discarded.
    #[allow(clippy::too_many_arguments)]
    pub fn collect<M: CausalLm + ?Sized>(
        &self,
        model: &M,
        tok: &Tokenizer,
        params: SamplingParams,
        (prompts, group): (usize, usize),
        version: u64,
        (prompt_rng, sample_rng): (&mut ChaCha8Rng, &mut ChaCha8Rng),
        pacing: Option<Pacing<'_>>,
        next_group_id: &mut u64,
    ) -> Result<Vec<ExperienceGroup>> {
        let starts: Vec<Start> = (0..prompts).map(|_| self.draw_start(prompt_rng)).collect();
        self.collect_starts(
            model,
            tok,
            params,
            (&starts, group),
            version,
            sample_rng,
            pacing,
            next_group_id,
        )
    }

    /// One group of `group` episodes from each of `starts` (drawn training starts, or eva's
    /// pool puzzles); token draws from `sample_rng`; `pacing` as in [`EnvRunner::collect`].
    #[allow(clippy::too_many_arguments)]
    pub fn collect_starts<M: CausalLm + ?Sized>(
        &self,
        model: &M,
        tok: &Tokenizer,
        params: SamplingParams,
        (starts, group): (&[Start], usize),
        version: u64,
        sample_rng: &mut ChaCha8Rng,
        pacing: Option<Pacing<'_>>,
        next_group_id: &mut u64,
    ) -> Result<Vec<ExperienceGroup>> {
        let prompts = starts.len();
        let mut draw = |requests: &[(usize, usize)]| {
            let jobs: Vec<Start> = requests
                .iter()
                .flat_map(|&(g, n)| std::iter::repeat_n(starts[g].clone(), n))
                .collect();
            self.episodes(model, tok, params.clone(), &jobs, sample_rng)
        };
        let drawn: Vec<Vec<(Episode, bool)>> = match pacing {
            None => {
                let all: Vec<(usize, usize)> = (0..prompts).map(|g| (g, group)).collect();
                let mut eps = draw(&all)?.into_iter();
                (0..prompts)
                    .map(|_| eps.by_ref().take(group).map(|e| (e, true)).collect())
                    .collect()
            }
            Some(p) => {
                let d = p.duration;
                let dt = |e: &Episode| {
                    let exec = super::episode::exec_time(&e.infos, d.unparsable);
                    effective_duration(exec, d.t_min, d.t_floor, d.unparsable)
                };
                fill_paced(
                    (prompts, group),
                    (p.window_s, p.max_rounds),
                    dt,
                    p.rng,
                    draw,
                )?
            }
        };
        let discount = self.config().discount;
        let mut out = Vec::with_capacity(prompts);
        for eps in drawn {
            let group_id = *next_group_id;
            *next_group_id += 1;
            let experiences = eps
                .iter()
                .filter(|(_, kept)| *kept)
                .map(|(e, _)| experience(e, discount, group_id, version))
                .collect();
            // Empty when every drawn episode was kept (the experiences are all that was drawn).
            let drawn_rewards = if eps.iter().all(|(_, kept)| *kept) {
                vec![]
            } else {
                eps.iter()
                    .map(|(e, _)| e.discounted_return(discount))
                    .collect()
            };
            out.push(ExperienceGroup {
                group_id,
                policy_version: version,
                experiences,
                drawn_rewards,
            });
        }
        Ok(out)
    }

    /// The start of a group that plays a prompt of eva's pool (a countdown puzzle,
    /// [`Puzzle::from_problem`]): its row, and a training seed drawn from `prompt_rng`.
    pub fn pool_start(&self, problem: &Problem, prompt_rng: &mut ChaCha8Rng) -> Result<Start> {
        let puzzle = Puzzle::from_problem(problem).map_err(Error::Internal)?;
        Ok(Start {
            seed: prompt_rng.gen::<u64>() & !HELDOUT_BIT,
            row: Some(Arc::new(DataRow {
                at: puzzle.key(),
                fields: puzzle.to_row(),
            })),
        })
    }

    /// `n` episodes of each of the first `limit` held-out starts (all when None), sampled with
    /// `params` from `rng`, `batch` episodes rolled out together; one list per start, in
    /// held-out order (pass@k evaluation, `grove eval --task <env kind>`).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_heldout<M: CausalLm + ?Sized>(
        &self,
        model: &M,
        tok: &Tokenizer,
        params: SamplingParams,
        (n, limit): (usize, Option<usize>),
        batch: usize,
        rng: &mut ChaCha8Rng,
        mut progress: impl FnMut(&[Episode]),
    ) -> Result<Vec<Vec<Episode>>> {
        let mut starts = self.heldout_starts();
        if let Some(l) = limit {
            starts.truncate(l);
        }
        let jobs: Vec<Start> = starts
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.clone(), n))
            .collect();
        let mut eps = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(batch.max(1)) {
            let done = self.episodes(model, tok, params.clone(), chunk, rng)?;
            progress(&done);
            eps.extend(done);
        }
        let mut per_start: Vec<Vec<Episode>> = Vec::with_capacity(starts.len());
        let mut it = eps.into_iter();
        for _ in &starts {
            per_start.push(it.by_ref().take(n).collect());
        }
        Ok(per_start)
    }

    /// Fraction of the first `n` held-out episodes (all when 0) the greedy policy solves.
    pub fn evaluate<M: CausalLm + ?Sized>(
        &self,
        model: &M,
        tok: &Tokenizer,
        n: usize,
        max_new_tokens: usize,
    ) -> Result<f64> {
        let mut starts = self.heldout_starts();
        if n > 0 {
            starts.truncate(n);
        }
        if starts.is_empty() {
            return Ok(0.0);
        }
        // Greedy decoding draws nothing; a fixed RNG keeps the signature simple.
        let mut rng = rand::SeedableRng::seed_from_u64(0);
        let eps = self.episodes(
            model,
            tok,
            SamplingParams::greedy(max_new_tokens),
            &starts,
            &mut rng,
        )?;
        Ok(eps.iter().filter(|e| e.success).count() as f64 / eps.len() as f64)
    }
}

/// An episode as the learner stores it: the return as reward, `correct` = solved, the
/// transcript in `episode`.
pub fn experience(e: &Episode, discount: f64, group_id: u64, version: u64) -> Experience {
    let ret = e.discounted_return(discount);
    let mut components = BTreeMap::from([
        ("correct".to_string(), if e.success { 1.0 } else { 0.0 }),
        ("turns".to_string(), e.rewards.len() as f64),
    ]);
    if !e.tools.is_empty() {
        // Logged as reward/tool_call/mean: the fraction of episodes that used a tool.
        components.insert("tool_call".into(), f64::from(u8::from(used_a_tool(e))));
    }
    Experience {
        group_id,
        prompt: e.prompt.clone(),
        prompt_ids: e.prompt_ids.clone(),
        response_ids: e.response_ids.clone(),
        logprobs: e.logprobs.clone(),
        reward: ret,
        components,
        answer: match &e.row {
            Some(at) => format!("seed {}, {at}", e.seed),
            None => format!("seed {}", e.seed),
        },
        finished: e.ended_by_env,
        policy_version: version,
        use_count: 0,
        trainable: e.trainable.clone(),
        episode: Some(e.to_json()),
        hidden: e.hidden.clone(),
    }
}

/// Whether a step of the episode answered at least one tool call without an error (its info's
/// `tool_calls_ok`, as the built-in tool environments report it).
pub fn used_a_tool(e: &Episode) -> bool {
    e.infos
        .iter()
        .any(|i| i.get("tool_calls_ok").and_then(|v| v.as_u64()).unwrap_or(0) > 0)
}

/// The task face of an environment run: held-out "problems" are the held-out seeds (the
/// prompt names the episode; the environment writes the real prompt at reset). On
/// `countdown` it also draws and evolves puzzles for eva's pool ([`CountdownPuzzles`]).
pub struct EnvTask {
    heldout: Vec<Problem>,
    prompt_bos: bool,
    puzzles: Option<CountdownPuzzles>,
}

impl EnvTask {
    pub fn new(runner: &EnvRunner) -> Self {
        let cfg = runner.config();
        let kind = serde_json::to_value(cfg.kind).unwrap_or_default();
        let starts = runner.heldout_starts();
        let puzzles = (cfg.kind == EnvKind::Countdown)
            .then(|| CountdownPuzzles::new(cfg, starts.iter().map(|s| s.seed)));
        EnvTask {
            heldout: starts
                .into_iter()
                .map(|s| Problem {
                    prompt: format!("{} episode", kind.as_str().unwrap_or("env")),
                    answer: s.describe(),
                })
                .collect(),
            prompt_bos: runner.prompt_bos(),
            puzzles,
        }
    }
}

impl Task for EnvTask {
    /// A training episode's seed; on `countdown`, the puzzle that seed plays.
    fn sample_train(&self, rng: &mut ChaCha8Rng) -> Problem {
        let s = rng.gen::<u64>() & !HELDOUT_BIT;
        match &self.puzzles {
            Some(p) => p.sample(s).to_problem(),
            None => Problem {
                prompt: "episode".into(),
                answer: format!("seed {s}"),
            },
        }
    }
    fn heldout(&self) -> &[Problem] {
        &self.heldout
    }
    fn verify(&self, _response: &str, _finished: bool, _reference: &str) -> Verdict {
        Verdict {
            score: 0.0,
            extracted: None,
            reason: "environments score episodes, not single responses".into(),
        }
    }
    fn prompt_bos(&self) -> bool {
        self.prompt_bos
    }
    /// A countdown puzzle's key with its numbers sorted: `make 12 from 3 7 2` and
    /// `make 12 from 7 2 3` are one puzzle in eva's pool.
    fn pool_key(&self, problem: &Problem) -> String {
        match (&self.puzzles, Puzzle::from_problem(problem)) {
            (Some(_), Ok(p)) => p.canonical_key(),
            _ => problem.prompt.clone(),
        }
    }
    /// eva's countdown mutator ([`CountdownPuzzles::mutate`]); other environments have none.
    fn evolve(
        &self,
        parent: &Problem,
        n: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Option<Vec<Problem>>> {
        let Some(p) = &self.puzzles else {
            return Ok(None);
        };
        let parent = Puzzle::from_problem(parent).map_err(Error::Internal)?;
        Ok(Some(
            p.mutate(&parent, n, rng)
                .iter()
                .map(Puzzle::to_problem)
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::eva::EvaConfig;
    use crate::task::eva_pool::{Evolved, PromptPool};
    use rand::SeedableRng;

    /// eva's pool on countdown: a puzzle with its numbers in another order is the same
    /// puzzle, so a round adds the new child and not the reordered copy of a pool puzzle.
    #[test]
    fn eva_pool_holds_a_countdown_puzzle_once_whatever_the_order_of_its_numbers() {
        let cfg = EnvConfig {
            kind: EnvKind::Countdown,
            ..Default::default()
        };
        let runner = EnvRunner::new(&cfg, &Tokenizer::builtin_arithmetic(), "test").unwrap();
        let task = EnvTask::new(&runner);
        let p = |prompt: &str| Problem {
            prompt: prompt.into(),
            answer: String::new(),
        };
        assert_eq!(
            task.pool_key(&p("make 12 from 3 7 2")),
            "make 12 from 2 3 7"
        );
        assert_eq!(
            task.pool_key(&p("make 12 from 7 2 3")),
            "make 12 from 2 3 7"
        );
        assert_eq!(
            task.pool_key(&p("make 13 from 7 2 3")),
            "make 13 from 2 3 7"
        );
        let eva = EvaConfig {
            pool_size: 2,
            children: 2,
            select_fraction: 0.5,
            ..Default::default()
        };
        let mut pool = PromptPool::new(&task, &eva, ChaCha8Rng::seed_from_u64(0)).unwrap();
        // Prompt 0 is the informative one: the round's only parent.
        pool.observe(0, &[0.0, 1.0], &eva);
        pool.observe(1, &[1.0, 1.0], &eva);
        let parent = Puzzle::from_problem(pool.problem(0)).unwrap();
        let mut reordered = parent.clone();
        reordered.numbers.rotate_left(1);
        assert_ne!(reordered.key(), parent.key(), "{parent:?}");
        let mut new = parent.clone();
        new.target += 1;
        let kids = [reordered.to_problem(), new.to_problem()];
        let added = pool
            .evolve_round_with(
                &eva,
                |q| task.pool_key(q),
                |_, _, _| {
                    Ok(Evolved {
                        children: kids.iter().map(|k| (k.clone(), None)).collect(),
                        rejected: 0,
                    })
                },
            )
            .unwrap();
        assert_eq!(added, 1);
        assert_eq!(pool.problem(2).prompt, new.key());
    }
}

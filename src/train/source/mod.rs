//! Where the learner's batches come from: one [`BatchSource`] per sync mode, chosen once by
//! [`open`] at the start of a run.
//!
//! - [`OnPolicy`]: each batch sampled by the current weights, just before the update;
//! - [`lagged::Lagged`]: batches sampled `sync.offset` steps ahead by a copy of the weights
//!   refreshed every `sync.interval` updates;
//! - [`asynchronous::AsyncExplorer`]: an explorer thread samples while the learner learns;
//! - [`shared::SharedBuffer`]: `grove explore` processes fill a buffer (JSONL, SQLite,
//!   PostgreSQL) and the learner publishes weights for them;
//! - [`offline::Offline`]: groups read from an experience file, no sampling at all;
//! - [`remote::RemoteSync`]: a `[remote]` server samples and the learner pushes its weights
//!   to it after every `sync.interval` updates.
pub mod asynchronous;
pub mod lagged;
pub mod offline;
pub mod remote;
pub mod shared;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::buffer::ExperienceGroup;
use crate::config::SyncMode;
use crate::error::Result;
use crate::train::checkpoint::{Extras, LaggedState};
use crate::train::explore::{collect_rewarded, Env, ExploreState};
use crate::train::learn::Learner;

/// One batch as handed to the learner.
pub struct Batch {
    pub groups: Vec<ExperienceGroup>,
    /// Seconds spent sampling these groups.
    pub generate_s: f64,
    /// Groups the source discarded as too stale while assembling this batch.
    pub dropped: usize,
}

/// A sync mode: where batches come from and what it does after each update.
pub trait BatchSource {
    /// The batch for learner step `s` (1-based), or `None` when the source is exhausted.
    fn next_batch(
        &mut self,
        env: &Env,
        learner: &mut Learner,
        explore_st: &mut ExploreState,
        s: usize,
    ) -> Result<Option<Batch>>;

    /// Whether this source's batches arrive scored by the run's `[reward.pipeline]` (sampled
    /// in this thread, with the learner's rewarder). The others (the async explorer thread,
    /// `grove explore` processes, offline files) are scored by the learner as it takes each
    /// batch, in batch order, so the pipeline's state follows the learner's steps and is
    /// checkpointed with them.
    fn scored_by_pipeline(&self) -> bool {
        false
    }

    /// Called after every update (publishing weights, waking an explorer).
    fn after_update(&mut self, _env: &Env, _learner: &Learner) -> Result<()> {
        Ok(())
    }

    /// What a checkpoint keeps of this source besides the policy and optimizer.
    fn checkpoint(&self) -> Result<(Option<LaggedState>, Extras<'_>)> {
        Ok((None, Extras::default()))
    }
}

/// What a resumed run restores into its source.
pub struct Restored {
    /// Offline groups read (and checked) before the run directory was touched.
    pub offline: Option<Vec<ExperienceGroup>>,
    /// Lagged mode's state and behaviour weights, from the checkpoint.
    pub lagged: Option<(LaggedState, crate::model::Llama)>,
    /// Lagged mode's sampled-but-unused batches, from the checkpoint.
    pub pending: Vec<ExperienceGroup>,
    /// Async mode with a staleness bound: the older published weights, from the checkpoint.
    pub sampler: Vec<(u64, crate::model::Llama)>,
}

/// Chooses the run's source from its config, once.
pub fn open(
    env: &Arc<Env>,
    learner: &Learner,
    explore_st: &ExploreState,
    step: usize,
    restored: Restored,
) -> Result<Box<dyn BatchSource>> {
    let cfg = &env.cfg;
    let np = cfg.rollout.prompts_per_step;
    if let Some(url) = &cfg.sync.buffer {
        return Ok(Box::new(shared::SharedBuffer::open(cfg, url, learner)?));
    }
    if cfg.remote.is_some() {
        return Ok(Box::new(remote::RemoteSync::open(env, learner)?));
    }
    if let Some(groups) = restored.offline {
        return Ok(Box::new(offline::Offline {
            groups: groups.into_iter().skip(step * np).collect(),
        }));
    }
    Ok(match cfg.sync.mode {
        SyncMode::OnPolicy => Box::new(OnPolicy {
            generator: match crate::train::eva_generator::needs_generator(env) {
                true => Some(crate::train::eva_generator::TextGenerator::new(
                    &cfg.sampling.eva,
                    &env.tok,
                    learner.model.device(),
                )?),
                false => None,
            },
        }),
        SyncMode::Lagged => Box::new(match restored.lagged {
            Some((ls, behaviour)) => lagged::Lagged {
                behaviour,
                behaviour_version: ls.behaviour_version,
                next_batch: ls.next_batch,
                pending: chunk_groups(restored.pending, np),
            },
            None => lagged::Lagged {
                behaviour: learner.model.deep_clone()?,
                behaviour_version: learner.version,
                next_batch: step,
                pending: VecDeque::new(),
            },
        }),
        SyncMode::Async => Box::new(asynchronous::spawn_explorer(
            env.clone(),
            &learner.model,
            learner.version,
            restored.sampler,
            explore_st.clone(),
            step,
        )?),
    })
}

/// Each batch sampled by the current weights just before the update.
pub struct OnPolicy {
    /// eva on a text dataset: the model that writes evolved prompts.
    generator: Option<crate::train::eva_generator::TextGenerator>,
}

impl BatchSource for OnPolicy {
    fn scored_by_pipeline(&self) -> bool {
        true
    }
    fn next_batch(
        &mut self,
        env: &Env,
        learner: &mut Learner,
        explore_st: &mut ExploreState,
        s: usize,
    ) -> Result<Option<Batch>> {
        let t = Instant::now();
        let sampling = &env.cfg.sampling;
        if sampling.reinforce_ada.enabled() {
            let (groups, stats) = crate::train::reinforce_ada::collect_adaptive(
                env,
                &learner.model,
                learner.version,
                explore_st,
            )?;
            learner.note_drawn(stats.samples);
            learner.note_ada(stats);
            return Ok(Some(Batch {
                groups,
                generate_s: t.elapsed().as_secs_f64(),
                dropped: 0,
            }));
        }
        let refill_rounds = if sampling.filter_zero_std {
            sampling.refill_max_rounds
        } else {
            0
        };
        // Every response sampled for this batch, kept or not (`sampling/samples_drawn`).
        let mut drawn = 0usize;
        let mut collect = || {
            let groups = collect_rewarded(
                env,
                &learner.model,
                learner.version,
                explore_st,
                learner.rewards.as_mut(),
            )?;
            drawn += groups.iter().map(|g| g.samples_drawn()).sum::<usize>();
            Ok::<_, crate::error::Error>(groups)
        };
        // Without refill the groups stay in the order they were sampled (fill_batch puts the
        // informative ones first, which would change the float sums of every metric and loss).
        let (groups, refill) = if refill_rounds == 0 {
            (collect()?, None)
        } else {
            let (groups, refill) = crate::sampling::fill_batch(
                env.cfg.rollout.prompts_per_step,
                refill_rounds,
                |g: &ExperienceGroup| {
                    let rewards: Vec<f64> = g.experiences.iter().map(|e| e.reward).collect();
                    !crate::sampling::is_zero_std(&rewards)
                },
                collect,
            )?;
            (groups, Some(refill))
        };
        if let Some(r) = refill {
            learner.note_refill(r);
        }
        learner.note_drawn(drawn);
        // eva's creator: after every `every` steps, evolve the most informative prompts seen
        // since the last round; the new ones are drawn from the next batch on.
        if let Some(pool) = explore_st.eva.as_mut() {
            let eva = &env.cfg.sampling.eva;
            if eva.every > 0 && s.is_multiple_of(eva.every) {
                crate::train::eva_generator::evolve_round(
                    env,
                    &learner.model,
                    self.generator.as_ref(),
                    pool,
                )?;
            }
            learner.note_eva(pool.take_stats());
        }
        Ok(Some(Batch {
            groups,
            generate_s: t.elapsed().as_secs_f64(),
            dropped: 0,
        }))
    }
}

/// What a buffer-reading source (async explorer, shared buffer) took for one batch: the stale
/// groups it dropped, and every response it read, dropped ones included
/// (`sampling/samples_drawn`).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tally {
    pub dropped: usize,
    pub drawn: usize,
}

impl Tally {
    /// Counts one take.
    pub fn add(&mut self, taken: &crate::buffer::Taken) {
        self.dropped += taken.dropped;
        self.drawn += taken.dropped_samples
            + taken
                .groups
                .iter()
                .map(|g| g.samples_drawn())
                .sum::<usize>();
    }
}

/// Splits groups into batches of `np` (the last may be short).
fn chunk_groups(groups: Vec<ExperienceGroup>, np: usize) -> VecDeque<Vec<ExperienceGroup>> {
    let mut out = VecDeque::new();
    let mut it = groups.into_iter().peekable();
    while it.peek().is_some() {
        out.push_back(it.by_ref().take(np).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{sample_group as group, Buffer, MemoryBuffer, TakeMode};

    #[test]
    fn a_tally_counts_the_responses_of_dropped_and_taken_groups() {
        let mut buf = MemoryBuffer::new(10, TakeMode::Fifo).unwrap();
        // Stale at min_version 1: A (v0, 2 responses) and B (v0, 3 kept of 5 drawn).
        buf.put(group(1, 0, 2)).unwrap();
        let mut b = group(2, 0, 3);
        b.drawn_rewards = vec![0.0; 5];
        buf.put(b).unwrap();
        // Fresh: C (v1, 2 responses), D (v1, 4 responses).
        buf.put(group(3, 1, 2)).unwrap();
        buf.put(group(4, 1, 4)).unwrap();
        let mut tally = Tally::default();
        let taken = buf.take(2, 1).unwrap();
        assert_eq!(taken.groups.len(), 2);
        tally.add(&taken);
        tally.add(&buf.take(2, 1).unwrap()); // empty now: adds nothing
                                             // Dropped A, B: 2 + 5 = 7 responses; taken C, D: 2 + 4 = 6.
        assert_eq!(
            tally,
            Tally {
                dropped: 2,
                drawn: 13
            }
        );
    }
}

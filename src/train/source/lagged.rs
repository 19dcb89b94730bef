//! Lagged mode: batch b is sampled when the learner is at step b − `sync.offset` + 1, by a copy
//! of the weights refreshed whenever b is a multiple of `sync.interval`.
use std::collections::VecDeque;
use std::time::Instant;

use super::{Batch, BatchSource};
use crate::buffer::ExperienceGroup;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::train::checkpoint::{Extras, LaggedState};
use crate::train::explore::{collect_rewarded, Env, ExploreState};
use crate::train::learn::Learner;

pub struct Lagged {
    /// The weights that sample (the behaviour policy).
    pub behaviour: Llama,
    pub behaviour_version: u64,
    /// The next batch index to sample (0-based).
    pub next_batch: usize,
    /// Batches sampled ahead of the learner.
    pub pending: VecDeque<Vec<ExperienceGroup>>,
}

impl BatchSource for Lagged {
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
        let cfg = &env.cfg;
        let mut generate_s = 0.0;
        while self.next_batch < s + cfg.sync.offset {
            if self.next_batch.is_multiple_of(cfg.sync.interval) {
                self.behaviour.copy_weights_from(&learner.model)?;
                self.behaviour_version = learner.version;
            }
            let t = Instant::now();
            self.pending.push_back(collect_rewarded(
                env,
                &self.behaviour,
                self.behaviour_version,
                explore_st,
                learner.rewards.as_mut(),
            )?);
            generate_s += t.elapsed().as_secs_f64();
            self.next_batch += 1;
        }
        let groups = self
            .pending
            .pop_front()
            .ok_or_else(|| Error::Internal("lagged mode: no pending batch".into()))?;
        Ok(Some(Batch {
            groups,
            generate_s,
            dropped: 0,
        }))
    }

    fn checkpoint(&self) -> Result<(Option<LaggedState>, Extras<'_>)> {
        Ok((
            Some(LaggedState {
                behaviour_version: self.behaviour_version,
                next_batch: self.next_batch,
            }),
            Extras {
                behaviour: Some(&self.behaviour),
                pending: self.pending.iter().flatten().cloned().collect(),
                ..Extras::default()
            },
        ))
    }
}

//! Offline mode: groups read from an experience file, `rollout.prompts_per_step` per step, in
//! file order; the run ends when fewer than one step's groups are left.
use std::collections::VecDeque;

use super::{Batch, BatchSource};
use crate::buffer::ExperienceGroup;
use crate::error::Result;
use crate::train::explore::{Env, ExploreState};
use crate::train::learn::Learner;

pub struct Offline {
    pub groups: VecDeque<ExperienceGroup>,
}

impl BatchSource for Offline {
    fn next_batch(
        &mut self,
        env: &Env,
        _learner: &mut Learner,
        _explore_st: &mut ExploreState,
        _s: usize,
    ) -> Result<Option<Batch>> {
        let np = env.cfg.rollout.prompts_per_step;
        if self.groups.len() < np {
            return Ok(None);
        }
        Ok(Some(Batch {
            groups: self.groups.drain(..np).collect(),
            generate_s: 0.0,
            dropped: 0,
        }))
    }
}

//! Shared-buffer mode: `grove explore` processes fill a buffer (JSONL, SQLite, PostgreSQL); the
//! learner takes groups no staler than `sync.max_staleness` and publishes its weights every
//! `sync.interval` updates for the explorers to load.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Batch, BatchSource, Tally};
use crate::buffer::{self, Buffer, TakeMode};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::train::explore::{Env, ExploreState};
use crate::train::learn::Learner;
use crate::train::publish;

pub struct SharedBuffer {
    buffer: Box<dyn Buffer>,
    publish_dir: PathBuf,
}

impl SharedBuffer {
    /// Opens the buffer and publishes the starting weights.
    pub fn open(cfg: &RunConfig, url: &str, learner: &Learner) -> Result<Self> {
        let mode = match &cfg.sync.replay {
            Some(r) => TakeMode::PriorityReplay(*r),
            None => TakeMode::Fifo,
        };
        let buffer = buffer::open_with_mode(url, usize::MAX / 2, mode)?;
        let publish_dir = PathBuf::from(cfg.sync.publish_dir.clone().unwrap_or_default());
        publish::clear_finished(&publish_dir)?;
        publish::publish(&publish_dir, learner.version, &learner.model)?;
        Ok(SharedBuffer {
            buffer,
            publish_dir,
        })
    }
}

impl BatchSource for SharedBuffer {
    fn next_batch(
        &mut self,
        env: &Env,
        learner: &mut Learner,
        _explore_st: &mut ExploreState,
        _s: usize,
    ) -> Result<Option<Batch>> {
        let cfg = &env.cfg;
        let np = cfg.rollout.prompts_per_step;
        let min_version = cfg
            .sync
            .max_staleness
            .map(|m| buffer::min_version(learner.version, m))
            .unwrap_or(0);
        let mut groups = Vec::with_capacity(np);
        let mut tally = Tally::default();
        let waited = Instant::now();
        while groups.len() < np {
            let taken = self
                .buffer
                .take(np - groups.len(), min_version)
                .map_err(Error::from)?;
            tally.add(&taken);
            groups.extend(taken.groups);
            if groups.len() < np {
                if waited.elapsed().as_secs_f64() > cfg.sync.wait_timeout_s {
                    // The URL as the user gave it may hold a password: shown redacted.
                    return Err(Error::Timeout {
                        what: format!(
                            "experience in {}",
                            crate::error::redact_url(
                                cfg.sync.buffer.as_deref().unwrap_or("the buffer")
                            )
                        ),
                        waited_s: cfg.sync.wait_timeout_s,
                        hint: format!(
                            "have {} of {np} groups; is a `grove explore` process running?",
                            groups.len()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        learner.note_drawn(tally.drawn);
        Ok(Some(Batch {
            groups,
            generate_s: 0.0,
            dropped: tally.dropped,
        }))
    }

    fn after_update(&mut self, env: &Env, learner: &Learner) -> Result<()> {
        if learner.version.is_multiple_of(env.cfg.sync.interval as u64) {
            publish::publish(&self.publish_dir, learner.version, &learner.model)?;
        }
        Ok(())
    }
}

//! Async mode: an explorer thread samples with its own copy of the weights while the learner
//! learns. With `sync.max_staleness = k`, batch b (0-based) is sampled by the weights of
//! [`sampling_version`] (at most k versions old), so the run is repeatable and with k = 0
//! equals the on-policy run; without a bound, by the newest weights when it starts.
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::{Batch, BatchSource, Tally};
use crate::buffer::{self, Buffer, MemoryBuffer, TakeMode};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::train::checkpoint::{AsyncSnapshot, Extras, LaggedState};
use crate::train::explore::{collect, Env, ExploreState};
use crate::train::learn::Learner;

/// State shared between the learner and the async explorer thread.
pub struct AsyncShared {
    /// Updates the learner has taken.
    learner_version: u64,
    /// Published weights (deep copies) by version: with a staleness bound, every version from
    /// the one that samples the learner's next batch on (what the explorer and a checkpoint
    /// may still need); without, the newest only.
    published: BTreeMap<u64, Llama>,
    queue: MemoryBuffer,
    /// Sampling seconds of queued groups, by group id.
    gen_s: std::collections::HashMap<u64, f64>,
    stop: bool,
    error: Option<String>,
    /// With a staleness bound, the explorer's state at the start of each batch the learner has
    /// not taken yet, and the environment's episode count then: a checkpoint at learner
    /// version v resumes the explorer from batch v. Without, nothing (no exact resume).
    state_at: BTreeMap<u64, (ExploreState, Option<u64>)>,
}

impl AsyncShared {
    /// The state shared by the learner (at `learner_version`) and the explorer thread.
    fn new(
        learner_version: u64,
        published: BTreeMap<u64, Llama>,
        queue: MemoryBuffer,
    ) -> Arc<(Mutex<AsyncShared>, Condvar)> {
        Arc::new((
            Mutex::new(AsyncShared {
                learner_version,
                published,
                queue,
                gen_s: Default::default(),
                stop: false,
                error: None,
                state_at: BTreeMap::new(),
            }),
            Condvar::new(),
        ))
    }
}

pub struct AsyncExplorer {
    shared: Arc<(Mutex<AsyncShared>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
    max_staleness: Option<u64>,
    interval: u64,
}

impl Drop for AsyncExplorer {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            if let Ok(mut s) = lock.lock() {
                s.stop = true;
            }
            cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The weights version that samples batch b (0-based) under `max_staleness = k`: the oldest
/// published version (a multiple of `interval`) no more than k versions behind b. The learner
/// takes batch b at version b, so no group is ever too stale, and because the version depends
/// on b alone the run is the same whatever the threads' timing. With k = 0 every batch is
/// on-policy; k = interval − 1 is lagged mode's schedule at `sync.offset = 0`, and k with
/// interval 1 its schedule at `sync.offset = k`.
pub fn sampling_version(batch: u64, max_staleness: u64, interval: u64) -> u64 {
    batch.saturating_sub(max_staleness).div_ceil(interval) * interval
}

/// Starts the explorer thread. With `sync.max_staleness` set, batch b waits until the learner
/// has published [`sampling_version`] and is sampled by exactly those weights; without, it is
/// sampled by the newest weights published when it starts (which depends on thread timing).
pub fn spawn_explorer(
    env: Arc<Env>,
    learner_model: &Llama,
    version: u64,
    saved: Vec<(u64, Llama)>,
    mut st: ExploreState,
    first_batch: usize,
) -> Result<AsyncExplorer> {
    let cfg = &env.cfg;
    let interval = cfg.sync.interval as u64;
    let max_staleness = cfg.sync.max_staleness;
    let mut published: BTreeMap<u64, Llama> = saved.into_iter().collect();
    // The weights of the first batch: the learner's, or (resuming a bounded run) a saved older
    // version.
    let first_version = match max_staleness {
        Some(k) => sampling_version(first_batch as u64, k, interval),
        None => version,
    };
    let model = if first_version == version {
        learner_model.deep_clone()?
    } else {
        published
            .get(&first_version)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "async resume: batch {first_batch} is sampled by weights v{first_version}, \
                     and the checkpoint has no sampler-v{first_version}.safetensors (a \
                     checkpoint of a grove that refused async resume?)"
                ))
            })?
            .deep_clone()?
    };
    if max_staleness.is_some_and(|k| k > 0) && version.is_multiple_of(interval) {
        // A checkpoint may need the learner's current version until the explorer is past it.
        published.insert(version, learner_model.deep_clone()?);
    }
    let np = cfg.rollout.prompts_per_step;
    let capacity = if cfg.sync.capacity == 0 {
        4 * np
    } else {
        cfg.sync.capacity.max(np)
    };
    let queue = MemoryBuffer::new(capacity, TakeMode::Fifo)?;
    let shared = AsyncShared::new(version, published, queue);
    // Snapshots for checkpoints, only where a resume can use them.
    let snapshot = move |env: &Env, st: &ExploreState| {
        max_staleness.map(|_| {
            (
                st.clone(),
                env.environment.as_ref().map(|r| r.episodes_numbered()),
            )
        })
    };
    if let (Ok(mut s), Some(snap)) = (shared.0.lock(), snapshot(&env, &st)) {
        s.state_at.insert(first_batch as u64, snap);
    }
    let sh = shared.clone();
    let handle = std::thread::spawn(move || {
        let (lock, cv) = &*sh;
        let mut my_version = first_version;
        let mut b = first_batch as u64;
        loop {
            {
                let Ok(mut s) = lock.lock() else { return };
                loop {
                    if s.stop {
                        return;
                    }
                    let gated = max_staleness
                        .map(|m| s.learner_version < sampling_version(b, m, interval))
                        .unwrap_or(false);
                    let full = s.queue.len().unwrap_or(0) + np > capacity;
                    if !gated && !full {
                        break;
                    }
                    s = match cv.wait(s) {
                        Ok(g) => g,
                        Err(_) => return,
                    };
                }
                let want = match max_staleness {
                    Some(m) => sampling_version(b, m, interval),
                    None => {
                        let newest = s.published.keys().next_back().copied();
                        newest.unwrap_or(my_version).max(my_version)
                    }
                };
                if want > my_version {
                    let Some(w) = s.published.get(&want) else {
                        s.error = Some(format!(
                            "explorer: weights v{want} for batch {b} were not published"
                        ));
                        cv.notify_all();
                        return;
                    };
                    if let Err(e) = model.copy_weights_from(w) {
                        s.error = Some(format!("explorer: loading published weights v{want}: {e}"));
                        cv.notify_all();
                        return;
                    }
                    my_version = want;
                }
            }
            let t = Instant::now();
            let res = collect(&env, &model, my_version, &mut st);
            let gen_s = t.elapsed().as_secs_f64();
            let Ok(mut s) = lock.lock() else { return };
            match res {
                Ok(groups) => {
                    for g in groups {
                        s.gen_s.insert(g.group_id, gen_s / np as f64);
                        if let Err(e) = s.queue.put(g) {
                            s.error = Some(format!("explorer: buffer: {e}"));
                            cv.notify_all();
                            return;
                        }
                    }
                }
                Err(e) => {
                    s.error = Some(format!("explorer: {e}"));
                    cv.notify_all();
                    return;
                }
            }
            if let Some(snap) = snapshot(&env, &st) {
                s.state_at.insert(b + 1, snap);
            }
            cv.notify_all();
            b += 1;
        }
    });
    Ok(AsyncExplorer {
        shared,
        handle: Some(handle),
        max_staleness,
        interval,
    })
}

impl BatchSource for AsyncExplorer {
    /// With a staleness bound: the explorer's state at the learner's next batch and the saved
    /// older weights it samples by (a [`AsyncSnapshot`]); without, nothing (resume is refused).
    fn checkpoint(&self) -> Result<(Option<LaggedState>, Extras<'_>)> {
        let Some(k) = self.max_staleness else {
            return Ok((None, Extras::default()));
        };
        let (lock, _) = &*self.shared;
        let s = lock.lock().map_err(|_| Error::Thread {
            thread: "async explorer",
            msg: "panicked".into(),
        })?;
        let v = s.learner_version;
        let (explore, env_episodes) = s.state_at.get(&v).cloned().ok_or_else(|| {
            Error::Internal(format!("async checkpoint: no explorer state for batch {v}"))
        })?;
        let oldest = sampling_version(v, k, self.interval);
        let mut weights = Vec::new();
        for (&w, model) in s.published.range(oldest..v) {
            weights.push((w, model.deep_clone()?));
        }
        Ok((
            None,
            Extras {
                async_snapshot: Some(AsyncSnapshot {
                    explore,
                    env_episodes,
                    weights,
                }),
                ..Extras::default()
            },
        ))
    }

    fn next_batch(
        &mut self,
        env: &Env,
        learner: &mut Learner,
        _explore_st: &mut ExploreState,
        _s: usize,
    ) -> Result<Option<Batch>> {
        let cfg = &env.cfg;
        let np = cfg.rollout.prompts_per_step;
        let (lock, cv) = &*self.shared;
        let min_version = cfg
            .sync
            .max_staleness
            .map(|m| buffer::min_version(learner.version, m))
            .unwrap_or(0);
        let mut groups = Vec::with_capacity(np);
        let mut tally = Tally::default();
        let mut generate_s = 0.0;
        let mut s_guard = lock.lock().map_err(|_| Error::Thread {
            thread: "async explorer",
            msg: "panicked".into(),
        })?;
        while groups.len() < np {
            if let Some(e) = &s_guard.error {
                return Err(Error::Thread {
                    thread: "async explorer",
                    msg: e.clone(),
                });
            }
            let taken = s_guard
                .queue
                .take(np - groups.len(), min_version)
                .map_err(Error::from)?;
            tally.add(&taken);
            for g in taken.groups {
                generate_s += s_guard.gen_s.remove(&g.group_id).unwrap_or(0.0);
                groups.push(g);
            }
            cv.notify_all();
            if groups.len() < np {
                s_guard = cv.wait(s_guard).map_err(|_| Error::Thread {
                    thread: "async explorer",
                    msg: "panicked".into(),
                })?;
            }
        }
        learner.note_drawn(tally.drawn);
        Ok(Some(Batch {
            groups,
            generate_s,
            dropped: tally.dropped,
        }))
    }

    fn after_update(&mut self, env: &Env, learner: &Learner) -> Result<()> {
        let interval = env.cfg.sync.interval as u64;
        let (lock, cv) = &*self.shared;
        let publish = learner.version.is_multiple_of(interval);
        let copy = if publish {
            Some(learner.model.deep_clone()?)
        } else {
            None
        };
        let mut s = lock.lock().map_err(|_| Error::Thread {
            thread: "async explorer",
            msg: "panicked".into(),
        })?;
        s.learner_version = learner.version;
        if let Some(c) = copy {
            if env.cfg.sync.max_staleness.is_none() {
                s.published.clear();
            }
            s.published.insert(learner.version, c);
        }
        if let Some(k) = env.cfg.sync.max_staleness {
            // Neither the explorer (at batch ≥ the learner's version) nor a checkpoint needs
            // versions older than the one that samples the learner's next batch.
            let oldest = sampling_version(learner.version, k, interval);
            s.published.retain(|&v, _| v >= oldest);
        }
        let taken = learner.version;
        s.state_at.retain(|&b, _| b >= taken);
        cv.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::sample_group as group;
    use crate::compute::optim::AdamW;

    #[test]
    fn sampling_versions_by_hand() {
        let versions = |k, i| {
            (0..8)
                .map(|b| sampling_version(b, k, i))
                .collect::<Vec<_>>()
        };
        // k = 0: on-policy.
        assert_eq!(versions(0, 1), [0, 1, 2, 3, 4, 5, 6, 7]);
        // k = 2, every version published: two behind, none before 0.
        assert_eq!(versions(2, 1), [0, 0, 0, 1, 2, 3, 4, 5]);
        // k = 1, published every 2: lagged mode's floor(b / 2) * 2.
        assert_eq!(versions(1, 2), [0, 0, 2, 2, 4, 4, 6, 6]);
        // k = 2, every 2: the oldest multiple of 2 at or after b − 2.
        assert_eq!(versions(2, 2), [0, 0, 0, 2, 2, 4, 4, 6]);
        // k = 3, every 2 (k above interval − 1): staleness 2 or 3 once b ≥ 3.
        assert_eq!(versions(3, 2), [0, 0, 0, 0, 2, 2, 4, 4]);
    }

    /// The learner at version 1 with `max_staleness = 0` drops the queue's two v0 groups and
    /// takes two v1 groups: `sampling/samples_drawn` counts all 4 × 2 responses read.
    #[test]
    fn an_async_batch_counts_the_stale_groups_it_dropped_as_drawn() {
        let sets: Vec<String> = [
            "sync.mode=\"async\"",
            "sync.max_staleness=0",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
        ]
        .map(String::from)
        .to_vec();
        let env = Arc::new(Env::new(crate::config::load(None, &sets).unwrap()).unwrap());
        let model = env.initial_policy(&crate::compute::device()).unwrap();
        let opt = AdamW::new(model.params(), Default::default());
        let tmp = tempfile::tempdir().unwrap();
        let mut learner = Learner::new(model, opt, tmp.path(), 0).unwrap();
        learner.version = 1;
        let mut queue = MemoryBuffer::new(8, TakeMode::Fifo).unwrap();
        for (id, version) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
            queue.put(group(id, version, 2)).unwrap();
        }
        let mut source = AsyncExplorer {
            shared: AsyncShared::new(1, BTreeMap::new(), queue),
            handle: None,
            max_staleness: Some(0),
            interval: 1,
        };
        let mut st = ExploreState::for_trainer(&env.cfg, env.task.as_ref()).unwrap();
        let batch = source
            .next_batch(&env, &mut learner, &mut st, 2)
            .unwrap()
            .unwrap();
        let ids: Vec<u64> = batch.groups.iter().map(|g| g.group_id).collect();
        assert_eq!((ids, batch.dropped), (vec![3, 4], 2));
        let m = learner
            .learn(&env, &batch.groups, 2, 0.0, batch.dropped)
            .unwrap();
        assert_eq!(m["sampling/samples_drawn"], 8.0);
        assert_eq!(m["staleness/dropped"], 2.0);
    }
}

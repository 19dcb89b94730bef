//! A bounded in-process buffer: the explorer thread puts, the trainer takes. Insertion order
//! is kept in a `VecDeque`, which gives FIFO directly and breaks replay ties oldest first.
use super::{
    check_capacity, priority, top_by_priority, Buffer, BufferError, ExperienceGroup, TakeMode,
    Taken,
};
use std::collections::VecDeque;

#[derive(Debug)]
pub struct MemoryBuffer {
    groups: VecDeque<ExperienceGroup>,
    capacity: usize,
    mode: TakeMode,
}

impl MemoryBuffer {
    pub fn new(capacity: usize, mode: TakeMode) -> Result<Self, BufferError> {
        check_capacity(capacity)?;
        mode.validate()?;
        Ok(MemoryBuffer {
            groups: VecDeque::new(),
            capacity,
            mode,
        })
    }

    /// Removes groups older than `min_version` and says how many went.
    /// Removes the groups older than `min_version`: (groups, their responses).
    fn drop_stale(&mut self, min_version: u64) -> (usize, usize) {
        let (mut groups, mut samples) = (0, 0);
        self.groups.retain(|g| {
            let keep = g.policy_version >= min_version;
            if !keep {
                groups += 1;
                samples += g.samples_drawn();
            }
            keep
        });
        (groups, samples)
    }

    fn take_fifo(&mut self, n: usize) -> Vec<ExperienceGroup> {
        let count = n.min(self.groups.len());
        self.groups
            .drain(..count)
            .map(|mut group| {
                group.set_use_count(group.use_count().saturating_add(1));
                group
            })
            .collect()
    }

    fn take_replay(&mut self, n: usize, decay: f64, max_uses: u32) -> Vec<ExperienceGroup> {
        let priorities: Vec<f64> = self
            .groups
            .iter()
            .map(|g| priority(g.policy_version, g.use_count(), decay))
            .collect();
        let chosen = top_by_priority(&priorities, n);
        let mut taken = Vec::with_capacity(chosen.len());
        let mut spent = Vec::new();
        for &index in &chosen {
            if let Some(group) = self.groups.get_mut(index) {
                let uses = group.use_count().saturating_add(1);
                group.set_use_count(uses);
                taken.push(group.clone());
                if uses >= max_uses {
                    spent.push(index);
                }
            }
        }
        // Remove from the back so earlier indices stay valid.
        spent.sort_unstable_by(|a, b| b.cmp(a));
        for index in spent {
            self.groups.remove(index);
        }
        taken
    }
}

impl Buffer for MemoryBuffer {
    fn put(&mut self, group: ExperienceGroup) -> Result<(), BufferError> {
        group.validate()?;
        if self.groups.len() >= self.capacity {
            return Err(BufferError::Full {
                capacity: self.capacity,
            });
        }
        self.groups.push_back(group);
        Ok(())
    }

    fn take(&mut self, n: usize, min_version: u64) -> Result<Taken, BufferError> {
        let (dropped, dropped_samples) = self.drop_stale(min_version);
        let groups = match self.mode {
            TakeMode::Fifo => self.take_fifo(n),
            TakeMode::PriorityReplay(replay) => self.take_replay(n, replay.decay, replay.max_uses),
        };
        Ok(Taken {
            groups,
            dropped,
            dropped_samples,
        })
    }

    fn len(&self) -> Result<usize, BufferError> {
        Ok(self.groups.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::*;

    fn fifo(capacity: usize) -> MemoryBuffer {
        MemoryBuffer::new(capacity, TakeMode::Fifo).unwrap()
    }

    #[test]
    fn fifo_order() {
        contract::fifo_order(&mut fifo(8));
    }

    #[test]
    fn stale_groups_are_dropped_and_counted() {
        contract::drops_stale(&mut fifo(8));
    }

    #[test]
    fn full_at_capacity() {
        contract::full_at_capacity(&mut fifo(contract::SMALL_CAPACITY));
    }

    #[test]
    fn replay_priorities_and_eviction() {
        let mut buffer = MemoryBuffer::new(8, contract::replay_mode()).unwrap();
        contract::replay_priorities(&mut buffer);
    }

    #[test]
    fn content_round_trips() {
        contract::content_round_trips(&mut fifo(8));
    }

    #[test]
    fn invalid_groups_are_refused() {
        contract::invalid_groups_are_refused(&mut fifo(8));
    }
}

//! The behaviour every [`Buffer`] must show, written once as functions over `&mut dyn Buffer`
//! and called from each implementation's tests with a fresh, empty buffer.
use super::experience::tests::sample_group;
use super::{Buffer, BufferError, ExperienceGroup, ReplayConfig, TakeMode, Taken};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The capacity `full_at_capacity` expects.
pub(crate) const SMALL_CAPACITY: usize = 2;

/// The mode `replay_priorities` expects.
pub(crate) fn replay_mode() -> TakeMode {
    TakeMode::PriorityReplay(ReplayConfig {
        decay: 1.5,
        max_uses: 2,
    })
}

fn ids(taken: &Taken) -> Vec<u64> {
    taken.groups.iter().map(|g| g.group_id).collect()
}

fn uses(taken: &Taken) -> Vec<u32> {
    taken.groups.iter().map(|g| g.use_count()).collect()
}

fn put(buffer: &mut dyn Buffer, group_id: u64, version: u64) {
    buffer.put(sample_group(group_id, version, 2)).unwrap();
}

/// Needs capacity >= 3, FIFO mode.
pub(crate) fn fifo_order(buffer: &mut dyn Buffer) {
    put(buffer, 1, 0);
    put(buffer, 2, 0);
    put(buffer, 3, 1);
    assert_eq!(buffer.len().unwrap(), 3);

    let taken = buffer.take(2, 0).unwrap();
    assert_eq!(ids(&taken), vec![1, 2]); // oldest first
    assert_eq!(taken.dropped, 0);
    assert_eq!(uses(&taken), vec![1, 1]); // first delivery
    assert_eq!(buffer.len().unwrap(), 1); // taken groups leave

    let taken = buffer.take(5, 0).unwrap();
    assert_eq!(ids(&taken), vec![3]); // fewer than asked: all that is left
    assert_eq!(buffer.len().unwrap(), 0);

    let taken = buffer.take(5, 0).unwrap();
    assert_eq!(taken, Taken::default()); // empty buffer: nothing, nothing dropped
}

/// Needs capacity >= 5, FIFO mode.
pub(crate) fn drops_stale(buffer: &mut dyn Buffer) {
    for (group_id, version) in [(10, 0), (11, 1), (12, 2), (13, 3), (14, 1)] {
        put(buffer, group_id, version);
    }
    // min_version 2 drops versions 0, 1, 1 (groups 10, 11, 14) = 3, then serves the oldest left.
    let taken = buffer.take(1, 2).unwrap();
    assert_eq!(taken.dropped, 3);
    assert_eq!(taken.dropped_samples, 6, "3 groups of 2 responses");
    assert_eq!(ids(&taken), vec![12]);
    assert_eq!(buffer.len().unwrap(), 1); // group 13 (v3) remains

    // n = 0 still drops: v3 < 4.
    let taken = buffer.take(0, 4).unwrap();
    assert_eq!(taken.dropped, 1);
    assert_eq!(taken.dropped_samples, 2);
    assert!(taken.groups.is_empty());
    assert_eq!(buffer.len().unwrap(), 0);

    // A group that records more draws than it keeps (Reinforce-Ada, time pacing) counts them
    // all: 3 kept of 5 drawn, dropped at min_version 6.
    let mut g = sample_group(15, 5, 3);
    g.drawn_rewards = vec![0.0, 1.0, 0.0, 1.0, 2.0];
    buffer.put(g).unwrap();
    let taken = buffer.take(1, 6).unwrap();
    assert_eq!((taken.dropped, taken.dropped_samples), (1, 5));
}

/// Needs capacity == SMALL_CAPACITY (2), FIFO mode.
pub(crate) fn full_at_capacity(buffer: &mut dyn Buffer) {
    put(buffer, 1, 0);
    put(buffer, 2, 0);
    let err = buffer.put(sample_group(3, 0, 2)).unwrap_err();
    assert!(
        matches!(err, BufferError::Full { capacity: 2 }),
        "expected Full, got {err}"
    );
    assert_eq!(buffer.len().unwrap(), 2); // the refused group was not stored

    assert_eq!(ids(&buffer.take(1, 0).unwrap()), vec![1]);
    put(buffer, 3, 0); // room again after a take
    assert_eq!(ids(&buffer.take(5, 0).unwrap()), vec![2, 3]);
}

/// Needs capacity >= 3 and `replay_mode()` (decay 1.5, max_uses 2).
pub(crate) fn replay_priorities(buffer: &mut dyn Buffer) {
    put(buffer, 1, 3); // A
    put(buffer, 2, 2); // B
    put(buffer, 3, 3); // C

    // priorities A = 3 - 1.5*0 = 3, B = 2, C = 3: tie A/C goes to the older A.
    let taken = buffer.take(1, 0).unwrap();
    assert_eq!(ids(&taken), vec![1]);
    assert_eq!(uses(&taken), vec![1]);
    assert_eq!(buffer.len().unwrap(), 3); // replayed groups stay

    // A = 3 - 1.5*1 = 1.5, B = 2, C = 3 -> C, B.
    let taken = buffer.take(2, 0).unwrap();
    assert_eq!(ids(&taken), vec![3, 2]);
    assert_eq!(uses(&taken), vec![1, 1]);
    assert_eq!(buffer.len().unwrap(), 3);

    // A = 1.5, B = 2 - 1.5 = 0.5, C = 3 - 1.5 = 1.5 -> A, C (tie, A older); both reach
    // max_uses = 2 and are evicted.
    let taken = buffer.take(2, 0).unwrap();
    assert_eq!(ids(&taken), vec![1, 3]);
    assert_eq!(uses(&taken), vec![2, 2]);
    assert_eq!(buffer.len().unwrap(), 1);

    // Only B = 0.5 is left; its second use evicts it.
    let taken = buffer.take(2, 0).unwrap();
    assert_eq!(ids(&taken), vec![2]);
    assert_eq!(uses(&taken), vec![2]);
    assert_eq!(buffer.len().unwrap(), 0);

    // Staleness applies in replay mode too: D (v1) < 2 is dropped, E (v4) served and kept.
    put(buffer, 4, 1);
    put(buffer, 5, 4);
    let taken = buffer.take(1, 2).unwrap();
    assert_eq!((ids(&taken), taken.dropped), (vec![5], 1));
    assert_eq!(buffer.len().unwrap(), 1);
    // A kept group goes stale as the trainer advances: E (v4) < 5.
    let taken = buffer.take(1, 5).unwrap();
    assert_eq!((ids(&taken), taken.dropped), (vec![], 1));
    assert_eq!(buffer.len().unwrap(), 0);
}

/// Needs capacity >= 2, FIFO mode.
pub(crate) fn content_round_trips(buffer: &mut dyn Buffer) {
    let group = sample_group(7, 3, 4);
    buffer.put(group.clone()).unwrap();
    let mut reused = sample_group(8, 3, 2);
    reused.set_use_count(1); // e.g. read back from an offline file that was trained on once
    buffer.put(reused).unwrap();

    let taken = buffer.take(2, 0).unwrap();
    let mut expected = group;
    expected.set_use_count(1);
    assert_eq!(taken.groups.first(), Some(&expected)); // every field survives storage
    assert_eq!(uses(&taken), vec![1, 2]); // 0 + 1, 1 + 1
}

/// Any capacity, any mode.
pub(crate) fn invalid_groups_are_refused(buffer: &mut dyn Buffer) {
    let mut empty = sample_group(1, 0, 1);
    empty.experiences.clear();
    let err = buffer.put(empty).unwrap_err();
    assert!(matches!(err, BufferError::Invalid(_)), "{err}");

    let mut nan = sample_group(2, 0, 1);
    nan.experiences[0].reward = f64::NAN;
    let err = buffer.put(nan).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot store group: group 2: experiences[0].reward is NaN, expected a finite number \
         (JSON cannot store NaN or infinity)"
    );
    assert_eq!(buffer.len().unwrap(), 0);
}

/// Puts, waiting while the buffer is full (what an async explorer does).
pub(crate) fn put_waiting(buffer: &mut dyn Buffer, group: ExperienceGroup) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match buffer.put(group.clone()) {
            Ok(()) => return,
            Err(BufferError::Full { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("put failed: {e}"),
        }
    }
}

/// Takes in small batches until all consumers together have seen `total` distinct groups; every
/// delivery is recorded, so a group delivered twice shows up as a longer `seen`.
pub(crate) fn drain_until(buffer: &mut dyn Buffer, seen: &Mutex<Vec<u64>>, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let distinct = |seen: &Mutex<Vec<u64>>| {
        let seen = seen.lock().unwrap();
        seen.iter().collect::<std::collections::BTreeSet<_>>().len()
    };
    while distinct(seen) < total {
        assert!(Instant::now() < deadline, "consumers starved");
        let taken = buffer.take(3, 0).unwrap();
        if taken.groups.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
        seen.lock()
            .unwrap()
            .extend(taken.groups.iter().map(|g| g.group_id));
    }
}

//! Pieces shared by the SQLite and PostgreSQL stores. Both keep one row per group:
//! `seq` (insertion order), `group_id`, `policy_version`, `use_count` (columns for querying)
//! and `body` (the group as JSON text, the source of truth for its content).
use super::{BufferError, ExperienceGroup, TakeMode};

/// A row as read by `take`, before decoding.
pub(super) struct StoredRow {
    pub seq: i64,
    pub use_count: i64,
    pub body: String,
}

/// Databases store signed 64-bit integers; refuse what would wrap.
pub(super) fn to_i64(field: &'static str, value: u64) -> Result<i64, BufferError> {
    i64::try_from(value).map_err(|_| BufferError::OutOfRange { field, value })
}

/// A `LIMIT` for `n`; any n beyond i64 means "all".
pub(super) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn encode(group: &ExperienceGroup) -> Result<String, BufferError> {
    serde_json::to_string(group).map_err(|source| BufferError::Encode {
        group_id: group.group_id,
        source,
    })
}

/// Decodes a taken row and stamps the group with its new use count (stored + 1).
pub(super) fn decode_taken(
    location: &str,
    row: &StoredRow,
) -> Result<(ExperienceGroup, u32), BufferError> {
    let corrupt = |msg: String| BufferError::Corrupt {
        location: location.to_string(),
        seq: row.seq,
        msg,
    };
    let mut group: ExperienceGroup =
        serde_json::from_str(&row.body).map_err(|e| corrupt(format!("body: {e}")))?;
    let stored = u32::try_from(row.use_count).map_err(|_| {
        corrupt(format!(
            "use_count is {}, expected 0..=u32::MAX",
            row.use_count
        ))
    })?;
    let uses = stored.saturating_add(1);
    group.set_use_count(uses);
    Ok((group, uses))
}

/// Whether a group just taken leaves the store: always in FIFO mode; in replay mode once it
/// has been used `max_uses` times.
pub(super) fn leaves_after_take(mode: &TakeMode, uses: u32) -> bool {
    match mode {
        TakeMode::Fifo => true,
        TakeMode::PriorityReplay(replay) => uses >= replay.max_uses,
    }
}

#[cfg(test)]
mod tests {
    use super::super::experience::tests::sample_group;
    use super::super::ReplayConfig;
    use super::*;

    #[test]
    fn versions_beyond_i64_are_refused() {
        assert_eq!(to_i64("policy_version", 7).unwrap(), 7);
        let message = to_i64("policy_version", u64::MAX).unwrap_err().to_string();
        assert_eq!(
            message,
            "policy_version = 18446744073709551615 does not fit the database's signed 64-bit column"
        );
        assert_eq!(limit(3), 3);
        assert_eq!(limit(usize::MAX), i64::MAX);
    }

    #[test]
    fn decode_stamps_the_next_use_count() {
        let body = encode(&sample_group(5, 2, 2)).unwrap();
        let row = StoredRow {
            seq: 9,
            use_count: 2,
            body,
        };
        let (group, uses) = decode_taken("t", &row).unwrap();
        assert_eq!(uses, 3); // stored 2 + this take
        assert_eq!(group.use_count(), 3);
        assert_eq!(group.group_id, 5);
    }

    #[test]
    fn corrupt_rows_name_the_row() {
        let row = StoredRow {
            seq: 4,
            use_count: 0,
            body: "{\"group_id\": 1}".to_string(),
        };
        let message = decode_taken("sqlite a.db", &row).unwrap_err().to_string();
        assert!(
            message.starts_with("sqlite a.db: stored row seq=4 is not a valid experience group: body: missing field"),
            "{message}"
        );
        let row = StoredRow {
            seq: 4,
            use_count: -1,
            body: encode(&sample_group(1, 0, 1)).unwrap(),
        };
        let message = decode_taken("t", &row).unwrap_err().to_string();
        assert!(message.contains("use_count is -1"), "{message}");
    }

    #[test]
    fn fifo_always_retires_replay_at_max_uses() {
        assert!(leaves_after_take(&TakeMode::Fifo, 1));
        let replay = TakeMode::PriorityReplay(ReplayConfig {
            decay: 1.0,
            max_uses: 2,
        });
        assert!(!leaves_after_take(&replay, 1));
        assert!(leaves_after_take(&replay, 2));
    }
}

//! The reference-reward cache: raw component values on each prompt's reference responses.
use super::*;

/// Raw component values of a prompt's reference responses.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReferenceRewards {
    /// Component name → its raw value on each reference response.
    pub components: BTreeMap<String, Vec<f64>>,
    /// Σ_k w_k·c_k on each reference response.
    pub totals: Vec<f64>,
}

/// Reference rewards by prompt, computed once and kept (oldest prompts evicted beyond
/// `capacity`). Serialisable, so a resumed run reuses the same references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRewardCache {
    capacity: usize,
    entries: HashMap<String, ReferenceRewards>,
    order: VecDeque<String>,
    hits: u64,
    misses: u64,
}

impl ReferenceRewardCache {
    pub fn new(capacity: usize) -> Self {
        ReferenceRewardCache {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits
    }
    /// Lookups that had to compute.
    pub fn misses(&self) -> u64 {
        self.misses
    }
    pub fn get(&self, prompt: &str) -> Option<&ReferenceRewards> {
        self.entries.get(prompt)
    }

    /// The cached rewards of `prompt`, or `compute()`'s, stored. An error stores nothing.
    pub fn get_or_compute(
        &mut self,
        prompt: &str,
        compute: impl FnOnce() -> Result<ReferenceRewards>,
    ) -> Result<(&ReferenceRewards, bool)> {
        if self.entries.contains_key(prompt) {
            self.hits += 1;
            return Ok((&self.entries[prompt], true));
        }
        let value = compute()?;
        self.misses += 1;
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(prompt.to_string());
        self.entries.insert(prompt.to_string(), value);
        Ok((&self.entries[prompt], false))
    }
}

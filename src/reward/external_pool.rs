//! Several copies of one external reward command scoring a batch at once, so a slow checker
//! does not serialize the rollout. Request i of a batch goes to copy i mod w (w = the pool
//! width, `concurrency`), each copy answers its share in order on its own thread, and the
//! rewards come back in request order: with a command whose answer depends only on the request,
//! the rewards, and so the run, do not depend on the width or on timing.
use crate::error::{Error, Result};
use crate::reward::external::{
    ExternalCommandReward, ExternalConfig, ExternalError, RewardFn, RewardRequest,
};

/// The default pool width: the machine's cores.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `w` running copies of one command.
pub struct ExternalPool {
    workers: Vec<ExternalCommandReward>,
}

impl ExternalPool {
    /// Starts `cfg.concurrency` (default: the cores) copies of the command.
    pub fn new(cfg: ExternalConfig) -> std::result::Result<Self, ExternalError> {
        let width = cfg.concurrency.unwrap_or_else(default_concurrency).max(1);
        let workers = (0..width)
            .map(|_| ExternalCommandReward::new(cfg.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(ExternalPool { workers })
    }

    pub fn width(&self) -> usize {
        self.workers.len()
    }

    /// Responses scored as failed so far, over all copies.
    pub fn failures(&self) -> u64 {
        self.workers.iter().map(|w| w.failures()).sum()
    }

    /// The rewards of `requests`, in their order; the first failing request (by index) is the
    /// error.
    pub fn score_all(&mut self, requests: &[RewardRequest]) -> Result<Vec<f64>> {
        let width = self.workers.len().min(requests.len());
        if width <= 1 {
            let Some(worker) = self.workers.first_mut() else {
                return Ok(Vec::new());
            };
            return requests.iter().map(|r| worker.score(r)).collect();
        }
        let shares: Vec<Vec<(usize, Result<f64>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .take(width)
                .enumerate()
                .map(|(k, worker)| {
                    s.spawn(move || {
                        // A copy stops at its first error: its later answers could not be
                        // matched to requests.
                        let mut out = Vec::new();
                        for (i, r) in requests.iter().enumerate().skip(k).step_by(width) {
                            let v = worker.score(r);
                            let failed = v.is_err();
                            out.push((i, v));
                            if failed {
                                break;
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut rewards: Vec<Option<Result<f64>>> = (0..requests.len()).map(|_| None).collect();
        for (i, v) in shares.into_iter().flatten() {
            rewards[i] = Some(v);
        }
        rewards
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.unwrap_or_else(|| {
                    Err(Error::Reward(format!(
                        "reward request {i} was not answered (an earlier request of its \
                         command copy failed)"
                    )))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(response: &str) -> RewardRequest {
        RewardRequest {
            prompt: "p".into(),
            response: response.into(),
            references: vec![],
            metadata: serde_json::Value::Null,
        }
    }

    /// 8 slow requests (1 s each) on 4 copies: the command logs when each request starts and ends; at
    /// most 4 and, at some moment, exactly 4 are in progress together; rewards are in order.
    #[test]
    fn a_batch_runs_on_width_copies_at_once_and_answers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // Reward = the length of the request line, so each answer identifies its request.
        let script = format!(
            "while read -r l; do echo \"start $(date +%s%N)\" >> {log}; sleep 1; \
             echo \"end $(date +%s%N)\" >> {log}; echo ${{#l}}; done",
            log = log.display()
        );
        let mut cfg = ExternalConfig::new(vec!["sh".into(), "-c".into(), script]);
        cfg.concurrency = Some(4);
        let mut pool = ExternalPool::new(cfg).unwrap();
        assert_eq!(pool.width(), 4);
        let requests: Vec<RewardRequest> = (0..8).map(|i| request(&"x".repeat(i * 3))).collect();
        let rewards = pool.score_all(&requests).unwrap();
        let lens: Vec<f64> = requests
            .iter()
            .map(|r| serde_json::to_string(r).unwrap().len() as f64)
            .collect();
        assert_eq!(rewards, lens);
        // Count overlapping executions from the logged times.
        let text = std::fs::read_to_string(&log).unwrap();
        let mut events: Vec<(u128, i32)> = text
            .lines()
            .map(|l| {
                let (kind, t) = l.split_once(' ').unwrap();
                (t.parse().unwrap(), if kind == "start" { 1 } else { -1 })
            })
            .collect();
        assert_eq!(events.len(), 16);
        events.sort_by_key(|&(t, d)| (t, d)); // an end before a start at the same instant
        let (mut now, mut most) = (0, 0);
        for (_, d) in events {
            now += d;
            most = most.max(now);
        }
        assert_eq!(most, 4, "{text}");
    }

    #[test]
    fn one_copy_scores_in_order_and_errors_name_the_request() {
        let mut cfg = ExternalConfig::new(vec![
            "sh".into(),
            "-c".into(),
            "while read -r l; do case \"$l\" in *bad*) echo oops;; *) echo 1;; esac; done".into(),
        ]);
        cfg.concurrency = Some(1);
        let mut pool = ExternalPool::new(cfg.clone()).unwrap();
        assert_eq!(
            pool.score_all(&[request("a"), request("b")]).unwrap(),
            [1.0, 1.0]
        );
        cfg.concurrency = Some(2);
        let mut pool = ExternalPool::new(cfg).unwrap();
        let e = pool
            .score_all(&[request("a"), request("bad"), request("c"), request("d")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("request 0") && e.contains("\"oops\""), "{e}");
    }
}

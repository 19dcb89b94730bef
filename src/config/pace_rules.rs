//! Rules that hold between `sampling.pace = "time"` and the rest of a config: the paced
//! stream thins episodes by their simulated durations, so it needs episodes that record them,
//! and a window no longer than the shortest one. Each message names the setting to change.
use crate::advantage::adjust::effective_duration;
use crate::config::RunConfig;
use crate::env::EnvKind;
use crate::sampling::pace::Pace;

/// What `sampling.pace = "time"` can be combined with; the message names the setting.
pub fn validate(cfg: &RunConfig) -> std::result::Result<(), String> {
    if cfg.sampling.pace != Pace::Time {
        return Ok(());
    }
    let Some(env) = &cfg.env else {
        return Err(
            "sampling.pace = \"time\" needs an [env] whose steps record `duration_s` (the \
             `bandit`, or an env.program that reports it): a task's responses have no simulated \
             duration"
                .into(),
        );
    };
    if !matches!(env.kind, EnvKind::Bandit | EnvKind::Program) {
        let kind = serde_json::to_value(env.kind).unwrap_or_default();
        return Err(format!(
            "sampling.pace = \"time\" needs episodes that record `duration_s` in their steps' \
             info (env.kind = \"bandit\", or an env.program that reports it); env.kind = {kind} \
             records none"
        ));
    }
    if cfg.reward.pipeline.is_some() {
        return Err(
            "sampling.pace = \"time\" cannot be combined with [reward.pipeline] (the pipeline \
             scores the kept episodes only, and the group's drawn rewards would mix scored and \
             unscored ones)"
                .into(),
        );
    }
    let window = cfg.sampling.pace_window_s.unwrap_or(0.0);
    if env.kind == EnvKind::Bandit {
        let shortest = shortest_bandit_dt(cfg);
        if window > shortest {
            return Err(format!(
                "sampling.pace_window_s = {window} exceeds the shortest Δt a bandit episode can \
                 have, {shortest} s (the shortest arm of env.bandit_arm_durations_s, with \
                 advantage.duration.t_min and t_floor, or advantage.duration.unparsable for a \
                 reply that pulls no arm): the window must be at most that"
            ));
        }
    }
    Ok(())
}

/// The shortest Δt (as the duration weights price it) of a `bandit` episode: one pull of the
/// shortest arm, or an episode whose replies pull no arm (the fixed unparsable duration). An
/// episode with a pull and unparsable replies takes longer than the pull alone.
fn shortest_bandit_dt(cfg: &RunConfig) -> f64 {
    let d = &cfg.advantage.duration;
    let arm = cfg
        .env
        .as_ref()
        .map(|e| {
            e.bandit_arm_durations_s
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min)
        })
        .unwrap_or(f64::INFINITY);
    effective_duration(arm, d.t_min, d.t_floor, d.unparsable).min(d.unparsable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::EnvConfig;

    fn paced(env: Option<EnvConfig>, window: f64) -> RunConfig {
        let mut c = RunConfig {
            env,
            ..Default::default()
        };
        c.sampling.pace = Pace::Time;
        c.sampling.pace_window_s = Some(window);
        c
    }

    fn bandit() -> Option<EnvConfig> {
        Some(EnvConfig {
            kind: EnvKind::Bandit,
            ..Default::default()
        })
    }

    #[test]
    fn time_pace_needs_timed_episodes_and_a_short_enough_window() {
        assert_eq!(validate(&paced(bandit(), 1.0)), Ok(()));
        assert_eq!(validate(&RunConfig::default()), Ok(()));
        assert!(validate(&paced(None, 1.0))
            .unwrap_err()
            .contains("needs an [env]"));
        let guess = Some(EnvConfig::default());
        assert!(validate(&paced(guess, 1.0))
            .unwrap_err()
            .contains("env.kind = \"guess\" records none"));
        // Arms 1 s and 3 s, unparsable 1 s: the shortest Δt is 1 s.
        let e = validate(&paced(bandit(), 1.5)).unwrap_err();
        assert!(
            e.starts_with("sampling.pace_window_s = 1.5 exceeds the shortest Δt a bandit episode can have, 1 s"),
            "{e}"
        );
        // A cheaper unparsable reply (0.5 s) or a faster arm lowers it.
        let mut c = paced(bandit(), 1.0);
        c.advantage.duration.unparsable = 0.5;
        assert!(validate(&c).unwrap_err().contains(", 0.5 s"));
        let mut c = paced(bandit(), 1.0);
        c.env.as_mut().unwrap().bandit_arm_durations_s = vec![2.0, 0.25];
        c.env.as_mut().unwrap().bandit_arm_payoffs = vec![1.0, 1.0];
        assert!(validate(&c).unwrap_err().contains(", 0.25 s"));
        // t_min adds to the pull: 0.25 + 0.75 = 1.
        c.advantage.duration.t_min = 0.75;
        assert_eq!(validate(&c), Ok(()));
        let mut c = paced(bandit(), 1.0);
        c.reward.pipeline = Some(toml::from_str("components = []").unwrap());
        assert!(validate(&c).unwrap_err().contains("[reward.pipeline]"));
    }
}

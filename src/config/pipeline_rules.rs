//! Rules that hold between `[reward.pipeline]` and the rest of a `grove train` config: what the
//! pipeline can be combined with today. Each message names the setting to change.
use crate::config::RunConfig;
use crate::reward::pipeline::ComponentKind;
use crate::reward::shaping::ShapingConfig;
use crate::reward::CORRECT_KEY;

/// What `grove train` supports with a `[reward.pipeline]`; the message names the setting.
pub fn validate_for_train(cfg: &RunConfig) -> std::result::Result<(), String> {
    let named = cfg.task.reward_kind()? == Some(crate::task::scorers::RewardKind::Pipeline);
    let Some(p) = &cfg.reward.pipeline else {
        if named {
            return Err(
                "task.reward = \"pipeline\" needs a [reward.pipeline] section \
                        (docs/rewards.md)"
                    .into(),
            );
        }
        return Ok(());
    };
    if let Some(c) = p.components.iter().find(|c| {
        c.name == CORRECT_KEY
            && !(matches!(c.kind, ComponentKind::Verifier { .. })
                && c.shaping == ShapingConfig::None)
    }) {
        return Err(format!(
            "reward.pipeline component `{}` (kind {}, shaping {:?}): the name `{CORRECT_KEY}` \
             holds the verified correctness (reward/correct/mean, acc/train), so only an \
             unshaped verifier may use it; rename the component, e.g. `{}_score`",
            c.name,
            c.kind.label(),
            c.shaping,
            c.kind.label().replace('-', "_")
        ));
    }
    env_rules(cfg, p)?;
    if let Some(b) = &p.blend {
        blend_rules(cfg, b)?;
    }
    let rw = &cfg.reward;
    if rw.noise_rho0 > 0.0 || rw.noise_rho1 > 0.0 {
        return Err(format!(
            "reward.noise_rho0 = {} / reward.noise_rho1 = {} flip the verifier-only reward and \
             cannot be combined with reward.pipeline",
            rw.noise_rho0, rw.noise_rho1
        ));
    }
    if cfg.sampling.inject_ground_truth {
        return Err(
            "sampling.inject_ground_truth gives injected answers reward 1, which is not \
                    on the reward.pipeline's scale: not supported together"
                .into(),
        );
    }
    Ok(())
}

/// `[reward.pipeline.blend]` needs what its gradient assumes: groups sampled by the current
/// policy (the look-ahead and the held-out surrogate are on-policy policy gradients), a
/// group baseline (more than one sample per group), and groups left over for the inner
/// gradient once the held-out ones are taken.
fn blend_rules(
    cfg: &RunConfig,
    b: &crate::reward::pipeline::BlendConfig,
) -> std::result::Result<(), String> {
    let off_policy = |what: &str| {
        Err(format!(
            "reward.pipeline.blend learns its weights from groups sampled by the current policy; \
             {what} gives older policies' samples: use the default on-policy sampling \
             (sync.mode = \"on-policy\", no sync.buffer, sync.offline or [remote])"
        ))
    };
    let s = &cfg.sync;
    match s.mode {
        crate::config::SyncMode::OnPolicy => {}
        crate::config::SyncMode::Lagged => return off_policy("sync.mode = \"lagged\""),
        crate::config::SyncMode::Async => return off_policy("sync.mode = \"async\""),
    }
    if s.buffer.is_some() {
        return off_policy("sync.buffer");
    }
    if s.offline.is_some() {
        return off_policy("sync.offline");
    }
    if cfg.remote.is_some() {
        return off_policy("[remote]");
    }
    if cfg.advantage.estimator == crate::advantage::Estimator::Gae {
        return Err(
            "reward.pipeline.blend: advantage.estimator = \"gae\" learns a critic on the \
             reward, whose scale the blend changes every step, and has no groups for the \
             blend's group-mean baseline; use a group estimator (grpo, group-mean, rloo, ...)"
                .into(),
        );
    }
    if cfg.rollout.group_size < 2 {
        return Err(format!(
            "reward.pipeline.blend: rollout.group_size = {} gives every group-mean advantage 0 \
             (the blend gradient would vanish); expected >= 2",
            cfg.rollout.group_size
        ));
    }
    if cfg.rollout.prompts_per_step <= b.heldout_groups {
        return Err(format!(
            "reward.pipeline.blend.heldout_groups = {} leaves no group of the step's \
             rollout.prompts_per_step = {} for the inner gradient; expected fewer held-out \
             groups than prompts per step",
            b.heldout_groups, cfg.rollout.prompts_per_step
        ));
    }
    Ok(())
}

/// Episode components need an `[env]`; with one, the components that compare a single
/// response with a reference answer or a reference policy's responses do not apply.
fn env_rules(
    cfg: &RunConfig,
    p: &crate::reward::pipeline::PipelineConfig,
) -> std::result::Result<(), String> {
    let Some(_) = &cfg.env else {
        return match p.components.iter().find(|c| c.kind.needs_episode()) {
            Some(c) => Err(format!(
                "reward.pipeline component `{}` (kind {}) reads a multi-turn episode's rewards: \
                 it needs an [env] section (docs/environments.md)",
                c.name,
                c.kind.label()
            )),
            None => Ok(()),
        };
    };
    let single = |k: &ComponentKind| {
        match k {
        ComponentKind::Verifier { .. } | ComponentKind::Consistency { .. } => Some(
            "an episode has no reference answer; use kind \"success\" for the environment's verdict",
        ),
        ComponentKind::Sar {} => Some("SAR's perplexities are of a single answer to a prompt"),
        _ => None,
    }
    };
    if let Some((c, why)) = p
        .components
        .iter()
        .find_map(|c| single(&c.kind).map(|why| (c, why)))
    {
        return Err(format!(
            "reward.pipeline component `{}` (kind {}) cannot score [env] episodes: {why}",
            c.name,
            c.kind.label()
        ));
    }
    let shaped = std::iter::once(("the pipeline", &p.shaping))
        .chain(p.components.iter().map(|c| (c.name.as_str(), &c.shaping)));
    for (at, s) in shaped {
        if crate::reward::pipeline::needs_refs(s) {
            return Err(format!(
                "reward.pipeline shaping {s:?} of {at} compares with reference responses to a \
                 prompt, which [env] episodes do not have; use a running shaping instead"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::reward::shaping::ShapingConfig;

    fn load(sets: &[&str]) -> std::result::Result<crate::config::RunConfig, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        crate::config::load(None, &sets)
            .map(|v| v.into_config())
            .map_err(|e| e.to_string())
    }

    /// `[env]` + `[reward.pipeline]`: episode components work, single-response ones are
    /// refused with the reason, and episode components need an `[env]`.
    #[test]
    fn env_runs_take_episode_components() {
        let env = "env.kind=\"guess\"";
        let gra = r#"reward.pipeline.components=[{name="outcome", kind="turns", part="outcome", weight=0}, {name="steps", kind="turns", part="steps", weight=0}, {name="gra", kind="gated", channels=[{component="outcome", threshold=1.0}, {component="steps"}]}]"#;
        assert!(load(&[env, gra]).is_ok());
        let e = load(&[gra]).unwrap_err();
        assert!(
            e.contains("component `outcome` (kind turns)") && e.contains("needs an [env]"),
            "{e}"
        );
        let verifier = r#"reward.pipeline.components=[{name="correct", kind="verifier"}]"#;
        let e = load(&[env, verifier]).unwrap_err();
        assert!(
            e.contains("cannot score [env] episodes") && e.contains("kind \"success\""),
            "{e}"
        );
        let par =
            r#"reward.pipeline.components=[{name="s", kind="success", shaping={kind="par"}}]"#;
        let e = load(&[env, par]).unwrap_err();
        assert!(
            e.contains("Par of s compares with reference responses"),
            "{e}"
        );
    }

    /// `[reward.pipeline.blend]`: every mistake is named before any step.
    #[test]
    fn blend_is_validated_against_the_pipeline_and_the_run() {
        let comps = r#"reward.pipeline.components=[{name="correct", kind="verifier"}, {name="len", kind="length-penalty", weight=0.5}, {name="fmt", kind="length-penalty", weight=0}]"#;
        let blend = |b: &str| format!("reward.pipeline.blend={{{b}}}");
        let ok = blend(r#"primary="correct", auxiliary="len""#);
        assert!(load(&[comps, &ok]).is_ok());
        let cases: Vec<(Vec<String>, &[&str])> = vec![
            (
                vec![blend(r#"primary="correct", auxiliary="lenght""#)],
                &["blend.auxiliary", "`lenght`", "known: correct, len, fmt"],
            ),
            (
                vec![blend(r#"primary="len", auxiliary="len""#)],
                &["blend.auxiliary", "`len` for both"],
            ),
            (
                vec![
                    ok.clone(),
                    r#"reward.pipeline.components=[{name="correct", kind="verifier"}, {name="len", kind="length-penalty"}, {name="fmt", kind="length-penalty", weight=0.2}]"#.into(),
                ],
                &["components[2] (`fmt`).weight", "weight 0", "found 0.2"],
            ),
            (
                vec![ok.clone(), r#"reward.pipeline.shaping={kind="running-norm"}"#.into()],
                &["shaping", "linear in the weights"],
            ),
            (
                vec![blend(r#"primary="correct", auxiliary="len", outer_lr=-1.0"#)],
                &["blend.outer_lr", "found -1"],
            ),
            (
                vec![blend(r#"primary="correct", auxiliary="len", inner_lr=0.0"#)],
                &["blend.inner_lr", "> 0"],
            ),
            (
                vec![blend(r#"primary="correct", auxiliary="len", heldout_groups=0"#)],
                &["blend.heldout_groups", ">= 1"],
            ),
            (
                vec![ok.clone(), "sync.mode=\"lagged\"".into(), "sync.offset=1".into()],
                &["reward.pipeline.blend", "sync.mode = \"lagged\""],
            ),
            (
                vec![ok.clone(), "sync.mode=\"async\"".into()],
                &["reward.pipeline.blend", "sync.mode = \"async\""],
            ),
            (
                vec![ok.clone(), "sync.offline=\"x.jsonl\"".into()],
                &["reward.pipeline.blend", "sync.offline"],
            ),
            (
                vec![ok.clone(), "advantage.estimator=\"gae\"".into(), "critic={}".into()],
                &["reward.pipeline.blend", "gae"],
            ),
            (
                vec![ok.clone(), "rollout.group_size=1".into()],
                &["rollout.group_size = 1", ">= 2"],
            ),
            (
                vec![ok.clone(), "rollout.prompts_per_step=1".into()],
                &["heldout_groups = 1", "rollout.prompts_per_step = 1"],
            ),
        ];
        for (sets, needles) in cases {
            let mut all = vec![comps];
            all.extend(sets.iter().map(String::as_str));
            let e = load(&all).expect_err(&format!("{sets:?}"));
            for n in needles {
                assert!(e.contains(n), "{sets:?}: `{n}` not in: {e}");
            }
        }
    }

    #[test]
    fn run_config_section_loads_validates_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "[reward.pipeline]\nshaping = { kind = \"centered\" }\nreference_samples = 2\n\
             [[reward.pipeline.components]]\nname = \"correct\"\nkind = \"verifier\"\n\
             [[reward.pipeline.components]]\nname = \"len\"\nkind = \"length-penalty\"\n",
        )
        .unwrap();
        // It loads through the run-config path (`grove train` uses it)...
        let loaded = crate::config::load(Some(&file), &[]).unwrap();
        assert_eq!(
            loaded.reward.pipeline.as_ref().map(|p| p.components.len()),
            Some(2)
        );
        // ...and deserialises and round-trips as a config value.
        let text = std::fs::read_to_string(&file).unwrap();
        let cfg: crate::config::RunConfig = toml::from_str(&text).unwrap();
        let p = cfg.reward.pipeline.as_ref().unwrap();
        assert_eq!(p.components.len(), 2);
        assert_eq!(p.shaping, ShapingConfig::Centered);
        // The saved config.toml of a run reads back to the same config.
        let back: crate::config::RunConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back.reward, cfg.reward);
        // Without the section there is no pipeline.
        assert!(crate::config::RunConfig::default()
            .reward
            .pipeline
            .is_none());

        std::fs::write(
            &file,
            "[[reward.pipeline.components]]\nname = \"g\"\nkind = \"gated\"\n\
             channels = [{ component = \"missing\" }]\n",
        )
        .unwrap();
        let e = crate::config::load(Some(&file), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml")
                && e.contains("reward.pipeline.components[0]")
                && e.contains("`missing`"),
            "{e}"
        );
    }
}

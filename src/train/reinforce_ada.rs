//! Reinforce-Ada batches (`[sampling.reinforce_ada]`): the step's prompts are drawn as for
//! any batch, then rounds of `samples_per_round` responses go to the prompts still active
//! (the rules are `sampling::reinforce_ada`), each round through the same prompt and sample RNG
//! streams as [`super::explore::collect`], so a run is deterministic and resumes exactly. With
//! one round of `rollout.group_size` responses the batch is `collect`'s, bit for bit.
use crate::buffer::{Experience, ExperienceGroup};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::rollout::engine::{LocalEngine, RolloutEngine};
use crate::sampling::reinforce_ada::{adaptive_sample, AdaStats};
use crate::train::explore::{scored_experience, Env, ExploreState};

/// One batch of `rollout.prompts_per_step` groups of `rollout.group_size` responses, each
/// selected from that prompt's adaptive draws; every group carries the rewards of all its
/// draws in `drawn_rewards` (the `global-mean` baseline).
pub fn collect_adaptive(
    env: &Env,
    model: &Llama,
    version: u64,
    st: &mut ExploreState,
) -> Result<(Vec<ExperienceGroup>, AdaStats)> {
    let cfg = &env.cfg;
    let ada = &cfg.sampling.reinforce_ada;
    let (np, n) = (cfg.rollout.prompts_per_step, cfg.rollout.group_size);
    let problems: Vec<_> = (0..np)
        .map(|_| env.task.sample_train(&mut st.prompt_rng))
        .collect();
    let mut prompt_ids = Vec::with_capacity(np);
    for p in &problems {
        prompt_ids.push(env.encode_prompt(&p.prompt)?);
    }
    // Ids in prompt order, as `collect` numbers its groups.
    let group_ids: Vec<u64> = (0..np as u64).map(|k| st.next_group_id + k).collect();
    st.next_group_id += np as u64;
    let engine = LocalEngine::new(model, &env.tok);
    let params = cfg.rollout.sampling();
    let draw = |active: &[usize], m: usize| -> Result<Vec<Vec<Experience>>> {
        let prompts: Vec<Vec<u32>> = active.iter().map(|&p| prompt_ids[p].clone()).collect();
        let gens = engine.generate_n(&prompts, m, &params, &mut st.sample_rng)?;
        if gens.len() != active.len() * m {
            return Err(Error::Internal(format!(
                "sampler returned {} responses for {} prompts × {m}",
                gens.len(),
                active.len()
            )));
        }
        let mut out = Vec::with_capacity(active.len());
        for (k, &p) in active.iter().enumerate() {
            let mut exps = Vec::with_capacity(m);
            for gen in &gens[k * m..(k + 1) * m] {
                exps.push(scored_experience(
                    env,
                    st,
                    &problems[p],
                    &prompt_ids[p],
                    gen,
                    (group_ids[p], version),
                )?);
            }
            out.push(exps);
        }
        Ok(out)
    };
    let threshold = ada.positive_threshold;
    let (prompts, stats) =
        adaptive_sample(np, ada, n, |e: &Experience| e.reward > threshold, draw)?;
    let groups = prompts
        .into_iter()
        .zip(group_ids)
        .map(|(p, group_id)| {
            let drawn_rewards = p.drawn.iter().map(|e| e.reward).collect();
            let mut drawn: Vec<Option<Experience>> = p.drawn.into_iter().map(Some).collect();
            ExperienceGroup {
                group_id,
                policy_version: version,
                experiences: p.selected.iter().filter_map(|&i| drawn[i].take()).collect(),
                drawn_rewards,
            }
        })
        .collect();
    Ok((groups, stats))
}

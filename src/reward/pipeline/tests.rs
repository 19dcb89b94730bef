//! Tests of the reward pipeline: hand-computed values for every component and shaping.
use super::*;
use crate::reward::shaping::{log_sigmoid, reference_quantile, sigmoid};
use crate::testing::near;
use std::cell::RefCell;
use std::rc::Rc;

fn group(prompt: &str, answer: &str) -> GroupContext {
    GroupContext {
        prompt: prompt.into(),
        references: vec![answer.into()],
        metadata: serde_json::Value::Null,
    }
}

fn resp(text: &str, finished: bool, num_tokens: usize) -> ResponseContext {
    ResponseContext {
        text: text.into(),
        finished,
        num_tokens,
        ..Default::default()
    }
}

fn verifier(name: &str) -> ComponentConfig {
    ComponentConfig::new(
        name,
        ComponentKind::Verifier {
            check: VerifierCheck::Exact,
        },
    )
}

fn length(coef: f64, free_len: usize) -> ComponentConfig {
    ComponentConfig::new("length", ComponentKind::LengthPenalty { coef, free_len })
}

#[test]
fn toml_config_parses_with_defaults() {
    let text = r#"
        reference_samples = 4
        shaping = { kind = "running-norm" }
        [[components]]
        name = "correct"
        kind = "verifier"
        [[components]]
        name = "length"
        kind = "length-penalty"
        weight = 0.5
        coef = 0.02
        [[components]]
        name = "sar"
        kind = "sar"
        [[components]]
        name = "cmd"
        kind = "external"
        command = ["python3", "examples/reward_length.py"]
        on_error = "fail-response"
        timeout_s = 2.0
        [[components]]
        name = "gate"
        kind = "gated"
        weight = 0.0
        channels = [{ component = "correct", threshold = 0.5 }, { component = "length" }]
    "#;
    let cfg: PipelineConfig = toml::from_str(text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.reference_samples, 4);
    assert_eq!(cfg.shaping, ShapingConfig::RunningNorm);
    assert_eq!(
        cfg.components[0].kind,
        ComponentKind::Verifier {
            check: VerifierCheck::Exact
        }
    );
    assert_eq!(cfg.components[0].weight(), 1.0);
    assert_eq!(cfg.components[1].weight(), 0.5);
    assert_eq!(
        cfg.components[1].kind,
        ComponentKind::LengthPenalty {
            coef: 0.02,
            free_len: 300
        }
    );
    // SAR's default weight is α = 0.2.
    assert_eq!(cfg.components[2].weight(), 0.2);
    match &cfg.components[3].kind {
        ComponentKind::External(e) => {
            assert_eq!(e.on_error, crate::reward::external::OnError::FailResponse);
            assert_eq!((e.timeout_s, e.failure_reward), (2.0, 0.0));
        }
        other => panic!("{other:?}"),
    }
    // Round trip through TOML.
    let back: PipelineConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn config_errors_name_the_field() {
    let bad = |text: &str| {
        toml::from_str::<PipelineConfig>(text)
            .unwrap_err()
            .to_string()
    };
    let e = bad("[[components]]\nname = \"a\"\nkind = \"verifer\"\n");
    assert!(e.contains("verifer") && e.contains("length-penalty"), "{e}");
    let e = bad("[[components]]\nname = \"a\"\nkind = \"length-penalty\"\ncoeff = 1\n");
    assert!(e.contains("coeff"), "{e}");

    let invalid = |cfg: PipelineConfig| cfg.validate().unwrap_err().to_string();
    let e = invalid(PipelineConfig::new(vec![verifier("a"), verifier("a")]));
    assert!(e.contains("already used"), "{e}");
    let e = invalid(PipelineConfig::new(vec![verifier("a/b")]));
    assert!(e.contains("components[0].name"), "{e}");
    let e = invalid(PipelineConfig::new(vec![ComponentConfig::new(
        "g",
        ComponentKind::Gated {
            channels: vec![GateChannel {
                component: "nope".into(),
                threshold: None,
            }],
        },
    )]));
    assert!(e.contains("`nope` is not a component"), "{e}");
    let e = invalid(PipelineConfig::new(vec![ComponentConfig::new(
        "c",
        ComponentKind::Consistency {
            judge: "last-number".into(),
        },
    )]));
    assert!(e.contains("needs a verifier"), "{e}");
    let e = invalid(PipelineConfig {
        shaping: ShapingConfig::Par,
        ..PipelineConfig::new(vec![verifier("a").shaped(ShapingConfig::Centered)])
    });
    assert!(e.contains("cannot be shaped themselves"), "{e}");
    let e = invalid(PipelineConfig::new(vec![verifier("a").weighted(f64::NAN)]));
    assert!(e.contains("weight"), "{e}");
    let e = invalid(PipelineConfig::new(vec![]));
    assert!(e.contains("at least one component"), "{e}");
}

#[test]
fn weighted_sum_of_verifier_and_length_penalty() {
    // correct (w 1) + length (w 0.5, coef 0.1, free 2):
    //   "85" finished, 3 tokens:   1 + 0.5·(−0.1·1) = 0.95
    //   "84" finished, 3 tokens:   0 + 0.5·(−0.1·1) = −0.05
    //   "85" unfinished, 2 tokens: 0 + 0 = 0
    let mut p = RewardPipeline::new(PipelineConfig::new(vec![
        verifier("correct"),
        length(0.1, 2).weighted(0.5),
    ]))
    .unwrap();
    let out = p
        .score_group(
            &group("37+48=", "85"),
            &[
                resp("85", true, 3),
                resp("84", true, 3),
                resp("85", false, 2),
            ],
        )
        .unwrap();
    assert!(near(out.rewards[0], 0.95), "{:?}", out.rewards);
    assert!(near(out.rewards[1], -0.05));
    assert!(near(out.rewards[2], 0.0));
    assert_eq!(out.components[0]["correct"], 1.0);
    assert!(near(out.components[0]["length"], -0.1));
    assert_eq!(out.verdicts[1].score, 0.0);
    assert!(out.verdicts[1].reason.contains("mismatch"));
    let means = component_means(&[out]);
    // correct: (1 + 0 + 0)/3; length: (−0.1 − 0.1 + 0)/3
    assert!(near(means["reward/correct/mean"], 1.0 / 3.0));
    assert!(near(means["reward/length/mean"], -0.2 / 3.0));
}

#[test]
fn math_verifier_takes_the_best_reference() {
    let mut p = RewardPipeline::new(PipelineConfig::new(vec![ComponentConfig::new(
        "math",
        ComponentKind::Verifier {
            check: VerifierCheck::Math,
        },
    )]))
    .unwrap();
    let ctx = GroupContext {
        prompt: "q".into(),
        references: vec!["3".into(), "0.5".into()],
        metadata: serde_json::Value::Null,
    };
    let out = p
        .score_group(
            &ctx,
            &[resp("so #### 1/2", true, 5), resp("#### 4", true, 3)],
        )
        .unwrap();
    assert_eq!(out.rewards, vec![1.0, 0.0]);
    // A verifier with no reference answer is an error, not a silent 0.
    let err = p
        .score_group(
            &GroupContext {
                prompt: "q".into(),
                ..Default::default()
            },
            &[resp("1", true, 1)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("no reference answer"), "{err}");
}

/// Reference provider returning fixed responses and counting its calls.
struct FixedRefs {
    calls: Rc<RefCell<Vec<String>>>,
    responses: Vec<ResponseContext>,
}
impl ReferenceProvider for FixedRefs {
    fn reference_responses(
        &mut self,
        ctx: &GroupContext,
        m: usize,
    ) -> Result<Vec<ResponseContext>> {
        self.calls.borrow_mut().push(ctx.prompt.clone());
        Ok(self.responses.iter().cycle().take(m).cloned().collect())
    }
}

#[test]
fn par_against_cached_reference_rewards() {
    // References (M = 2): one correct, one wrong → totals [1, 0].
    // PAR(r) = (σ(r − 1) + σ(r − 0))/2: r = 1 → (0.5 + 0.7310585786)/2 = 0.6155292893;
    // r = 0 → (σ(−1) + 0.5)/2 = (0.2689414214 + 0.5)/2 = 0.3844707107.
    let cfg = PipelineConfig {
        shaping: ShapingConfig::Par,
        reference_samples: 2,
        ..PipelineConfig::new(vec![verifier("correct")])
    };
    let mut p = RewardPipeline::new(cfg).unwrap();
    let calls = Rc::new(RefCell::new(vec![]));
    let mut refs = FixedRefs {
        calls: Rc::clone(&calls),
        responses: vec![resp("85", true, 3), resp("11", true, 3)],
    };
    let rs = [resp("85", true, 3), resp("84", true, 3)];
    let mut score = |p: &mut RewardPipeline, prompt: &str| {
        p.score_group_with(
            &group(prompt, "85"),
            &rs,
            &mut Providers {
                references: Some(&mut refs),
                logprobs: None,
            },
        )
        .unwrap()
    };
    let a = score(&mut p, "37+48=");
    assert!(
        near(a.rewards[0], 0.615_529_289_315_002_4),
        "{:?}",
        a.rewards
    );
    assert!(near(a.rewards[1], 0.384_470_710_684_997_6));
    assert!(near(a.rewards[0], (sigmoid(0.0) + sigmoid(1.0)) / 2.0));
    assert_eq!(a.reference_cache_hit, Some(false));
    // Same prompt again: served from the cache, the provider is not called.
    let b = score(&mut p, "37+48=");
    assert_eq!(b.rewards, a.rewards);
    assert_eq!(b.reference_cache_hit, Some(true));
    assert_eq!(calls.borrow().len(), 1);
    // A new prompt calls the provider once more.
    score(&mut p, "48+37=");
    assert_eq!(
        *calls.borrow(),
        vec!["37+48=".to_string(), "48+37=".to_string()]
    );
    assert_eq!(
        (p.cache().hits(), p.cache().misses(), p.cache().len()),
        (1, 2, 2)
    );
    assert_eq!(
        p.cache().get("37+48=").unwrap(),
        &ReferenceRewards {
            components: [("correct".to_string(), vec![1.0, 0.0])]
                .into_iter()
                .collect(),
            totals: vec![1.0, 0.0],
        }
    );
    // Without a provider the missing callback is named.
    let err = p
        .score_group(&group("new=", "1"), &rs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ReferenceProvider"), "{err}");
}

#[test]
fn reference_cache_evicts_oldest_and_keeps_errors_out() {
    let mut c = ReferenceRewardCache::new(2);
    let rr = |x: f64| ReferenceRewards {
        components: BTreeMap::new(),
        totals: vec![x],
    };
    c.get_or_compute("a", || Ok(rr(1.0))).unwrap();
    c.get_or_compute("b", || Ok(rr(2.0))).unwrap();
    assert!(c
        .get_or_compute("x", || Err(Error::Reward("no".into())))
        .is_err());
    assert_eq!(c.len(), 2);
    c.get_or_compute("c", || Ok(rr(3.0))).unwrap();
    assert!(c.get("a").is_none(), "oldest entry evicted");
    assert_eq!(c.get("b").unwrap().totals, vec![2.0]);
    let (v, hit) = c.get_or_compute("b", || panic!("must be cached")).unwrap();
    assert!(hit && v.totals == vec![2.0]);
    let back: ReferenceRewardCache =
        serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn lsc_per_reward_component_sums_as_and() {
    // Two "reward models" (user functions) each with LSC against its own references;
    // the sum is log P(good on both). Function a = text length, b = 1 if it contains '5'.
    let reg = Registry::default()
        .function(
            "len",
            Box::new(|r: &RewardRequest| -> Result<f64> { Ok(r.response.len() as f64) }),
        )
        .function(
            "five",
            Box::new(|r: &RewardRequest| -> Result<f64> {
                Ok(f64::from(u8::from(r.response.contains('5'))))
            }),
        );
    let lsc = ShapingConfig::Lsc { quantile: 0.85 };
    let cfg = PipelineConfig {
        reference_samples: 3,
        ..PipelineConfig::new(vec![
            ComponentConfig::new(
                "a",
                ComponentKind::Function {
                    function: "len".into(),
                },
            )
            .shaped(lsc.clone()),
            ComponentConfig::new(
                "b",
                ComponentKind::Function {
                    function: "five".into(),
                },
            )
            .shaped(lsc),
        ])
    };
    let mut p = RewardPipeline::with_registry(cfg, reg).unwrap();
    // References: texts of length 1, 2, 3 → a refs [1, 2, 3], q_a = 2 + 1.0364333895 = 3.0364333895;
    // b refs: "5" → 1, "12" → 0, "555" → 1 → mean 2/3, sample std = sqrt(1/3) = 0.5773502692,
    // q_b = 0.6666666667 + 1.0364333895·0.5773502692 = 1.2650517631.
    let mut refs = FixedRefs {
        calls: Rc::new(RefCell::new(vec![])),
        responses: vec![
            resp("5", true, 1),
            resp("12", true, 2),
            resp("555", true, 3),
        ],
    };
    let out = p
        .score_group_with(
            &group("p", "x"),
            &[resp("4444", true, 4)],
            &mut Providers {
                references: Some(&mut refs),
                logprobs: None,
            },
        )
        .unwrap();
    let qa = reference_quantile(&[1.0, 2.0, 3.0], 0.85).unwrap();
    let qb = reference_quantile(&[1.0, 0.0, 1.0], 0.85).unwrap();
    assert!((qb - 1.265_051_763_1).abs() < 1e-8, "{qb}");
    // a = log σ(4 − 3.0364333895) = log σ(0.9635666105) = −0.3231913553;
    // b = log σ(0 − 1.2650517631) = −1.2650517631 − ln(1 + e^−1.2650517631) = −1.5136483691
    let expected = log_sigmoid(4.0 - qa) + log_sigmoid(0.0 - qb);
    assert!(
        near(out.rewards[0], expected),
        "{} vs {expected}",
        out.rewards[0]
    );
    assert!((out.components[0]["a"] - -0.323_191_355_3).abs() < 1e-8);
    assert!((out.components[0]["b"] - -1.513_648_369_1).abs() < 1e-8);
    assert_eq!(out.verdicts[0].score, out.rewards[0]);
    assert!(out.verdicts[0].reason.contains("a=") && out.verdicts[0].reason.contains("b="));
}

/// Log-probs from a table: prompt "" → the answer-only pass.
struct TableLogProbs {
    calls: usize,
}
impl LogProbProvider for TableLogProbs {
    fn logprobs(&mut self, reqs: &[LogProbRequest<'_>]) -> Result<Vec<Vec<f64>>> {
        self.calls += 1;
        Ok(reqs
            .iter()
            .map(|r| match (r.prompt.is_empty(), r.response) {
                (true, "85") => vec![-2.0, -2.0],  // ppl(a) = e²
                (false, "85") => vec![-0.5, -1.5], // ppl(a|q) = e¹
                (true, _) => vec![-1.0],           // ppl(a) = e
                (false, _) => vec![-1.2],          // ppl(a|q) = e^1.2
            })
            .collect())
    }
}

#[test]
fn sar_adds_alpha_times_self_aligned_reward() {
    // correct + 0.2·R_SA:
    //   "85": R_SA = 1 − e^(−2 − (−1)) = 1 − e^−1 = 0.6321205588 → 1 + 0.1264241118 = 1.1264241118
    //   "84": R_SA = 1 − e^(−1 − (−1.2)) = 1 − e^0.2 = −0.2214027582 → 0 − 0.0442805516
    let mut p = RewardPipeline::new(PipelineConfig::new(vec![
        verifier("correct"),
        ComponentConfig::new("sar", ComponentKind::Sar {}),
    ]))
    .unwrap();
    assert!(p.needs_logprobs() && !p.needs_references());
    let mut lp = TableLogProbs { calls: 0 };
    let out = p
        .score_group_with(
            &group("37+48=", "85"),
            &[resp("85", true, 2), resp("84", true, 2)],
            &mut Providers {
                logprobs: Some(&mut lp),
                references: None,
            },
        )
        .unwrap();
    assert!(
        near(out.rewards[0], 1.126_424_111_765_711_4),
        "{:?}",
        out.rewards
    );
    assert!(near(out.rewards[1], -0.044_280_551_632_033_96));
    assert!(near(out.components[0]["sar"], 0.632_120_558_828_557_7));
    assert_eq!(lp.calls, 2, "one batched call per pass");
    // With the rollout's log-probs supplied, only the answer-only pass is asked for.
    let mut with_lp = resp("85", true, 2);
    with_lp.token_logprobs = Some(vec![-1.0, -1.0]); // ppl(a|q) = e → same R_SA as above
    let mut lp2 = TableLogProbs { calls: 0 };
    let out = p
        .score_group_with(
            &group("37+48=", "85"),
            &[with_lp],
            &mut Providers {
                logprobs: Some(&mut lp2),
                references: None,
            },
        )
        .unwrap();
    assert!(near(out.rewards[0], 1.126_424_111_765_711_4));
    assert_eq!(lp2.calls, 1);
    let err = p
        .score_group(&group("q", "85"), &[resp("85", true, 2)])
        .unwrap_err();
    assert!(err.to_string().contains("LogProbProvider"), "{err}");
}

#[test]
fn consistency_with_builtin_and_registered_judges() {
    struct Always(i8);
    impl ConsistencyJudge for Always {
        fn judge(&self, _: &str, _: &str) -> i8 {
            self.0
        }
    }
    let cfg = |judge: &str| {
        PipelineConfig::new(vec![
            ComponentConfig::new(
                "math",
                ComponentKind::Verifier {
                    check: VerifierCheck::Math,
                },
            )
            .weighted(0.0),
            ComponentConfig::new(
                "cons",
                ComponentKind::Consistency {
                    judge: judge.into(),
                },
            ),
        ])
    };
    let ctx = group("q", "8");
    let rs = [
        resp("5 + 3 = 8\n#### 8", true, 9), // format 1, acc 1, cons 1: 0.5 + 1.5 = 2
        resp("5 + 3 = 8\n#### 9", true, 9), // format 1, acc 0: 0.5
        resp("5 + 3 = 9\n#### 8", true, 9), // acc 1, cons −1: 0.5 + 0.5 = 1
        resp("5 + 3 = 8\n#### 8", false, 9), // truncated: format 0, acc 1, cons 1: 1.5
    ];
    let mut p = RewardPipeline::new(cfg("last-number")).unwrap();
    assert_eq!(
        p.score_group(&ctx, &rs).unwrap().rewards,
        vec![2.0, 0.5, 1.0, 1.5]
    );
    let reg = Registry::default().judge("never", Box::new(Always(-1)));
    let mut p = RewardPipeline::with_registry(cfg("never"), reg).unwrap();
    // cons −1 everywhere: 0.5 + 0.5, 0.5, 0.5 + 0.5, 0 + 0.5
    assert_eq!(
        p.score_group(&ctx, &rs).unwrap().rewards,
        vec![1.0, 0.5, 1.0, 0.5]
    );
    let err = RewardPipeline::new(cfg("nobody"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`nobody`"), "{err}");
}

#[test]
fn gated_component_truth_table() {
    // gate = correct (threshold 0.5) then length (always passes): G-RA with one step reward.
    // Component weights 0 so the reward is the gate alone.
    let cfg = PipelineConfig::new(vec![
        verifier("correct").weighted(0.0),
        length(0.1, 0).weighted(0.0),
        ComponentConfig::new(
            "gate",
            ComponentKind::Gated {
                channels: vec![
                    GateChannel {
                        component: "correct".into(),
                        threshold: Some(0.5),
                    },
                    GateChannel {
                        component: "length".into(),
                        threshold: None,
                    },
                ],
            },
        ),
    ]);
    let mut p = RewardPipeline::new(cfg).unwrap();
    let out = p
        .score_group(
            &group("1+1=", "2"),
            &[resp("2", true, 2), resp("3", true, 2)],
        )
        .unwrap();
    // correct passes: 1 + (−0.1·2) = 0.8; wrong fails the first gate: 0 (length ignored).
    assert!(near(out.rewards[0], 0.8), "{:?}", out.rewards);
    assert_eq!(out.rewards[1], 0.0);
    assert!(near(out.components[1]["length"], -0.2));
}

#[test]
fn milestones_and_running_shaping_with_state_round_trip() {
    let cfg = PipelineConfig {
        shaping: ShapingConfig::RunningMinMax,
        ..PipelineConfig::new(vec![ComponentConfig::new(
            "steps",
            ComponentKind::Milestones { credit: 0.1 },
        )])
    };
    let mut p = RewardPipeline::new(cfg.clone()).unwrap();
    let r = |ms: &[&str]| ResponseContext {
        milestones: ms.iter().map(|s| s.to_string()).collect(),
        ..resp("", true, 1)
    };
    // raw: {a,b} → 0.2, {a,a} → 0.1, {} → 0; min-max over [0.2, 0.1, 0] → [1, 0.5, 0]
    let out = p
        .score_group(
            &GroupContext::default(),
            &[r(&["a", "b"]), r(&["a", "a"]), r(&[])],
        )
        .unwrap();
    assert!(near(out.components[0]["steps"], 0.2));
    assert!(near(out.rewards[1], 0.5) && out.rewards[0] == 1.0 && out.rewards[2] == 0.0);
    // Resume: a fresh pipeline with the saved state continues identically.
    let state = p.state();
    let mut q = RewardPipeline::new(cfg).unwrap();
    q.restore(serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap())
        .unwrap();
    let g = [r(&["a"])]; // 0.1 → (0.1 − 0)/(0.2 − 0) = 0.5
    let a = p.score_group(&GroupContext::default(), &g).unwrap();
    let b = q.score_group(&GroupContext::default(), &g).unwrap();
    assert_eq!(a, b);
    assert!(near(a.rewards[0], 0.5));
    // State of another config is refused.
    let mut other = RewardPipeline::new(PipelineConfig::new(vec![verifier("steps")])).unwrap();
    assert!(other.restore(state).is_err());
}

#[test]
fn external_component_counts_failures() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("half.py");
    // Answers 1 for "ok", prints garbage otherwise.
    std::fs::write(
        &script,
        "import sys, json\nfor line in sys.stdin:\n    r = json.loads(line)\n    \
         assert r['metadata']['num_tokens'] >= 1 and r['references'] == ['2']\n    \
         print(1 if r['response'] == 'ok' else 'garbage', flush=True)\n",
    )
    .unwrap();
    // A generous timeout: the copies of the pool start python at once on a loaded machine;
    // the bad answer fails on its garbage line, not on the timeout.
    let ext = ExternalConfig {
        timeout_s: 20.0,
        on_error: crate::reward::external::OnError::FailResponse,
        failure_reward: -1.0,
        ..ExternalConfig::new(vec!["python3".into(), script.display().to_string()])
    };
    let mut p = RewardPipeline::new(PipelineConfig::new(vec![ComponentConfig::new(
        "ext",
        ComponentKind::External(ext),
    )]))
    .unwrap();
    let out = p
        .score_group(
            &group("1+1=", "2"),
            &[
                resp("ok", true, 2),
                resp("bad", true, 2),
                resp("ok", true, 2),
            ],
        )
        .unwrap();
    assert_eq!(out.rewards, vec![1.0, -1.0, 1.0]);
    assert_eq!(out.external_failures, 1);
    assert_eq!(p.external_failures(), 1);
}

#[test]
fn unknown_function_and_non_finite_values_are_errors() {
    let cfg = PipelineConfig::new(vec![ComponentConfig::new(
        "f",
        ComponentKind::Function {
            function: "mine".into(),
        },
    )]);
    let err = RewardPipeline::new(cfg.clone()).err().unwrap().to_string();
    assert!(
        err.contains("`mine`") && err.contains("registered: none"),
        "{err}"
    );
    let reg = Registry::default().function(
        "mine",
        Box::new(|_: &RewardRequest| -> Result<f64> { Ok(f64::NAN) }),
    );
    let mut p = RewardPipeline::with_registry(cfg, reg).unwrap();
    let err = p
        .score_group(&group("q", "a"), &[resp("x", true, 1)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("component `f`") && err.contains("NaN"),
        "{err}"
    );
}

/// An episode with raw per-turn rewards, discounted by `discount`.
fn episode(rewards: &[f64], ended_by_env: bool, success: bool, discount: f64) -> ResponseContext {
    ResponseContext {
        turns: Some(EpisodeTurns {
            discounted: crate::reward::gates::discount_turns(rewards, discount),
            ended_by_env,
            success,
            rewards: rewards.to_vec(),
            milestones: vec![vec![]; rewards.len()],
        }),
        ..resp("", ended_by_env, 4)
    }
}

fn turns(name: &str, part: TurnPart) -> ComponentConfig {
    ComponentConfig::new(name, ComponentKind::Turns { part, gate: None })
}

fn gated_turns(name: &str, part: TurnPart, gate: TurnGate) -> ComponentConfig {
    ComponentConfig::new(
        name,
        ComponentKind::Turns {
            part,
            gate: Some(gate),
        },
    )
}

/// Per-turn gates through the pipeline, by hand. A [0.1, 0.2, 0.3, 1] (solved on turn 3)
/// reports the milestone `key` at turn 1; B [0.1, 0.2, 0.3] (cut) never reports it and
/// reaches reward 0.3 at turn 2; C [0, 0] (failed) has nothing.
#[test]
fn per_turn_gates_count_turns_from_the_one_where_the_condition_held() {
    let mut a = episode(&[0.1, 0.2, 0.3, 1.0], true, true, 1.0);
    a.turns.as_mut().unwrap().milestones[1] = vec!["key".into()];
    let eps = vec![
        a,
        episode(&[0.1, 0.2, 0.3], false, false, 1.0),
        episode(&[0.0, 0.0], false, false, 1.0),
    ];
    let score = |components: Vec<ComponentConfig>| {
        let mut p = RewardPipeline::new(PipelineConfig::new(components)).unwrap();
        p.score_group(&GroupContext::default(), &eps).unwrap()
    };
    let key = || TurnGate::Milestone("key".into());
    // Steps gated on `key` per turn: A = 0.2 + 0.3 (turn 0 before the key) = 0.5; B, C: 0.
    // The trajectory-level gate (`gated` over a milestones channel) would give A 0.6.
    let steps = score(vec![gated_turns("s", TurnPart::Steps, key())]);
    crate::testing::assert_close(&steps.rewards, &[0.5, 0.0, 0.0], 1e-12);
    // The return gated on `key`: A = 0.2 + 0.3 + 1 = 1.5.
    let ret = score(vec![gated_turns("r", TurnPart::Return, key())]);
    crate::testing::assert_close(&ret.rewards, &[1.5, 0.0, 0.0], 1e-12);
    // Gate on a turn's own reward ≥ 0.2: A = 0.2 + 0.3 + 1 = 1.5, B = 0.2 + 0.3 = 0.5.
    let by_reward = score(vec![gated_turns(
        "r",
        TurnPart::Return,
        TurnGate::RewardAtLeast(0.2),
    )]);
    crate::testing::assert_close(&by_reward.rewards, &[1.5, 0.5, 0.0], 1e-12);
    // Reduction: a gate that always holds (every reward ≥ 0) is the ungated component.
    for part in [TurnPart::Return, TurnPart::Outcome, TurnPart::Steps] {
        let always = score(vec![gated_turns("x", part, TurnGate::RewardAtLeast(0.0))]);
        let ungated = score(vec![turns("x", part)]);
        assert_eq!(always.rewards, ungated.rewards, "{part:?}");
    }
    // TOML spelling, and the checks on a gate's value.
    let toml_text = r#"
[[components]]
name = "s"
kind = "turns"
part = "steps"
gate = { milestone = "key" }
"#;
    let cfg: PipelineConfig = toml::from_str(toml_text).unwrap();
    assert_eq!(
        cfg.components[0].kind,
        ComponentKind::Turns {
            part: TurnPart::Steps,
            gate: Some(key())
        }
    );
    let bad = PipelineConfig::new(vec![gated_turns(
        "s",
        TurnPart::Steps,
        TurnGate::Milestone(String::new()),
    )]);
    assert_eq!(
        bad.validate().unwrap_err(),
        "components[0] (`s`).gate.milestone: expected a milestone name, found \"\""
    );
    let bad = PipelineConfig::new(vec![gated_turns(
        "s",
        TurnPart::Steps,
        TurnGate::RewardAtLeast(f64::NAN),
    )]);
    assert!(
        bad.validate()
            .unwrap_err()
            .contains("gate.reward_at_least: expected a finite number, found NaN"),
        "{:?}",
        bad.validate()
    );
    let e = toml::from_str::<PipelineConfig>(
        "[[components]]\nname = \"s\"\nkind = \"turns\"\ngate = { door = \"x\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("milestone") && e.contains("reward_at_least"),
        "{e}"
    );
}

/// Per-turn rewards through the pipeline, by hand. Episodes (format reward 0.2 per wrong
/// guess, 1 for the find): A solved on turn 3 [0.2, 0.2, 1]; B cut at max_turns
/// [0.2, 0.2, 0.2, 0.2]; C ended by a failure [0, 0].
#[test]
fn per_turn_rewards_accumulate_gated_and_ungated() {
    let eps = |discount: f64| {
        vec![
            episode(&[0.2, 0.2, 1.0], true, true, discount),
            episode(&[0.2, 0.2, 0.2, 0.2], false, false, discount),
            episode(&[0.0, 0.0], false, false, discount),
        ]
    };
    let score = |components: Vec<ComponentConfig>, discount: f64| {
        let mut p = RewardPipeline::new(PipelineConfig::new(components)).unwrap();
        p.score_group(&GroupContext::default(), &eps(discount))
            .unwrap()
    };
    // Ungated, γ = 1: the return, A 1.4, B 0.8, C 0 (the trajectory sum of an [env] run
    // without a pipeline).
    let ungated = score(vec![turns("ret", TurnPart::Return)], 1.0);
    crate::testing::assert_close(&ungated.rewards, &[1.4, 0.8, 0.0], 1e-12);
    // The same as outcome + steps with weight 1 each.
    let split = score(
        vec![
            turns("outcome", TurnPart::Outcome),
            turns("steps", TurnPart::Steps),
        ],
        1.0,
    );
    crate::testing::assert_close(&split.rewards, &[1.4, 0.8, 0.0], 1e-12);
    crate::testing::assert_close(
        &split
            .components
            .iter()
            .map(|c| c["outcome"])
            .collect::<Vec<_>>(),
        &[1.0, 0.0, 0.0],
        1e-12,
    );
    // G-RA: R = outcome + 1[outcome ≥ 1]·steps. A keeps its 0.4 of steps; B's 0.8 is gated
    // off (no outcome); C stays 0.
    let gra = |discount| {
        score(
            vec![
                turns("outcome", TurnPart::Outcome).weighted(0.0),
                turns("steps", TurnPart::Steps).weighted(0.0),
                ComponentConfig::new(
                    "gra",
                    ComponentKind::Gated {
                        channels: vec![
                            GateChannel {
                                component: "outcome".into(),
                                threshold: Some(1.0),
                            },
                            GateChannel {
                                component: "steps".into(),
                                threshold: None,
                            },
                        ],
                    },
                ),
            ],
            discount,
        )
    };
    let g = gra(1.0);
    crate::testing::assert_close(&g.rewards, &[1.4, 0.0, 0.0], 1e-12);
    // Logged per response: `steps` is the component's own (ungated) value, A 0.4, B 0.8, C 0;
    // `gra/steps` what the gate paid of it, A 0.4, B 0 (outcome 0 < δ), C 0; `gra/outcome`
    // the outcome channel, A 1, B 0, C 0.
    let col = |k: &str| g.components.iter().map(|c| c[k]).collect::<Vec<_>>();
    crate::testing::assert_close(&col("steps"), &[0.4, 0.8, 0.0], 1e-12);
    crate::testing::assert_close(&col("gra/steps"), &[0.4, 0.0, 0.0], 1e-12);
    crate::testing::assert_close(&col("gra/outcome"), &[1.0, 0.0, 0.0], 1e-12);
    // As metrics: reward/steps/mean = 1.2 / 3 = 0.4, reward/gra/steps/mean = 0.4 / 3, and the
    // channels' means sum to reward/gra/mean = 1.4 / 3.
    let means = component_means(std::slice::from_ref(&g));
    assert!(near(means["reward/steps/mean"], 0.4));
    assert!(near(means["reward/gra/steps/mean"], 0.4 / 3.0));
    assert!(near(means["reward/gra/outcome/mean"], 1.0 / 3.0));
    assert!(near(means["reward/gra/mean"], 1.4 / 3.0));
    // γ = 0.5: A = 0.2 + 0.5·0.2 + 0.25·1 = 0.55 (outcome 0.25 < δ = 1: gated to 0.25);
    // B = 0.2 + 0.1 + 0.05 + 0.025 = 0.375 ungated.
    crate::testing::assert_close(
        &score(vec![turns("ret", TurnPart::Return)], 0.5).rewards,
        &[0.55, 0.375, 0.0],
        1e-12,
    );
    crate::testing::assert_close(&gra(0.5).rewards, &[0.25, 0.0, 0.0], 1e-12);
    // success: 1 for the solved episode only.
    let s = score(
        vec![ComponentConfig::new("solved", ComponentKind::Success {})],
        1.0,
    );
    crate::testing::assert_close(&s.rewards, &[1.0, 0.0, 0.0], 0.0);
    // A single response has no turns: the component says so.
    let mut p =
        RewardPipeline::new(PipelineConfig::new(vec![turns("ret", TurnPart::Return)])).unwrap();
    let e = p
        .score_group(&GroupContext::default(), &[resp("4", true, 2)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("component `ret` (turns) reads a multi-turn episode"),
        "{e}"
    );
    // The kinds parse from TOML, `part` defaulting to the return.
    let cfg: PipelineConfig = toml::from_str(
        "[[components]]\nname = \"r\"\nkind = \"turns\"\n\
         [[components]]\nname = \"o\"\nkind = \"turns\"\npart = \"outcome\"\n\
         [[components]]\nname = \"s\"\nkind = \"success\"\n",
    )
    .unwrap();
    assert_eq!(
        cfg.components[0].kind,
        ComponentKind::Turns {
            part: TurnPart::Return,
            gate: None
        }
    );
    assert!(cfg.components[2].kind.needs_episode());
}

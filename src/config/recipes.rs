//! Recipes: named presets of config values, one per paper's method. A recipe is only data —
//! TOML merged under the user's file — never a separate code path.

pub struct Recipe {
    pub name: &'static str,
    pub description: &'static str,
    pub source: &'static str,
    /// TOML applied before the config file's own values.
    pub toml: &'static str,
}

pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "quickstart",
        description: "GRPO on the built-in arithmetic task: grpo advantage, ppo-clip, token-mean",
        source: "DeepSeekMath (GRPO), DESIGN.md §5",
        toml: "",
    },
    Recipe {
        name: "grpo",
        description: "group z-scored advantage, PPO-style clipped ratio, token-mean",
        source: "Shao et al. 2024, DeepSeekMath",
        toml: "[advantage]\nestimator = \"grpo\"\n[loss]\nloss = \"ppo-clip\"\nagg = \"token-mean\"\n",
    },
];

pub fn find(name: &str) -> Result<&'static Recipe, String> {
    RECIPES.iter().find(|r| r.name == name).ok_or_else(|| {
        let known: Vec<&str> = RECIPES.iter().map(|r| r.name).collect();
        format!("unknown recipe {name:?}; known recipes: {}", known.join(", "))
    })
}

/// The recipe's values as a TOML table (with `recipe` itself recorded).
pub fn table(name: &str) -> Result<toml::Table, String> {
    let r = find(name)?;
    let mut t: toml::Table =
        toml::from_str(r.toml).map_err(|e| format!("recipe {name:?} is not valid TOML: {e}"))?;
    t.insert("recipe".into(), toml::Value::String(name.into()));
    Ok(t)
}

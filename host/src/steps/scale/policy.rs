//! The built-in layer policies: SOLAR depth up-scaling, repeat, interleave, LLaMA-Pro block expansion and
//! explicit mergekit-style slices. Each turns the input models' layer counts into a [`ScalePlan`].

use super::plan::{LayerSource, ScalePlan, TensorTransform, TransformOp};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A built-in policy, chosen with `policy = "NAME"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinPolicy {
    /// SOLAR (Kim et al. 2023): layers `[0, n−m)` then `[m, n)`, 2·(n−m) layers (n = 32, m = 8 → 48).
    Solar,
    /// The whole stack `times` times (n → 2n by default): the paper's "simpler alternative" with a large seam.
    Repeat,
    /// After every `every`-th layer, a copy of it.
    Interleave,
    /// LLaMA-Pro (Wu et al. 2024): like interleave, with the copy's `o_proj` and `down_proj` zeroed so the
    /// expanded model computes the same function as the base.
    LlamaPro,
    /// The `slices` list, in order.
    Slices,
}

impl BuiltinPolicy {
    /// The name as written in `policy = "..."`.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinPolicy::Solar => "solar",
            BuiltinPolicy::Repeat => "repeat",
            BuiltinPolicy::Interleave => "interleave",
            BuiltinPolicy::LlamaPro => "llama-pro",
            BuiltinPolicy::Slices => "slices",
        }
    }
}

/// One explicit slice: layers `[start, end)` of input `model` (`slices = [{ model = "base", layers = [0, 24] }]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSpec {
    /// Name of the input (as written in `inputs`); may be left out when the step has one input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Half-open layer range `[start, end)`.
    pub layers: [usize; 2],
    /// Transforms applied to every layer of the slice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<TransformSpec>,
}

/// A transform as written in TOML: `{ tensor = "o_proj.weight", zero = true }` or `{ tensor = "...", scale = 0.5 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    /// Suffix of the layer-relative tensor name, e.g. `self_attn.o_proj.weight` or `o_proj.weight`.
    pub tensor: String,
    /// Replace by zeros.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
    /// Multiply by this factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
}

impl TransformSpec {
    /// The plan's form; an error when neither or both of `zero` and `scale` are given.
    pub fn to_transform(&self) -> Result<TensorTransform> {
        let op = match (self.zero, self.scale) {
            (true, None) => TransformOp::Zero,
            (false, Some(f)) if f.is_finite() => TransformOp::Scale(f),
            (false, Some(f)) => bail!("transform of `{}`: scale = {f} is not finite", self.tensor),
            _ => bail!(
                "transform of `{}`: give exactly one of `zero = true` or `scale = FACTOR`",
                self.tensor
            ),
        };
        if self.tensor.is_empty() {
            bail!("transform with an empty `tensor` suffix");
        }
        Ok(TensorTransform {
            tensor_suffix: self.tensor.clone(),
            op,
        })
    }
}

/// The parameters the built-in policies read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyParams {
    /// SOLAR: layers trimmed from each copy.
    pub m: Option<usize>,
    /// SOLAR: target layer count (alternative to `m`: m = n − s/2).
    pub s: Option<usize>,
    /// Repeat: how many copies of the stack (default 2).
    pub times: Option<usize>,
    /// Interleave / LLaMA-Pro: group size.
    pub every: Option<usize>,
    /// Solar / repeat / interleave: factor for `o_proj` and `down_proj` of the second occurrence of a layer.
    pub scale_duplicates: Option<f32>,
    /// Explicit slices.
    pub slices: Vec<SliceSpec>,
}

/// Plans the new model with a built-in policy. `names[i]` and `layers[i]` are input `i`'s name and layer count.
pub fn builtin_plan(
    policy: BuiltinPolicy,
    p: &PolicyParams,
    names: &[String],
    layers: &[usize],
) -> Result<ScalePlan> {
    let name = policy.name();
    if policy != BuiltinPolicy::Slices && layers.len() != 1 {
        bail!("policy `{name}` scales exactly one model, the step has {} inputs (use `slices` for several)", layers.len());
    }
    let n = layers[0];
    let mut plan = match policy {
        BuiltinPolicy::Solar => {
            let m = match (p.m, p.s) {
                (Some(m), None) => m,
                (None, Some(s)) => {
                    if s % 2 != 0 || s < 2 || s / 2 >= n {
                        bail!("policy `solar`: s = {s} must be even and between 2 and {} for an {n}-layer model", 2 * (n - 1));
                    }
                    n - s / 2
                }
                (None, None) => bail!("policy `solar` needs `m` (layers trimmed per copy) or `s` (target layer count)"),
                (Some(_), Some(_)) => bail!("policy `solar`: give `m` or `s`, not both"),
            };
            if m == 0 || m >= n {
                bail!(
                    "policy `solar`: m = {m} must be between 1 and {} for an {n}-layer model",
                    n.saturating_sub(1)
                );
            }
            let layers = (0..n - m)
                .chain(m..n)
                .map(|l| LayerSource::copy(0, l))
                .collect();
            ScalePlan::from_layers(layers)
        }
        BuiltinPolicy::Repeat => {
            let times = p.times.unwrap_or(2);
            if times == 0 {
                bail!("policy `repeat`: times must be at least 1");
            }
            ScalePlan::from_layers(
                (0..times)
                    .flat_map(|_| 0..n)
                    .map(|l| LayerSource::copy(0, l))
                    .collect(),
            )
        }
        BuiltinPolicy::Interleave | BuiltinPolicy::LlamaPro => {
            let Some(every) = p.every.filter(|&k| k >= 1 && k <= n) else {
                bail!("policy `{name}` needs `every` between 1 and {n} (a copy after every `every`-th layer)");
            };
            let mut out = Vec::new();
            for l in 0..n {
                out.push(LayerSource::copy(0, l));
                if (l + 1) % every == 0 {
                    let mut copy = LayerSource::copy(0, l);
                    if policy == BuiltinPolicy::LlamaPro {
                        copy.transforms = TensorTransform::output_projections(TransformOp::Zero);
                    }
                    out.push(copy);
                }
            }
            ScalePlan::from_layers(out)
        }
        BuiltinPolicy::Slices => slices_plan(&p.slices, names, layers)?,
    };
    if let Some(f) = p.scale_duplicates {
        if !matches!(
            policy,
            BuiltinPolicy::Solar | BuiltinPolicy::Repeat | BuiltinPolicy::Interleave
        ) {
            bail!("policy `{name}` does not take `scale_duplicates` (solar, repeat and interleave do)");
        }
        if !f.is_finite() {
            bail!("policy `{name}`: scale_duplicates = {f} is not finite");
        }
        let mut seen = std::collections::HashSet::new();
        for l in &mut plan.layers {
            if !seen.insert((l.model, l.layer)) {
                l.transforms
                    .extend(TensorTransform::output_projections(TransformOp::Scale(f)));
            }
        }
    }
    Ok(plan)
}

fn slices_plan(slices: &[SliceSpec], names: &[String], layers: &[usize]) -> Result<ScalePlan> {
    if slices.is_empty() {
        bail!("policy `slices` needs a non-empty `slices` list");
    }
    let mut out = Vec::new();
    for (i, s) in slices.iter().enumerate() {
        let model = match &s.model {
            Some(m) => names.iter().position(|n| n == m).ok_or_else(|| {
                anyhow::anyhow!(
                    "slices[{i}]: model `{m}` is not an input of this step (inputs: {})",
                    names.join(", ")
                )
            })?,
            None if names.len() == 1 => 0,
            None => bail!(
                "slices[{i}]: say which model (`model = \"...\"`): the step has {} inputs",
                names.len()
            ),
        };
        let [start, end] = s.layers;
        if start >= end {
            bail!("slices[{i}]: layers = [{start}, {end}] is empty (ranges are half-open [start, end))");
        }
        if end > layers[model] {
            bail!(
                "slices[{i}]: layers = [{start}, {end}] ends past the {} layers of model `{}`",
                layers[model],
                names[model]
            );
        }
        let transforms = s
            .transforms
            .iter()
            .map(TransformSpec::to_transform)
            .collect::<Result<Vec<_>>>()?;
        out.extend((start..end).map(|l| LayerSource {
            model,
            layer: l,
            transforms: transforms.clone(),
        }));
    }
    Ok(ScalePlan::from_layers(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(plan: &ScalePlan) -> Vec<(usize, usize)> {
        plan.layers.iter().map(|l| (l.model, l.layer)).collect()
    }

    fn one(n: usize) -> (Vec<String>, Vec<usize>) {
        (vec!["base".into()], vec![n])
    }

    #[test]
    fn solar_trims_m_from_each_copy() {
        let (names, layers) = one(32);
        let plan = builtin_plan(
            BuiltinPolicy::Solar,
            &PolicyParams {
                m: Some(8),
                ..Default::default()
            },
            &names,
            &layers,
        )
        .unwrap();
        let expected: Vec<_> = (0..24).chain(8..32).map(|l| (0, l)).collect();
        assert_eq!(sources(&plan), expected);
        let by_s = builtin_plan(
            BuiltinPolicy::Solar,
            &PolicyParams {
                s: Some(48),
                ..Default::default()
            },
            &names,
            &layers,
        )
        .unwrap();
        assert_eq!(by_s, plan);
    }

    #[test]
    fn interleave_and_llama_pro_copy_every_kth_layer() {
        let (names, layers) = one(6);
        let p = PolicyParams {
            every: Some(3),
            ..Default::default()
        };
        let plan = builtin_plan(BuiltinPolicy::Interleave, &p, &names, &layers).unwrap();
        assert_eq!(
            sources(&plan),
            vec![
                (0, 0),
                (0, 1),
                (0, 2),
                (0, 2),
                (0, 3),
                (0, 4),
                (0, 5),
                (0, 5)
            ]
        );
        assert!(plan.layers.iter().all(|l| l.transforms.is_empty()));
        let pro = builtin_plan(BuiltinPolicy::LlamaPro, &p, &names, &layers).unwrap();
        assert_eq!(sources(&pro), sources(&plan));
        let zeroed: Vec<usize> = (0..8)
            .filter(|&i| !pro.layers[i].transforms.is_empty())
            .collect();
        assert_eq!(zeroed, vec![3, 7]);
        assert_eq!(
            pro.layers[3].transforms,
            TensorTransform::output_projections(TransformOp::Zero)
        );
    }

    #[test]
    fn repeat_doubles_and_scale_duplicates_marks_second_occurrences() {
        let (names, layers) = one(3);
        let p = PolicyParams {
            scale_duplicates: Some(0.5),
            ..Default::default()
        };
        let plan = builtin_plan(BuiltinPolicy::Repeat, &p, &names, &layers).unwrap();
        assert_eq!(
            sources(&plan),
            vec![(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2)]
        );
        let scaled: Vec<bool> = plan
            .layers
            .iter()
            .map(|l| !l.transforms.is_empty())
            .collect();
        assert_eq!(scaled, vec![false, false, false, true, true, true]);
    }

    #[test]
    fn slices_take_embeddings_from_the_first_and_head_from_the_last_model() {
        let names = vec!["a".to_string(), "b".to_string()];
        let p = PolicyParams {
            slices: vec![
                SliceSpec {
                    model: Some("b".into()),
                    layers: [0, 2],
                    transforms: vec![],
                },
                SliceSpec {
                    model: Some("a".into()),
                    layers: [1, 3],
                    transforms: vec![],
                },
            ],
            ..Default::default()
        };
        let plan = builtin_plan(BuiltinPolicy::Slices, &p, &names, &[4, 4]).unwrap();
        assert_eq!(sources(&plan), vec![(1, 0), (1, 1), (0, 1), (0, 2)]);
        assert_eq!((plan.embed_model, plan.head_model), (1, 0));
    }

    #[test]
    fn bad_parameters_name_the_policy_and_the_problem() {
        let (names, layers) = one(32);
        let err = |policy, p: PolicyParams| {
            builtin_plan(policy, &p, &names, &layers)
                .unwrap_err()
                .to_string()
        };
        assert!(err(
            BuiltinPolicy::Solar,
            PolicyParams {
                m: Some(40),
                ..Default::default()
            }
        )
        .contains("policy `solar`: m = 40"));
        assert!(err(BuiltinPolicy::Solar, PolicyParams::default()).contains("needs `m`"));
        assert!(err(BuiltinPolicy::Interleave, PolicyParams::default())
            .contains("policy `interleave` needs `every`"));
        let past = PolicyParams {
            slices: vec![SliceSpec {
                model: None,
                layers: [8, 40],
                transforms: vec![],
            }],
            ..Default::default()
        };
        assert!(
            err(BuiltinPolicy::Slices, past).contains("ends past the 32 layers of model `base`")
        );
        let unknown = PolicyParams {
            slices: vec![SliceSpec {
                model: Some("nope".into()),
                layers: [0, 1],
                transforms: vec![],
            }],
            ..Default::default()
        };
        assert!(err(BuiltinPolicy::Slices, unknown).contains("model `nope` is not an input"));
        let two = builtin_plan(
            BuiltinPolicy::Repeat,
            &PolicyParams::default(),
            &["a".into(), "b".into()],
            &[2, 2],
        );
        assert!(two.unwrap_err().to_string().contains("exactly one model"));
    }
}

//! LightGBM's text model (`Booster.save_model("model.txt")`) into a flat [`Forest`].
//!
//! Read from the header: `max_feature_idx`, `num_tree_per_iteration` (the classes of a
//! multiclass model; tree `t` adds to class `t % K`) and `objective`; from each `Tree=` block:
//! `num_leaves`, `num_cat`, `split_feature`, `threshold`, `decision_type`, `left_child`,
//! `right_child` (a negative child `c` is leaf `!c`), `leaf_value`, `is_linear`.
//!
//! Semantics (LightGBM's `Tree::NumericalDecision`): the value as f64; with missing type
//! None a NaN is read as 0.0; with Zero, NaN and zero (|x| ≤ 1e-35) take the default
//! direction (bit 1 of `decision_type`); with NaN, NaN does; otherwise `x <= threshold`
//! goes left. Scores add in f64 from 0, in tree order.
//!
//! One known gap: LightGBM's predictor also reads any |x| <= 1e-35 as exactly 0 before the
//! split (it drops such values from its sparse row), under every missing type; here that
//! happens only where the missing type is Zero. The two differ only for an input in
//! (0, 1e-35] against a threshold in the same range, which LightGBM's binning does not
//! produce (its bins around zero end at ±1e-35 exactly, where both agree).

use super::forest::{Accumulate, Forest, ForestBuilder, Node, lightgbm_threshold};
use super::{Objective, TreeError};

/// Parses the text of a LightGBM model.
pub(crate) fn parse(text: &str) -> Result<(Forest, Objective), TreeError> {
    let mut lines = text.lines().map(str::trim);
    let mut header: Vec<(&str, &str)> = Vec::new();
    let mut blocks: Vec<Vec<(&str, &str)>> = Vec::new();
    for line in &mut lines {
        if line == "end of trees" {
            break;
        }
        if line.starts_with("Tree=") {
            blocks.push(Vec::new());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match blocks.last_mut() {
            Some(block) => block.push((key, value)),
            None => header.push((key, value)),
        }
    }
    let header_value = |key: &str| header.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);

    if header_value("average_output").is_some() {
        return Err(TreeError::Unsupported {
            what: "LightGBM average_output (random forest mode)".to_owned(),
        });
    }
    let max_feature = header_value("max_feature_idx")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| TreeError::Malformed {
            what: "LightGBM model has no max_feature_idx".to_owned(),
        })?;
    let per_iteration = match header_value("num_tree_per_iteration") {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&k| k >= 1)
            .ok_or_else(|| TreeError::Malformed {
                what: format!("num_tree_per_iteration `{v}` is not a count"),
            })?,
        None => 1,
    };
    let objective_text = header_value("objective").ok_or_else(|| TreeError::Unsupported {
        what: "LightGBM model without an objective (a custom objective?)".to_owned(),
    })?;
    let objective = objective(objective_text, per_iteration)?;
    let base = vec![0.0; per_iteration];
    let features = max_feature
        .checked_add(1)
        .ok_or_else(|| TreeError::Malformed {
            what: "max_feature_idx overflows".to_owned(),
        })?;
    let mut builder = ForestBuilder::new(features, base, Accumulate::F64)
        .map_err(|what| TreeError::Malformed { what })?;
    if blocks.is_empty() {
        return Err(TreeError::Malformed {
            what: "LightGBM model has no trees".to_owned(),
        });
    }
    for (t, block) in blocks.iter().enumerate() {
        let nodes = tree_nodes(block, t)?;
        builder
            .push_tree(&nodes, t % per_iteration)
            .map_err(|what| TreeError::Malformed {
                what: format!("Tree={t}: {what}"),
            })?;
    }
    Ok((builder.finish(), objective))
}

/// The `objective=` line: a name and `key:value` parameters.
fn objective(text: &str, per_iteration: usize) -> Result<Objective, TreeError> {
    let mut words = text.split_whitespace();
    let name = words.next().unwrap_or("");
    let params: Vec<(&str, &str)> = words.filter_map(|w| w.split_once(':')).collect();
    let extra: Vec<&str> = text
        .split_whitespace()
        .skip(1)
        .filter(|w| !w.contains(':'))
        .collect();
    let unsupported = |what: String| TreeError::Unsupported { what };
    let param = |key: &str| params.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let objective = match name {
        "binary" => {
            let scale = match param("sigmoid") {
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite())
                    .ok_or_else(|| TreeError::Malformed {
                        what: format!("objective `{text}`: sigmoid is not a number"),
                    })?,
                None => 1.0,
            };
            Objective::Logistic { scale }
        }
        "regression" if extra.is_empty() => Objective::Identity,
        "regression" => {
            return Err(unsupported(format!(
                "LightGBM objective `{text}` (the `{}` transform)",
                extra.join(" ")
            )));
        }
        "multiclass" => Objective::Softmax,
        other => {
            return Err(unsupported(format!(
                "LightGBM objective `{other}` (supported: binary, regression, multiclass)"
            )));
        }
    };
    let classes = matches!(objective, Objective::Softmax);
    if classes != (per_iteration > 1) {
        return Err(TreeError::Malformed {
            what: format!("objective `{text}` with {per_iteration} tree(s) per iteration"),
        });
    }
    Ok(objective)
}

/// One tree's nodes: the splits first (LightGBM's node order), then leaf `k` at
/// `splits + k`.
fn tree_nodes(block: &[(&str, &str)], t: usize) -> Result<Vec<Node>, TreeError> {
    let value = |key: &str| block.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let bad = |what: String| TreeError::Malformed {
        what: format!("Tree={t}: {what}"),
    };
    if value("is_linear").is_some_and(|v| v.trim() != "0") {
        return Err(TreeError::Unsupported {
            what: format!(
                "LightGBM linear tree (Tree={t}, is_linear={})",
                value("is_linear").unwrap_or("")
            ),
        });
    }
    let leaves: usize = value("num_leaves")
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| bad("num_leaves is missing or not a count".to_owned()))?;
    let leaf_values: Vec<f64> = numbers(value("leaf_value"), "leaf_value", t)?;
    if leaf_values.len() != leaves {
        return Err(bad(format!(
            "{} leaf_value for num_leaves={leaves}",
            leaf_values.len()
        )));
    }
    if leaves == 1 {
        return Ok(vec![Node::Leaf(leaf_values[0])]);
    }
    if value("num_cat").is_some_and(|v| v.trim() != "0") {
        let decision: Vec<u64> = numbers(value("decision_type"), "decision_type", t)?;
        let features: Vec<u64> = numbers(value("split_feature"), "split_feature", t)?;
        let at = decision.iter().position(|d| d & 1 != 0).unwrap_or(0);
        return Err(TreeError::Unsupported {
            what: format!(
                "categorical split on feature {} (Tree={t})",
                features.get(at).copied().unwrap_or(0)
            ),
        });
    }
    let splits = leaves - 1;
    let feature: Vec<u32> = numbers(value("split_feature"), "split_feature", t)?;
    let threshold: Vec<f64> = numbers(value("threshold"), "threshold", t)?;
    let decision: Vec<u8> = numbers(value("decision_type"), "decision_type", t)?;
    let left: Vec<i64> = numbers(value("left_child"), "left_child", t)?;
    let right: Vec<i64> = numbers(value("right_child"), "right_child", t)?;
    for (name, len) in [
        ("split_feature", feature.len()),
        ("threshold", threshold.len()),
        ("decision_type", decision.len()),
        ("left_child", left.len()),
        ("right_child", right.len()),
    ] {
        if len != splits {
            return Err(bad(format!("{len} {name} for num_leaves={leaves}")));
        }
    }
    let child = |c: i64| -> Result<usize, TreeError> {
        let index = if c < 0 {
            usize::try_from(!c).ok().map(|leaf| splits + leaf)
        } else {
            usize::try_from(c).ok()
        };
        index
            .filter(|&i| i < splits + leaves)
            .ok_or_else(|| bad(format!("child {c} is out of range")))
    };
    let mut nodes = Vec::with_capacity(splits + leaves);
    for i in 0..splits {
        let d = decision[i];
        if d & 1 != 0 {
            return Err(TreeError::Unsupported {
                what: format!("categorical split on feature {} (Tree={t})", feature[i]),
            });
        }
        let default_left = d & 2 != 0;
        let t64 = threshold[i];
        let (default_left, zero_missing) = match (d >> 2) & 3 {
            // None: NaN is read as 0.0, so it goes where 0.0 goes.
            0 => (0.0 <= t64, false),
            1 => (default_left, true),
            2 => (default_left, false),
            other => return Err(bad(format!("node {i}: missing type {other}"))),
        };
        nodes.push(Node::Split {
            feature: feature[i],
            threshold: lightgbm_threshold(t64),
            default_left,
            zero_missing,
            left: child(left[i])?,
            right: child(right[i])?,
        });
    }
    nodes.extend(leaf_values.into_iter().map(Node::Leaf));
    Ok(nodes)
}

/// A space-separated list of numbers.
fn numbers<T: std::str::FromStr>(
    text: Option<&str>,
    key: &str,
    t: usize,
) -> Result<Vec<T>, TreeError> {
    let text = text.ok_or_else(|| TreeError::Malformed {
        what: format!("Tree={t}: no {key}"),
    })?;
    text.split_whitespace()
        .map(|w| {
            w.parse::<T>().map_err(|_| TreeError::Malformed {
                what: format!("Tree={t}: {key} has `{w}`, not a number"),
            })
        })
        .collect()
}

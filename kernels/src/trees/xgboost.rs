//! XGBoost's JSON model (`Booster.save_model("model.json")`) into a flat [`Forest`].
//!
//! Read: `learner.objective.name`, `learner.learner_model_param` (`base_score`, a number or,
//! from XGBoost 3, a list with one per class; `num_class`, `num_feature`, `num_target`) and
//! `learner.gradient_booster` (`gbtree`): its trees' `left_children`, `right_children`,
//! `split_indices`, `split_conditions` (the leaf value at a leaf), `default_left`,
//! `split_type`, and `tree_info` (each tree's class).
//!
//! Semantics (XGBoost's CPU predictor): `x < split_condition` on f32 goes left, NaN takes
//! `default_left`; the margin starts at the base score (for `binary:logistic` stored as a
//! probability, so its logit) and adds each tree's leaf in f32, in tree order.

use serde_json::Value;

use super::forest::{Accumulate, Forest, ForestBuilder, Node, xgboost_threshold};
use super::{Objective, TreeError};

/// Parses the JSON text of an XGBoost model.
pub(crate) fn parse(bytes: &[u8]) -> Result<(Forest, Objective), TreeError> {
    let json: Value = serde_json::from_slice(bytes).map_err(|e| TreeError::Malformed {
        what: format!("XGBoost JSON: {e} (UBJSON, from save_model(\"model.ubj\"), is not read)"),
    })?;
    let learner = field(&json, "learner")?;
    let objective_name = str_field(field(learner, "objective")?, "name", "learner.objective")?;
    let objective = match objective_name {
        "binary:logistic" => Objective::Logistic { scale: 1.0 },
        "reg:squarederror" | "reg:linear" => Objective::Identity,
        "multi:softprob" | "multi:softmax" => Objective::Softmax,
        other => {
            return Err(TreeError::Unsupported {
                what: format!(
                    "XGBoost objective `{other}` (supported: binary:logistic, reg:squarederror, \
                     multi:softprob, multi:softmax)"
                ),
            });
        }
    };
    let params = field(learner, "learner_model_param")?;
    let at = "learner.learner_model_param";
    let features = number_param(params, "num_feature", at)?;
    let classes = match params.get("num_class") {
        Some(_) => number_param(params, "num_class", at)?,
        None => 0,
    };
    if let Some(targets) = params.get("num_target") {
        let targets = number_text(targets, &format!("{at}.num_target"))?;
        if targets > 1 {
            return Err(TreeError::Unsupported {
                what: format!("XGBoost multi-target model ({targets} targets)"),
            });
        }
    }
    let groups = match objective {
        Objective::Softmax if classes < 2 => {
            return Err(TreeError::Malformed {
                what: format!("{objective_name} with num_class {classes}"),
            });
        }
        Objective::Softmax => classes,
        _ => 1,
    };
    let base_text = str_field(params, "base_score", at)?;
    let mut base = parse_base_score(base_text)?;
    if base.len() == 1 && groups > 1 {
        base = vec![base[0]; groups];
    }
    if base.len() != groups {
        return Err(TreeError::Malformed {
            what: format!("base_score {base_text} for {groups} output(s)"),
        });
    }
    if let Objective::Logistic { .. } = objective {
        // Stored as a probability; the margin starts at its logit, computed as XGBoost does
        // (in f32: -ln(1/p - 1)).
        let p = base[0] as f32;
        if !(p > 0.0 && p < 1.0) {
            return Err(TreeError::Malformed {
                what: format!("binary:logistic base_score {p} is not in (0, 1)"),
            });
        }
        base[0] = f64::from(-(1.0f32 / p - 1.0).ln());
    }

    let booster = field(learner, "gradient_booster")?;
    let booster_name = str_field(booster, "name", "learner.gradient_booster")?;
    if booster_name != "gbtree" {
        return Err(TreeError::Unsupported {
            what: format!("XGBoost booster `{booster_name}` (supported: gbtree)"),
        });
    }
    let model = field(booster, "model")?;
    let trees = array(model, "trees", "gradient_booster.model")?;
    let tree_info = array(model, "tree_info", "gradient_booster.model")?;
    if tree_info.len() != trees.len() {
        return Err(TreeError::Malformed {
            what: format!(
                "{} trees but {} entries in tree_info",
                trees.len(),
                tree_info.len()
            ),
        });
    }
    let mut builder = ForestBuilder::new(features, base, Accumulate::F32)
        .map_err(|what| TreeError::Malformed { what })?;
    for (t, (tree, group)) in trees.iter().zip(tree_info).enumerate() {
        let group = group
            .as_u64()
            .and_then(|g| usize::try_from(g).ok())
            .ok_or_else(|| TreeError::Malformed {
                what: format!("tree_info[{t}] is not a class index"),
            })?;
        let nodes = tree_nodes(tree, t)?;
        builder
            .push_tree(&nodes, group)
            .map_err(|what| TreeError::Malformed {
                what: format!("tree {t}: {what}"),
            })?;
    }
    Ok((builder.finish(), objective))
}

/// One tree's nodes, by XGBoost's node id.
fn tree_nodes(tree: &Value, t: usize) -> Result<Vec<Node>, TreeError> {
    let at = format!("trees[{t}]");
    if let Some(size) = tree
        .get("tree_param")
        .and_then(|p| p.get("size_leaf_vector"))
    {
        let size = number_text(size, &format!("{at}.tree_param.size_leaf_vector"))?;
        if size > 1 {
            return Err(TreeError::Unsupported {
                what: format!("vector leaves (size_leaf_vector {size}) in tree {t}"),
            });
        }
    }
    let left = array(tree, "left_children", &at)?;
    let right = array(tree, "right_children", &at)?;
    let feature = array(tree, "split_indices", &at)?;
    let condition = array(tree, "split_conditions", &at)?;
    let default_left = array(tree, "default_left", &at)?;
    let n = left.len();
    for (name, a) in [
        ("right_children", right),
        ("split_indices", feature),
        ("split_conditions", condition),
        ("default_left", default_left),
    ] {
        if a.len() != n {
            return Err(TreeError::Malformed {
                what: format!("{at}: {n} left_children but {} {name}", a.len()),
            });
        }
    }
    let types = tree.get("split_type").and_then(Value::as_array);
    if let Some(i) = types.and_then(|types| types.iter().position(|v| v.as_u64() != Some(0))) {
        let feature = feature.get(i).and_then(Value::as_u64).unwrap_or(0);
        return Err(TreeError::Unsupported {
            what: format!("categorical split on feature {feature} (tree {t}, node {i})"),
        });
    }
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let bad = |what: &str| TreeError::Malformed {
            what: format!("{at} node {i}: {what}"),
        };
        let value = condition[i]
            .as_f64()
            .ok_or_else(|| bad("split_conditions is not a number"))?;
        let l = left[i]
            .as_i64()
            .ok_or_else(|| bad("left child is not an integer"))?;
        if l == -1 {
            // Leaf values are f32 in XGBoost; the JSON holds them in shortest f32 form.
            nodes.push(Node::Leaf(f64::from(value as f32)));
            continue;
        }
        let r = right[i]
            .as_i64()
            .ok_or_else(|| bad("right child is not an integer"))?;
        let child = |c: i64| usize::try_from(c).map_err(|_| bad("negative child"));
        let f = feature[i]
            .as_u64()
            .and_then(|f| u32::try_from(f).ok())
            .ok_or_else(|| bad("split_indices is not a feature index"))?;
        let dl = match &default_left[i] {
            Value::Bool(b) => *b,
            v => {
                v.as_u64()
                    .ok_or_else(|| bad("default_left is not 0 or 1"))?
                    != 0
            }
        };
        nodes.push(Node::Split {
            feature: f,
            threshold: xgboost_threshold(value as f32),
            default_left: dl,
            zero_missing: false,
            left: child(l)?,
            right: child(r)?,
        });
    }
    Ok(nodes)
}

/// `"5E-1"` or, from XGBoost 3, `"[1.04E-1,4.7E-1]"`.
fn parse_base_score(text: &str) -> Result<Vec<f64>, TreeError> {
    let bad = || TreeError::Malformed {
        what: format!("base_score `{text}` is not a number or a list of numbers"),
    };
    let inner = text.trim();
    let inner = match inner.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or_else(bad)?,
        None => inner,
    };
    inner
        .split(',')
        .map(|v| v.trim().parse::<f32>().map(f64::from).map_err(|_| bad()))
        .collect()
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value, TreeError> {
    v.get(name).ok_or_else(|| TreeError::Malformed {
        what: format!("XGBoost JSON has no `{name}`"),
    })
}

fn str_field<'a>(v: &'a Value, name: &str, at: &str) -> Result<&'a str, TreeError> {
    v.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| TreeError::Malformed {
            what: format!("{at}.{name} is missing or not a string"),
        })
}

fn array<'a>(v: &'a Value, name: &str, at: &str) -> Result<&'a Vec<Value>, TreeError> {
    v.get(name)
        .and_then(Value::as_array)
        .ok_or_else(|| TreeError::Malformed {
            what: format!("{at}.{name} is missing or not a list"),
        })
}

/// A count that XGBoost writes as a string (`"12"`), or a plain number.
fn number_text(v: &Value, at: &str) -> Result<usize, TreeError> {
    let n = match v {
        Value::String(s) => s.trim().parse::<usize>().ok(),
        v => v.as_u64().and_then(|n| usize::try_from(n).ok()),
    };
    n.ok_or_else(|| TreeError::Malformed {
        what: format!("{at} is not a count"),
    })
}

fn number_param(params: &Value, name: &str, at: &str) -> Result<usize, TreeError> {
    let v = params.get(name).ok_or_else(|| TreeError::Malformed {
        what: format!("{at}.{name} is missing"),
    })?;
    number_text(v, &format!("{at}.{name}"))
}

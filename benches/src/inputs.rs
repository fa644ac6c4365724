//! What the harness sends: a pool of distinct requests, built once before the
//! first step, that every target encodes into its own wire form.
//!
//! Two kinds: FP32 tensors of a fixed shape (for `identity` and MLP models,
//! input `INPUT0` by default) and texts in a BYTES tensor of shape `[1]`
//! (for embedding models, input `text` by default), read from a file or
//! drawn from a built-in corpus with a chosen length distribution. Values are
//! drawn from a seeded generator, so a run can be repeated.

use std::collections::HashMap;
use std::str::FromStr;

use quiver_gateway::proto::InferParameter;
use quiver_gateway::request::params;
use quiver_gateway::tensor::int_param;
use quiver_kernels::{HostTensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why the inputs cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InputsError {
    #[error("bad shape '{0}': give comma-separated positive integers, e.g. 1,16")]
    BadShape(String),
    #[error(
        "bad length distribution '{0}': give N, fixed:N or uniform:A-B (or uniform:A:B; words, 1 <= A <= B)"
    )]
    BadLength(String),
    #[error("cannot read texts from {path}: {source}")]
    ReadTexts {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} holds no non-empty line")]
    NoTexts(String),
    #[error("tensor: {0}")]
    Tensor(#[from] quiver_kernels::InputError),
}

/// A tensor shape parsed from `1,16`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl FromStr for Shape {
    type Err = InputsError;
    fn from_str(s: &str) -> Result<Self, InputsError> {
        let dims = s
            .split(',')
            .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
            .collect::<Option<Vec<_>>>()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| InputsError::BadShape(s.into()))?;
        Ok(Shape(dims))
    }
}

/// How many words each generated text has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthDist {
    /// Always `n` words.
    Fixed(usize),
    /// Uniform in `[a, b]` words.
    Uniform(usize, usize),
}

impl FromStr for LengthDist {
    type Err = InputsError;
    fn from_str(s: &str) -> Result<Self, InputsError> {
        let bad = || InputsError::BadLength(s.into());
        let positive = |t: &str| t.trim().parse::<usize>().ok().filter(|&n| n > 0);
        if let Some(rest) = s.strip_prefix("uniform:") {
            let (a, b) = rest
                .split_once('-')
                .or_else(|| rest.split_once(':'))
                .ok_or_else(bad)?;
            let (a, b) = (positive(a).ok_or_else(bad)?, positive(b).ok_or_else(bad)?);
            if a > b {
                return Err(bad());
            }
            return Ok(LengthDist::Uniform(a, b));
        }
        let n = s.strip_prefix("fixed:").unwrap_or(s);
        Ok(LengthDist::Fixed(positive(n).ok_or_else(bad)?))
    }
}

impl LengthDist {
    fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform(a, b) => rng.random_range(a..=b),
        }
    }
}

/// The built-in corpus: common English words, so a tokenizer sees realistic
/// sub-word counts (about 1.3 tokens a word).
const CORPUS: &[&str] = &[
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "inference",
    "gateway",
    "request",
    "latency",
    "batch",
    "model",
    "server",
    "network",
    "deadline",
    "queue",
    "device",
    "embedding",
    "sentence",
    "search",
    "query",
    "document",
    "answer",
    "question",
    "river",
    "mountain",
    "city",
    "weather",
    "market",
    "price",
    "energy",
    "science",
    "history",
    "music",
    "language",
    "computer",
    "memory",
    "window",
    "garden",
    "morning",
    "evening",
    "travel",
    "station",
    "library",
    "student",
    "teacher",
    "doctor",
    "kitchen",
    "coffee",
    "bread",
    "water",
    "summer",
    "winter",
    "yellow",
    "green",
    "simple",
    "important",
    "different",
    "possible",
    "because",
    "between",
    "through",
    "without",
    "another",
    "people",
    "little",
    "small",
    "large",
];

/// Texts of `count` sentences drawn from the built-in corpus.
pub fn corpus_texts(lengths: LengthDist, count: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let n = lengths.draw(&mut rng);
            (0..n)
                .map(|_| CORPUS[rng.random_range(0..CORPUS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The non-empty lines of a file.
pub fn file_texts(path: &std::path::Path) -> Result<Vec<String>, InputsError> {
    let text = std::fs::read_to_string(path).map_err(|source| InputsError::ReadTexts {
        path: path.display().to_string(),
        source,
    })?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        return Err(InputsError::NoTexts(path.display().to_string()));
    }
    Ok(lines)
}

/// One request's worth of content, before any wire encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Payload {
    pub id: String,
    pub inputs: Vec<HostTensor>,
}

/// The requests a run cycles through (request `i` uses `pool[i % len]`), and
/// the schedule-policy parameters every one of them carries.
#[derive(Clone, Debug)]
pub struct RequestPool {
    pub model: String,
    pub payloads: Vec<Payload>,
    pub parameters: HashMap<String, InferParameter>,
}

/// Triton's schedule-policy parameters: `timeout` (µs) and `priority`.
pub fn policy_parameters(
    timeout_us: Option<u64>,
    priority: Option<u32>,
) -> HashMap<String, InferParameter> {
    let mut p = HashMap::new();
    if let Some(us) = timeout_us {
        p.insert(
            params::TIMEOUT.into(),
            int_param(i64::try_from(us).unwrap_or(i64::MAX)),
        );
    }
    if let Some(pr) = priority {
        p.insert(params::PRIORITY.into(), int_param(i64::from(pr)));
    }
    p
}

/// `count` FP32 tensors named `name` of `shape`, values uniform in [-1, 1).
pub fn tensor_payloads(
    name: &str,
    shape: &Shape,
    count: usize,
    seed: u64,
) -> Result<Vec<Payload>, InputsError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let elements: usize = shape.0.iter().product();
    (0..count)
        .map(|i| {
            let data: Vec<f32> = (0..elements)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            Ok(Payload {
                id: i.to_string(),
                inputs: vec![HostTensor::new(
                    name,
                    shape.0.clone(),
                    TensorData::F32(data),
                )?],
            })
        })
        .collect()
}

/// One BYTES tensor of shape `[1]` named `name` per text.
pub fn text_payloads(name: &str, texts: &[String]) -> Result<Vec<Payload>, InputsError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(Payload {
                id: i.to_string(),
                inputs: vec![HostTensor::new(
                    name,
                    vec![1],
                    TensorData::Bytes(vec![t.as_bytes().to_vec()]),
                )?],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shapes_and_lengths_parse_or_are_refused() {
        assert_eq!("1,16".parse::<Shape>().unwrap(), Shape(vec![1, 16]));
        assert!("1,0".parse::<Shape>().is_err());
        assert!("".parse::<Shape>().is_err());
        assert_eq!("32".parse::<LengthDist>().unwrap(), LengthDist::Fixed(32));
        assert_eq!(
            "uniform:8-64".parse::<LengthDist>().unwrap(),
            LengthDist::Uniform(8, 64)
        );
        assert_eq!(
            "uniform:8:256".parse::<LengthDist>().unwrap(),
            LengthDist::Uniform(8, 256)
        );
        assert!("uniform:9-3".parse::<LengthDist>().is_err());
        assert!("uniform:9".parse::<LengthDist>().is_err());
        assert!("fixed:0".parse::<LengthDist>().is_err());
    }

    #[test]
    fn corpus_texts_follow_the_length_distribution_and_the_seed() {
        let a = corpus_texts(LengthDist::Uniform(3, 5), 200, 1);
        assert_eq!(a, corpus_texts(LengthDist::Uniform(3, 5), 200, 1));
        let words: Vec<usize> = a.iter().map(|t| t.split(' ').count()).collect();
        assert!(words.iter().all(|n| (3..=5).contains(n)));
        assert!(words.contains(&3) && words.contains(&5));
        let fixed = corpus_texts(LengthDist::Fixed(7), 10, 1);
        assert!(fixed.iter().all(|t| t.split(' ').count() == 7));
    }

    #[test]
    fn tensor_payloads_have_the_shape_and_distinct_values() {
        let p = tensor_payloads("INPUT0", &Shape(vec![2, 3]), 4, 9).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].inputs[0].shape, vec![2, 3]);
        assert_eq!(p[0].inputs[0].len(), 6);
        assert_ne!(p[0].inputs[0], p[1].inputs[0]);
    }

    #[test]
    fn policy_parameters_carry_timeout_and_priority() {
        let p = policy_parameters(Some(5000), Some(1));
        assert_eq!(p.len(), 2);
        assert!(policy_parameters(None, None).is_empty());
    }
}
